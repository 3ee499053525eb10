"""Named snapshots, disk and memory together, kept inside the qcow2 boot disk.

A running VM saves, restores and deletes them through QEMU (HMP ``savevm``/``loadvm``/
``delvm`` over QMP: one synchronous command each); a stopped VM starts from one with
``-loadvm``, and its snapshots are listed and deleted with ``qemu-img``.
"""

from __future__ import annotations

import json

from kvmtasks import command
from kvmtasks.config.diskformat import boot_disk
from kvmtasks.config.options import Firmware
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.engines import lifecycle, sharing
from kvmtasks.engines.qemu import qmp, savestate, vm
from kvmtasks.engines.qemu.argv import escape
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
from kvmtasks.guest import connection

# savevm of a large guest under TCG takes a while; QEMU answers nothing else meanwhile.
HMP_TIMEOUT = 600.0


def listing(part: Part) -> list[Snapshot]:
    """The boot disk's snapshots, oldest first (read while QEMU runs too: --force-share)."""
    check_supported(part)
    disk = boot_disk(part)
    result = command.checked(["qemu-img", "info", "--force-share", "--output=json", "-f", "qcow2",
                              "--", str(disk)], timeout=60, doing=f"reading the snapshots of {disk}")
    found = json.loads(result.stdout).get("snapshots", [])
    return [Snapshot(item["name"], item["date-sec"] + item["date-nsec"] / 1e9, item["vm-state-size"])
            for item in found]


def _hmp(part: Part, line: str) -> None:
    """One HMP command; HMP reports a failure as text, success as nothing."""
    with qmp.QmpClient(RunFiles.of(part).qmp_socket, timeout=HMP_TIMEOUT) as client:
        output = client.execute("human-monitor-command", **{"command-line": line})
    if output and output.strip():
        raise VmError(f"QEMU: {' '.join(output.split())}")


def _existing(part: Part, name: str) -> Snapshot:
    for snapshot in listing(part):
        if snapshot.name == name:
            return snapshot
    raise not_found(part, name, f"in {boot_disk(part)}")


def save(part: Part, name: str, say: lifecycle.Say = print) -> None:
    check_request(part, name)
    if not current(part).running:
        raise not_running(part)
    replaced = any(snapshot.name == name for snapshot in listing(part))
    sharing.detach(part, f"save snapshot {name}")
    connection.close(part)  # its TCP connection would come back half-open from a restore
    try:
        _hmp(part, f"savevm {name}")
    finally:
        connection.open_master(part)
        sharing.attach(part, say)
    saved = _existing(part, name)
    say(saved_line(part, name, replaced, f"{(saved.state_size or 0) / 1e6:.0f} MB of memory state"))


def restore(part: Part, name: str, say: lifecycle.Say = print) -> None:
    """A running VM jumps back to the snapshot; a stopped (or suspended) one starts from it."""
    check_request(part, name)
    _existing(part, name)
    if not current(part).running:
        if savestate.saved(part) is not None:
            savestate.discard(part)
            say(f"{part.name}: the suspended state is discarded, snapshot {name} replaces it")
        lifecycle.start(vm.QemuMachine(part), say, loadvm=name)
        say(f"{part.name}: started from snapshot {name}")
        return
    connection.close(part)
    try:
        _hmp(part, f"loadvm {name}")
    finally:
        connection.open_master(part)
    lifecycle.set_clock(part, say)
    sharing.attach(part, say)
    say(f"{part.name}: restored snapshot {name}")


def delete(part: Part, name: str, say: lifecycle.Say = print) -> None:
    check_request(part, name)
    _existing(part, name)
    if current(part).running:
        _hmp(part, f"delvm {name}")
    elif savestate.saved(part) is not None:
        # The suspended state belongs to the disk as it is: a rewritten disk would not fit it.
        raise VmError(f"{part.name} is suspended: deleting snapshot {name} would change its disk and "
                      f"lose the suspended state; start it first, then delete {name}")
    else:
        disk = boot_disk(part)
        # qemu-img snapshot has no -f: the format goes in image options, so it never probes.
        image = f"driver=qcow2,file.driver=file,file.filename={escape(disk)}"
        command.checked(["qemu-img", "snapshot", "--image-opts", "-d", name, "--", image],
                        timeout=120, doing=f"deleting snapshot {name} from {disk}")
        _delete_from_varstore(part, name)
    say(f"{part.name}: snapshot {name} deleted")


def _delete_from_varstore(part: Part, name: str) -> None:
    """A UEFI part's savevm also snapshots its variable store (qcow2): delete it there too. One
    that is not there (the store was copied after the snapshot) is no error."""
    store = part.varstore_path
    if part.firmware is Firmware.BIOS or not store.exists():
        return
    image = f"driver=qcow2,file.driver=file,file.filename={escape(store)}"
    command.run(["qemu-img", "snapshot", "--image-opts", "-d", name, "--", image], timeout=120)


def describe(part: Part) -> list[str]:
    """The lines ``snapshot list`` prints: name, date, size of the memory state."""
    return listing_lines(listing(part), f"no snapshots in {boot_disk(part)}")
