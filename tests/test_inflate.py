"""Inflating a download while it arrives: the incremental inflater and the streamed image."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtasks.errors import VerifyError
from kvmtasks.provision import decompress, fetch
from kvmtasks.provision.inflate import BadStream, GzipInflater

RAW = random.Random(1).randbytes(1 << 20) + bytes(3 << 20) + b"kvmtasks " * 100_000
PACKED = gzip.compress(RAW[:1_500_000], compresslevel=1) + bytes(3) + gzip.compress(RAW[1_500_000:])


def inflate(data: bytes, piece: int) -> bytes:
    inflater, out = GzipInflater(), bytearray()
    for start in range(0, len(data), piece):
        for chunk in inflater.inflate(memoryview(data)[start:start + piece]):
            assert len(chunk) <= 1 << 20
            out += chunk
    inflater.end()
    return bytes(out)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=len(PACKED)))
def test_members_and_padding_inflate_whole_whatever_the_pieces(piece: int) -> None:
    assert inflate(PACKED, max(piece, 997)) == RAW


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "not gzip", "garbage after"])
def test_a_bad_stream_is_bad(damage: str) -> None:
    data = {
        "corrupt": PACKED[:200] + bytes(b ^ 0xFF for b in PACKED[200:300]) + PACKED[300:],
        "truncated": PACKED[:-5],
        "not gzip": b"just a disk image",
        "garbage after": PACKED + b"trailing",
    }[damage]

    with pytest.raises(BadStream):
        inflate(data, 65536)


def test_the_streamed_image_is_only_ever_a_part_file_until_committed(tmp_path: Path) -> None:
    download = tmp_path / "disk.img.gz"
    download.write_bytes(PACKED)
    dest = tmp_path / "disk.img"
    image = decompress.StreamedImage(dest, "gzip", ["md5", "sha256"], "http://host/disk.img.gz")

    assert fetch.fetch(download.as_uri(), tmp_path / "copy.gz", ["md5"], "vm", image) == {
        "md5": hashlib.md5(PACKED).hexdigest()}

    assert image.complete and not dest.exists()
    assert image.commit() == {"md5": hashlib.md5(RAW).hexdigest(), "sha256": hashlib.sha256(RAW).hexdigest()}
    assert dest.read_bytes() == RAW
    assert os.stat(dest).st_blocks * 512 < len(RAW) - (2 << 20)  # the zeros are holes
    image.abandon()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy.gz", "disk.img", "disk.img.gz"]


def test_a_corrupt_stream_fails_the_copy_and_leaves_neither_file(tmp_path: Path) -> None:
    download = tmp_path / "disk.img.gz"
    download.write_bytes(PACKED[:200] + bytes(300) + PACKED[500:])
    image = decompress.StreamedImage(tmp_path / "disk.img", "gzip", ["md5"], "disk.img.gz")

    with pytest.raises(VerifyError, match=r"^disk.img.gz is not a valid gzip file \("):
        fetch.fetch(download.as_uri(), tmp_path / "copy.gz", ["md5"], "vm", image)

    assert not image.complete
    assert sorted(path.name for path in tmp_path.iterdir()) == ["disk.img.gz"]
