"""Suspend and resume: the running VM's whole state saved to a file, and loaded back.

QEMU writes and reads the state through file descriptors kvmtasks opens and passes over QMP
(``getfd`` + ``migrate``/``migrate-incoming`` ``fd:NAME``): QEMU 7.2 has no ``file:`` URI,
and ``exec:`` would hand the path to a shell.

A state belongs to one argv and one boot disk: the record next to it holds the QEMU argv
the VM ran with and the disk's identity (device, inode, size, mtime) after QEMU exited.
Anything else (re-provisioned, reset, another kvm_* value, another QEMU) does not fit.
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
    disk: list[Any]
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
    """The part's saved state, or None (an unreadable record counts as none)."""
    try:
        record = json.loads(record_file(part).read_text())
        found = Saved(state_file(part), list(record["argv"]), str(record["accel"]),
                      list(record["disk"]), float(record["saved_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if found.state.is_file() else None


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
    if found.disk != disk_identity(part):
        return f"the boot disk {boot_disk(part)} changed since (re-provisioned or reset)"
    if found.argv != argv[1:]:
        return "the QEMU command line changed since (kvm_* options, disk_size, or QEMU itself)"
    return None


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

    Returns the record that finish() completes once QEMU has exited and the disk is final.
    """
    files = RunFiles.of(part)
    partial = state_file(part).with_suffix(".part")
    record: dict[str, Any] = {"argv": started_from(command_line(pid))[1:], "accel": accel}
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with qmp.QmpClient(files.qmp_socket, timeout=30.0) as client:
            client.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
            client.pass_fd(FD_NAME, fd)
            client.execute("migrate", uri=f"fd:{FD_NAME}")
            _wait_for_migration(client, "saving the VM's state")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    partial.replace(state_file(part))
    record["saved_at"] = time.time()
    return record


def finish(part: Part, record: dict[str, Any]) -> None:
    """After QEMU exited: record the disk as it now is, which makes the state usable."""
    temporary = record_file(part).with_suffix(".tmp")
    temporary.write_text(json.dumps({**record, "disk": disk_identity(part)}))
    temporary.replace(record_file(part))


def load(part: Part, found: Saved) -> None:
    """Feed the saved state to a QEMU started with INCOMING; it runs on once loaded.

    A state QEMU cannot load makes it exit: that shows here as QMP closing.
    """
    files = RunFiles.of(part)
    fd = os.open(found.state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with qmp.QmpClient(files.qmp_socket, timeout=30.0) as client:
            client.pass_fd(FD_NAME, fd)
            client.execute("migrate-incoming", uri=f"fd:{FD_NAME}")
            deadline = time.monotonic() + MIGRATION_TIMEOUT
            # The destination forgets its migration status once done: ask for the run state.
            while client.execute("query-status")["status"] == "inmigrate":
                if time.monotonic() > deadline:
                    raise VmError(f"loading the saved state did not finish within {MIGRATION_TIMEOUT:g} s")
                time.sleep(0.02)
    finally:
        os.close(fd)
