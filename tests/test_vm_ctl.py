"""The everyday commands against real guests under TCG: PART-ssh, console, status --json in every
state, and the three ways stop ends a VM (ACPI button, poweroff over ssh, QEMU told to quit when
ssh refuses us), the last two after a start on a port that TIME-WAIT entries still held.

Three boots: the tiny guest (it acts on the ACPI power button), then twice the variant that
ignores the button.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time

import pytest

from tests.conftest import Project
from tests.test_ctl import assert_ends_quietly_on_ctrl_c, check_status_json, read_until
from tests.test_portprobe import leave_time_wait, time_wait_entries
from tests.test_vm_e2e import script, vm_config
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]


def write_part(project: Project, guest: Guest, port: int, shutdown_timeout: int) -> None:
    disk = project.root / "disk.img"
    disk.write_bytes(guest.image.path.read_bytes())
    config = vm_config(guest, f"file = {disk}", port, "kvm_snapshot = true\n")
    project.write(config.replace("kvm_shutdown_timeout = 3", f"kvm_shutdown_timeout = {shutdown_timeout}"))


def timed_stop(project: Project) -> tuple[float, str]:
    began = time.monotonic()
    stopped = script(project, "vm-ctl", "stop")
    took = time.monotonic() - began
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    return took, stopped.stdout


def test_ssh_console_status_json_and_a_stop_on_the_acpi_button(project: Project, guest: Guest) -> None:
    port = free_port()
    write_part(project, guest, port, shutdown_timeout=30)
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()

    # PART-ssh: a command's output and exit status; with no terminal, ssh gets none in the guest.
    uname = script(project, "vm-ssh", "uname", "-r")
    assert (uname.returncode, uname.stdout.strip()) == (0, guest.image.kernel_release)
    assert script(project, "vm-ssh", "exit 7").returncode == 7
    assert script(project, "vm-ssh", "test -t 0").returncode == 1
    # From a terminal, the command gets one too (-t), as a login would.
    primary, secondary = pty.openpty()
    try:
        with_tty = subprocess.run([str(project.root / "bin" / "vm-ssh"), "test -t 0 && test -t 1"],
                                  stdin=secondary, stdout=secondary, stderr=secondary, timeout=60,
                                  check=False, env=project.environment())
    finally:
        os.close(secondary)
        os.close(primary)
    assert with_tty.returncode == 0
    # ssh's own options go before the command, as with ssh.
    verbose = script(project, "vm-ssh", "-v", "true")
    assert verbose.returncode == 0 and "debug1:" in verbose.stderr

    # status --json: the ssh command it gives is the one PART-ssh runs, and it works.
    status = script(project, "vm-ctl", "status", "--json")
    assert status.returncode == 0, status.stderr
    data = check_status_json(status.stdout, project, state="running", ssh_port=port)
    logged_in = subprocess.run([*data["ssh_command"], "echo", "via-json"],
                               capture_output=True, text=True, timeout=60, check=False)
    assert (logged_in.returncode, logged_in.stdout) == (0, "via-json\n"), logged_in.stderr

    # console: the boot's lines so far; --follow shows what the guest writes next.
    console = script(project, "vm-ctl", "console")
    assert console.returncode == 0
    assert f"kvmtasks-guest: up, kernel {guest.image.kernel_release}" in console.stdout
    follower = subprocess.Popen([str(project.root / "bin" / "vm-ctl"), "console", "--follow"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=project.environment())
    try:
        assert follower.stdout is not None
        read_until(follower.stdout, b"kvmtasks-guest: up")
        assert script(project, "vm-ssh", "echo marker-from-the-guest > /dev/console").returncode == 0
        read_until(follower.stdout, b"marker-from-the-guest")
        assert_ends_quietly_on_ctrl_c(follower)
    finally:
        follower.kill()
        follower.wait()

    took, said = timed_stop(project)
    assert said == "vm stopped (the guest powered off on the ACPI power button)\n"
    assert took < 30, f"stop took {took:.1f} s: it waited for kvm_shutdown_timeout"
    status = script(project, "vm-ctl", "status", "--json")
    assert status.returncode == 3
    check_status_json(status.stdout, project, state="stopped", ssh_port=port)
    assert qemu_pids_under(project.root) == []


def test_time_wait_port_then_poweroff_over_ssh_then_quit(project: Project, guest_without_acpi: Guest) -> None:
    # ssh attempts the guest's side closed first: the listening side of the port is in TIME-WAIT.
    port = leave_time_wait(free_port())
    assert time_wait_entries(port)
    write_part(project, guest_without_acpi, port, shutdown_timeout=10)
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    assert "vm is running" in started.stdout

    # The button does nothing; ssh works, so the guest is asked to power off: seconds, not 10 + 5.
    took, said = timed_stop(project)
    assert said == ("vm stopped (the guest ignored the ACPI power button and powered off when "
                    "asked over ssh)\n")
    assert took < 10, f"stop took {took:.1f} s"
    assert "reboot: Power down" in (project.var / "vm" / "console.log").read_text(errors="replace")
    assert qemu_pids_under(project.root) == []

    # When ssh no longer lets us in, nothing asks the guest to power off: QEMU is told to quit.
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    assert script(project, "vm-ssh", "rm /root/.ssh/authorized_keys").returncode == 0
    # The VM's ssh master stays logged in; stop closes it first, so its poweroff needs a new
    # login, which the guest now refuses.
    took, said = timed_stop(project)
    assert said == "vm stopped (no power-off within kvm_shutdown_timeout = 10 s, so QEMU was told to quit)\n"
    assert 10 <= took < 30, f"stop took {took:.1f} s"
    assert qemu_pids_under(project.root) == []
    status = script(project, "vm-ctl", "status", "--json")
    assert (status.returncode, json.loads(status.stdout)["state"]) == (3, "stopped")

