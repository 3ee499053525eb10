"""Faults around a real guest: re-provisioning under a running VM, a VM killed from outside,
a stale pid file naming an unrelated process, and a block device that must stay as it was.

Guests run under TCG (see test_vm_e2e.py). One boot per scenario; the first test chains three
scenarios over two boots, the way they follow each other in real life.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.httpserver import FileServer
from tests.reliability import Recorder
from tests.test_provision_pipeline import assert_one_line_error, sha256
from tests.test_vm_e2e import script, vm_config
from tests.vmfixtures import Guest, free_port, loop_device, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Until pid is no process, or a zombie nobody reaps (its cmdline is then empty)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes():
                return
        except OSError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still alive after {timeout} s")


def test_refused_while_running_then_killed_from_outside_then_restarted_over_a_stale_pid_file(
    project: Project, guest: Guest, http_server: FileServer, reliability: Recorder
) -> None:
    raw = guest.image.path.read_bytes()
    first = http_server.put("v1/guest.img", raw)
    port = free_port()
    extra = f"sha256_image = {sha256(raw)}\nkvm_snapshot = true\n"
    project.write(vm_config(guest, f"image = {first}", port, extra))
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    image = project.parts / "vm" / "guest.img"
    reliability.keep(image)

    # A wrong checksum for the running VM's disk fails, and the disk stays.
    project.write(vm_config(guest, f"image = {first}", port, extra.replace(sha256(raw), "0" * 64)))
    mismatch = project.run("provision:vm")
    reliability.fault("running")
    assert_one_line_error(mismatch, "verify-image:vm: sha256_image mismatch", "disk of the running VM")
    assert mismatch.ran() == {"verify-image"}

    # A new image URL while the VM runs: provision and start both refuse, the VM runs on.
    second = http_server.put("v2/guest.img", raw)
    project.write(vm_config(guest, f"image = {second}", port, extra))
    for task in ("provision:vm", "start:vm"):
        refused = project.run(task)
        reliability.fault("running")
        assert_one_line_error(refused, "download:vm: vm is running; stop it first: doit stop:vm")
    assert not any(request.path == "/v2/guest.img" for request in http_server.requests)
    # doit clean would delete the disk under the VM: it refuses instead.
    cleaned = project.run("clean", "-a")
    reliability.fault("running")
    assert "vm is running; stop it first" in cleaned.output and image.exists()
    assert cleaned.returncode == 1 and "Traceback" not in cleaned.output, cleaned.describe()
    assert reliability.lost() == 0
    assert script(project, "vm-runscript", "true").returncode == 0
    assert script(project, "vm-ctl", "status").returncode == 0

    # Killed from outside: status says so, and cleans up after it.
    pidfile = project.var / "vm" / "qemu.pid"
    qemu = int(pidfile.read_text())
    os.kill(qemu, signal.SIGKILL)
    reliability.fault("qemu")
    wait_gone(qemu)
    status = script(project, "vm-ctl", "status")
    assert (status.returncode, status.stdout) == (3, "vm is stopped\n")
    assert not any((project.var / "vm" / name).exists() for name in ("qemu.pid", "qmp.sock", "accel"))
    assert qemu_pids_under(project.root) == []

    # A stale pid file now naming an unrelated process: start provisions the new URL and boots,
    # and the bystander is never signalled.
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        pidfile.write_text(f"{bystander.pid}\n")
        reliability.fault("stale-pid")
        restarted = project.run("start:vm", timeout=300)
        assert restarted.returncode == 0, restarted.describe()
        assert "download:vm" in restarted.executed
        assert int(pidfile.read_text()) != bystander.pid
        assert script(project, "vm-runscript", "true").returncode == 0
        assert script(project, "vm-ctl", "stop").returncode == 0
        assert bystander.poll() is None, "an unrelated process was signalled"
    finally:
        bystander.kill()
        bystander.wait()
    assert qemu_pids_under(project.root) == []


@pytest.fixture
def guest_on_a_loop_device(guest: Guest, tmp_path: Path) -> Iterator[Path]:
    """A real block device holding the guest's disk."""
    backing = tmp_path / "backing.img"
    shutil.copyfile(guest.image.path, backing)
    with loop_device(backing) as device:
        yield device


def test_a_block_device_boots_with_snapshot_and_keeps_every_byte(
    project: Project, guest: Guest, guest_on_a_loop_device: Path, reliability: Recorder
) -> None:
    device = guest_on_a_loop_device
    reliability.keep(device)
    reliability.bad_input("paths")
    project.write(vm_config(guest, f"file = {device}", free_port(), "kvm_snapshot = true\n"))

    started = project.run("start:vm", timeout=300)

    assert started.returncode == 0, started.describe()
    write = "grep -q ' /mnt ' /proc/mounts && dd if=/dev/urandom of=/mnt/junk bs=1k count=256 && sync"
    wrote = script(project, "vm-runscript", write)
    assert wrote.returncode == 0, wrote.stderr
    assert script(project, "vm-ctl", "stop").returncode == 0
    assert reliability.lost() == 0
