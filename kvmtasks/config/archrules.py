"""What a part's architecture and firmware allow, decided from the config alone.

The host's side (is the QEMU program there, is the firmware package installed) is the engine's
question at start; here only what no host could run is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvmtasks.config.options import Arch, Firmware, ImageType
from kvmtasks.errors import ConfigError

# Debian 12's package for each architecture's QEMU program and UEFI firmware (named in errors).
QEMU_PACKAGES = {Arch.X86_64: "qemu-system-x86", Arch.AARCH64: "qemu-system-arm",
                 Arch.RISCV64: "qemu-system-misc"}
FIRMWARE_PACKAGES = {Arch.X86_64: "ovmf", Arch.AARCH64: "qemu-efi-aarch64"}
# Why riscv64 is refused: QEMU runs it (qemu-system-misc, opensbi, u-boot-qemu), but Debian 12
# has no EDK2 build for it (qemu-efi-riscv64 comes with Debian 13), hence no firmware descriptor
# and no variable store: neither `bios` nor `uefi` would mean what it means elsewhere.
RISCV64_REFUSED = ("not supported: Debian 12 packages no UEFI firmware for riscv64 "
                   "(no qemu-efi-riscv64, no QEMU firmware descriptor); use x86_64 or aarch64")


def default_binary(arch: Arch) -> str:
    return f"qemu-system-{arch.value}"


def default_firmware(arch: Arch) -> Firmware:
    """What a user of that architecture expects to boot: the PC BIOS on x86_64, UEFI elsewhere."""
    return Firmware.BIOS if arch is Arch.X86_64 else Firmware.UEFI


def check(values: Mapping[str, Any], where: str) -> tuple[Arch, Firmware]:
    """The part's architecture and firmware; a ConfigError naming the option for what cannot run."""
    arch: Arch = values["kvm_arch"]
    if arch is Arch.RISCV64:
        raise ConfigError(f"{where} kvm_arch = riscv64: {RISCV64_REFUSED}")
    firmware: Firmware = values.get("firmware") or default_firmware(arch)
    if firmware is Firmware.BIOS and arch is not Arch.X86_64:
        raise ConfigError(f"{where} firmware = bios: only x86_64 has a BIOS; "
                          f"kvm_arch = {arch.value} boots through uefi")
    if values["image_type"] is ImageType.HDA and arch is not Arch.X86_64:
        raise ConfigError(f"{where} image_type = hda: the {arch.value} virt machine has no IDE bus; "
                          "use image_type = drive")
    return arch, firmware
