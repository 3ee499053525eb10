"""Warm starts on a real guest: the shared ssh connection, suspend/resume, named snapshots.

The tiny busybox guest under TCG; its root file system lives in memory (so a file in / or
/tmp is "memory") and its disk is mounted on /mnt (a file there is "disk").
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from kvmtasks.config.partjson import from_json
from kvmtasks.config.runfiles import control_socket
from tests.conftest import Project
from tests.test_vm_e2e import _http_get, script, vm_config
from tests.vmfixtures import Guest, free_port, loop_device, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]



def ssh_client(project: Project) -> str:
    """The guest's view of the ssh connection (address and port): the same for every session
    carried by one master, new for every direct connection."""
    answer = script(project, "vm-runscript", "echo $SSH_CLIENT")
    assert answer.returncode == 0, answer.stderr
    return answer.stdout.strip()


def master_processes(socket_path: Path) -> list[int]:
    """ssh processes whose command line or title names the master's socket."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ssh" in cmdline and str(socket_path) in cmdline:
            found.append(int(entry.name))
    return found


def socket_of(project: Project, run_directory: Path | None = None) -> Path:
    folder = (run_directory or project.var) / "vm"
    return control_socket(from_json((folder / "part.json").read_text()))


def test_one_ssh_connection_per_vm_with_a_long_run_directory(
    project: Project, guest: Guest, tmp_path: Path
) -> None:
    # The QMP socket still fits in this folder, an ssh master's socket would not (104 bytes).
    base = tmp_path / "run"
    run_directory = base / ("r" * (96 - len(str(base)) - len("/vm/qmp.sock")))
    assert len(str(run_directory / "vm" / "qmp.sock")) <= 107
    project.write(vm_config(guest, f"file = {guest.image.path}", free_port(),
                            f"kvm_run_directory = {run_directory}\nkvm_snapshot = true\n"))
    assert project.run("render:vm").returncode == 0
    master = socket_of(project, run_directory)
    assert len(str(master)) < 80

    started = script(project, "vm-ctl", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert master.is_socket()
    assert subprocess.run(["ssh", "-O", "check", "-o", f"ControlPath={master}", "x"],
                          capture_output=True, check=False).returncode == 0

    # runscript, sendfile and getfile ride on the master: one connection for them all.
    first = ssh_client(project)
    payload = tmp_path / "payload.txt"
    payload.write_text("through the master\n")
    assert script(project, "vm-sendfile", "/tmp/payload.txt", str(payload)).returncode == 0
    back = tmp_path / "back.txt"
    assert script(project, "vm-getfile", "/tmp/payload.txt", str(back)).returncode == 0
    assert back.read_text() == "through the master\n"
    assert script(project, "vm-runscript", "exit 7").returncode == 7
    assert ssh_client(project) == first

    # A stale socket (nothing answers on it) is replaced; the backgrounded master does not
    # hold the caller's pipes: capture_output returns as soon as start does.
    for pid in master_processes(master):
        os.kill(pid, 9)
    time.sleep(0.3)
    assert master.exists()
    began = time.monotonic()
    again = subprocess.run([str(project.root / "bin" / "vm-ctl"), "start"], capture_output=True,
                           text=True, timeout=60, check=False,
                           env={**os.environ, **project.environment()})
    assert again.returncode == 0 and "already running" in again.stdout, again.stderr
    assert time.monotonic() - began < 30
    assert len(master_processes(master)) == 1
    second = ssh_client(project)
    assert second != first and ssh_client(project) == second

    assert script(project, "vm-ctl", "stop").returncode == 0
    assert not master.exists() and not master.is_symlink()
    assert master_processes(master) == []
    assert qemu_pids_under(project.root) == []


def guest_epoch(project: Project) -> int:
    answer = script(project, "vm-runscript", "date +%s")
    assert answer.returncode == 0, answer.stderr
    return int(answer.stdout)


def test_suspend_resume_and_a_state_that_no_longer_fits(
    project: Project, guest: Guest, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(guest.image.path.read_bytes())
    project.write(vm_config(guest, f"file = {disk}", free_port()))
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    master = socket_of(project)
    # In memory (the root file system is a tmpfs), and a clock far in the past.
    assert script(project, "vm-runscript", "echo kept > /tmp/mem && date -u -s @1000000000").returncode == 0

    suspended = project.run("suspend:vm", timeout=300)
    assert suspended.returncode == 0, suspended.describe()
    assert "vm suspended" in suspended.stdout
    assert qemu_pids_under(project.root) == [] and not master.exists()
    status = script(project, "vm-ctl", "status")
    assert status.returncode == 3 and "vm is suspended" in status.stdout, status.stdout

    resumed = script(project, "vm-ctl", "start")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "vm resumed" in resumed.stdout and "discarded" not in resumed.stdout
    assert script(project, "vm-runscript", "cat /tmp/mem").stdout == "kept\n"
    assert abs(guest_epoch(project) - time.time()) < 30
    assert master.is_socket()
    assert list((project.var / "vm").glob("suspended*")) == []
    assert script(project, "vm-ctl", "status").returncode == 0

    # Re-provisioned: the boot disk is another file now. The state is dropped, the VM boots.
    assert script(project, "vm-ctl", "suspend").returncode == 0
    fresh = tmp_path / "fresh.img"
    fresh.write_bytes(guest.image.path.read_bytes())
    fresh.replace(disk)
    cold = script(project, "vm-ctl", "start")
    assert cold.returncode == 0, cold.stdout + cold.stderr
    notice = [line for line in cold.stdout.splitlines() if "discarded" in line]
    assert len(notice) == 1 and "boot disk" in notice[0] and "booting afresh" in notice[0]
    assert script(project, "vm-runscript", "test -e /tmp/mem").returncode == 1

    # A state QEMU cannot load (cut short): dropped with a notice, the VM boots.
    assert script(project, "vm-ctl", "suspend").returncode == 0
    state = project.var / "vm" / "suspended.state"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    cold = script(project, "vm-ctl", "start")
    assert cold.returncode == 0, cold.stdout + cold.stderr
    notice = [line for line in cold.stdout.splitlines() if "discarded" in line]
    assert len(notice) == 1 and "QEMU could not load it" in notice[0], cold.stdout
    # The file and what is wrong with it, not the QMP socket's error.
    assert f"{state} (" in notice[0] and "is damaged or truncated" in notice[0], notice[0]
    assert "Errno" not in cold.stdout + cold.stderr
    assert "vm is running" in cold.stdout and qemu_pids_under(project.root)

    # stop of a suspended VM drops the state and says so.
    assert script(project, "vm-ctl", "suspend").returncode == 0
    stopped = script(project, "vm-ctl", "stop")
    assert stopped.returncode == 0 and "saved state is discarded" in stopped.stdout
    status = script(project, "vm-ctl", "status")
    assert status.returncode == 3 and "vm is stopped" in status.stdout
    assert list((project.var / "vm").glob("suspended*")) == []
    assert not master.exists()


def qcow2_copy(guest: Guest, target: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(guest.image.path), str(target)],
                   check=True)
    return target


def test_snapshots_of_disk_and_memory(project: Project, guest: Guest, tmp_path: Path) -> None:
    disk = qcow2_copy(guest, tmp_path / "disk.qcow2")
    web_port = free_port()
    project.write(vm_config(guest, f"file = {disk}", free_port(), f"kvm_redir =\n  tcp:{web_port}::80\n"))
    assert project.run("render:vm").returncode == 0

    assert script(project, "vm-ctl", "snapshot", "list").stdout.startswith("no snapshots in ")
    refused = script(project, "vm-ctl", "snapshot", "save", "one")
    assert refused.returncode == 1 and "vm is not running" in refused.stderr
    for bad in ("a b", "1", "x\ny", "-x"):
        named = script(project, "vm-ctl", "snapshot", "save", "--", bad)
        assert named.returncode != 0 and len(named.stderr.strip().splitlines()) <= 2, named.stderr

    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    (pid,) = qemu_pids_under(project.root)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert cmdline[cmdline.index("-machine") + 1].startswith("pc-i440fx-")

    serve = "mkdir -p /www && echo served > /www/hello.txt && busybox httpd -p 80 -h /www"
    setup = f"{serve} && echo one > /tmp/mem && echo one > /mnt/disk && sync"
    assert script(project, "vm-runscript", setup).returncode == 0
    saved = script(project, "vm-ctl", "snapshot", "save", "one")
    assert saved.returncode == 0 and "snapshot one saved" in saved.stdout, saved.stdout + saved.stderr
    change = "echo two > /tmp/mem && echo two > /mnt/disk && sync && killall httpd; date -u -s @1000000000"
    assert script(project, "vm-runscript", change).returncode == 0

    listed = script(project, "vm-ctl", "snapshot", "list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "DATE", "SIZE"]
    assert listed[1].split()[0] == "one" and listed[1].endswith(" MB")
    assert listed[1].split()[1] == time.strftime("%Y-%m-%d")

    restored = script(project, "vm-ctl", "snapshot", "restore", "one")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert script(project, "vm-runscript", "cat /tmp/mem /mnt/disk").stdout == "one\none\n"
    assert abs(guest_epoch(project) - time.time()) < 30
    assert b"served" in _http_get(web_port)  # the forward, to a process of the snapshot

    # A stopped VM starts from the snapshot.
    assert script(project, "vm-runscript", "echo three > /tmp/mem").returncode == 0
    assert script(project, "vm-ctl", "stop").returncode == 0
    from_stopped = script(project, "vm-ctl", "snapshot", "restore", "one")
    assert from_stopped.returncode == 0, from_stopped.stdout + from_stopped.stderr
    assert "started from snapshot one" in from_stopped.stdout
    assert script(project, "vm-runscript", "cat /tmp/mem /mnt/disk").stdout == "one\none\n"

    # Delete while running (QEMU) and while stopped (qemu-img).
    assert script(project, "vm-ctl", "snapshot", "save", "two").returncode == 0
    assert script(project, "vm-ctl", "snapshot", "delete", "one").returncode == 0
    assert [line.split()[0] for line in script(project, "vm-ctl", "snapshot", "list").stdout.splitlines()] \
        == ["NAME", "two"]
    assert script(project, "vm-ctl", "stop").returncode == 0
    assert script(project, "vm-ctl", "snapshot", "delete", "two").returncode == 0
    assert script(project, "vm-ctl", "snapshot", "list").stdout.startswith("no snapshots in ")
    missing = script(project, "vm-ctl", "snapshot", "restore", "two")
    assert missing.returncode == 1 and "no snapshot two in" in missing.stderr
    assert not socket_of(project).exists()


def test_snapshots_are_refused_where_they_cannot_work(project: Project, guest: Guest,
                                                     tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(guest.image.path.read_bytes())
    for source, extra, reason in (
        (f"file = {raw}", "", f"no snapshots on {raw}: it is raw"),
        (f"file = {qcow2_copy(guest, tmp_path / 'disk.qcow2')}", "kvm_snapshot = true\n",
         "no snapshots with kvm_snapshot = true"),
    ):
        project.write(vm_config(guest, source, free_port(), extra))
        assert project.run("render:vm").returncode == 0
        for args in (("save", "one"), ("restore", "one"), ("list",), ("delete", "one")):
            refused = script(project, "vm-ctl", "snapshot", *args)
            assert refused.returncode == 1, refused.stdout
            (line,) = refused.stderr.strip().splitlines()
            assert reason in line and "Traceback" not in line
    suspend = script(project, "vm-ctl", "suspend")
    assert suspend.returncode == 1 and "vm is not running" in suspend.stderr

    # A libvirt part is refused for the same reasons, before anything is asked of libvirt.
    project.write(vm_config(guest, f"file = {raw}", free_port(),
                            "kvm_engine = libvirt\nlibvirt_uri = qemu+ssh://root@127.0.0.1:1/system\n"))
    assert project.run("render:vm").returncode == 0
    for args, reason in ((("suspend",), "vm is not running: there is nothing to suspend"),
                         (("snapshot", "list"), f"no snapshots on {raw}: it is raw")):
        refused = script(project, "vm-ctl", *args)
        assert refused.returncode == 1
        (line,) = refused.stderr.strip().splitlines()
        assert reason in line, line



def test_snapshots_are_refused_on_a_block_device(project: Project, guest: Guest, tmp_path: Path) -> None:
    backing = qcow2_copy(guest, tmp_path / "disk.qcow2")  # qcow2 bytes, yet a device is given as raw
    with loop_device(backing) as device:
        project.write(vm_config(guest, f"file = {device}", free_port()))
        assert project.run("render:vm").returncode == 0
        refused = script(project, "vm-ctl", "snapshot", "list")
        assert refused.returncode == 1
        assert refused.stderr.strip() == (f"vm-ctl: no snapshots on {device}: it is a block device, "
                                          "and snapshots live in a qcow2 boot disk")


def test_snapshots_live_in_the_overlay_never_in_the_verified_image(
    project: Project, guest: Guest, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"  # raw: with an overlay the boot disk is qcow2 all the same
    image.write_bytes(guest.image.path.read_bytes())
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    project.write(vm_config(guest, f"file = {image}", free_port(), "overlay = true\n"))
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    assert script(project, "vm-runscript", "echo one > /mnt/disk && sync").returncode == 0
    saved = script(project, "vm-ctl", "snapshot", "save", "one")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert script(project, "vm-runscript", "echo two > /mnt/disk && sync").returncode == 0
    assert script(project, "vm-ctl", "snapshot", "restore", "one").returncode == 0
    assert script(project, "vm-runscript", "cat /mnt/disk").stdout == "one\n"
    # Suspended, then reset: the state belonged to the overlay that is gone.
    assert script(project, "vm-ctl", "suspend").returncode == 0
    assert script(project, "vm-ctl", "reset").returncode == 0
    cold = script(project, "vm-ctl", "start")
    assert cold.returncode == 0, cold.stdout + cold.stderr
    assert "the suspended state is discarded, the boot disk" in cold.stdout
    assert script(project, "vm-runscript", "test -e /mnt/disk").returncode == 1
    assert script(project, "vm-ctl", "snapshot", "list").stdout.startswith("no snapshots in ")
    assert script(project, "vm-ctl", "stop").returncode == 0
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
