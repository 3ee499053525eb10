"""The saved state's record on disk (no VM): what counts as a state to resume, and what is said
of a state file whose record is missing or garbled."""

from __future__ import annotations

import json
from pathlib import Path

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.engines.qemu import savestate


def load(tmp_path: Path) -> Part:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\nfile = {tmp_path / 'disk.img'}\n")
    (part,) = load_file(path, tmp_path)
    part.state_directory.mkdir(parents=True)
    (tmp_path / "disk.img").write_bytes(b"\0" * 512)
    return part


def test_a_state_without_a_usable_record_is_said_and_never_resumed(tmp_path: Path) -> None:
    part = load(tmp_path)
    state, record = savestate.state_file(part), savestate.record_file(part)
    assert savestate.unusable(part) is None  # no state at all
    state.write_bytes(b"QEVM")
    assert savestate.unusable(part) == f"its record {record} is missing"
    record.write_text("{garbage")
    problem = savestate.unusable(part)
    assert problem is not None and problem.startswith(f"its record {record} is unreadable (JSONDecodeError: ")
    assert savestate.saved(part) is None
    record.write_text(json.dumps({"argv": [], "accel": "tcg", "disk": None, "saved_at": 1.0}))
    assert savestate.unusable(part) is None


def test_a_suspend_killed_after_qemu_exited_is_finished(tmp_path: Path) -> None:
    """The record is written without the disk before QEMU is told to quit; a kill -9 then
    leaves it so, and the next operation records the disk as it is."""
    part = load(tmp_path)
    savestate.state_file(part).write_bytes(b"QEVM")
    savestate.record_file(part).write_text(json.dumps({"argv": ["-m", "256M"], "accel": "tcg",
                                                       "disk": None, "saved_at": 1.0}))
    assert savestate.finish_interrupted(part)
    found = savestate.saved(part)
    assert found is not None and found.disk == savestate.disk_identity(part)
    assert savestate.mismatch(part, found, ["qemu", "-m", "256M"]) is None
    assert not savestate.finish_interrupted(part)  # done once


def test_a_changed_disk_is_said_without_guessing_why(tmp_path: Path) -> None:
    part = load(tmp_path)
    savestate.state_file(part).write_bytes(b"QEVM")
    savestate.finish(part, {"argv": [], "accel": "tcg", "saved_at": 1.0})
    (tmp_path / "disk.img").write_bytes(b"\1" * 1024)
    found = savestate.saved(part)
    assert found is not None
    assert savestate.mismatch(part, found, ["qemu"]) == (
        f"the boot disk {part.boot_disk} changed after the VM was suspended")
