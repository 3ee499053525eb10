"""Named snapshots on libvirt: the domain's internal snapshots, disk and memory together.

``virsh snapshot-create-as`` of a running domain keeps its memory and devices inside the
qcow2 boot volume (the overlay volume), as QEMU's savevm does for the direct engine;
``snapshot-revert`` brings a running or stopped domain back to one, running;
``snapshot-list`` and ``snapshot-delete`` do the rest. The same refusals as the direct
engine's (raw disk, kvm_snapshot) come first, before libvirt is asked anything.
"""

from __future__ import annotations

import calendar
import time

from kvmtasks.config.diskformat import boot_disk
from kvmtasks.config.options import Firmware
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.engines import lifecycle, sharing
from kvmtasks.engines.libvirt import managedsave, vm
from kvmtasks.engines.libvirt.virsh import virsh
from kvmtasks.engines.running import current
from kvmtasks.engines.snapshotrules import (
    Snapshot,
    check_request,
    check_supported,
    listing_lines,
    not_found,
    not_running,
    saved_line,
)
from kvmtasks.errors import VmError

# libvirt saves or reverts a running domain's memory in one virsh call: as long as savevm takes.
SNAPSHOT_TIMEOUT = 600.0


def listing(part: Part) -> list[Snapshot]:
    """The domain's snapshots, oldest first; none when kvmtasks never defined the domain."""
    check_supported(part)
    if part.name not in virsh(part, "list", "--all", "--name").split():
        return []
    found = []
    # "NAME  YYYY-MM-DD HH:MM:SS +ZZZZ  STATE": names never hold blanks (check_name).
    for line in virsh(part, "snapshot-list", part.name).splitlines():
        fields = line.split()
        if len(fields) >= 4:
            stamp = time.strptime(f"{fields[1]} {fields[2]} {fields[3]}", "%Y-%m-%d %H:%M:%S %z")
            found.append(Snapshot(fields[0], calendar.timegm(stamp) - stamp.tm_gmtoff, None))
    return sorted(found, key=lambda snapshot: snapshot.saved_at)


def _existing(part: Part, name: str) -> None:
    if not any(snapshot.name == name for snapshot in listing(part)):
        raise not_found(part, name, f"of libvirt domain {part.name}")


def save(part: Part, name: str, say: lifecycle.Say = print) -> None:
    check_request(part, name)
    if part.firmware is not Firmware.BIOS:
        # libvirt 9.0 refuses internal snapshots of a domain with pflash firmware (its nvram).
        raise VmError(f"no named snapshots of {part.name} on libvirt: libvirt takes none of a domain "
                      f"booted through UEFI (firmware = {part.firmware.value}); suspend keeps its state, "
                      "and kvm_engine = qemu snapshots UEFI parts with their variables")
    if not current(part).running:
        raise not_running(part)
    replaced = any(snapshot.name == name for snapshot in listing(part))
    sharing.detach(part, f"save snapshot {name}")
    if replaced:
        virsh(part, "snapshot-delete", part.name, name, timeout=SNAPSHOT_TIMEOUT)
    virsh(part, "snapshot-create-as", part.name, name, timeout=SNAPSHOT_TIMEOUT)
    say(saved_line(part, name, replaced, f"libvirt domain {part.name} on {part.libvirt_uri}"))


def restore(part: Part, name: str, say: lifecycle.Say = print) -> None:
    """A running domain jumps back to the snapshot; a stopped (or suspended) one starts from it."""
    check_request(part, name)
    _existing(part, name)
    running = current(part).running
    if not running:
        vm.check_ports(part)
    if not running and managedsave.suspended(part):
        managedsave.discard(part)
        say(f"{part.name}: the suspended state is discarded, snapshot {name} replaces it")
    virsh(part, "snapshot-revert", part.name, name, "--running", timeout=SNAPSHOT_TIMEOUT)
    files = RunFiles.of(part)
    if not running:
        vm.mark_started(part, "kvm" if "type='kvm'" in virsh(part, "dumpxml", part.name) else "qemu")
    if part.ssh_port is not None:
        vm.wait_for_login(part)
    lifecycle.set_clock(part, say)
    sharing.attach(part, say)  # the copies as the host has them now
    if running:
        say(f"{part.name}: restored snapshot {name}")
    else:
        say(f"{part.name}: started from snapshot {name} (accel {files.accel.read_text()})")


def delete(part: Part, name: str, say: lifecycle.Say = print) -> None:
    check_request(part, name)
    _existing(part, name)
    virsh(part, "snapshot-delete", part.name, name, timeout=SNAPSHOT_TIMEOUT)
    say(f"{part.name}: snapshot {name} deleted")


def describe(part: Part) -> list[str]:
    return listing_lines(listing(part), f"no snapshots of libvirt domain {part.name} ({boot_disk(part)})")
