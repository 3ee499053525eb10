"""Faults in a VM's lifecycle, against the real tiny guest under TCG: two operations on one
part at once, a start killed while the guest boots, a suspend and a resume killed half way
(kill -9 and Ctrl-C), a state record garbled, and a snapshot deleted under a suspended VM
(a truncated state file is test_warm.py's), then a start on a full run directory.

One scenario, in the order they follow each other in real life: one cold boot, the rest are
resumes; the full run directory fails before any boot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmtasks.engines.qemu import qmp
from tests.conftest import Project
from tests.reliability import Recorder
from tests.test_vm_e2e import script, vm_config
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]


def spawn(project: Project, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(project.root / "bin" / "vm-ctl"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=project.environment(), cwd="/")


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 120, every: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(every)


def writing(state: Path) -> bool:
    """QEMU has begun to write the state (the file is made before QEMU is asked to)."""
    try:
        return state.with_suffix(".part").stat().st_size > 0
    except OSError:
        return False


def ctl(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return script(project, "vm-ctl", *args, timeout=300)


def hostname(project: Project) -> str:
    """The guest's hostname, kept in its memory only: a fresh boot forgets it, a resume keeps it."""
    result = script(project, "vm-ssh", "cat /proc/sys/kernel/hostname")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_status(project: Project, *allowed: str) -> str:
    """status's first line is one of allowed (which start with "vm is ") and its exit code agrees."""
    status = ctl(project, "status")
    first = status.stdout.splitlines()[0]
    assert any(first.startswith(f"vm is {state}") for state in allowed), status.stdout
    assert status.returncode == (0 if first.startswith("vm is running") else 3), status.stdout
    return first


def test_concurrent_operations_and_interrupted_suspends_and_resumes(
    project: Project, guest: Guest, reliability: Recorder
) -> None:
    disk = project.root / "disk.img"
    disk.write_bytes(guest.image.path.read_bytes())
    project.write(vm_config(guest, f"file = {disk}\noverlay = true", free_port()))
    assert project.run("provision:vm", timeout=120).returncode == 0
    state_dir, overlay = project.var / "vm", project.parts / "vm" / "vm.overlay.qcow2"
    lock, pidfile = state_dir / "vm.lock", state_dir / "qemu.pid"
    state, record = state_dir / "suspended.state", state_dir / "suspended.json"
    overlay_inode = overlay.stat().st_ino

    # Two starts and a reset at once, and the first start killed while the guest boots: the
    # second waits for the lock (naming the first), then for the guest; reset waits, then refuses.
    first = spawn(project, "start")
    wait_for("lock taken by the first start",
             lambda: lock.exists() and lock.read_text().startswith(f"{first.pid} start"))
    second, reset = spawn(project, "start"), spawn(project, "reset")
    waiting = f"waits for another operation on vm (pid {first.pid} start, lock {lock})\n"
    assert second.stderr is not None and second.stderr.readline() == f"vm: start {waiting}"
    assert reset.stderr is not None and reset.stderr.readline() == f"vm: reset {waiting}"
    wait_for("QEMU started by the first start", pidfile.exists)
    first.kill()
    first.wait()
    reliability.fault("vm-concurrent", 2)
    reliability.fault("vm-killed")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, out + err
    qemu = int(pidfile.read_text())
    assert f"vm is already running (pid {qemu})" in out
    reset_out, reset_err = reset.communicate(timeout=300)
    assert reset.returncode == 1 and reset_err.splitlines()[-1] == (
        f"vm-ctl: vm is running (pid {qemu}); stop it first, then reset"), reset_out + reset_err
    assert qemu_pids_under(project.root) == [qemu]
    assert overlay.stat().st_ino == overlay_inode
    assert_status(project, "running")
    assert script(project, "vm-ssh", "echo kept > /proc/sys/kernel/hostname").returncode == 0

    # kill -9 of a suspend once QEMU writes the state: QEMU finishes the save and stays paused.
    # status says so (not "running"), and start completes the suspend, then resumes it.
    suspend = spawn(project, "suspend")
    wait_for("the state being written", lambda: writing(state))
    suspend.kill()
    suspend.wait()
    reliability.fault("vm-killed")
    wait_for("the guest frozen", lambda: not assert_status(project, "running", "suspend")
             .startswith("vm is running"), timeout=60, every=0.2)
    started = ctl(project, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "vm: an interrupted suspend is completed" in started.stdout
    assert "vm resumed" in started.stdout
    assert hostname(project) == "kept"

    # Ctrl-C during a suspend: either the save is cancelled and the VM runs on, or it is saved;
    # never frozen. start then brings back the same running guest.
    suspend = spawn(project, "suspend")
    wait_for("the state being written", lambda: writing(state))
    suspend.send_signal(signal.SIGINT)
    out, err = suspend.communicate(timeout=120)
    reliability.fault("vm-killed")
    assert suspend.returncode == 130, out + err
    assert_status(project, "running", "suspended")
    started = ctl(project, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert hostname(project) == "kept"

    # kill -9 of a resume once QEMU waits for the state: status tells it, start undoes and resumes.
    assert ctl(project, "suspend").returncode == 0
    resume = spawn(project, "start")
    wait_for("QEMU started for the resume", pidfile.exists)
    resume.kill()
    resume.wait()
    reliability.fault("vm-killed")
    said = assert_status(project, "resuming", "running", "suspended")
    if said.startswith("vm is running"):  # then the guest runs indeed (inmigrate only ever leads there)
        assert qmp.query_status(state_dir / "qmp.sock") == "running", said
    started = ctl(project, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "vm resumed" in started.stdout or "already running" in started.stdout
    assert hostname(project) == "kept"
    assert not state.exists() and not record.exists()  # used up by the resume

    # A snapshot deleted under a suspended VM would rewrite the disk its state belongs to.
    assert ctl(project, "snapshot", "save", "keep1").returncode == 0
    assert ctl(project, "suspend").returncode == 0
    deleted = ctl(project, "snapshot", "delete", "keep1")
    reliability.bad_input("suspended-snapshot")
    assert deleted.returncode == 1 and deleted.stderr.splitlines() == [
        "vm-ctl: vm is suspended: deleting snapshot keep1 would change its disk and lose the suspended "
        "state; start it first, then delete keep1"], deleted.stderr
    assert "keep1" in ctl(project, "snapshot", "list").stdout
    assert_status(project, "suspended")

    # A garbled record: status says so, the next operation deletes the state and says so.
    size = state.stat().st_size
    record.write_text("{garbage")
    reliability.fault("state-damaged")
    said = assert_status(project, "stopped")
    assert said.startswith(f"vm is stopped; its suspended state cannot be resumed, its record {record} "
                           "is unreadable"), said
    stopped = ctl(project, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == [
        f"vm: the suspended state {state} ({size / 1e6:.0f} MB) cannot be resumed, its record "
        f"{record} is unreadable (JSONDecodeError: {_json_error('{garbage')}): it is deleted",
        "vm is not running"]
    assert not state.exists() and not record.exists()
    assert qemu_pids_under(project.root) == []
    assert reliability.lost() == 0



def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except ValueError as error:
        return str(error)
    raise AssertionError(text)


def test_a_start_that_fills_the_run_directory_fails_in_one_line_and_leaves_no_qemu(
    project: Project, guest: Guest, reliability: Recorder
) -> None:
    disk = project.root / "disk.img"
    disk.write_bytes(guest.image.path.read_bytes())
    project.write(vm_config(guest, f"file = {disk}\nkvm_snapshot = true", free_port()))
    assert project.run("provision:vm", timeout=120).returncode == 0
    state_dir = project.var / "vm"
    state_dir.mkdir(parents=True, exist_ok=True)
    # A tmpfs with few inodes, all used.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M,nr_inodes=64", "tmpfs", str(state_dir)],
                   check=True)
    try:
        fillers = []
        try:
            while True:
                filler = state_dir / f"filler{len(fillers)}"
                filler.touch()
                fillers.append(filler)
        except OSError:
            pass
        # One more free inode each round: the start fails at each file it makes in turn (QEMU's
        # own first), each time in one line with nothing left running, up to the accel file
        # kvmtasks writes once QEMU runs.
        accel_line = f"ERROR: start:vm: vm could not start: {state_dir / 'accel'}: No space left on device"
        for _ in range(8):
            fillers.pop().unlink()
            started = project.run("start:vm", timeout=300)
            reliability.fault("disk-full")
            assert started.returncode != 0, started.describe()
            assert "Traceback" not in started.output, started.describe()
            errors = [line for line in started.output.splitlines() if line.startswith("ERROR:")]
            assert len(errors) == 1 and "No space left on device" in errors[0], started.describe()
            assert qemu_pids_under(project.root) == []
            if errors == [accel_line]:
                break
        else:
            raise AssertionError(f"the start never came to write its accel file:\n{started.describe()}")
        assert qemu_pids_under(project.root) == []
    finally:
        for pid in qemu_pids_under(project.root):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(state_dir)], check=False)
