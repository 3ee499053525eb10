"""A VM's lifecycle, written once for both engines: start (resuming a suspended VM, falling
back from KVM to TCG), the wait until the guest is ready, the clock after a jump in time,
stop, suspend, and what each says.

An engine brings its own primitives as a ``Machine`` (engines/qemu/vm.py, engines/libvirt/vm.py):
launch, what it sees of the VM while it boots, the power button, force off, save and load
its state. Whatever must hold across one whole operation on a part (a lock per part, the
recovery of an interrupted suspend or resume) belongs in the functions here, around those
primitives, so that both engines get it at once.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvmtasks.config import seedrules
from kvmtasks.config.options import Accel
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles, Status
from kvmtasks.engines import partlock, poweroff, sharing
from kvmtasks.engines.running import current
from kvmtasks.engines.statusreport import Facts
from kvmtasks.errors import VmError
from kvmtasks.guest import clock, connection, hostkeys, netsetup, readiness, ssh, sshconfig

Say = Callable[[str], None]
CONSOLE_TAIL_LINES = 20
KVM_SNAPSHOT_SUSPEND = ("cannot suspend with kvm_snapshot = true: the guest's disk writes end with "
                        "the VM, so the saved memory would come back without them")
# QEMU's run states (QMP query-status, under either engine) after which the guest never answers.
DEAD_RUN_STATES = frozenset({"internal-error", "guest-panicked", "shutdown", "io-error"})


class KvmUnusable(VmError):
    """KVM looked usable, yet QEMU or the guest died under it (nested virtualisation)."""


@dataclass(frozen=True)
class Seen:
    """The VM as its engine sees it while the guest boots."""

    ended: str | None = None  # why it is no longer booting, in a few words ("QMP status shutdown")
    running: bool = False  # the guest runs (QEMU's run state, libvirt's domain state)


class Machine(Protocol):
    """One part's VM as one engine runs it: the primitives the lifecycle is written over."""

    part: Part
    engine: str  # the engine's name in messages: "QEMU", "libvirt"
    uses_ssh_master: bool  # the guest is reached through the part's ssh master (guest/connection.py)
    forced_off: str  # how force_off ends a VM, as stop says it: "QEMU was told to quit"
    poll_seconds: float  # how often the VM is looked at while it boots or powers off

    def where(self, status: Status) -> str:
        """Where the running VM is, for messages: "pid 4242", "libvirt domain vm on URI"."""

    def prepare(self) -> None:
        """The engine's checks and setup before anything starts (ports, socket paths, ...)."""

    def console_log(self) -> Path | None:
        """The serial console's log on this machine; None when it is on another host."""

    def has_saved_state(self) -> bool:
        """A suspended state waits to be loaded (start resumes it or discards it)."""

    def suspended(self) -> bool:
        """The VM is stopped with a state kvmtasks saved (what stop, suspend and status say)."""

    def misfit(self) -> str | None:
        """Why the saved state no longer fits the part, or None when it can be loaded."""

    def load_saved(self) -> Accel:
        """Start the VM from its saved state; the accelerator it runs under."""

    def discard_saved(self) -> None: ...

    def provide(self, say: Say) -> None:
        """What a cold boot needs beyond the local disks (libvirt's volumes)."""

    def first_accel(self) -> Accel:
        """The accelerator to try first (kvm_accel = auto: KVM when the host offers it)."""

    def launch(self, accel: Accel, loadvm: str | None) -> None:
        """Start the VM; KvmUnusable when KVM fails at once, VmError otherwise; nothing left."""

    def seen(self) -> Seen: ...

    def press_power_button(self) -> None: ...

    def force_off(self) -> None:
        """End the VM, if it still runs, and forget its run files."""

    def save_state(self, status: Status) -> str:
        """Save the running VM's state and stop it; where the state is, for the message."""

    def facts(self) -> Facts: ...

    def recover(self, say: Say) -> None:
        """Finish or undo what a suspend or resume killed half way left behind."""


def details(console_log: Path | None, stderr: str = "") -> str:
    """What helps to see why a boot failed: the console's last lines, QEMU's stderr."""
    sections = []
    if console_log is not None:
        tail = console_tail(console_log)
        if tail:
            sections.append(f"--- last lines of {console_log} ---\n{tail}")
        else:
            sections.append(f"--- {console_log} is empty: the guest wrote nothing to its serial console ---")
    if stderr.strip():
        sections.append(f"--- qemu's stderr ---\n{stderr.strip()}")
    return "\n".join(sections)


def console_tail(console_log: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        text = console_log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def check_disks(part: Part) -> None:
    """The disks a boot needs, made by provisioning: one wording for every engine."""
    disks = [("image", part.image_path), ("overlay", part.boot_disk)]  # no boot without its image
    if part.cloud_init:
        disks.append(("cloud-init seed", seedrules.seed_path(part)))
    for what, disk in disks:
        if not disk.exists():
            raise VmError(f"{what} {disk} not found; run: doit provision:{part.name}")


def start(machine: Machine, say: Say = print, *, loadvm: str | None = None) -> None:
    """Start the VM and wait until it answers; leave nothing running on failure.

    A suspended VM resumes instead; loadvm names a snapshot of the boot disk to start from.
    """
    part = machine.part
    with partlock.operation(part, "start"):
        machine.recover(say)
        was_running = current(part).running
        try:
            _start(machine, say, loadvm)
        except OSError as error:  # the run directory full, or read-only: a file kvmtasks writes
            if not was_running:
                machine.force_off()  # nothing a failed start launched outlives it
            where = f"{error.filename}: " if error.filename else ""
            raise VmError(f"{part.name} could not start: {where}{error.strerror or error}") from None


def _start(machine: Machine, say: Say, loadvm: str | None) -> None:
    part = machine.part
    status = current(part)
    if status.running:
        if part.ssh_port is not None and not _answers(machine):
            # Started by a run that was killed while the guest booted: wait as that run would have.
            say(f"{part.name} is running ({machine.where(status)}) but does not answer yet: "
                f"waiting for it (kvm_boot_timeout = {part.kvm_boot_timeout:g} s)")
            wait_until_ready(machine, Accel.TCG, time.monotonic() + part.kvm_boot_timeout)
        say(f"{part.name} is already running ({machine.where(status)})")
        return
    check_disks(part)
    part.state_directory.mkdir(parents=True, exist_ok=True)
    # The part's ssh config (the jump too, which a remote host's port check takes): a path
    # ssh cannot take is refused before anything starts.
    sshconfig.write(part)
    machine.prepare()
    _keep_previous_console_log(machine)
    if loadvm is None and _resume(machine, say):
        return
    hostkeys.prepare(part)
    machine.provide(say)
    try:
        deadline = _boot(machine, machine.first_accel(), loadvm)
    except KvmUnusable as error:
        if part.effective_accel is not Accel.AUTO:
            raise VmError(f"{error}; set kvm_accel = tcg or auto", error.details) from None
        say(f"{part.name}: {error}; starting again under TCG (software emulation, slower)")
        deadline = _boot(machine, Accel.TCG, loadvm)
    if loadvm is not None:
        set_clock(part, say)
    if part.ssh_port is not None:
        readiness.wait(part, deadline, say)
        _first_boot_done(part)
        sharing.attach(part, say)
        _join_networks(machine)
    say(f"{part.name} is running ({_where_and_accel(machine)})")


def _join_networks(machine: Machine) -> None:
    """A guest without a seed gets its private networks over ssh (a seed's network-config does
    it for the others); a guest that cannot is stopped, as any start that fails."""
    if not machine.part.links or machine.part.cloud_init:
        return
    try:
        netsetup.configure(machine.part)
    except VmError:
        machine.force_off()
        raise


def _disk_id(part: Part) -> str:
    try:
        info = part.boot_disk.stat()
    except OSError:
        return ""
    return f"{part.boot_disk.absolute()} {info.st_dev} {info.st_ino}"


def _first_boot_done(part: Part) -> None:
    """The guest answered on this disk: its first boot (cloud-init's keys and users) is behind it."""
    with contextlib.suppress(OSError):  # only a stop during the first boot waits without it
        RunFiles.of(part).first_boot.write_text(_disk_id(part))


def in_first_boot(part: Part) -> bool:
    """A cloud-init guest that never answered on this disk: a hard power-off now could leave it
    half set up for good (no ssh host keys), so stop first lets it finish."""
    if not part.cloud_init or part.kvm_snapshot or part.ssh_port is None:
        return False  # with kvm_snapshot, every boot is a first boot and leaves nothing behind
    try:
        return RunFiles.of(part).first_boot.read_text() != _disk_id(part)
    except OSError:
        return True


def _where_and_accel(machine: Machine) -> str:
    return f"{machine.where(current(machine.part))}, accel {RunFiles.of(machine.part).accel.read_text()}"


def _resume(machine: Machine, say: Say) -> bool:
    """Start the suspended VM from its saved state; False (state discarded) when it cannot."""
    part = machine.part
    if not machine.has_saved_state():
        return False
    reason = machine.misfit()
    if reason is None:
        started_at = time.monotonic()
        try:
            accel = machine.load_saved()
        except VmError as error:
            machine.force_off()
            reason = f"{machine.engine} could not load it: {error}"
            _keep_previous_console_log(machine)
        except KeyboardInterrupt:
            machine.force_off()  # the guest never ran: the state on disk still fits
            raise
    machine.discard_saved()  # a loaded state is used up (the guest runs on from it); one that failed goes too
    if reason is None:
        try:
            wait_until_ready(machine, accel, started_at + part.kvm_boot_timeout)
        except VmError as error:
            machine.force_off()
            reason = f"the guest did not answer once resumed: {error}"
        except KeyboardInterrupt:
            machine.force_off()
            raise
    if reason is not None:
        say(f"{part.name}: the suspended state is discarded, {reason}; booting afresh")
        return False
    set_clock(part, say)
    sharing.attach(part, say)  # its mounts went down before the save; the host may have changed
    say(f"{part.name} resumed ({_where_and_accel(machine)})")
    return True


def _boot(machine: Machine, accel: Accel, loadvm: str | None) -> float:
    """Boot and wait for the guest; return the deadline kvm_boot_timeout sets for this boot."""
    started_at = time.monotonic()
    machine.launch(accel, loadvm)
    deadline = started_at + machine.part.kvm_boot_timeout
    try:
        wait_until_ready(machine, accel, deadline)
    except (VmError, KeyboardInterrupt):
        machine.force_off()
        raise
    return deadline


def wait_until_ready(machine: Machine, accel: Accel, deadline: float) -> None:
    """Until the guest lets us log in (or runs, without ssh_port); the reason when it never does."""
    part = machine.part
    while True:
        seen = machine.seen()
        if seen.ended is not None:
            if accel is Accel.KVM:
                raise KvmUnusable(f"the guest stopped under KVM ({seen.ended})")
            raise VmError(f"the guest stopped while booting ({seen.ended})",
                          details(machine.console_log()))
        if part.ssh_port is None:
            if seen.running:
                return
        elif _answers(machine):
            return
        if time.monotonic() > deadline:
            waited = "answered on ssh" if part.ssh_port is not None else "ran"
            raise VmError(f"the guest never {waited} within kvm_boot_timeout = "
                          f"{part.kvm_boot_timeout:g} s", details(machine.console_log()))
        time.sleep(machine.poll_seconds)


def _answers(machine: Machine) -> bool:
    part = machine.part
    assert part.ssh_port is not None
    if machine.uses_ssh_master:
        if connection.is_open(part):
            return True
        # The master's login is the proof that the guest answers; the banner spares a slow try.
        return ssh.banner(part.ssh_hostname, part.ssh_port) and connection.open_master(part)
    return ssh.can_log_in(part)


def set_clock(part: Part, say: Say) -> None:
    """The guest's clock stood still while its state was saved: set it from the host's."""
    problem = clock.set_from_host(part)
    if problem is not None:
        say(f"{part.name}: the guest's clock could not be set from the host's ({problem})")


def _keep_previous_console_log(machine: Machine) -> None:
    """QEMU truncates the console log at start: keep the last boot's as console.log.1."""
    console_log = machine.console_log()
    if console_log is not None and console_log.exists():
        os.replace(console_log, console_log.with_name(console_log.name + ".1"))


def gone_within(machine: Machine, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not current(machine.part).running:
            return True
        time.sleep(machine.poll_seconds)
    return not current(machine.part).running


def stop(machine: Machine, say: Say = print) -> None:
    """Power the VM off (poweroff.py's policy), else end it; a suspended VM's state is discarded."""
    with partlock.operation(machine.part, "stop"):
        machine.recover(say)
        _stop(machine, say)


def _stop(machine: Machine, say: Say) -> None:
    part = machine.part
    connection.close(part)
    if not current(part).running:
        if machine.suspended():
            machine.discard_saved()
            say(f"{part.name} was suspended: its saved state is discarded, {part.name} is stopped")
        else:
            say(f"{part.name} is not running")
        return
    if in_first_boot(part):
        _finish_first_boot(machine, say)
    how = poweroff.power_off(part, part.kvm_shutdown_timeout, machine.press_power_button,
                             lambda seconds: gone_within(machine, seconds))
    machine.force_off()  # after a power-off, only its run files are left to forget
    if how is not None:
        say(f"{part.name} stopped ({poweroff.STOPPED_HOW[how]})")
    else:
        say(f"{part.name} stopped (no power-off within kvm_shutdown_timeout = "
            f"{part.kvm_shutdown_timeout:g} s, so {machine.forced_off})")


def _finish_first_boot(machine: Machine, say: Say) -> None:
    part = machine.part
    say(f"{part.name} is in its first boot (cloud-init sets it up): waiting for it to finish "
        f"before powering it off (kvm_boot_timeout = {part.kvm_boot_timeout:g} s)")
    deadline = time.monotonic() + part.kvm_boot_timeout
    try:
        wait_until_ready(machine, Accel.TCG, deadline)
    except VmError as error:
        say(f"{part.name}: {error}; powering it off all the same")
        return
    readiness.wait(part, deadline, say)
    _first_boot_done(part)
    connection.close(part)


def suspend(machine: Machine, say: Say = print) -> None:
    """Save the running VM's state and stop it; start resumes it."""
    with partlock.operation(machine.part, "suspend"):
        machine.recover(say)
        _suspend(machine, say)


def _suspend(machine: Machine, say: Say) -> None:
    part = machine.part
    status = current(part)
    if not status.running:
        if machine.suspended():
            say(f"{part.name} is already suspended")
            return
        raise VmError(f"{part.name} is not running: there is nothing to suspend")
    if part.kvm_snapshot:
        raise VmError(KVM_SNAPSHOT_SUSPEND)
    sharing.detach(part, "suspend")
    connection.close(part)
    try:
        where = machine.save_state(status)
    except KeyboardInterrupt:
        machine.recover(say)  # whatever the moment: the VM runs on, or its state is saved
        if current(part).running:
            say(f"{part.name}: suspend interrupted; the save is cancelled and {part.name} runs on")
            if machine.uses_ssh_master:
                connection.open_master(part)
        else:
            say(f"{part.name}: suspend interrupted once the state was saved; start resumes it")
        raise
    except VmError:
        if machine.uses_ssh_master:
            connection.open_master(part)  # the VM runs on: keep it as fast to reach as it was
        sharing.attach(part, say)
        raise
    say(f"{part.name} suspended ({where}); start resumes it")
