"""End to end against a guest the project did not build: stock Debian 12 with systemd and OpenSSH.

The image comes from tests/debian_guest.py (debootstrap, cached in
.cache/debian-guest). It is provisioned from a ``file://`` URL with a
sha256_image checksum: the test HTTP server holds its files in memory, which
is no place for a 1.5 GiB disk. The kernel boots through ``kvm_extra_args``
(``-kernel``/``-initrd``/``-append``). Two boots in all: start and restart.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmtasks.config import partjson
from kvmtasks.guest import connection
from tests.conftest import Project
from tests.debian_guest import PLAIN, DebianGuest, Variant, apt_mirror, ensure_debian_guest, missing_tools
from tests.vmfixtures import free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]

BOOT_TIMEOUT = 300
SHUTDOWN_TIMEOUT = 120


def debian_guest_or_skip(variant: Variant) -> DebianGuest:
    """The cached guest of that variant, built first; a skip only where it cannot be built."""
    if os.geteuid() != 0:
        pytest.skip("building the Debian guest (debootstrap, chroot) needs root")
    if missing_tools():
        pytest.skip(f"not installed: {', '.join(missing_tools())} (./dev installs them)")
    try:
        apt_mirror()
    except Exception as error:
        pytest.skip(str(error))
    return ensure_debian_guest(variant=variant)


@pytest.fixture(scope="session")
def debian_guest() -> DebianGuest:
    return debian_guest_or_skip(PLAIN)


@pytest.fixture
def free_the_disk(project: Project) -> Iterator[None]:
    """Delete the 1.5 GiB provisioned copy afterwards: pytest keeps the last runs' tmp dirs."""
    yield
    shutil.rmtree(project.parts, ignore_errors=True)


def script(project: Project, name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(project.root / "home")}
    env.pop("KVMTASKS_ACCEL", None)
    return subprocess.run([str(project.root / "bin" / name), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd="/", env=env)


def run_in_guest(project: Project, command: str) -> subprocess.CompletedProcess[str]:
    done = script(project, "vm-runscript", command)
    assert done.returncode == 0, f"{command!r}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def ssh_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        return connection.recv(256)


def config(guest: DebianGuest, ssh_port: int) -> str:
    extra_args = "".join(f"  {arg}\n" for arg in guest.kvm_extra_args())
    return (
        "[vm]\n"
        f"image = {guest.image.as_uri()}\n"
        f"sha256_image = {guest.sha256}\n"
        f"ssh_port = {ssh_port}\n"
        f"ssh_key_path = {guest.key}\n"
        "kvm_memory = 1G\n"
        "kvm_accel = tcg\n"
        f"kvm_boot_timeout = {BOOT_TIMEOUT}\n"
        f"kvm_shutdown_timeout = {SHUTDOWN_TIMEOUT}\n"
        f"kvm_extra_args =\n{extra_args}"
    )


@pytest.mark.timeout(2400)  # a cold image build (~3 min) and two Debian boots under TCG
@pytest.mark.usefixtures("free_the_disk")
def test_debian_guest_end_to_end(project: Project, debian_guest: DebianGuest, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    ssh_port = free_port()
    project.write(config(debian_guest, ssh_port))
    timings: dict[str, float] = {}

    began = time.monotonic()
    started = project.run("start:vm", timeout=BOOT_TIMEOUT + 300)
    timings["provision + first boot"] = time.monotonic() - began
    assert started.returncode == 0, started.describe()
    assert {"download:vm", "verify-image:vm", "render:vm", "start:vm"} <= started.executed
    assert "vm is running" in started.stdout

    # What answers is Debian's OpenSSH, and the guest is Debian 12 booted by systemd.
    assert ssh_banner(ssh_port).startswith(b"SSH-2.0-OpenSSH_")
    version = run_in_guest(project, "cat /etc/debian_version").stdout.strip()
    assert version.startswith("12."), version
    assert run_in_guest(project, "uname -r").stdout.strip() == debian_guest.kernel_release
    assert run_in_guest(project, "cat /proc/1/comm").stdout.strip() == "systemd"
    state = script(project, "vm-runscript", "systemctl is-system-running --wait")
    failed = script(project, "vm-runscript", "systemctl --failed --no-legend").stdout
    assert (state.returncode, state.stdout.strip()) == (0, "running"), failed

    # Exit statuses come back through ssh.
    assert script(project, "vm-runscript", "false").returncode == 1
    assert script(project, "vm-runscript", "exit 7").returncode == 7

    # A few MB there and back, through OpenSSH's own sftp-server (scp's default protocol).
    # sshd's VERBOSE level logs each session's kind: "subsystem 'sftp'", or "command" for legacy scp
    # (restart, not reload: a SIGHUPed sshd stops listening while it re-executes itself).
    run_in_guest(project, "echo 'LogLevel VERBOSE' > /etc/ssh/sshd_config.d/verbose.conf"
                          " && systemctl restart ssh")
    # The VM's ssh master was served by an sshd of the old settings: the copies below must
    # come through connections of their own (the scripts connect directly when no master runs).
    connection.close(partjson.from_json((project.var / "vm" / "part.json").read_text()))
    payload = tmp_path / "payload.bin"
    size = 5 * 1024 * 1024 + 123
    payload.write_bytes(os.urandom(size))
    sent = script(project, "vm-sendfile", "/root/payload.bin", str(payload))
    assert sent.returncode == 0, sent.stderr
    assert run_in_guest(project, "stat -c %s /root/payload.bin").stdout.strip() == str(size)
    back = tmp_path / "back.bin"
    got = script(project, "vm-getfile", "/root/payload.bin", str(back))
    assert got.returncode == 0, got.stderr
    assert back.read_bytes() == payload.read_bytes()
    sessions = run_in_guest(project, "journalctl -b -u ssh -o cat | grep 'Starting session:'").stdout
    kinds = ["sftp" if "subsystem 'sftp'" in line else "command" for line in sessions.splitlines()]
    # sendfile (where the file goes, the copy, the rename), stat, getfile, and this command; a
    # fallback to the legacy protocol would add a command after each sftp.
    assert kinds == ["command", "sftp", "command", "command", "sftp", "command"], sessions

    status = script(project, "vm-ctl", "status")
    assert status.returncode == 0 and "accel tcg" in status.stdout, status.stdout

    # Restart: the guest powers off cleanly, boots again, and keeps its host key.
    known_hosts = project.var / "vm" / "known_hosts"
    pinned = known_hosts.read_text()
    assert pinned.strip()
    began = time.monotonic()
    restarted = script(project, "vm-ctl", "restart")
    timings["restart (stop + boot)"] = time.monotonic() - began
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "vm stopped" in restarted.stdout and "vm is running" in restarted.stdout
    # The guest's disk (the overlay over the verified image) keeps what it wrote across a restart.
    assert run_in_guest(project, "stat -c %s /root/payload.bin").stdout.strip() == str(size)
    assert known_hosts.read_text() == pinned
    # The persistent journal of the boot before: logind took the ACPI power button.
    previous = run_in_guest(project, "journalctl -b -1 -o cat").stdout
    assert "Power key pressed" in previous and "Reached target poweroff.target" in previous, previous[-3000:]

    # Stop: ACPI power button, systemd shuts down, the kernel powers off, qemu exits.
    began = time.monotonic()
    stopped = script(project, "vm-ctl", "stop")
    timings["stop"] = time.monotonic() - began
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "vm stopped (the guest powered off on the ACPI power button)" in stopped.stdout, stopped.stdout
    console = re.sub(r"\x1b\[[0-9;]*m", "", (project.var / "vm" / "console.log").read_text(errors="replace"))
    assert "Reached target poweroff.target - System Power Off." in console, console[-3000:]
    assert "reboot: Power down" in console, console[-3000:]

    status = script(project, "vm-ctl", "status")
    assert status.returncode == 3 and "stopped" in status.stdout
    assert qemu_pids_under(project.root) == []

    with capsys.disabled():
        info = debian_guest.info
        built = "built now" if debian_guest.built_now else "cached; it was built"
        print(f"\nDebian guest {info['kernel_release']}, image {built} in {info['build_seconds']} s; "
              + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))


@pytest.mark.timeout(1800)  # a Debian boot under TCG, a suspend, a resume, a stop
@pytest.mark.usefixtures("free_the_disk")
def test_debian_guest_resumes_with_the_host_clock(project: Project, debian_guest: DebianGuest) -> None:
    project.write(config(debian_guest, free_port()))
    started = project.run("start:vm", timeout=BOOT_TIMEOUT + 300)
    assert started.returncode == 0, started.describe()
    known_hosts = (project.var / "vm" / "known_hosts").read_text()
    run_in_guest(project, "systemctl is-system-running --wait; echo kept > /dev/shm/mem")
    run_in_guest(project, "date -u -s @1000000000")  # far in the past: resume must set it

    suspended = script(project, "vm-ctl", "suspend")
    assert suspended.returncode == 0, suspended.stdout + suspended.stderr
    time.sleep(3)  # a jump in time of its own
    resumed = script(project, "vm-ctl", "start")
    assert resumed.returncode == 0 and "vm resumed" in resumed.stdout, resumed.stdout + resumed.stderr
    assert "clock could not be set" not in resumed.stdout
    assert run_in_guest(project, "cat /dev/shm/mem").stdout == "kept\n"
    assert abs(int(run_in_guest(project, "date +%s").stdout) - time.time()) < 10
    assert run_in_guest(project, "systemctl is-system-running").stdout.strip() == "running"
    assert (project.var / "vm" / "known_hosts").read_text() == known_hosts
    assert script(project, "vm-ctl", "stop").returncode == 0
    assert qemu_pids_under(project.root) == []
