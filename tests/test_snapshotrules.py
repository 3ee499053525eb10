"""The snapshot rules both engines share: names, the parts refused, the listing (no guest)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.engines.snapshotrules import Snapshot, check_name, check_request, listing_lines
from kvmtasks.errors import VmError


def load(tmp_path: Path, body: str) -> Part:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\n{body}")
    (part,) = load_file(path, tmp_path)
    return part


@pytest.mark.parametrize("name", ["a", "before-upgrade", "v1.2_rc+3", "x" * 64])
def test_names_that_pass(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", ["", "1", "42abc", "-x", "with space", "a/b", "x" * 65, "é"])
def test_names_refused_in_one_line(name: str) -> None:
    with pytest.raises(VmError, match=r"^snapshot name .*64 characters at most\)$"):
        check_name(name)


def test_kvm_snapshot_is_refused_before_the_disk_is_read(tmp_path: Path) -> None:
    part = load(tmp_path, "file = missing.qcow2\nkvm_snapshot = true\n")
    with pytest.raises(VmError, match="no snapshots with kvm_snapshot = true"):
        check_request(part, "good")


def test_a_raw_boot_disk_is_refused_with_the_way_out(tmp_path: Path) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(1 << 20))
    part = load(tmp_path, "file = disk.raw\n")
    with pytest.raises(VmError, match=r"it is raw, .*overlay = true gives one"):
        check_request(part, "good")


def test_a_qcow2_boot_disk_passes_and_the_name_is_checked_after(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    part = load(tmp_path, "file = disk.qcow2\n")
    check_request(part, "good")
    with pytest.raises(VmError, match="snapshot name '9'"):
        check_request(part, "9")


def test_listing_lines_align_names_and_say_none() -> None:
    assert listing_lines([], "no snapshots in d.qcow2") == ["no snapshots in d.qcow2"]
    at = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    lines = listing_lines([Snapshot("a", at, 12_400_000), Snapshot("longer-name", at, None)], "none")
    assert lines == [
        "NAME         DATE                 SIZE",
        "a            2026-01-02 03:04:05  12 MB",
        "longer-name  2026-01-02 03:04:05  -",
    ]
