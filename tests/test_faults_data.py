"""Faults where what the user had is at stake: the guest's disk and snapshots, a cached image,
a local file fetched from the guest, input files without an end.

Real doit runs over the suite's HTTP server, real qemu-img and qemu-io, real guests under TCG.
Each test names the files that must come through intact (``reliability.keep``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmtasks.provision.cache import Entry
from tests.conftest import Project
from tests.test_provision_pipeline import assert_ok, assert_one_line_error
from tests.test_vm_e2e import script, vm_config
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

if TYPE_CHECKING:
    from tests.httpserver import FileServer
    from tests.reliability import Recorder

MIB = 1 << 20
RAW = os.urandom(MIB) + bytes(3 * MIB)
PACKED = gzip.compress(RAW, compresslevel=1)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached_project(root: Path, cache: Path, url: str) -> Project:
    root.mkdir()
    project = Project(root)
    project.buildout["download-cache"] = str(cache)
    project.write(f"[vm]\nimage = {url}\ngzip = true\noverlay = true\n"
                  f"sha256_image = {sha256(RAW)}\n")
    return project


def overlay(project: Project) -> Path:
    return project.parts / "vm" / "vm.overlay.qcow2"


def guest_write_and_snapshot(disk: Path) -> None:
    """What a guest's write and `PART-ctl snapshot save keep1` leave in the overlay."""
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 65536", str(disk)],
                   capture_output=True, check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "keep1", str(disk)], capture_output=True, check=True)


def snapshots(disk: Path) -> str:
    return subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(disk)], capture_output=True,
                          text=True, check=True).stdout


def touch(path: Path) -> None:
    """A new mtime, the same bytes (what `touch` does)."""
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 5_000_000_000))


def flip_byte(path: Path, offset: int) -> None:
    """One byte changed in place (the cache's files are read-only; root writes them anyway)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def two_projects_on_one_cache(tmp_path: Path, http_server: FileServer) -> tuple[Project, Project, Entry]:
    url = http_server.put("disk.img.gz", PACKED)
    cache = tmp_path / "cache"
    first, second = (cached_project(tmp_path / name, cache, url) for name in ("first", "second"))
    for project in (first, second):
        assert_ok(project.provision())
        guest_write_and_snapshot(overlay(project))
    return first, second, Entry(cache, url)


# -- 1. the overlay and its snapshots outlive a decompress run again --------------------------

def test_a_touched_download_keeps_the_overlay_and_its_snapshots_in_every_project(
    tmp_path: Path, http_server: FileServer, reliability: Recorder
) -> None:
    first, second, entry = two_projects_on_one_cache(tmp_path, http_server)
    reliability.fault("reprovision")
    reliability.keep(overlay(first), overlay(second))
    # The download is a hard link of the cache's file and of the other project's download.
    touch(first.parts / "vm" / "disk.img.gz")
    assert (second.parts / "vm" / "disk.img.gz").samefile(entry.data)

    for project in (first, second):
        again = project.provision()
        assert_ok(again)
        assert "overlay:vm" not in again.executed, again.describe()
        assert "discarding" not in again.output, again.describe()
        assert "keep1" in snapshots(overlay(project))
        # And the next run has nothing to do.
        assert project.provision().ran() & {"decompress", "overlay"} == set()
    assert reliability.lost() == 0


def test_a_cache_entry_fetched_again_with_the_same_bytes_keeps_the_overlay(
    tmp_path: Path, http_server: FileServer, reliability: Recorder
) -> None:
    first, second, entry = two_projects_on_one_cache(tmp_path, http_server)
    reliability.fault("reprovision")
    reliability.keep(overlay(first), overlay(second))
    # The cache emptied (a user clearing it) and the part's download gone: fetched again, a
    # new file of the same bytes, and the image made again from it.
    for path in entry.folder.iterdir():
        path.unlink()
    (first.parts / "vm" / "disk.img.gz").unlink()
    again = first.provision()
    assert_ok(again)
    assert "download:vm" in again.executed
    assert "overlay:vm" not in again.executed, again.describe()
    assert "keep1" in snapshots(overlay(first))
    assert_ok(second.provision())
    assert "keep1" in snapshots(overlay(second))
    assert reliability.lost() == 0


def test_a_damaged_cached_download_fails_decompress_and_every_overlay_is_kept(
    tmp_path: Path, http_server: FileServer, reliability: Recorder
) -> None:
    first, second, entry = two_projects_on_one_cache(tmp_path, http_server)
    reliability.fault("reprovision")
    reliability.keep(overlay(first), overlay(second), first.parts / "vm" / "disk.img")
    flip_byte(entry.data, len(PACKED) // 2)
    for project in (first, second):
        failed = project.provision()
        assert_one_line_error(failed, "decompress:vm", "disk.img.gz is not a valid gzip file")
        assert overlay(project).exists()
        assert "keep1" in snapshots(overlay(project))
    assert reliability.lost() == 0


def test_a_new_image_of_another_content_still_gets_a_new_overlay(
    tmp_path: Path, http_server: FileServer
) -> None:
    first, _, entry = two_projects_on_one_cache(tmp_path, http_server)
    other = bytes(MIB) + os.urandom(MIB)
    http_server.put("disk.img.gz", gzip.compress(other))
    config = first.configs[0].read_text()
    first.configs[0].write_text(config.replace(sha256(RAW), sha256(other)))
    for path in entry.folder.iterdir():
        path.unlink()
    (first.parts / "vm" / "disk.img.gz").unlink()
    again = first.provision()
    assert_ok(again)
    assert "overlay:vm" in again.executed
    assert "keep1" not in snapshots(overlay(first))


@pytest.mark.usefixtures("no_vm_left")
@pytest.mark.vm
@needs_qemu
def test_a_guest_write_and_snapshot_outlive_a_touched_download(
    tmp_path: Path, guest: Guest, http_server: FileServer, reliability: Recorder
) -> None:
    url = http_server.put("guest.img.gz", guest.gzipped())
    root = tmp_path / "t1"
    root.mkdir()
    project = Project(root)
    project.buildout["download-cache"] = str(tmp_path / "cache")
    project.write(vm_config(guest, f"image = {url}\ngzip = true\noverlay = true\n", free_port()))
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    wrote = script(project, "vm-runscript",
                   "grep -q ' /mnt ' /proc/mounts && echo kept > /mnt/marker && sync")
    assert wrote.returncode == 0, wrote.stderr
    saved = script(project, "vm-ctl", "snapshot", "save", "keep1")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert script(project, "vm-ctl", "stop").returncode == 0
    reliability.fault("reprovision")
    reliability.keep(overlay(project))

    touch(project.parts / "vm" / "guest.img.gz")
    again = project.provision()
    assert_ok(again)
    assert "overlay:vm" not in again.executed, again.describe()
    assert reliability.lost() == 0
    listed = script(project, "vm-ctl", "snapshot", "list")
    assert "keep1" in listed.stdout, listed.stdout + listed.stderr
    assert script(project, "vm-ctl", "start").returncode == 0
    kept = script(project, "vm-runscript", "cat /mnt/marker")
    assert (kept.returncode, kept.stdout) == (0, "kept\n"), kept.stderr
    assert script(project, "vm-ctl", "stop").returncode == 0
    assert qemu_pids_under(project.root) == []


# -- 9. a cut PART-getfile leaves the local file as it was -----------------------------------

@pytest.mark.usefixtures("no_vm_left")
@pytest.mark.vm
@needs_qemu
def test_a_getfile_cut_mid_file_leaves_the_local_file_and_says_the_transfer_was_cut(
    project: Project, guest: Guest, tmp_path: Path, reliability: Recorder
) -> None:
    project.write(vm_config(guest, f"file = {guest.image.path}\noverlay = true\n", free_port()))
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    made = script(project, "vm-runscript", "dd if=/dev/zero of=/tmp/big bs=1M count=60 2>/dev/null")
    assert made.returncode == 0, made.stderr
    local = tmp_path / "local.txt"
    local.write_text("what the user had\n")
    local.chmod(0o640)
    reliability.fault("cut-transfer")
    reliability.keep(local)

    getting = subprocess.Popen([str(project.root / "bin" / "vm-getfile"), "/tmp/big", str(local)],
                               env={**os.environ, "HOME": str(project.root / "home"), **project.env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(p.stat().st_size > MIB for p in tmp_path.glob(".local.txt.getfile-*")),
                 "bytes arriving")
        for pid in qemu_pids_under(project.root):
            os.kill(pid, signal.SIGKILL)
        _, stderr = getting.communicate(timeout=120)
    finally:
        if getting.poll() is None:
            getting.kill()
    assert getting.returncode == 1
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "the transfer was cut after" in stderr and "local.txt is unchanged" in stderr, stderr
    assert "Connection refused" not in stderr
    assert reliability.lost() == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".local")) == []
    assert local.stat().st_mode & 0o777 == 0o640


@pytest.mark.usefixtures("no_vm_left")
@pytest.mark.vm
@needs_qemu
def test_getfile_and_sendfile_replace_a_file_whole_keep_its_mode_and_a_cut_sendfile_changes_nothing(
    project: Project, guest: Guest, tmp_path: Path, reliability: Recorder
) -> None:
    project.write(vm_config(guest, f"file = {guest.image.path}\noverlay = true\n", free_port()))
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    assert script(project, "vm-runscript", "echo new > /tmp/small").returncode == 0
    local = tmp_path / "local.txt"
    local.write_text("old, and longer than the new one\n")
    local.chmod(0o640)
    folder = tmp_path / "into"
    folder.mkdir()
    assert script(project, "vm-getfile", "/tmp/small", str(local)).returncode == 0
    assert script(project, "vm-getfile", "/tmp/small", str(folder)).returncode == 0
    assert local.read_text() == "new\n" and local.stat().st_mode & 0o777 == 0o640
    assert (folder / "small").read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir() if "getfile" in p.name] == []

    # sendfile: over a file (its mode kept), into a folder, through a symlink (the link kept).
    kept = script(project, "vm-runscript", "echo 'old, and longer' > /tmp/kept && chmod 600 /tmp/kept && "
                                           "mkdir /tmp/in && ln -s /tmp/kept /tmp/link")
    assert kept.returncode == 0, kept.stderr
    sent = tmp_path / "sent.txt"
    sent.write_text("sent\n")
    sent.chmod(0o644)
    for remote in ("/tmp/kept", "/tmp/in", "/tmp/link"):
        done = script(project, "vm-sendfile", remote, str(sent))
        assert done.returncode == 0, done.stderr
    seen = script(project, "vm-runscript", "cat /tmp/kept /tmp/in/sent.txt; stat -c %a /tmp/kept; "
                                           "readlink /tmp/link; ls -a /tmp /tmp/in | grep -c sendfile")
    assert seen.stdout.split("\n") == ["sent", "sent", "600", "/tmp/kept", "0", ""], seen.stdout

    # A sendfile cut by Ctrl-C half-way: the guest's file is as it was, no partial file is left.
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 * MIB) * 15)
    reliability.fault("cut-transfer")  # the file kept is the guest's: checked in the guest below
    sending = subprocess.Popen([str(project.root / "bin" / "vm-sendfile"), "/tmp/kept", str(big)],
                               env={**os.environ, "HOME": str(project.root / "home"), **project.env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        def arriving() -> bool:
            listed = script(project, "vm-runscript", "ls -la /tmp | grep sendfile || true").stdout.split()
            return len(listed) > 4 and int(listed[4]) > MIB
        wait_for(arriving, "bytes arriving in the guest")
        os.killpg(sending.pid, signal.SIGINT)
        sending.communicate(timeout=120)
    finally:
        if sending.poll() is None:
            os.killpg(sending.pid, signal.SIGKILL)
    assert sending.returncode != 0
    after = script(project, "vm-runscript", "cat /tmp/kept; ls -a /tmp | grep -c sendfile")
    assert after.stdout.split("\n") == ["sent", "0", ""], after.stdout
    assert script(project, "vm-ctl", "stop").returncode == 0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- 8. a damaged cached image is made again from the cached download --------------------------

def flip_byte_keeping_mtime(path: Path, offset: int) -> None:
    info = path.stat()
    flip_byte(path, offset)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def with_sha512_image(project: Project) -> None:
    """A checksum added to the config: verify-image runs again, and hashes the image for it."""
    config = project.configs[0].read_text()
    project.configs[0].write_text(config + f"sha512_image = {hashlib.sha512(RAW).hexdigest()}\n")


def test_a_damaged_cached_image_is_made_again_from_the_cached_download(
    tmp_path: Path, http_server: FileServer, reliability: Recorder
) -> None:
    first, second, entry = two_projects_on_one_cache(tmp_path, http_server)
    reliability.fault("cache-image")
    flip_byte_keeping_mtime(entry.image, 100)  # the parts' images too: the same file
    with_sha512_image(first)
    repaired = first.provision()
    assert_ok(repaired)
    assert "making it again from the verified download" in repaired.output, repaired.describe()
    image = first.parts / "vm" / "disk.img"
    assert image.read_bytes() == RAW
    assert entry.image.read_bytes() == RAW and entry.image.samefile(image)
    requests = len(http_server.requests)
    # The other project finds the damage as soon as it checks, and takes the image made again.
    with_sha512_image(second)
    assert_ok(second.provision())
    assert (second.parts / "vm" / "disk.img").read_bytes() == RAW
    assert len(http_server.requests) == requests, "the cached download was fetched again"
    assert first.provision().ran() == set()


def test_a_stale_recorded_digest_is_never_quoted_when_the_image_is_intact(
    tmp_path: Path, http_server: FileServer, reliability: Recorder
) -> None:
    first, _, entry = two_projects_on_one_cache(tmp_path, http_server)
    reliability.fault("cache-image")
    # A digest recorded from a damaged image whose byte was restored since (the mtime kept).
    stale = "0" * 128
    for record in (entry.image_record, first.parts / "vm" / ".kvmtasks" / "image.json"):
        data = json.loads(record.read_text())
        data["digests"]["sha512"] = stale
        record.write_text(json.dumps(data))
    with_sha512_image(first)
    again = first.provision()
    assert_ok(again)
    assert stale not in again.output
    recorded = json.loads((first.parts / "vm" / ".kvmtasks" / "image.json").read_text())
    assert recorded["digests"]["sha512"] == hashlib.sha512(RAW).hexdigest()
    # A wrong checksum is still refused, quoting what the image holds.
    config = first.configs[0].read_text()
    first.configs[0].write_text(config.replace(hashlib.sha512(RAW).hexdigest(), "1" * 128))
    refused = first.provision()
    line = assert_one_line_error(refused, "verify-image:vm", "sha512_image mismatch")
    assert line.endswith(f"got {hashlib.sha512(RAW).hexdigest()}")


# -- 6. no input file is read without a bound -------------------------------------------------

def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def big_file(path: Path, first_line: str = "#cloud-config\n") -> Path:
    """200 MB, most of it a hole: the size a reader would have to go through."""
    path.write_text(first_line)
    os.truncate(path, 200 * 1000 * 1000)
    return path


@pytest.mark.parametrize("option", ["cloud_init_user_data", "cloud_init_network_config",
                                    "ssh_key_path"])
@pytest.mark.parametrize("kind", ["device", "fifo", "200 MB"])
def test_an_input_file_without_an_end_is_one_line_naming_file_option_and_limit(
    project: Project, tmp_path: Path, reliability: Recorder, option: str, kind: str
) -> None:
    reliability.bad_input("endless")
    if kind == "device":
        path = Path("/dev/urandom")
    elif kind == "fifo":
        path = fifo(tmp_path / "input")
    else:
        path = big_file(tmp_path / "input")
    value = path
    if option == "ssh_key_path":
        value, public = tmp_path / "key", tmp_path / "key.pub"
        if kind == "device":
            public.symlink_to(path)  # KEY.pub, a link to the device
        else:
            path.rename(public)
        path = public
    project.write(f"[vm]\nimage = http://127.0.0.1:9/disk.img\ncloud_init = true\n{option} = {value}\n")

    run = project.run("list", timeout=60)

    line = assert_one_line_error(run, option, str(path))
    if kind == "200 MB":
        assert "is larger than the limit of" in line and line.endswith("iB"), line
    else:
        assert "is not a regular file" in line, line


def test_a_config_file_or_checksum_list_without_an_end_is_one_line(
    project: Project, tmp_path: Path, reliability: Recorder
) -> None:
    reliability.bad_input("endless", 3)
    project.write("[vm]\nimage = http://127.0.0.1:9/disk.img\n")
    project.configs.append(fifo(tmp_path / "more.cfg"))
    assert_one_line_error(project.run("list", timeout=60), "more.cfg", "is not a regular file")
    project.configs.pop()

    for listed in (fifo(tmp_path / "SHA256SUMS"), big_file(tmp_path / "SHA512SUMS", "")):
        algorithm = listed.name[:6].lower()
        project.write(f"[vm]\nimage = http://127.0.0.1:9/disk.img\n"
                      f"{algorithm}_download = file://{listed}\n")
        failed = project.run("checksums:vm", timeout=60)
        assert_one_line_error(failed, "checksums:vm", str(listed), "not a checksum list")


def test_a_damaged_or_endless_part_json_names_the_step_that_writes_it_again(
    project: Project, tmp_path: Path, reliability: Recorder
) -> None:
    reliability.bad_input("misleading")
    reliability.bad_input("endless")
    project.write("[vm]\nfile = /dev/null\n")
    assert_ok(project.run("render:vm"))
    snapshot = project.root / "var" / "vm" / "part.json"
    assert snapshot.is_file()
    for damage in ("garbage", "fifo"):
        snapshot.unlink()
        if damage == "fifo":
            fifo(snapshot)
        else:
            snapshot.write_text("{garbage")
        said = subprocess.run([str(project.root / "bin" / "vm-ctl"), "status"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **project.env})
        assert said.returncode == 1
        assert len(said.stderr.strip().splitlines()) == 1, said.stderr
        assert said.stderr.startswith(f"vm-ctl: cannot read {snapshot}"), said.stderr
        assert said.stderr.strip().endswith("write it again: doit render:vm"), said.stderr
        # And that command does write it again.
        snapshot.unlink()
        snapshot.write_text("{garbage")
        assert "render:vm" in project.run("render:vm").executed
        status = subprocess.run([str(project.root / "bin" / "vm-ctl"), "status"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, **project.env})
        assert (status.returncode, status.stdout, status.stderr) == (3, "vm is stopped\n", "")


# -- 5. a full disk in the run folder while rendering -------------------------------------------

def test_a_full_disk_while_rendering_is_one_line_and_leaves_no_temporary_file(
    project: Project, small_disk: Path, reliability: Recorder
) -> None:
    project.write(f"[vm]\nfile = /dev/null\nkvm_run_directory = {small_disk}\n"
                  f"kvm_bin_directory = {small_disk / 'bin'}\n")
    filler = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(filler, bytes(64 << 10))
    finally:
        os.close(filler)
    reliability.fault("disk-full")

    failed = project.run("render:vm")

    assert_one_line_error(failed, "render:vm", "No space left on device")
    assert [p.name for p in small_disk.rglob("*.tmp")] == []
    (small_disk / "filler").unlink()
    assert_ok(project.run("render:vm"))


# -- messages that misled -------------------------------------------------------------------------

def test_a_redirect_to_a_file_url_is_refused_and_not_called_a_network_failure(
    project: Project, http_server: FileServer, reliability: Recorder
) -> None:
    reliability.bad_input("misleading", 2)
    http_server.redirects["/disk.img"] = "file:///etc/passwd"
    http_server.redirects["/SHA256SUMS"] = "file:///etc/passwd"
    project.write(f"[vm]\nimage = {http_server.url('disk.img')}\n")
    failed = project.provision()
    line = assert_one_line_error(failed, "download:vm", "file:///etc/passwd")
    assert "does not follow" in line and "run again" not in line and "interrupted" not in line
    assert not (project.parts / "vm" / "disk.img").exists()

    project.write(f"[vm]\nimage = {http_server.url('other.img')}\n"
                  f"sha256_download = {http_server.url('SHA256SUMS')}\n")
    listed = project.run("checksums:vm")
    line = assert_one_line_error(listed, "checksums:vm", "file:///etc/passwd")
    assert "does not follow" in line and "connection failed" not in line


def test_a_relative_kvmtasks_config_is_found_from_the_folder_doit_runs_in(
    project: Project, tmp_path: Path, reliability: Recorder
) -> None:
    reliability.bad_input("misleading")
    elsewhere = tmp_path / "elsewhere" / "configs"
    elsewhere.mkdir(parents=True)
    (elsewhere / "relative.cfg").write_text(f"[buildout]\ndirectory = {project.root}\n\n"
                                            "[rel]\nfile = /dev/null\n")
    env = {**project.environment(), "KVMTASKS_CONFIG": "configs/relative.cfg"}
    listed = subprocess.run(project.argv("list", "--all"), env=env, cwd=elsewhere.parent,
                            capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "render:rel" in listed.stdout


@pytest.mark.parametrize(("redirects", "needle"), [
    ("tcp:8080::80\n  tcp:8080::81", "host port tcp:8080 is forwarded twice"),
    ("8080::80\n  tcp:8080::8080", "host port tcp:8080 is forwarded twice"),
    ("udp:53::53\n  udp:53::5353", "host port udp:53 is forwarded twice"),
])
def test_a_host_port_forwarded_twice_fails_the_config_check_in_one_line(
    project: Project, reliability: Recorder, redirects: str, needle: str
) -> None:
    reliability.bad_input("misleading")
    config = project.write(f"[vm]\nfile = /dev/null\nkvm_redir =\n  {redirects}\n")
    line = assert_one_line_error(project.run("list"), str(config), "[vm] kvm_redir", needle)
    assert line.startswith("ERROR: ")


def test_the_same_port_for_tcp_and_udp_is_two_forwards(project: Project) -> None:
    project.write("[vm]\nfile = /dev/null\nkvm_redir =\n  tcp:5353::53\n  udp:5353::53\n")
    assert_ok(project.run("list"))
