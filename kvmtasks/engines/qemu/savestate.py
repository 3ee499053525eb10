"""Suspend and resume: the running VM's whole state saved to a file, and loaded back.

QEMU writes and reads the state through file descriptors kvmtasks opens and passes over QMP
(``getfd`` + ``migrate``/``migrate-incoming`` ``fd:NAME``): QEMU 7.2 has no ``file:`` URI,
and ``exec:`` would hand the path to a shell.

A state belongs to one argv and one boot disk: the record next to it holds the QEMU argv
the VM ran with and the disk's identity (device, inode, size, mtime) after QEMU exited.
Anything else (re-provisioned, reset, another kvm_* value, another QEMU) does not fit.

A suspend or resume killed half way (recover()) is finished or undone by the next operation
on the part: QEMU carries on a migration whose file it was handed, so a suspend killed after
``migrate`` leaves QEMU paused with the whole state written, and a resume killed before
``migrate-incoming`` leaves QEMU waiting for a state forever.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmtasks.config.diskformat import boot_disk
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles, command_line
from kvmtasks.engines.qemu import qmp
from kvmtasks.errors import VmError

FD_NAME = "kvmtasks-state"
MIGRATION_TIMEOUT = 600.0
# Saving to a local file: no reason to hold QEMU to its network-minded default bandwidth.
MAX_BANDWIDTH = 1 << 40
# The argv option that makes QEMU wait for migrate-incoming.
INCOMING = ("-incoming", "defer")
KVM_SNAPSHOT_SUSPEND = ("cannot suspend with kvm_snapshot = true: the guest's disk writes end with "
                        "the VM, so the saved memory would come back without them")


@dataclass(frozen=True)
class Saved:
    """A suspended VM: the state file and what it was saved from."""

    state: Path
    argv: list[str]
    accel: str
    disk: list[Any] | None  # None: QEMU had not exited yet when the record was written
    saved_at: float

    @property
    def size(self) -> int:
        try:
            return self.state.stat().st_size
        except OSError:
            return 0


def state_file(part: Part) -> Path:
    return part.state_directory / "suspended.state"


def record_file(part: Part) -> Path:
    return part.state_directory / "suspended.json"


def disk_identity(part: Part) -> list[Any]:
    path = boot_disk(part)
    try:
        info = path.stat()
    except OSError:
        return [str(path)]
    return [str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]


def saved(part: Part) -> Saved | None:
    """The part's saved state, or None (an unreadable record counts as none: see unusable())."""
    try:
        return _read(part)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read(part: Part) -> Saved | None:
    record = json.loads(record_file(part).read_text())
    disk = record["disk"]
    found = Saved(state_file(part), list(record["argv"]), str(record["accel"]),
                  None if disk is None else list(disk), float(record["saved_at"]))
    return found if found.state.is_file() else None


def unusable(part: Part) -> str | None:
    """Why a state file left on disk cannot be resumed (its record is missing or unreadable),
    or None when there is no such file."""
    state = state_file(part)
    if not state.is_file():
        return None
    try:
        _read(part)
    except FileNotFoundError:
        return f"its record {record_file(part)} is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its record {record_file(part)} is unreadable ({type(error).__name__}: {error})"
    return None


def discard(part: Part) -> None:
    record_file(part).unlink(missing_ok=True)
    state_file(part).unlink(missing_ok=True)
    state_file(part).with_suffix(".part").unlink(missing_ok=True)


def started_from(argv: list[str]) -> list[str]:
    """argv without what kvmtasks appends to start from a saved state (INCOMING, -loadvm NAME):
    the VM is the same machine whichever way it started."""
    if len(argv) >= 2 and (tuple(argv[-2:]) == INCOMING or argv[-2] == "-loadvm"):
        return argv[:-2]
    return argv


def mismatch(part: Part, found: Saved, argv: list[str]) -> str | None:
    """Why the saved state does not fit the VM that would start now, or None when it does."""
    if found.disk is not None and found.disk != disk_identity(part):
        # Not "re-provisioned or reset": a guess the user may know is wrong misleads.
        return f"the boot disk {boot_disk(part)} changed after the VM was suspended"
    if found.argv != argv[1:]:
        return "the QEMU command line changed since (kvm_* options, disk_size, or QEMU itself)"
    return None


# query-migrate's states while a migration goes on.
ACTIVE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling"})


def _wait_for_migration(client: qmp.QmpClient, what: str) -> None:
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    while True:
        info = client.execute("query-migrate") or {}
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VmError(f"{what} failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise VmError(f"{what} did not finish within {MIGRATION_TIMEOUT:g} s")
        time.sleep(0.02)


def save(part: Part, pid: int, accel: str) -> dict[str, Any]:
    """Write the running VM's state to the part's state file; QEMU stays, paused.

    Returns the record, written without the disk: finish() completes it once QEMU has exited
    and the disk is final. Interrupted (Ctrl-C), the save is cancelled and the VM runs on.
    """
    files = RunFiles.of(part)
    partial = state_file(part).with_suffix(".part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with qmp.QmpClient(files.qmp_socket, timeout=30.0) as client:
            client.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
            client.pass_fd(FD_NAME, fd)
            client.execute("migrate", uri=f"fd:{FD_NAME}")
            _wait_for_migration(client, "saving the VM's state")
    except KeyboardInterrupt:
        # A new session: the interrupted one may hold half a reply.
        with qmp.QmpClient(files.qmp_socket, timeout=30.0) as client:
            _cancel(client)
        partial.unlink(missing_ok=True)
        raise
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return _keep(part, pid, accel)


def _keep(part: Part, pid: int, accel: str) -> dict[str, Any]:
    """The state QEMU wrote completely goes to its name, with a record that lacks the disk."""
    partial = state_file(part).with_suffix(".part")
    if partial.exists():
        partial.replace(state_file(part))
    record: dict[str, Any] = {"argv": started_from(command_line(pid))[1:], "accel": accel,
                              "saved_at": time.time()}
    _write_record(part, {**record, "disk": None})
    return record


def _cancel(client: qmp.QmpClient) -> None:
    """Stop the save and let the VM run on, whether the save had finished or not."""
    client.execute("migrate_cancel")
    deadline = time.monotonic() + 30
    while (client.execute("query-migrate") or {}).get("status") in ACTIVE:
        if time.monotonic() > deadline:
            raise VmError("the save of the VM's state could not be cancelled within 30 s")
        time.sleep(0.02)
    if client.execute("query-status")["status"] != "running":
        client.execute("cont")


def finish(part: Part, record: dict[str, Any]) -> None:
    """After QEMU exited: record the disk as it now is, which makes the state usable."""
    _write_record(part, {**record, "disk": disk_identity(part)})


def _write_record(part: Part, record: dict[str, Any]) -> None:
    temporary = record_file(part).with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    temporary.replace(record_file(part))


def finish_interrupted(part: Part) -> bool:
    """A suspend killed once QEMU had exited: the state and its record wait for the disk's
    identity. True when that is what was found (and is now done)."""
    try:
        record = json.loads(record_file(part).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or "disk" not in record or record["disk"] is not None:
        return False
    finish(part, record)
    return True


def saving(part: Part) -> bool:
    """QEMU is writing a state out (a save whose kvmtasks was killed goes on without it)."""
    try:
        with qmp.QmpClient(RunFiles.of(part).qmp_socket, timeout=5.0) as client:
            return (client.execute("query-migrate") or {}).get("status") in ACTIVE
    except VmError:
        return False


def interrupted_save(part: Part, pid: int, accel: str) -> dict[str, Any] | None:
    """QEMU paused by a save whose kvmtasks was killed: wait for QEMU to finish writing, then
    keep the state as save() would have. The record, or None when no save was under way
    (a failed or cancelled one: the VM is let run on)."""
    with qmp.QmpClient(RunFiles.of(part).qmp_socket, timeout=30.0) as client:
        status = (client.execute("query-migrate") or {}).get("status")
        if status in ACTIVE:
            _wait_for_migration(client, "saving the VM's state")
            status = "completed"
        partial = state_file(part).with_suffix(".part")
        if status != "completed" or not (partial.exists() or state_file(part).exists()):
            if client.execute("query-status")["status"] != "running":
                client.execute("cont")
            partial.unlink(missing_ok=True)
            return None
    return _keep(part, pid, accel)


def load(part: Part, found: Saved) -> None:
    """Feed the saved state to a QEMU started with INCOMING; it runs on once loaded.

    A state QEMU cannot load makes it exit: that shows here as QMP closing.
    """
    files = RunFiles.of(part)
    fd = os.open(found.state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _load(files, fd)
    except VmError as error:
        # QMP closing is all QEMU says of a state it cannot read: name the file instead.
        raise VmError(f"{found.state} ({found.size / 1e6:.0f} MB) is damaged or truncated",
                      str(error)) from None
    finally:
        os.close(fd)


def _load(files: RunFiles, fd: int) -> None:
    with qmp.QmpClient(files.qmp_socket, timeout=30.0) as client:
        client.pass_fd(FD_NAME, fd)
        client.execute("migrate-incoming", uri=f"fd:{FD_NAME}")
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        # The destination forgets its migration status once done: ask for the run state.
        while client.execute("query-status")["status"] == "inmigrate":
            if time.monotonic() > deadline:
                raise VmError(f"loading it did not finish within {MIGRATION_TIMEOUT:g} s")
            time.sleep(0.02)
