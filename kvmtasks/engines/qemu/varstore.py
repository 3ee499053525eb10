"""A part's own UEFI variable store: a copy of its firmware's template, made before the first
boot and kept beside the overlay (config/part.py ``varstore_path``).

The copy is qcow2 so that named snapshots (savevm) cover the variables as they cover the disk:
QEMU snapshots every writable drive or refuses. `reset` deletes it (provision/overlay.py) and the
next start copies the template again; the packaged template is only ever read.
"""

from __future__ import annotations

from kvmtasks import command
from kvmtasks.config.archrules import FIRMWARE_PACKAGES
from kvmtasks.config.options import Firmware
from kvmtasks.config.part import Part
from kvmtasks.engines.qemu import firmware
from kvmtasks.errors import VmError


def ensure(part: Part, descriptor: firmware.Descriptor) -> None:
    """The part's variable store, copied from the descriptor's template when it has none."""
    store = part.varstore_path
    if store.exists():
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    partial = store.with_name(store.name + ".part")
    try:
        command.checked(["qemu-img", "convert", "-f", descriptor.template_format, "-O", "qcow2",
                         "--", str(descriptor.template), str(partial)],
                        timeout=120, doing=f"copying the UEFI variable store {descriptor.template}")
        partial.replace(store)
    finally:
        partial.unlink(missing_ok=True)


def prepare(part: Part, machine: str | None) -> firmware.Flash | None:
    """The flash a UEFI part boots with (None for the BIOS); its variable store made when missing.

    A VmError names the Debian package when no installed descriptor fits.
    """
    if part.firmware is Firmware.BIOS:
        return None
    descriptor = firmware.choose(firmware.read_all(), part.kvm_arch, machine, part.firmware)
    if descriptor is None:
        package = FIRMWARE_PACKAGES.get(part.kvm_arch, "the firmware")
        on = f" on {machine}" if machine else ""
        folders = ", ".join(str(folder) for folder in firmware.DESCRIPTOR_FOLDERS)
        raise VmError(f"firmware = {part.firmware.value} for {part.kvm_arch.value}{on}: no QEMU "
                      f"firmware descriptor fits (in {folders}); install the {package} package")
    ensure(part, descriptor)
    return firmware.Flash(code=descriptor.code, code_format=descriptor.code_format,
                          varstore=part.varstore_path, secure=descriptor.requires_smm)
