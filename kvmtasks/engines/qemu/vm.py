"""Start, stop and inspect a part's VM: what ``PART-ctl`` and the doit tasks call."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from kvmtasks import command
from kvmtasks.config import seedrules
from kvmtasks.config.diskformat import boot_disk_format
from kvmtasks.config.options import Accel
from kvmtasks.config.part import Part, forwards, listen_address
from kvmtasks.config.runfiles import RunFiles, clean_run_files, current, is_our_qemu, read_pid
from kvmtasks.engines import portprobe, poweroff, statusreport
from kvmtasks.engines.qemu import machine, qmp, savestate
from kvmtasks.engines.qemu.argv import qemu_argv
from kvmtasks.errors import VmError
from kvmtasks.guest import clock, connection, hostkeys, readiness, ssh, sshconfig

Say = Callable[[str], None]
CONSOLE_TAIL_LINES = 20
QUIT_WAIT = 5.0
SOCKET_PATH_MAX = 107


class KvmUnusable(VmError):
    """KVM looked usable but qemu or the guest died under it (nested virtualisation)."""


def console_tail(part: Part, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        text = RunFiles.of(part).console_log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _details(part: Part, stderr: str = "") -> str:
    console_log = RunFiles.of(part).console_log
    tail = console_tail(part)
    if tail:
        sections = [f"--- last lines of {console_log} ---\n{tail}"]
    else:
        sections = [f"--- {console_log} is empty: the guest wrote nothing to its serial console ---"]
    if stderr.strip():
        sections.append(f"--- qemu's stderr ---\n{stderr.strip()}")
    return "\n".join(sections)


def choose_accel(part: Part) -> Accel:
    accel = part.effective_accel
    if accel is Accel.AUTO:
        return Accel.KVM if os.access("/dev/kvm", os.R_OK | os.W_OK) else Accel.TCG
    return accel


def _preflight(part: Part) -> str:
    """Check what qemu needs before starting it; return the forwards' listen address."""
    files = RunFiles.of(part)
    command.find(part.kvm_binary)
    for what, disk in (("image", part.image_path), ("overlay", part.boot_disk)):
        if not disk.exists():  # an overlay without its image would not boot either
            raise VmError(f"{what} {disk} not found; run: doit provision:{part.name}")
    if part.cloud_init and not seedrules.seed_path(part).exists():
        raise VmError(f"cloud-init seed {seedrules.seed_path(part)} not found; "
                      f"run: doit provision:{part.name}")
    if len(str(files.qmp_socket)) > SOCKET_PATH_MAX:
        raise VmError(
            f"kvm_run_directory path is too long for a unix socket: {files.qmp_socket}"
        )
    part.state_directory.mkdir(parents=True, exist_ok=True)
    sshconfig.write(part)  # a path ssh cannot take is refused before qemu starts
    address = listen_address(part.ssh_hostname)
    for forward in forwards(part):
        portprobe.check_free(forward.protocol, address, forward.host_port)
    return address


def start(part: Part, say: Say = print, *, loadvm: str | None = None) -> None:
    """Start the VM and wait until it answers; leave nothing running on failure.

    A suspended VM resumes instead; loadvm names a snapshot of the boot disk to start from.
    """
    status = current(part)
    if status.running:
        if part.ssh_port is not None and not connection.is_open(part):
            connection.open_master(part)
        say(f"{part.name} is already running (pid {status.pid})")
        return
    address = _preflight(part)
    part.state_directory.mkdir(parents=True, exist_ok=True)
    _keep_previous_console_log(part)
    machine_type = machine.resolve(part)
    if loadvm is None and _resume(part, address, machine_type, say):
        return
    hostkeys.prepare(part)
    extra = ("-loadvm", loadvm) if loadvm is not None else ()
    accel = choose_accel(part)
    try:
        deadline = _boot(part, accel, address, machine_type, extra)
    except KvmUnusable as error:
        if part.effective_accel is not Accel.AUTO:
            raise VmError(f"{error}; set kvm_accel = tcg or auto", error.details) from None
        say(f"{part.name}: {error}; starting again under TCG (software emulation, slower)")
        deadline = _boot(part, Accel.TCG, address, machine_type, extra)
    if loadvm is not None:
        set_clock(part, say)
    if part.ssh_port is not None:
        readiness.wait(part, deadline, say)
    say(f"{part.name} is running (pid {current(part).pid}, accel {RunFiles.of(part).accel.read_text()})")


def _resume(part: Part, address: str, machine_type: str | None, say: Say) -> bool:
    """Start the suspended VM from its saved state; False (state discarded) when it cannot."""
    found = savestate.saved(part)
    if found is None:
        return False
    accel = Accel(found.accel)
    argv = _argv(part, accel, address, machine_type)
    reason = savestate.mismatch(part, found, argv)
    if reason is None:
        try:
            _boot(part, accel, address, machine_type, savestate.INCOMING, found)
        except VmError as error:
            reason = f"QEMU could not load it: {error}"
            _keep_previous_console_log(part)
    savestate.discard(part)
    if reason is not None:
        say(f"{part.name}: the suspended state is discarded, {reason}; booting afresh")
        return False
    set_clock(part, say)
    say(f"{part.name} resumed (pid {current(part).pid}, accel {accel.value})")
    return True


def set_clock(part: Part, say: Say) -> None:
    """The guest's clock stood still while its state was saved: set it from the host's."""
    problem = clock.set_from_host(part)
    if problem is not None:
        say(f"{part.name}: the guest's clock could not be set from the host's ({problem})")


def _keep_previous_console_log(part: Part) -> None:
    """QEMU truncates console.log at start: keep the last boot's as console.log.1."""
    console_log = RunFiles.of(part).console_log
    if console_log.exists():
        os.replace(console_log, console_log.with_name(console_log.name + ".1"))


def _argv(part: Part, accel: Accel, address: str, machine_type: str | None) -> list[str]:
    return qemu_argv(part, accel=accel.value, disk_format=boot_disk_format(part),
                     listen_address=address, machine=machine_type)


def _boot(part: Part, accel: Accel, address: str, machine_type: str | None,
          extra: tuple[str, ...] = (), incoming: savestate.Saved | None = None) -> float:
    """Boot and wait for the guest; return the deadline kvm_boot_timeout sets for this boot."""
    files = RunFiles.of(part)
    argv = [*_argv(part, accel, address, machine_type), *extra]
    started_at = time.monotonic()
    result = command.run(argv, timeout=120)
    if result.exit_code != 0:
        clean_run_files(files)
        message = _first_error_line(result.stderr) or f"exit status {result.exit_code}"
        if accel is Accel.KVM and "kvm" in result.stderr.lower():
            raise KvmUnusable(f"qemu could not start under KVM ({message})")
        raise VmError(f"qemu failed to start: {message}", _details(part, result.stderr))
    files.accel.write_text(accel.value)
    deadline = started_at + part.kvm_boot_timeout
    try:
        if incoming is not None:
            savestate.load(part, incoming)
        _wait_until_ready(part, accel, deadline)
    except (VmError, KeyboardInterrupt):
        _kill(part)
        raise
    return deadline


def _first_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _wait_until_ready(part: Part, accel: Accel, deadline: float) -> None:
    files = RunFiles.of(part)
    while True:
        if not current(part).running:
            raise VmError("qemu exited while the guest was booting", _details(part))
        state = _query_status(files)
        if state in qmp.DEAD_RUN_STATES:
            if accel is Accel.KVM:
                raise KvmUnusable(f"the guest stopped under KVM (QMP status {state})")
            raise VmError(f"the guest stopped (QMP status {state})", _details(part))
        if part.ssh_port is None:
            if state == "running":
                return
        elif ssh.banner(part.ssh_hostname, part.ssh_port) and connection.open_master(part):
            return
        if time.monotonic() > deadline:
            waited = "answered on ssh" if part.ssh_port is not None else "reached QMP status running"
            raise VmError(
                f"the guest never {waited} within kvm_boot_timeout = "
                f"{part.kvm_boot_timeout:g} s",
                _details(part),
            )
        time.sleep(0.5)


def _query_status(files: RunFiles) -> str | None:
    try:
        return qmp.query_status(files.qmp_socket, timeout=5.0)
    except VmError:
        return None  # QMP not up yet, or busy: ask again on the next round


def _wait_gone(pid: int, files: RunFiles, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not is_our_qemu(pid, files):
            return True
        time.sleep(0.2)
    return not is_our_qemu(pid, files)


def _qmp_command(files: RunFiles, name: str) -> None:
    try:
        with qmp.QmpClient(files.qmp_socket, timeout=5.0) as client:
            client.execute(name)
    except VmError:
        pass  # the escalation to the next, harder step handles it


def _kill(part: Part, graceful_seconds: float = 0.0) -> str | None:
    """Stop qemu: a power-off asked of the guest, then QMP quit, then SIGTERM and SIGKILL.

    Returns how the guest powered itself off ("acpi" or "ssh"), or None when QEMU was ended.
    """
    files = RunFiles.of(part)
    pid = read_pid(files)
    powered_off = None
    if pid is not None and is_our_qemu(pid, files):
        if graceful_seconds > 0:
            powered_off = poweroff.power_off(
                part, graceful_seconds, lambda: _qmp_command(files, "system_powerdown"),
                lambda seconds: _wait_gone(pid, files, seconds))
        if powered_off is None:
            _qmp_command(files, "quit")
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and is_our_qemu(pid, files):
                    os.kill(pid, sig)
                if _wait_gone(pid, files, QUIT_WAIT):
                    break
    clean_run_files(files)
    return powered_off


def stop(part: Part, say: Say = print) -> None:
    connection.close(part)
    status = current(part)
    if not status.running:
        if savestate.saved(part) is not None:
            savestate.discard(part)
            say(f"{part.name} was suspended: its saved state is discarded, {part.name} is stopped")
        else:
            say(f"{part.name} is not running")
        return
    how = _kill(part, part.kvm_shutdown_timeout)
    if how is not None:
        say(f"{part.name} stopped ({poweroff.STOPPED_HOW[how]})")
    else:
        say(f"{part.name} stopped (no power-off within kvm_shutdown_timeout = "
            f"{part.kvm_shutdown_timeout:g} s, so QEMU was told to quit)")


def facts(part: Part) -> statusreport.Facts:
    return statusreport.gather(part, address=listen_address(part.ssh_hostname),
                         console_log=RunFiles.of(part).console_log,
                         suspended=savestate.saved(part) is not None)


def suspend(part: Part, say: Say = print) -> None:
    """Save the running VM's state and stop QEMU; start resumes it."""
    status = current(part)
    if not status.running or status.pid is None:
        if savestate.saved(part) is not None:
            say(f"{part.name} is already suspended")
            return
        raise VmError(f"{part.name} is not running: there is nothing to suspend")
    if part.kvm_snapshot:
        raise VmError(savestate.KVM_SNAPSHOT_SUSPEND)
    connection.close(part)
    try:
        record = savestate.save(part, status.pid, status.accel or choose_accel(part).value)
    except VmError:
        connection.open_master(part)  # the VM runs on: keep it as fast to reach as it was
        raise
    _kill(part)
    savestate.finish(part, record)
    size = savestate.state_file(part).stat().st_size
    say(f"{part.name} suspended ({size / 1e6:.0f} MB state in {savestate.state_file(part)}); "
        f"start resumes it")

