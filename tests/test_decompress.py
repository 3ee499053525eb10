"""Decompressing a download into the image, and recognising an image's format."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtasks.config import diskformat
from kvmtasks.errors import KvmTasksError, VerifyError
from kvmtasks.provision import decompress


def test_gunzip_writes_the_image_and_returns_its_digests(tmp_path: Path) -> None:
    raw = os.urandom(3 << 20)
    source = tmp_path / "disk.img.gz"
    source.write_bytes(gzip.compress(raw))
    dest = tmp_path / "disk.img"

    assert decompress.gunzip(source, dest, ["md5", "sha256"]) == {
        "md5": hashlib.md5(raw).hexdigest(), "sha256": hashlib.sha256(raw).hexdigest()}
    assert dest.read_bytes() == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "disk.img.gz"]


def test_gunzip_reads_every_member(tmp_path: Path) -> None:
    source = tmp_path / "disk.img.gz"
    source.write_bytes(gzip.compress(b"first ") + gzip.compress(b"second ") + gzip.compress(b"third"))
    dest = tmp_path / "disk.img"

    decompress.gunzip(source, dest, [])

    assert dest.read_bytes() == b"first second third"


@pytest.mark.parametrize("damage", ["not gzip", "corrupt", "truncated", "empty member cut"])
def test_a_bad_gzip_is_a_verify_error_and_leaves_nothing(tmp_path: Path, damage: str) -> None:
    packed = gzip.compress(os.urandom(200_000))
    data = {
        "not gzip": b"plain bytes, no gzip header",
        "corrupt": packed[:20] + bytes(b ^ 0x5A for b in packed[20:2000]) + packed[2000:],
        "truncated": packed[: len(packed) - 100],
        "empty member cut": gzip.compress(b"")[:12],
    }[damage]
    source = tmp_path / "disk.img.gz"
    source.write_bytes(data)
    dest = tmp_path / "disk.img"

    with pytest.raises(VerifyError) as error:
        decompress.gunzip(source, dest, ["md5"])

    assert str(error.value).startswith(f"{source} is not a valid gzip file (")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img.gz"]


def test_a_missing_download_is_reported(tmp_path: Path) -> None:
    with pytest.raises(KvmTasksError, match=r"decompressing .*missing\.gz"):
        decompress.gunzip(tmp_path / "missing.gz", tmp_path / "disk.img", [])


@pytest.mark.parametrize(("header", "expected"), [
    (b"QFI\xfb\x00\x00\x00\x03", "qcow2"),
    (b"KDMV\x01\x00\x00\x00", "vmdk"),
    (b"QED\x00", "qed"),
    (b"conectix\x00\x00", "vpc"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\x00") + b"\x7f\x10\xda\xbe", "vdi"),
    (b"\xeb\x63\x90" + b"\x00" * 509, "raw"),
    (b"", "raw"),
    (b"QFI", "raw"),
])
def test_disk_format_from_the_header(tmp_path: Path, header: bytes, expected: str) -> None:
    path = tmp_path / "disk"
    path.write_bytes(header)

    assert diskformat.disk_format(path) == expected


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "qed", "vpc", "vdi", "raw"])
def test_disk_format_of_images_made_by_qemu_img(tmp_path: Path, fmt: str) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    path = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "1M"], check=True)

    assert diskformat.disk_format(path) == fmt


def test_an_unreadable_image_is_reported(tmp_path: Path) -> None:
    with pytest.raises(KvmTasksError, match=f"cannot read image {tmp_path / 'missing'}"):
        diskformat.disk_format(tmp_path / "missing")
    with pytest.raises(KvmTasksError, match="cannot read image"):
        diskformat.disk_format(tmp_path)


def test_gunzip_leaves_holes_for_zero_blocks_and_reads_back_the_same(tmp_path: Path) -> None:
    block = 4096
    raw = (os.urandom(10_000) + bytes(3 << 20) + os.urandom(block) + bytes(5 * block)
           + os.urandom(7) + bytes(100 * block))
    source = tmp_path / "disk.img.gz"
    source.write_bytes(gzip.compress(raw, compresslevel=1))
    dest = tmp_path / "disk.img"

    digests = decompress.gunzip(source, dest, ["sha256"])

    assert dest.read_bytes() == raw
    assert digests == {"sha256": hashlib.sha256(raw).hexdigest()}
    allocated = dest.stat().st_blocks * 512
    assert allocated <= len(raw) - (3 << 20), "zero blocks take no disk space"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * 4096)), max_size=12))
def test_holes_cover_every_aligned_zero_block_and_nothing_else(pieces: list[tuple[bool, int]]) -> None:
    block = 4096
    chunk = b"".join(bytes(size) if zero else b"\x01" * size for zero, size in pieces)

    holes = list(decompress._holes(chunk))

    for (_, end), (start, _) in itertools.pairwise(holes):
        assert end < start, "in order, apart"
    covered = set()
    for start, end in holes:
        assert start % block == 0 and start < end and (end % block == 0 or end == len(chunk))
        assert chunk[start:end] == bytes(end - start)
        covered |= set(range(start, end, block))
    zero_blocks = {offset for offset in range(0, len(chunk) - block + 1, block)
                   if chunk[offset:offset + block] == bytes(block)}
    assert zero_blocks <= covered


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_without_zlib_ng_the_standard_library_inflates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setitem(sys.modules, "zlib_ng", None)  # as if it were not installed
    raw = os.urandom(300_000) + bytes(1 << 20)
    source = tmp_path / "disk.img.gz"
    source.write_bytes(gzip.compress(raw))
    dest = tmp_path / "disk.img"

    assert decompress.gunzip(source, dest, ["md5"]) == {"md5": hashlib.md5(raw).hexdigest()}
    assert dest.read_bytes() == raw

    packed = gzip.compress(os.urandom(200_000))
    source.write_bytes(packed[:20] + bytes(b ^ 0x5A for b in packed[20:2000]) + packed[2000:]
                       if damage == "corrupt" else packed[:-100])
    with pytest.raises(VerifyError, match="is not a valid gzip file"):
        decompress.gunzip(source, tmp_path / "other.img", ["md5"])
