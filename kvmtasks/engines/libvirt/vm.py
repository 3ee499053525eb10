"""Run a part's VM as a libvirt domain named after the part, on a local or remote host.

Everything goes through ``virsh`` (one argv per call, through command.run):
the forwarded ports are checked free on the host (hostports.py), the
volumes are made ready (storage.py), the domain is defined
from domain.py and started (or resumed from its managed save,
managedsave.py), and the guest is reached over ssh as with the
direct QEMU engine.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvmtasks.config import seedrules
from kvmtasks.config.options import Accel
from kvmtasks.config.part import Part, listen_address
from kvmtasks.config.remote import remote_of
from kvmtasks.config.runfiles import RunFiles, current, virsh
from kvmtasks.engines import poweroff, statusreport
from kvmtasks.engines.libvirt import hostports, managedsave, storage
from kvmtasks.engines.libvirt.domain import domain_xml, made_by_kvmtasks
from kvmtasks.engines.qemu import qmp
from kvmtasks.engines.qemu.savestate import KVM_SNAPSHOT_SUSPEND
from kvmtasks.errors import VmError
from kvmtasks.guest import clock, hostkeys, readiness, ssh, sshconfig

Say = Callable[[str], None]
POLL = 0.5
STOPPED_STATES = frozenset({"shut off", "crashed"})


class KvmUnusable(VmError):
    """The host offers KVM, yet the guest died under it (nested virtualisation)."""


def _our_domain_uuid(part: Part) -> str | None:
    """The uuid of the part's domain when kvmtasks defined it before; a foreign one is refused."""
    names = virsh(part, "list", "--all", "--name").split()
    if part.name not in names:
        return None
    if not made_by_kvmtasks(virsh(part, "dumpxml", part.name)):
        raise VmError(
            f"a domain named {part.name} exists on {part.libvirt_uri} and was not made by kvmtasks; "
            "it is left alone: rename the part or remove that domain"
        )
    return virsh(part, "domuuid", part.name).strip()


def _domain_type(part: Part) -> str:
    accel = part.effective_accel
    if accel is Accel.TCG:
        return "qemu"
    if accel is Accel.KVM:
        return "kvm"
    probe = ["domcapabilities", "--virttype", "kvm"]
    try:
        virsh(part, *probe, timeout=60)
    except VmError:
        return "qemu"
    return "kvm"


def _listen_address(part: Part) -> str:
    # On a remote host the forwards listen on its loopback; ssh reaches them through it.
    return "127.0.0.1" if remote_of(part) is not None else listen_address(part.ssh_hostname)


def check_ports(part: Part) -> None:
    """The forwards must be free on the libvirt host before the domain (re)starts."""
    hostports.check_free(part, _listen_address(part))


def _xml(part: Part, domain_type: str, uuid: str | None) -> str:
    remote = remote_of(part) is not None
    return domain_xml(
        part, domain_type=domain_type,
        disk=storage.boot_volume(part),
        listen_address=_listen_address(part),
        console_log=None if remote else RunFiles.of(part).console_log,
        uuid=uuid,
        seed=storage.seed_volume(part),
    )


def _defined_xml(part: Part) -> Path:
    """The XML kvmtasks last defined the domain with: what a suspended state belongs to."""
    return part.state_directory / "libvirt-domain.xml"


def _define(part: Part, domain_type: str, uuid: str | None) -> None:
    xml = _xml(part, domain_type, uuid)
    with tempfile.NamedTemporaryFile("w", dir=part.state_directory, suffix=".xml",
                                     delete=False) as handle:
        handle.write(xml)
    try:
        virsh(part, "define", handle.name)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    # Without the uuid: libvirt's name for the domain, not part of what the VM is.
    _defined_xml(part).write_text(_xml(part, domain_type, None))


def start(part: Part, say: Say = print) -> None:
    status = current(part)
    if status.running:
        say(f"{part.name} is already running (libvirt domain {part.name} on {part.libvirt_uri})")
        return
    disks = [part.image_path, part.boot_disk, *([seedrules.seed_path(part)] if part.cloud_init else [])]
    for disk in disks:
        if not disk.exists():
            raise VmError(f"{disk} not found; run: doit provision:{part.name}")
    part.state_directory.mkdir(parents=True, exist_ok=True)
    sshconfig.write(part)  # a path ssh cannot take is refused before anything starts
    check_ports(part)
    hostkeys.prepare(part)
    uuid = _our_domain_uuid(part)
    if uuid is not None and managedsave.has_managed_save(part) and _resume(part, say):
        return
    storage.ensure_pool(part)
    storage.upload(part, part.image_path, storage.volume_name(part),
                           storage.volume_record(part), say)
    if part.cloud_init:
        # The seed travels like the image: uploaded again only when its bytes changed.
        storage.upload(part, seedrules.seed_path(part), storage.seed_volume_name(part),
                               storage.seed_record(part), say)
    if part.overlay:
        storage.ensure_overlay_volume(part)
    domain_type = _domain_type(part)
    deadline = time.monotonic() + part.kvm_boot_timeout  # for cloud-init, after the login
    try:
        _boot(part, domain_type, uuid)
    except KvmUnusable as error:
        if part.effective_accel is not Accel.AUTO:
            raise VmError(f"{error}; set kvm_accel = tcg or auto") from None
        say(f"{part.name}: {error}; starting again under TCG (software emulation, slower)")
        _boot(part, "qemu", virsh(part, "domuuid", part.name).strip())
    if part.ssh_port is not None:
        readiness.wait(part, deadline, say)
    accel = RunFiles.of(part).accel.read_text()
    say(f"{part.name} is running (libvirt domain {part.name} on {part.libvirt_uri}, accel {accel})")


def _resume(part: Part, say: Say) -> bool:
    """Start the domain from its managed save; False (state discarded) when it cannot."""
    record = managedsave.recorded(part)
    domain_type = record.get("domain_type", "qemu")
    reason = None
    if not record:
        reason = "kvmtasks did not save it"
    elif record.get("fit") != managedsave.fit(part, _xml(part, domain_type, None)):
        reason = "the part changed since (re-provisioned, reset, or kvm_* options)"
    else:
        try:
            virsh(part, "start", part.name, timeout=managedsave.SAVE_TIMEOUT)
            mark_started(part, domain_type)
            _wait_until_ready(part, "qemu", time.monotonic() + part.kvm_boot_timeout)
        except VmError as error:
            reason = f"libvirt could not load it: {error}"
            _destroy(part)
    managedsave.discard(part)  # libvirt drops the state it loaded; a failed one goes too
    if reason is not None:
        say(f"{part.name}: the suspended state is discarded, {reason}; booting afresh")
        return False
    set_clock(part, say)
    say(f"{part.name} resumed (libvirt domain {part.name} on {part.libvirt_uri}, "
        f"accel {RunFiles.of(part).accel.read_text()})")
    return True


def set_clock(part: Part, say: Say) -> None:
    """The guest's clock stood still while its state was saved: set it from the host's."""
    problem = clock.set_from_host(part)
    if problem is not None:
        say(f"{part.name}: the guest's clock could not be set from the host's ({problem})")


def _boot(part: Part, domain_type: str, uuid: str | None) -> None:
    """Define and start the domain, wait for ssh; KvmUnusable when the guest died under KVM."""
    _define(part, domain_type, uuid)
    virsh(part, "start", part.name)
    mark_started(part, domain_type)
    try:
        _wait_until_ready(part, domain_type, time.monotonic() + part.kvm_boot_timeout)
    except (VmError, KeyboardInterrupt):
        _destroy(part)
        raise


def mark_started(part: Part, domain_type: str) -> None:
    """What status and "is it running" read: the domain kvmtasks started, and its accelerator."""
    files = RunFiles.of(part)
    files.domain.write_text(json.dumps({"uri": part.libvirt_uri, "name": part.name}))
    files.accel.write_text("tcg" if domain_type == "qemu" else "kvm")


def wait_for_login(part: Part) -> None:
    """After a revert: the guest runs on from its saved memory, so only ssh needs to answer."""
    _wait_until_ready(part, "qemu", time.monotonic() + part.kvm_boot_timeout)


def _wait_until_ready(part: Part, domain_type: str, deadline: float) -> None:
    while True:
        state = virsh(part, "domstate", part.name).strip()
        if state in STOPPED_STATES:
            RunFiles.of(part).domain.unlink(missing_ok=True)
            if domain_type == "kvm":
                raise KvmUnusable(f"the guest stopped under KVM (libvirt domain {state})")
            raise VmError(f"the guest stopped while booting (libvirt domain {state})")
        if state == "paused" and domain_type == "kvm":
            # libvirt 9.0 shows QEMU's internal-error (KVM failing a nested guest) as
            # "paused (unknown)": QEMU's own run state tells it from a pause.
            run_state = _qemu_run_state(part)
            if run_state in qmp.DEAD_RUN_STATES:
                raise KvmUnusable(f"the guest stopped under KVM (QEMU status {run_state})")
        if part.ssh_port is None:
            if state == "running":
                return
        elif ssh.can_log_in(part):
            return
        if time.monotonic() > deadline:
            waited = "answered on ssh" if part.ssh_port is not None else "ran"
            raise VmError(f"the guest never {waited} within kvm_boot_timeout = "
                          f"{part.kvm_boot_timeout:g} s")
        time.sleep(POLL)


def _qemu_run_state(part: Part) -> str | None:
    try:
        answer = virsh(part, "qemu-monitor-command", part.name, '{"execute":"query-status"}', timeout=30)
        status: str = json.loads(answer)["return"]["status"]
    except (VmError, ValueError, KeyError, TypeError):
        return None
    return status


def _destroy(part: Part) -> None:
    try:
        virsh(part, "destroy", part.name)
    except VmError as error:
        if "not running" not in str(error) and "not found" not in str(error).lower():
            raise
    RunFiles.of(part).domain.unlink(missing_ok=True)


def _gone_within(part: Part, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not current(part).running:
            return True
        time.sleep(POLL)
    return not current(part).running


def stop(part: Part, say: Say = print) -> None:
    if not current(part).running:
        if managedsave.suspended(part):
            managedsave.discard(part)
            say(f"{part.name} was suspended: its saved state is discarded, {part.name} is stopped")
        else:
            say(f"{part.name} is not running")
        return
    how = poweroff.power_off(part, part.kvm_shutdown_timeout, lambda: virsh(part, "shutdown", part.name),
                             lambda seconds: _gone_within(part, seconds))
    if how is not None:
        say(f"{part.name} stopped ({poweroff.STOPPED_HOW[how]})")
        return
    _destroy(part)
    say(f"{part.name} stopped (no power-off within kvm_shutdown_timeout = "
        f"{part.kvm_shutdown_timeout:g} s, so the domain was destroyed)")


def facts(part: Part) -> statusreport.Facts:
    # A remote host keeps the console log: QEMU writes it there.
    local = remote_of(part) is None
    return statusreport.gather(part, address=_listen_address(part),
                         console_log=RunFiles.of(part).console_log if local else None,
                         libvirt_uri=part.libvirt_uri,
                         suspended=not current(part).running and managedsave.suspended(part))


def suspend(part: Part, say: Say = print) -> None:
    """Save the running domain's state on its host (managed save) and stop it; start resumes it."""
    status = current(part)
    if not status.running:
        if managedsave.suspended(part):
            say(f"{part.name} is already suspended")
            return
        raise VmError(f"{part.name} is not running: there is nothing to suspend")
    if part.kvm_snapshot:
        raise VmError(KVM_SNAPSHOT_SUSPEND)
    domain_type = "kvm" if status.accel == "kvm" else "qemu"
    managedsave.save(part, domain_type, managedsave.fit(part, _defined_xml(part).read_text()))
    RunFiles.of(part).domain.unlink(missing_ok=True)
    say(f"{part.name} suspended (libvirt managed save on {part.libvirt_uri}); start resumes it")
