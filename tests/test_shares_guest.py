"""Shares with a real guest (the tiny one, with rsync and the 9p modules): live 9p shares
read-write and read-only, copied folders by rsync and by tar, PART-sync both ways, symlinks that
point outside HOSTDIR, and the shares after suspend/resume and a snapshot restore.

One boot serves every check, in sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DoitRun, Project
from tests.httpserver import FileServer
from tests.test_vm_e2e import script
from tests.vmfixtures import Guest, free_port, needs_qemu

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]


def in_guest(project: Project, shell: str) -> subprocess.CompletedProcess[str]:
    return script(project, "vm-runscript", shell, timeout=120)


def guest_text(project: Project, path: str) -> str:
    read = in_guest(project, f"cat {path}")
    assert read.returncode == 0, read.stderr
    return read.stdout


def listing(project: Project, folder: str) -> list[str]:
    """Every name under the guest's folder, sorted, as find prints them (``.`` first)."""
    found = in_guest(project, f"cd {folder} && find . | sort")
    assert found.returncode == 0, found.stderr
    return found.stdout.split()


def carried(project: Project) -> dict[str, str | None]:
    status = json.loads(script(project, "vm-ctl", "status", "--json").stdout)
    return {share["guest"]: share["carried_by"] for share in status["shares"]}


def sync(project: Project, *args: str) -> str:
    done = script(project, "vm-sync", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def tiny_part(guest: Guest, http_server: FileServer, *shares: str) -> str:
    """The part vm on the tiny guest, carrying these share lines."""
    url = http_server.put("guest.img.gz", guest.gzipped())
    return (f"[vm]\nimage = {url}\nssh_port = {free_port()}\nssh_key_path = {guest.key}\n"
            "kvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 120\nkvm_shutdown_timeout = 3\n"
            "share =\n" + "".join(f"  {line}\n" for line in shares))


def start(project: Project, config: str) -> DoitRun:
    project.write(config)
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    return started


def outside_folder(tmp_path: Path) -> Path:
    """A host folder beside the shares, with a secret a share's link points at."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret\n")
    return outside


def assert_the_link_stays_in_the_guest(project: Project, link: str, outside: Path) -> None:
    """A host link in HOSTDIR to outside it: the guest resolves it in its own tree, so it reads
    nothing and writes nothing there."""
    assert in_guest(project, f"cat {link}/secret.txt").returncode != 0
    assert in_guest(project, f"echo x > {link}/planted").returncode != 0
    assert not (outside / "planted").exists()


def test_live_and_copied_shares_through_one_boot(
    project: Project, guest_with_shares: Guest, http_server: FileServer, tmp_path: Path
) -> None:
    outside = outside_folder(tmp_path)
    live, readonly, copy = tmp_path / "live", tmp_path / "ro", tmp_path / "copy"
    for folder in (live, readonly, copy / "sub", copy / "cache"):
        folder.mkdir(parents=True)
    (live / "hello.txt").write_text("hello\n")
    (live / "escape").symlink_to(outside)
    (readonly / "fixed.txt").write_text("fixed\n")
    (copy / "a.txt").write_text("a1\n")
    (copy / "gone.txt").write_text("soon gone\n")
    (copy / "sub" / "b.txt").write_text("b\n")
    (copy / "main.o").write_text("object\n")
    (copy / "cache" / "big").write_text("cached\n")
    (copy / "inside").symlink_to("sub/b.txt")
    (copy / "escape").symlink_to(outside)
    (copy / "climb").symlink_to("../outside/secret.txt")
    start(project, tiny_part(guest_with_shares, http_server, f"{live} /srv/live", f"{readonly} /srv/ro ro 9p",
                             f"{copy} /srv/copy rsync exclude=*.o exclude=cache/"))
    assert carried(project) == {"/srv/live": "9p", "/srv/ro": "9p", "/srv/copy": "rsync"}
    status = script(project, "vm-ctl", "status").stdout
    assert f"  share {live} -> /srv/live (read-write, auto: 9p)" in status

    # Live: the host's change is there with no command run; the guest's write is on the host,
    # owned by the user running QEMU (mapped-xattr), with the guest's own view kept in xattrs.
    assert guest_text(project, "/srv/live/hello.txt") == "hello\n"
    (live / "new.txt").write_text("written on the host\n")
    assert guest_text(project, "/srv/live/new.txt") == "written on the host\n"
    made = in_guest(project, "echo from the guest > /srv/live/guest.txt && chmod 640 /srv/live/guest.txt"
                             " && chown 1234:5678 /srv/live/guest.txt"
                             " && stat -c '%u %g %a' /srv/live/guest.txt")
    assert (made.returncode, made.stdout) == (0, "1234 5678 640\n"), made.stderr
    written = (live / "guest.txt").stat()
    assert (live / "guest.txt").read_text() == "from the guest\n"
    assert (written.st_uid, written.st_gid) == (os.getuid(), os.getgid())
    assert os.getxattr(live / "guest.txt", "user.virtfs.uid") == (1234).to_bytes(4, "little")
    assert written.st_mode & 0o777 == 0o600  # QEMU's file mode for mapped files: the owner's only
    # A normal user in the guest: writes where the guest's ownership lets it (a folder chowned to
    # it in the guest), not into the host's folders, which the guest sees as their host owner's.
    as_user = in_guest(project, "echo 'dev:x:1000:1000::/tmp:/bin/sh' >> /etc/passwd"
                                " && mkdir /srv/live/devdir && chown 1000:1000 /srv/live/devdir"
                                " && su -s /bin/sh dev -c 'echo mine > /srv/live/devdir/u.txt"
                                " && stat -c \"%u %g %a\" /srv/live/devdir/u.txt'")
    assert (as_user.returncode, as_user.stdout) == (0, "1000 1000 644\n"), as_user.stderr
    assert in_guest(project, "su -s /bin/sh dev -c 'touch /srv/live/not-mine'").returncode != 0
    by_user = (live / "devdir" / "u.txt").stat()
    assert (by_user.st_uid, by_user.st_mode & 0o777) == (os.getuid(), 0o600)
    assert (live / "devdir").stat().st_mode & 0o777 == 0o700
    assert os.getxattr(live / "devdir" / "u.txt", "user.virtfs.uid") == (1000).to_bytes(4, "little")

    # Nothing through the share reaches outside HOSTDIR: the host's link resolves in the guest's
    # own tree; the guest's link and device node are plain files on the host.
    assert_the_link_stays_in_the_guest(project, "/srv/live/escape", outside)
    assert in_guest(project, "ln -s /etc /srv/live/link && mknod /srv/live/null c 1 3").returncode == 0
    assert not (live / "link").is_symlink() and (live / "link").is_file()
    assert (live / "null").is_file()

    # Read-only: refused in the guest, even after a remount read-write.
    assert guest_text(project, "/srv/ro/fixed.txt") == "fixed\n"
    assert in_guest(project, "touch /srv/ro/new").returncode != 0
    in_guest(project, "mount -o remount,rw /srv/ro")
    assert in_guest(project, "touch /srv/ro/new").returncode != 0
    assert sorted(p.name for p in readonly.iterdir()) == ["fixed.txt"]

    # The copy: excludes left out, the link inside kept, the links out of HOSTDIR left out.
    assert listing(project, "/srv/copy") == [".", "./a.txt", "./gone.txt", "./inside", "./sub", "./sub/b.txt"]
    assert guest_text(project, "/srv/copy/inside") == "b\n"
    # PART-sync: a change, a deletion, a new file; the guest's excluded file stays.
    in_guest(project, "echo guest build > /srv/copy/guest.o")
    (copy / "a.txt").write_text("a2\n")
    (copy / "gone.txt").unlink()
    (copy / "sub" / "c.txt").write_text("c\n")
    began = time.monotonic()
    assert "(rsync)" in sync(project)
    print(f"PART-sync after a small change: {time.monotonic() - began:.2f} s")
    assert listing(project, "/srv/copy") == [".", "./a.txt", "./guest.o", "./inside", "./sub", "./sub/b.txt",
                                             "./sub/c.txt"]
    assert guest_text(project, "/srv/copy/a.txt") == "a2\n"
    # --pull: the guest's work comes back; a link it made out of the folder does not.
    in_guest(project, "echo result > /srv/copy/result.txt && rm /srv/copy/sub/c.txt"
                      " && ln -s /etc/passwd /srv/copy/evil")
    assert "(rsync)" in sync(project, "--pull")
    assert (copy / "result.txt").read_text() == "result\n"
    assert not (copy / "sub" / "c.txt").exists() and not (copy / "evil").exists()
    assert (copy / "main.o").exists() and (copy / "escape").is_symlink()  # excluded, unsafe: kept

    # A guest without rsync gets the same copy through tar over the same connection.
    assert in_guest(project, "mv /usr/bin/rsync /usr/bin/rsync.off").returncode == 0
    (copy / "a.txt").write_text("a3\n")
    (copy / "result.txt").unlink()
    assert "(tar)" in sync(project)
    assert listing(project, "/srv/copy") == [".", "./a.txt", "./guest.o", "./inside", "./sub", "./sub/b.txt"]
    assert guest_text(project, "/srv/copy/a.txt") == "a3\n"
    in_guest(project, "echo tar back > /srv/copy/tarback.txt && rm /srv/copy/sub/b.txt"
                      " && ln -s /etc/passwd /srv/copy/evil && ln -s ../../x /srv/copy/sub/up")
    assert "(tar)" in sync(project, "--pull")
    assert (copy / "tarback.txt").read_text() == "tar back\n"
    assert not (copy / "sub" / "b.txt").exists() and not (copy / "evil").is_symlink()
    assert not (copy / "sub" / "up").is_symlink()
    assert (copy / "main.o").exists() and (copy / "escape").is_symlink()
    assert (outside / "secret.txt").read_text() == "host secret\n"
    assert in_guest(project, "mv /usr/bin/rsync.off /usr/bin/rsync").returncode == 0

    # Suspend and resume: the mount goes down for the save and comes back.
    assert script(project, "vm-ctl", "suspend").returncode == 0
    (live / "while-suspended.txt").write_text("later\n")
    resumed = script(project, "vm-ctl", "start")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stdout + resumed.stderr
    assert guest_text(project, "/srv/live/while-suspended.txt") == "later\n"
    # A snapshot saved with the share mounted, restored: mounted again.
    saved = script(project, "vm-ctl", "snapshot", "save", "one")
    assert saved.returncode == 0, saved.stderr
    assert guest_text(project, "/srv/live/hello.txt") == "hello\n"
    (live / "after-snapshot.txt").write_text("after\n")
    restored = script(project, "vm-ctl", "snapshot", "restore", "one")
    assert restored.returncode == 0, restored.stderr
    assert guest_text(project, "/srv/live/after-snapshot.txt") == "after\n"
    assert carried(project)["/srv/live"] == "9p"

    assert script(project, "vm-ctl", "stop").returncode == 0


def virtiofsd_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"virtiofsd" in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_virtiofs_share_lives_and_ends_with_its_vm(
    project: Project, guest_with_shares: Guest, http_server: FileServer, tmp_path: Path
) -> None:
    outside = outside_folder(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("hello\n")
    (shared / "escape").symlink_to(outside)
    before = set(virtiofsd_pids())
    config = tiny_part(guest_with_shares, http_server, f"{shared} /srv/fs virtiofs")
    # QEMU refuses to start: the daemon started for it does not outlive the failure.
    project.write(config + "kvm_extra_args = -no-such-option\n")
    failed = project.run("start:vm", timeout=300)
    assert failed.returncode != 0
    assert set(virtiofsd_pids()) == before

    start(project, config)
    assert set(virtiofsd_pids()) - before  # its sandbox is a child process of its own
    assert carried(project) == {"/srv/fs": "virtiofs"}
    assert guest_text(project, "/srv/fs/hello.txt") == "hello\n"
    (shared / "new.txt").write_text("from the host\n")
    assert guest_text(project, "/srv/fs/new.txt") == "from the host\n"
    assert in_guest(project, "echo back > /srv/fs/back.txt").returncode == 0
    assert (shared / "back.txt").read_text() == "back\n"
    assert_the_link_stays_in_the_guest(project, "/srv/fs/escape", outside)
    refused = script(project, "vm-ctl", "suspend")
    assert refused.returncode == 1 and "carried by virtiofs" in refused.stderr, refused.stderr
    assert guest_text(project, "/srv/fs/hello.txt") == "hello\n"

    assert script(project, "vm-ctl", "stop").returncode == 0
    assert set(virtiofsd_pids()) == before


def test_auto_copies_a_share_the_guest_cannot_mount(
    project: Project, guest_with_rsync: Guest, http_server: FileServer, tmp_path: Path
) -> None:
    """The tiny guest built without the 9p modules: auto says so and copies the folder instead."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("a\n")

    started = start(project, tiny_part(guest_with_rsync, http_server, f"{source} /srv/src"))
    assert "vm: share /srv/src: the guest cannot mount 9p" in started.stdout
    assert "copying it instead" in started.stdout
    assert carried(project) == {"/srv/src": "rsync"}
    assert guest_text(project, "/srv/src/a.txt") == "a\n"
    (source / "a.txt").write_text("a2\n")
    assert "(rsync)" in sync(project)
    assert guest_text(project, "/srv/src/a.txt") == "a2\n"
    assert script(project, "vm-ctl", "stop").returncode == 0
