"""Decompress a gzipped download into the image, hashing the output as it goes."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

from kvmtasks.digest import CHUNK, MultiHasher
from kvmtasks.errors import KvmTasksError, VerifyError

# Magic numbers of the formats QEMU is most often given; anything else is raw.
_MAGIC = ((b"QFI\xfb", "qcow2"), (b"KDMV", "vmdk"), (b"QED\x00", "qed"), (b"conectix", "vpc"))
_VDI_SIGNATURE = (0x40, b"\x7f\x10\xda\xbe")


def gunzip(source: Path, dest: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Decompress source (one or more gzip members) into dest; return dest's digests."""
    partial = dest.with_name(dest.name + ".part")
    hasher = MultiHasher(algorithms)
    try:
        with gzip.open(source, "rb") as reader, open(partial, "wb") as writer:
            while chunk := reader.read(CHUNK):
                hasher.update(chunk)
                writer.write(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        partial.unlink(missing_ok=True)
        raise VerifyError(f"{source} is not a valid gzip file ({error})") from None
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise KvmTasksError(f"decompressing {source} to {partial}: {error.strerror or error}") from None
    os.replace(partial, dest)
    return hasher.hexdigests()


def disk_format(path: Path) -> str:
    """The image format from its header, so QEMU never probes a raw image."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(512)
    except OSError as error:
        raise KvmTasksError(f"cannot read image {path}: {error.strerror or error}") from None
    for magic, name in _MAGIC:
        if header.startswith(magic):
            return name
    offset, signature = _VDI_SIGNATURE
    if header[offset:offset + len(signature)] == signature:
        return "vdi"
    return "raw"
