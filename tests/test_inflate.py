"""Inflating a download while it arrives: the incremental inflaters and the streamed image.

Each format is made by its reference library, as published images are; the
inflaters must accept exactly what decompress.decompress accepts from the file.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtasks.config.options import Compression
from kvmtasks.errors import VerifyError
from kvmtasks.provision import decompress, fetch
from kvmtasks.provision.inflate import INFLATERS, BadStream

RAW = random.Random(1).randbytes(1 << 20) + bytes(3 << 20) + b"kvmtasks " * 100_000
_CUT = 1_500_000
_ZSTD = zstandard.ZstdCompressor(level=1, write_checksum=True)
_ZSTD_SKIPPABLE = (0x184D2A5E).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
# Two members, streams or frames back to back (and what may come between them), per format.
PACKED: dict[Compression, bytes] = {
    Compression.GZIP: gzip.compress(RAW[:_CUT], compresslevel=1) + bytes(3) + gzip.compress(RAW[_CUT:]),
    Compression.XZ: lzma.compress(RAW[:_CUT], preset=1) + lzma.compress(RAW[_CUT:], preset=0),
    Compression.BZ2: bz2.compress(RAW[:_CUT], compresslevel=1) + bz2.compress(RAW[_CUT:]),
    Compression.ZSTD: _ZSTD.compress(RAW[:_CUT]) + _ZSTD_SKIPPABLE + _ZSTD.compress(RAW[_CUT:]),
}
FORMATS = list(PACKED)
SUFFIX = {Compression.GZIP: ".gz", Compression.XZ: ".xz", Compression.BZ2: ".bz2", Compression.ZSTD: ".zst"}


def inflate(kind: Compression, data: bytes, piece: int) -> bytes:
    inflater, out = INFLATERS[kind](), bytearray()

    def take(chunk: bytes) -> None:
        assert len(chunk) <= 1 << 20
        out.extend(chunk)

    for start in range(0, len(data), piece):
        inflater.inflate(memoryview(data)[start:start + piece], take)
    inflater.end()
    return bytes(out)


def from_file(tmp_path: Path, kind: Compression, data: bytes) -> bytes | None:
    """What decompress.decompress makes of data, None when it refuses it."""
    source, dest = tmp_path / "from-file.packed", tmp_path / "from-file.img"
    source.write_bytes(data)
    try:
        decompress.decompress(source, dest, kind, [])
    except VerifyError:
        return None
    return dest.read_bytes()


@pytest.mark.parametrize("kind", FORMATS)
@settings(max_examples=10, deadline=None)
@given(piece=st.integers(min_value=997, max_value=1 << 20))
def test_members_and_padding_inflate_whole_whatever_the_pieces(kind: Compression, piece: int) -> None:
    assert inflate(kind, PACKED[kind], piece) == RAW


@pytest.mark.parametrize("kind", FORMATS)
def test_zeros_come_out_in_bounded_pieces(kind: Compression) -> None:
    """64 MiB of zeros shrink to a few KiB (zstd: 5 bytes a block): one chunk in, many out."""
    zeros = bytes(64 << 20)
    packed = {Compression.GZIP: lambda: gzip.compress(zeros, compresslevel=9),
              Compression.XZ: lambda: lzma.compress(zeros), Compression.BZ2: lambda: bz2.compress(zeros),
              Compression.ZSTD: lambda: _ZSTD.compress(zeros)}[kind]()
    assert len(packed) < 1 << 20
    sizes: list[int] = []
    inflater = INFLATERS[kind]()
    inflater.inflate(packed, lambda chunk: sizes.append(len(chunk)))
    inflater.end()
    assert sum(sizes) == len(zeros)
    assert max(sizes) <= 1 << 20


def _damaged(kind: Compression, damage: str) -> bytes:
    packed = PACKED[kind]
    middle = len(packed) // 2
    return {
        "corrupt": packed[:middle] + bytes(b ^ 0x5A for b in packed[middle:middle + 64])
        + packed[middle + 64:],
        "truncated": packed[:-5],
        "cut in the header": packed[:3],
        "not compressed": b"just a disk image",
        "empty": b"",
        "garbage after": packed + b"trailing",
        "a cut stream after": packed + packed[:100],
    }[damage]


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "cut in the header", "not compressed",
                                    "empty", "garbage after", "a cut stream after"])
@pytest.mark.parametrize("kind", FORMATS)
def test_the_inflater_accepts_what_the_file_reader_accepts(
    tmp_path: Path, kind: Compression, damage: str
) -> None:
    """A download gives the same image (or the same refusal) inflated as it arrives or from
    the file afterwards: the cache hands the decompress step downloads the stream never saw."""
    data = _damaged(kind, damage)
    expected = from_file(tmp_path, kind, data)
    if damage in ("corrupt", "truncated", "cut in the header", "not compressed", "a cut stream after"):
        assert expected is None, "the file reader took a damaged stream"
    for piece in (1 << 20, 4093):
        try:
            got: bytes | None = inflate(kind, data, piece)
        except BadStream:
            got = None
        assert got == expected, (damage, piece)


@pytest.mark.parametrize("kind", FORMATS)
def test_the_streamed_image_is_only_ever_a_part_file_until_committed(
    tmp_path: Path, kind: Compression
) -> None:
    download = tmp_path / f"disk.img{SUFFIX[kind]}"
    download.write_bytes(PACKED[kind])
    dest = tmp_path / "disk.img"
    image = decompress.StreamedImage(dest, kind, ["md5", "sha256"], "http://host/disk.img")

    assert fetch.fetch(download.as_uri(), tmp_path / "copy", ["md5"], "vm", image) == {
        "md5": hashlib.md5(PACKED[kind]).hexdigest()}

    assert image.complete and not dest.exists()
    assert image.commit() == {"md5": hashlib.md5(RAW).hexdigest(), "sha256": hashlib.sha256(RAW).hexdigest()}
    assert dest.read_bytes() == RAW
    assert os.stat(dest).st_blocks * 512 < len(RAW) - (2 << 20)  # the zeros are holes
    image.abandon()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy", "disk.img", download.name]


@pytest.mark.parametrize("kind", FORMATS)
def test_auto_inflates_what_the_first_bytes_say(tmp_path: Path, kind: Compression) -> None:
    download = tmp_path / "download"
    download.write_bytes(PACKED[kind])
    image = decompress.StreamedImage(tmp_path / "disk.img", Compression.AUTO, ["sha256"], "download")

    fetch.fetch(download.as_uri(), tmp_path / "copy", [], "vm", image)

    assert image.complete
    assert image.commit() == {"sha256": hashlib.sha256(RAW).hexdigest()}
    assert (tmp_path / "disk.img").read_bytes() == RAW


@pytest.mark.parametrize("data", [RAW, b"QFI\xfb", b"\x1f", b""],
                         ids=["raw", "qcow2 head", "one byte", "empty"])
def test_auto_makes_no_image_of_a_download_that_is_not_compressed(tmp_path: Path, data: bytes) -> None:
    """The decompress step then links the download as the image (test_compression.py)."""
    download = tmp_path / "download"
    download.write_bytes(data)
    image = decompress.StreamedImage(tmp_path / "disk.img", Compression.AUTO, ["sha256"], "download")

    fetch.fetch(download.as_uri(), tmp_path / "copy", [], "vm", image)

    assert not image.complete
    image.abandon()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy", "download"]


def test_auto_refuses_a_download_cut_inside_the_magic(tmp_path: Path) -> None:
    download = tmp_path / "download"
    download.write_bytes(b"\xfd7zX")  # shorter than xz's magic: as detect() reads it, not xz
    image = decompress.StreamedImage(tmp_path / "disk.img", Compression.AUTO, [], "download")
    fetch.fetch(download.as_uri(), tmp_path / "copy", [], "vm", image)
    assert not image.complete
    assert decompress.detect(download) is None

    download.write_bytes(b"\x1f\x8b\x08")  # gzip's magic, then the end
    with pytest.raises(VerifyError, match=r"^download is not a valid gzip file \("):
        fetch.fetch(download.as_uri(), tmp_path / "copy", [], "vm", image)
    assert not (tmp_path / "disk.img.part").exists()


@pytest.mark.parametrize("kind", FORMATS)
def test_a_corrupt_stream_fails_the_copy_and_leaves_neither_file(tmp_path: Path, kind: Compression) -> None:
    download = tmp_path / "disk.img.packed"
    download.write_bytes(_damaged(kind, "corrupt"))
    image = decompress.StreamedImage(tmp_path / "disk.img", kind, ["md5"], "disk.img.packed")

    with pytest.raises(VerifyError, match=rf"^disk.img.packed is not a valid {kind} file \("):
        fetch.fetch(download.as_uri(), tmp_path / "copy", ["md5"], "vm", image)

    assert not image.complete
    assert sorted(path.name for path in tmp_path.iterdir()) == ["disk.img.packed"]


_COMPRESS: dict[Compression, Callable[[bytes], bytes]] = {
    Compression.GZIP: lambda data: gzip.compress(data, compresslevel=1),
    Compression.XZ: lambda data: lzma.compress(data, preset=0),
    Compression.BZ2: lambda data: bz2.compress(data, compresslevel=1),
    Compression.ZSTD: lambda data: _ZSTD.compress(data),
}


@pytest.mark.parametrize("kind", FORMATS)
def test_every_cut_of_a_stream_is_refused_while_it_arrives(kind: Compression) -> None:
    data = random.Random(2).randbytes(300_000) + bytes(200_000)  # more than one zstd block
    packed = _COMPRESS[kind](data)
    assert inflate(kind, packed, 65536) == data
    cuts = sorted({*range(1, 64), *range(64, len(packed), max(1, len(packed) // 100)), len(packed) - 1})
    for cut in cuts:
        with pytest.raises(BadStream):
            inflate(kind, packed[:cut], 4096)


def test_auto_opens_no_part_file_once_the_image_was_abandoned(tmp_path: Path) -> None:
    """Under auto the .part is opened in the consumer thread, at the first bytes; those can
    still be on their way when the download's thread gives up (a dropped connection)."""
    image = decompress.StreamedImage(tmp_path / "disk.img", Compression.AUTO, ["md5"], "download")
    image.start()
    image.abandon()

    image.update(PACKED[Compression.GZIP][:65536])

    assert not (tmp_path / "disk.img.part").exists()
    image.start()  # a new attempt opens it again
    image.update(PACKED[Compression.GZIP][:65536])
    assert (tmp_path / "disk.img.part").exists()
    image.abandon()
    assert list(tmp_path.iterdir()) == []
