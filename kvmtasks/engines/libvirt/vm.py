"""The libvirt engine's primitives for the lifecycle (engines/lifecycle.py): the part's VM as a
libvirt domain named after the part, on a local or remote host.

Everything goes through ``virsh`` (one argv per call, through command.run):
the forwarded ports are checked free on the host (hostports.py), the
files QEMU opens itself readable by its user (qemufiles.py), the
volumes are made ready (storage.py), the domain is defined
from domain.py and started (or resumed from its managed save,
managedsave.py), and the guest is reached over ssh as with the
direct QEMU engine.
"""

from __future__ import annotations

import json
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

from kvmtasks.config import seedrules
from kvmtasks.config.options import Accel, Firmware
from kvmtasks.config.part import Part, listen_address
from kvmtasks.config.remote import remote_of
from kvmtasks.config.runfiles import RunFiles, Status, clean_network_sockets
from kvmtasks.engines import lifecycle, statusreport
from kvmtasks.engines.libvirt import hostports, layervolume, managedsave, netfolder, qemufiles, storage
from kvmtasks.engines.libvirt.domain import domain_xml, made_by_kvmtasks
from kvmtasks.engines.libvirt.virsh import STOPPED_DOMAIN_STATES, VirshError, virsh
from kvmtasks.engines.lifecycle import Say, Seen
from kvmtasks.engines.running import current
from kvmtasks.errors import VmError


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


def _first_accel(part: Part) -> Accel:
    """kvm_accel = auto: KVM when the libvirt host offers it for the domain."""
    accel = part.effective_accel
    if accel is not Accel.AUTO:
        return accel
    try:
        virsh(part, "domcapabilities", "--virttype", "kvm", timeout=60)
    except VmError:
        return Accel.TCG
    return Accel.KVM


def domain_type(accel: Accel | str) -> str:
    """libvirt's name for the accelerator: a "kvm" or a "qemu" (TCG) domain."""
    return "kvm" if accel in (Accel.KVM, "kvm") else "qemu"


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


class LibvirtMachine:
    engine = "libvirt"
    uses_ssh_master = False  # every ssh logs in on its own, as this engine always did
    forced_off = "the domain was destroyed"
    poll_seconds = 0.5  # each look is a virsh call

    def __init__(self, part: Part) -> None:
        self.part = part
        self.uuid: str | None = None

    def where(self, status: Status) -> str:
        return f"libvirt domain {self.part.name} on {self.part.libvirt_uri}"

    def prepare(self) -> None:
        """The forwards free on the libvirt host (reached through the part's ssh config, which
        lifecycle.start has written), the files QEMU opens readable, the private networks'
        folders open to it, our domain's uuid."""
        check_ports(self.part)
        qemufiles.check_readable(self.part)
        netfolder.prepare(self.part)
        self.uuid = _our_domain_uuid(self.part)

    def console_log(self) -> Path | None:
        # A remote host keeps the console log: QEMU writes it there.
        return RunFiles.of(self.part).console_log if remote_of(self.part) is None else None

    def has_saved_state(self) -> bool:
        # libvirt's own word, not kvmtasks' record: a state saved behind its back is discarded too.
        return self.uuid is not None and managedsave.has_managed_save(self.part)

    def suspended(self) -> bool:
        return managedsave.suspended(self.part)

    def misfit(self) -> str | None:
        record = managedsave.recorded(self.part)
        if not record:
            return "kvmtasks did not save it"
        saved_fit = managedsave.fit(self.part, _xml(self.part, record.get("domain_type", "qemu"), None))
        if record.get("fit") != saved_fit:
            return "the part changed since (re-provisioned, reset, or kvm_* options)"
        return None

    def load_saved(self) -> Accel:
        saved_type = managedsave.recorded(self.part).get("domain_type", "qemu")
        virsh(self.part, "start", self.part.name, timeout=managedsave.SAVE_TIMEOUT)
        mark_started(self.part, saved_type)
        return Accel.KVM if saved_type == "kvm" else Accel.TCG

    def discard_saved(self) -> None:
        managedsave.discard(self.part)

    def provide(self, say: Say) -> None:
        """The pool and the volumes on the libvirt host, uploaded only when their bytes changed."""
        part = self.part
        storage.ensure_pool(part)
        top_layer = layervolume.top_layer_of(part)
        if top_layer is None:
            storage.upload(part, part.image_path, storage.volume_name(part), storage.volume_record(part), say)
            image_format = None
        else:  # setup steps: the volume holds the top layer's chain, flattened
            image_format = layervolume.ensure_image_volume(part, top_layer, say)
        if part.cloud_init:
            storage.upload(part, seedrules.seed_path(part), storage.seed_volume_name(part),
                           storage.seed_record(part), say)
        if part.overlay:
            storage.ensure_overlay_volume(part, image_format)

    def first_accel(self) -> Accel:
        return _first_accel(self.part)

    def launch(self, accel: Accel, loadvm: str | None) -> None:
        """Define the domain for the accelerator and start it."""
        if loadvm is not None:
            raise VmError("libvirt starts from a snapshot by reverting to it (snapshot restore)")
        _define(self.part, domain_type(accel), self.uuid)
        if self.uuid is None:
            self.uuid = virsh(self.part, "domuuid", self.part.name).strip()
        reset_nvram = self.part.firmware is not Firmware.BIOS and self.part.nvram_reset_mark.exists()
        virsh(self.part, "start", self.part.name, *(["--reset-nvram"] if reset_nvram else []))
        mark_started(self.part, domain_type(accel))
        if reset_nvram:
            self.part.nvram_reset_mark.unlink(missing_ok=True)
        if self.part.firmware is not Firmware.BIOS:
            _record_nvram(self.part)

    def seen(self) -> Seen:
        state = virsh(self.part, "domstate", self.part.name).strip()
        if state in STOPPED_DOMAIN_STATES:
            return Seen(ended=f"libvirt domain {state}")
        if state == "paused":
            # libvirt 9.0 shows QEMU's internal-error (KVM failing a nested guest) as
            # "paused (unknown)": QEMU's own run state tells it from a pause.
            run_state = _qemu_run_state(self.part)
            if run_state in lifecycle.DEAD_RUN_STATES:
                return Seen(ended=f"QEMU status {run_state}")
        return Seen(running=state == "running")

    def press_power_button(self) -> None:
        virsh(self.part, "shutdown", self.part.name)

    def force_off(self) -> None:
        _destroy(self.part)

    def save_state(self, status: Status) -> str:
        managedsave.save(self.part, domain_type(status.accel or "qemu"),
                         managedsave.fit(self.part, _defined_xml(self.part).read_text()))
        RunFiles.of(self.part).domain.unlink(missing_ok=True)
        clean_network_sockets(self.part)
        return f"libvirt managed save on {self.part.libvirt_uri}"

    def recover(self, say: Say) -> None:
        pass  # libvirtd, not kvmtasks, carries a managed save or its restore to the end

    def facts(self) -> statusreport.Facts:
        facts = statusreport.gather(
            self.part, address=_listen_address(self.part), console_log=self.console_log(),
            libvirt_uri=self.part.libvirt_uri,
            suspended=not current(self.part).running and managedsave.suspended(self.part))
        # The variables are in the domain's nvram on the libvirt host, not in a file of the part's.
        disks = {role: path for role, path in facts.disks.items() if role != "varstore"}
        nvram = _nvram(self.part) if self.part.firmware is not Firmware.BIOS else None
        return replace(facts, disks={**disks, **({"varstore": nvram} if nvram else {})})


def machine_of(part: Part) -> lifecycle.Machine:
    return LibvirtMachine(part)


def mark_started(part: Part, domain_type: str) -> None:
    """What status and "is it running" read: the domain kvmtasks started, and its accelerator."""
    files = RunFiles.of(part)
    files.domain.write_text(json.dumps({"uri": part.libvirt_uri, "name": part.name}))
    files.accel.write_text("tcg" if domain_type == "qemu" else "kvm")


def wait_for_login(part: Part) -> None:
    """After a revert: the guest runs on from its saved memory, so only ssh needs to answer."""
    lifecycle.wait_until_ready(LibvirtMachine(part), Accel.TCG, time.monotonic() + part.kvm_boot_timeout)


def _qemu_run_state(part: Part) -> str | None:
    try:
        answer = virsh(part, "qemu-monitor-command", part.name, '{"execute":"query-status"}', timeout=30)
        status: str = json.loads(answer)["return"]["status"]
    except (VmError, ValueError, KeyError, TypeError):
        return None
    return status


def nvram_record(part: Part) -> Path:
    """The path of the domain's nvram on the libvirt host, as the last start had it: libvirt 9.0
    names it only in a running domain's XML (a defined one keeps just ``firmware='efi'``)."""
    return part.state_directory / "libvirt-nvram"


def _record_nvram(part: Part) -> None:
    live = ET.fromstring(virsh(part, "dumpxml", part.name, timeout=60))  # noqa: S314 (libvirtd's own answer)
    path = live.findtext("os/nvram")
    if path:
        nvram_record(part).write_text(path)


def _nvram(part: Part) -> Path | None:
    try:
        return Path(nvram_record(part).read_text())
    except OSError:
        return None


def _destroy(part: Part) -> None:
    try:
        virsh(part, "destroy", part.name)
    except VirshError as error:
        if not (error.not_running or error.not_found):
            raise
    RunFiles.of(part).domain.unlink(missing_ok=True)
    clean_network_sockets(part)  # QEMU leaves the sockets it bound
