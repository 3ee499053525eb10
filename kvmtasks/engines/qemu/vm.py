"""The direct QEMU engine's primitives for the lifecycle (engines/lifecycle.py): QEMU started
as a daemon with a pid file and a QMP socket, its state saved and loaded through QMP."""

from __future__ import annotations

import os
import platform
import signal
import time
from pathlib import Path
from typing import Any

from kvmtasks import command
from kvmtasks.config.diskformat import boot_disk_format
from kvmtasks.config.options import Accel
from kvmtasks.config.part import Part, forwards, listen_address
from kvmtasks.config.runfiles import (
    RunFiles,
    Status,
    clean_network_sockets,
    clean_run_files,
    command_line,
    is_our_qemu,
    is_private_folder,
    long_path_socket_folder,
    network_folder,
    read_pid,
    runtime_folder,
)
from kvmtasks.engines import lifecycle, portprobe, statusreport
from kvmtasks.engines.lifecycle import KvmUnusable, Say, Seen
from kvmtasks.engines.qemu import machine, qmp, savestate, varstore, virtiofs
from kvmtasks.engines.qemu.argv import qemu_argv
from kvmtasks.engines.qemu.firmware import Flash
from kvmtasks.engines.running import current
from kvmtasks.engines.statusreport import State
from kvmtasks.errors import CommandFailed, VmError

QUIT_WAIT = 5.0
# QEMU's run states while or after it saves a VM's state: the guest is frozen.
SAVE_RUN_STATES = frozenset({"finish-migrate", "postmigrate", "paused"})
# What status says of a VM frozen between running and suspended.
BETWEEN = {
    "finish-migrate": State.SUSPENDING, "postmigrate": State.SUSPENDING, "inmigrate": State.RESUMING,
}


def choose_accel(part: Part) -> Accel:
    accel = part.effective_accel
    if accel is Accel.AUTO:
        return Accel.KVM if kvm_runs(part) else Accel.TCG
    if accel is Accel.KVM and not native(part):
        raise VmError(f"{part.name}: kvm_accel = kvm cannot run a {part.kvm_arch.value} guest on this "
                      f"{platform.machine()} host; set kvm_accel = tcg or auto")
    return accel


def native(part: Part) -> bool:
    """Whether the guest's architecture is the host's: KVM runs only those."""
    return part.kvm_arch.value == platform.machine()


def kvm_runs(part: Part) -> bool:
    return native(part) and os.access("/dev/kvm", os.R_OK | os.W_OK)


class QemuMachine:
    engine = "QEMU"
    uses_ssh_master = True
    forced_off = "QEMU was told to quit"
    poll_seconds = 0.2

    def __init__(self, part: Part) -> None:
        self.part = part
        self.files = RunFiles.of(part)
        self.address = listen_address(part.ssh_hostname)
        self.machine_type: str | None = None
        self.flash: Flash | None = None

    def where(self, status: Status) -> str:
        return f"pid {status.pid}"

    def prepare(self) -> None:
        """What QEMU needs before it starts: its binary, a short socket path, free ports."""
        command.find(self.part.kvm_binary)
        if self.files.qmp_socket.parent == long_path_socket_folder():
            _private_folder(long_path_socket_folder(), "QMP socket")
        for forward in forwards(self.part):
            portprobe.check_free(forward.protocol, self.address, forward.host_port)
        for link in self.part.links:
            _private_folder(runtime_folder(), "private networks' sockets")
            _private_folder(network_folder(link), "private networks' sockets")
        self.machine_type = machine.resolve(self.part)
        self.flash = varstore.prepare(self.part, self.machine_type)

    def console_log(self) -> Path:
        return self.files.console_log

    def has_saved_state(self) -> bool:
        return savestate.saved(self.part) is not None

    suspended = has_saved_state

    def misfit(self) -> str | None:
        found = savestate.saved(self.part)
        assert found is not None
        return savestate.mismatch(self.part, found, self._argv(Accel(found.accel)))

    def load_saved(self) -> Accel:
        found = savestate.saved(self.part)
        assert found is not None
        accel = Accel(found.accel)
        self._run(accel, savestate.INCOMING)
        savestate.load(self.part, found)
        return accel

    def discard_saved(self) -> None:
        savestate.discard(self.part)

    def provide(self, say: Say) -> None:
        pass  # QEMU opens the local disks itself

    def first_accel(self) -> Accel:
        return choose_accel(self.part)

    def launch(self, accel: Accel, loadvm: str | None) -> None:
        self._run(accel, ("-loadvm", loadvm) if loadvm is not None else ())

    def _argv(self, accel: Accel) -> list[str]:
        return qemu_argv(self.part, accel=accel.value, disk_format=boot_disk_format(self.part),
                         listen_address=self.address, machine=self.machine_type, flash=self.flash)

    def _run(self, accel: Accel, extra: tuple[str, ...]) -> None:
        virtiofs.start(self.part)
        try:
            command.checked([*self._argv(accel), *extra], timeout=120)
        except CommandFailed as error:
            virtiofs.stop(self.part)
            clean_run_files(self.files)
            message = error.reason or f"exit status {error.exit_code}"
            if accel is Accel.KVM and "kvm" in error.stderr.lower():
                raise KvmUnusable(f"qemu could not start under KVM ({message})") from None
            raise VmError(f"qemu failed to start: {message}",
                          lifecycle.details(self.files.console_log, error.stderr)) from None
        self.files.accel.write_text(accel.value)

    def seen(self) -> Seen:
        if not current(self.part).running:
            return Seen(ended="qemu exited")
        try:
            state = qmp.query_status(self.files.qmp_socket, timeout=5.0)
        except VmError:
            return Seen()  # QMP not up yet, or busy: ask again on the next round
        if state in lifecycle.DEAD_RUN_STATES:
            return Seen(ended=f"QMP status {state}")
        return Seen(running=state == "running")

    def press_power_button(self) -> None:
        self._qmp_command("system_powerdown")

    def _qmp_command(self, name: str) -> None:
        try:
            with qmp.QmpClient(self.files.qmp_socket, timeout=5.0) as client:
                client.execute(name)
        except VmError:
            pass  # the escalation to the next, harder step handles it

    def force_off(self) -> None:
        """QMP quit, then SIGTERM, then SIGKILL; the run files go."""
        pid = read_pid(self.files)
        if pid is not None and is_our_qemu(pid, self.files):
            self._qmp_command("quit")
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and is_our_qemu(pid, self.files):
                    os.kill(pid, sig)
                if self._gone(pid, QUIT_WAIT):
                    break
        virtiofs.stop(self.part)
        clean_run_files(self.files)
        clean_network_sockets(self.part)

    def _gone(self, pid: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not is_our_qemu(pid, self.files):
                return True
            time.sleep(self.poll_seconds)
        return not is_our_qemu(pid, self.files)

    def save_state(self, status: Status) -> str:
        assert status.pid is not None
        record = savestate.save(self.part, status.pid, status.accel or choose_accel(self.part).value)
        return self._end_saved(record)

    def _end_saved(self, record: dict[str, Any]) -> str:
        self.force_off()
        savestate.finish(self.part, record)
        state = savestate.state_file(self.part)
        return f"{state.stat().st_size / 1e6:.0f} MB state in {state}"

    def recover(self, say: Say) -> None:
        """Finish or undo what a killed suspend or resume left (savestate.py says how)."""
        part = self.part
        status = current(part)
        if not status.running:
            if savestate.finish_interrupted(part):
                say(f"{part.name}: an interrupted suspend is completed; start resumes it")
            savestate.state_file(part).with_suffix(".part").unlink(missing_ok=True)
            problem = savestate.unusable(part)
            if problem is not None:
                state = savestate.state_file(part)
                size = state.stat().st_size / 1e6
                savestate.discard(part)
                say(f"{part.name}: the suspended state {state} ({size:.0f} MB) cannot be resumed, "
                    f"{problem}: it is deleted")
            return
        assert status.pid is not None
        run_state = self._run_state()
        if run_state == "inmigrate":
            self.force_off()
            say(f"{part.name}: an interrupted resume is undone (QEMU was still waiting for the "
                "saved state); the saved state is kept")
        elif run_state in SAVE_RUN_STATES or savestate.saving(part):
            record = savestate.interrupted_save(part, status.pid, status.accel or choose_accel(part).value)
            if record is None:
                say(f"{part.name}: an interrupted suspend is undone; {part.name} runs on")
            else:
                where = self._end_saved(record)
                say(f"{part.name}: an interrupted suspend is completed ({where})")
        elif tuple(command_line(status.pid)[-2:]) == savestate.INCOMING:
            savestate.discard(part)  # QEMU runs from the state: a killed resume had loaded it

    def _run_state(self) -> str | None:
        try:
            return qmp.query_status(self.files.qmp_socket, timeout=5.0)
        except VmError:
            return None

    def facts(self) -> statusreport.Facts:
        status = current(self.part)
        run_state = self._run_state() if status.running else None
        return statusreport.gather(
            self.part, address=self.address, console_log=self.files.console_log,
            suspended=savestate.saved(self.part) is not None, between=BETWEEN.get(run_state or ""),
            problem=None if status.running else savestate.unusable(self.part))


def machine_of(part: Part) -> lifecycle.Machine:
    return QemuMachine(part)


def _private_folder(path: Path, what: str) -> None:
    """Sockets go where no other user can connect to them, send to them or bind them."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise VmError(f"cannot create {path} for the {what}: {error.strerror}") from None
    if not is_private_folder(path):
        raise VmError(f"{path} is not a folder only you can use (owner, mode 0700): "
                      f"nothing for the {what} is put there")
