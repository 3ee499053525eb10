"""What named snapshots are, whatever the engine: the name rule, the parts that cannot hold
them, the refusals both engines give, and the listing ``snapshot list`` prints."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from kvmtasks.config.diskformat import boot_disk, boot_disk_format
from kvmtasks.config.part import Part, path_is_block_device
from kvmtasks.errors import VmError

# A letter first: QEMU reads an all-digit name as a snapshot's numeric id.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9._+-]{0,63}")


@dataclass(frozen=True)
class Snapshot:
    name: str
    saved_at: float
    state_size: int | None  # bytes of memory state; None where libvirt does not say


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise VmError(f"snapshot name {name!r}: a letter, then letters, digits, '.', '_', '+' or '-' "
                      "(64 characters at most)")


def check_supported(part: Part) -> None:
    """Refuse, with the reason, a part whose boot disk cannot hold snapshots."""
    if part.kvm_snapshot:
        raise VmError("no snapshots with kvm_snapshot = true: the guest's writes go to a temporary "
                      "file QEMU drops, so a snapshot could not be kept")
    disk = boot_disk(part)
    if path_is_block_device(disk):
        raise VmError(f"no snapshots on {disk}: it is a block device, and snapshots live in a "
                      "qcow2 boot disk")
    disk_format = boot_disk_format(part)
    if disk_format != "qcow2":
        raise VmError(f"no snapshots on {disk}: it is {disk_format}, and snapshots live in a qcow2 "
                      "boot disk (overlay = true gives one; or qemu-img convert -O qcow2)")


def check_request(part: Part, name: str) -> None:
    """What every snapshot operation checks first, before the engine is asked anything."""
    check_supported(part)
    check_name(name)


def not_running(part: Part) -> VmError:
    return VmError(f"{part.name} is not running: a snapshot saves a running VM; start it first")


def not_found(part: Part, name: str, where: str) -> VmError:
    return VmError(f"no snapshot {name} {where} (see: {part.name}-ctl snapshot list)")


def saved_line(part: Part, name: str, replaced: bool, how: str) -> str:
    return f"{part.name}: snapshot {name} {'replaced' if replaced else 'saved'} ({how})"


def listing_lines(found: list[Snapshot], none: str) -> list[str]:
    """The lines ``snapshot list`` prints: name, date, size of the memory state."""
    if not found:
        return [none]
    width = max(len("NAME"), *(len(snapshot.name) for snapshot in found))
    lines = [f"{'NAME':<{width}}  {'DATE':<19}  SIZE"]
    for snapshot in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.saved_at))
        size = "-" if snapshot.state_size is None else f"{snapshot.state_size / 1e6:.0f} MB"
        lines.append(f"{snapshot.name:<{width}}  {when}  {size}")
    return lines
