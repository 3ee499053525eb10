"""gzip, xz, zstd and bz2 downloads: real doit runs over the suite's HTTP server.

Each format is made by its reference library (zlib, liblzma, libzstd, libbz2),
as published images are.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zstandard

from kvmtasks.config.options import Compression
from kvmtasks.errors import VerifyError
from kvmtasks.provision import decompress
from tests.test_provision_pipeline import assert_ok, assert_one_line_error, leftovers, part

if TYPE_CHECKING:
    from tests.conftest import Project
    from tests.httpserver import FileServer
    from tests.reliability import Recorder

COMPRESSORS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": (".gz", lambda data: gzip.compress(data, compresslevel=1)),
    "xz": (".xz", lambda data: lzma.compress(data, preset=1)),
    # The zstd tool writes a checksum by default; published images have one.
    "zstd": (".zst", lambda data: zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)),
    "bz2": (".bz2", lambda data: bz2.compress(data, compresslevel=1)),
}
FORMATS = list(COMPRESSORS)


def disk(size: int = 3 << 20) -> bytes:
    """Disk-like: data, a long zero run (a hole once decompressed), data."""
    data = os.urandom(size // 3)
    return data + bytes(size - 2 * len(data)) + data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("kind", "declared"), [
    *((kind, declared) for kind in FORMATS for declared in (None, "compression")),
    ("gzip", "gzip = true"),
    # The recipe's gzip = false declares nothing: a gzip download is still found out.
    ("gzip", "gzip = false"),
])
def test_each_format_is_decompressed_sparse_and_checked(
    project: Project, http_server: FileServer, kind: str, declared: str | None
) -> None:
    suffix, compress = COMPRESSORS[kind]
    raw = disk()
    packed = compress(raw)
    options: dict[str, object] = {"image": http_server.put(f"debian-12.raw{suffix}", packed),
                                  "sha256_download": sha256(packed), "sha256_image": sha256(raw)}
    if declared == "compression":
        options["compression"] = kind
    elif declared is not None:
        options["gzip"] = declared.split(" = ")[1]
    project.write(part(**options))

    first = project.provision()

    assert_ok(first)
    # Declared or found out from its first bytes, the format is inflated while the download
    # arrives: decompress finds the image made from the download, and is up to date.
    assert first.ran() == {"download", "verify-download", "verify-image"}
    assert "decompress" in first.skipped()
    image = project.parts / "vm" / "debian-12.raw"
    assert image.read_bytes() == raw
    record = json.loads((project.parts / "vm" / ".kvmtasks" / "image.json").read_text())
    download = (project.parts / "vm" / f"debian-12.raw{suffix}").stat()
    assert record["source"] == {"size": download.st_size, "mtime_ns": download.st_mtime_ns,
                                "sha256": hashlib.sha256(packed).hexdigest()}
    assert image.stat().st_blocks * 512 < len(raw) * 3 // 4, "the zero run was written, not a hole"
    assert (project.parts / "vm" / f"debian-12.raw{suffix}").read_bytes() == packed
    assert leftovers(project.parts) == []
    again = project.provision()
    assert_ok(again)
    assert again.ran() == set()


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
@pytest.mark.parametrize("kind", FORMATS)
def test_a_corrupt_or_truncated_stream_leaves_no_image_and_says_so(
    project: Project, http_server: FileServer, reliability: Recorder, kind: str, damage: str
) -> None:
    reliability.bad_input("compressed")
    suffix, compress = COMPRESSORS[kind]
    packed = compress(disk())
    if damage == "corrupt":
        middle = len(packed) // 2
        packed = packed[:middle] + bytes(b ^ 0x5A for b in packed[middle:middle + 64]) + packed[middle + 64:]
    else:
        packed = packed[: len(packed) * 2 // 3]
    project.write(part(image=http_server.put(f"disk.img{suffix}", packed)))

    for _ in range(2):  # the second run inflates the kept download again, and fails the same
        run = project.provision()

        # Found while the download arrives (compression = auto: from its first bytes).
        assert_one_line_error(run, "download:vm", f"disk.img{suffix} is not a valid {kind} file")
        assert not (project.parts / "vm" / "disk.img").exists()
        assert leftovers(project.parts) == []
        assert not (project.parts / "vm" / "vm.overlay.qcow2").exists()


@pytest.mark.parametrize("overlay", ["true", "false"])
@pytest.mark.parametrize("kind", FORMATS)
def test_a_cached_download_of_each_format_gives_the_image_streamed_or_decompressed(
    project: Project, http_server: FileServer, kind: str, overlay: str
) -> None:
    """The image inflated while downloading is shared through the download cache; a part
    booting its image directly gets its own, inflated by decompress from the cached file."""
    suffix, compress = COMPRESSORS[kind]
    raw = disk()
    project.write(part(image=http_server.put(f"disk.img{suffix}", compress(raw)), sha256_image=sha256(raw),
                       overlay=overlay))
    assert_ok(project.provision())
    shutil.rmtree(project.parts / "vm")

    again = project.provision()

    assert_ok(again)
    assert again.ran() == {"download", "verify-download", "verify-image"} | (
        set() if overlay == "true" else {"decompress"})
    assert len(http_server.requests) == 1
    assert (project.parts / "vm" / "disk.img").read_bytes() == raw
    assert project.provision().ran() == set()


def test_auto_finds_compressed_bytes_behind_a_name_without_suffix(
    project: Project, http_server: FileServer
) -> None:
    raw = disk()
    project.write(part(image=http_server.put("fetch", lzma.compress(raw, preset=1)),
                       sha256_image=sha256(raw)))

    run = project.provision()

    assert_ok(run)
    # Decompressed into the download's own name: one copy, never compressed bytes booted.
    assert sorted(p.name for p in (project.parts / "vm").iterdir() if p.is_file()) == [
        "fetch", "vm.overlay.qcow2"]
    assert (project.parts / "vm" / "fetch").read_bytes() == raw
    again = project.provision()
    assert_ok(again)
    assert again.ran() == set()


def test_auto_uses_an_uncompressed_download_as_it_is(project: Project, http_server: FileServer) -> None:
    raw = disk()
    project.write(part(image=http_server.put("plain.img", raw), sha256_image=sha256(raw)))
    assert_ok(project.provision())
    assert (project.parts / "vm" / "plain.img").read_bytes() == raw

    lying = disk()
    project.write(part(image=http_server.put("lying.img.xz", lying), sha256_image=sha256(lying)))
    run = project.provision()

    assert_ok(run)
    download, image = project.parts / "vm" / "lying.img.xz", project.parts / "vm" / "lying.img"
    assert image.read_bytes() == lying
    assert os.path.samefile(download, image), "an uncompressed download was copied"


def test_compression_none_keeps_the_download_as_the_image(project: Project, http_server: FileServer) -> None:
    raw = disk()
    project.write(part(image=http_server.put("disk.img", raw), compression="none", sha256_image=sha256(raw)))
    run = project.provision()
    assert_ok(run)
    assert "decompress:vm" not in run.executed
    assert (project.parts / "vm" / "disk.img").read_bytes() == raw


@pytest.mark.parametrize(("options", "needle"), [
    ({"image": "http://127.0.0.1:9/disk.img.xz", "gzip": "true", "compression": "xz"},
     "[vm] gzip = true contradicts compression = xz"),
    ({"file": "/srv/disk.img.zst", "compression": "zstd"},
     "[vm] compression = zstd needs an image URL; a file is used as it is"),
    ({"image": "http://127.0.0.1:9/disk.img", "compression": "lz4"},
     "[vm] compression = 'lz4': must be one of auto, none, gzip, xz, zstd, bz2"),
])
def test_a_compression_that_cannot_be_is_a_config_error(
    project: Project, reliability: Recorder, options: dict[str, str], needle: str
) -> None:
    reliability.bad_input("config")
    config = project.write(part(**options))
    assert_one_line_error(project.run("list"), f"{config}: {needle}")


@pytest.mark.parametrize(("head", "expected"), [
    (b"\x1f\x8b\x08\x00", Compression.GZIP), (b"\xfd7zXZ\x00\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd\x00", Compression.ZSTD), (b"BZh91AY", Compression.BZ2),
    (b"QFI\xfb\x00\x00\x00\x03", None), (b"", None), (b"\x1f", None),
])
def test_detect_reads_the_magic_bytes(tmp_path: Path, head: bytes, expected: Compression | None) -> None:
    path = tmp_path / "download"
    path.write_bytes(head)
    assert decompress.detect(path) is expected


def test_zstd_with_several_frames_and_a_skippable_frame(tmp_path: Path) -> None:
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    skippable = (0x184D2A5E).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    source = tmp_path / "disk.img.zst"
    source.write_bytes(compressor.compress(b"one ") + skippable + compressor.compress(b"two"))
    decompress.decompress(source, tmp_path / "disk.img", Compression.ZSTD, [])
    assert (tmp_path / "disk.img").read_bytes() == b"one two"

    source.write_bytes(compressor.compress(b"one ") + skippable[:6])
    with pytest.raises(VerifyError, match="ends in the middle of a frame"):
        decompress.decompress(source, tmp_path / "disk.img", Compression.ZSTD, [])


def _zstd_streamed(data: bytes) -> bytes:
    """As `zstd` writes from a pipe: no content size in the frame header, several blocks."""
    compressor = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj()
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("kind", [*FORMATS, "zstd-streamed"])
def test_every_cut_of_a_stream_is_refused(tmp_path: Path, reliability: Recorder, kind: str) -> None:
    data = os.urandom(300_000) + bytes(200_000)  # more than one zstd block
    packed = _zstd_streamed(data) if kind == "zstd-streamed" else COMPRESSORS[kind][1](data)
    compression = Compression(kind.split("-")[0])
    source, dest = tmp_path / "disk.img.packed", tmp_path / "disk.img"
    source.write_bytes(packed)
    assert decompress.decompress(source, dest, compression, []) == {}
    assert dest.read_bytes() == data
    dest.unlink()
    # Every header and block boundary, and a spread of cuts in between.
    cuts = sorted({*range(1, 64), *range(64, len(packed), max(1, len(packed) // 200)), len(packed) - 1})
    reliability.bad_input("compressed", len(cuts))
    for cut in cuts:
        source.write_bytes(packed[:cut])
        with pytest.raises(VerifyError, match=f"not a valid {compression.value} file"):
            decompress.decompress(source, dest, compression, [])
        assert not dest.exists() and not dest.with_name("disk.img.part").exists(), cut
