"""Disk image formats, read from the header so that QEMU never probes a raw image."""

from __future__ import annotations

from pathlib import Path

from kvmtasks.config.part import Part, path_is_block_device
from kvmtasks.errors import ConfigError

# Magic numbers of the formats QEMU is most often given; anything else is raw.
_MAGIC = ((b"QFI\xfb", "qcow2"), (b"KDMV", "vmdk"), (b"QED\x00", "qed"), (b"conectix", "vpc"))
_VDI_SIGNATURE = (0x40, b"\x7f\x10\xda\xbe")


def disk_format(path: Path) -> str:
    """The image format from its header, so QEMU never probes a raw image."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(512)
    except OSError as error:
        raise ConfigError(f"cannot read image {path}: {error.strerror or error}") from None
    for magic, name in _MAGIC:
        if header.startswith(magic):
            return name
    offset, signature = _VDI_SIGNATURE
    if header[offset:offset + len(signature)] == signature:
        return "vdi"
    return "raw"


def boot_disk(part: Part) -> Path:
    """The disk QEMU boots, the one that holds snapshots and that a saved state belongs to.

    Everything that means "the disk the VM runs on" asks here, and only here.
    """
    return part.boot_disk


def boot_disk_format(part: Part) -> str:
    """The boot disk's real format; a block device is always given to QEMU as raw."""
    disk = boot_disk(part)
    return "raw" if path_is_block_device(disk) else disk_format(disk)
