"""Decompress a gzipped download into the image, hashing the output as it goes."""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

from kvmtasks.errors import KvmTasksError, VerifyError
from kvmtasks.provision.digest import CHUNK, Buffers, MultiHasher

# A zero run becomes a hole when it covers whole blocks of the file system's usual size.
_BLOCK = 4096
_ZERO_BLOCK = bytes(_BLOCK)
_ZERO_PROBE = bytes(64)  # every zero block holds one; a rarity in data
_ZERO_RUN = bytes(16 * _BLOCK)
_ZERO_CHUNK = bytes(CHUNK)


def gunzip(source: Path, dest: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Decompress source (one or more gzip members) into dest; return dest's digests."""
    partial = dest.with_name(dest.name + ".part")
    hasher, buffers = MultiHasher(algorithms), Buffers()
    open_gzip, bad_data = _gzip_reader()
    try:
        with open_gzip(source) as reader, open(partial, "wb", buffering=0) as writer:
            while count := reader.readinto(buffer := buffers.get()):
                chunk = buffer if count == len(buffer) else buffer[:count]
                hasher.update(chunk, release=buffers.give_back(buffer))
                _write_sparse(writer, chunk)
            writer.truncate()  # the size, when the image ends with a hole
    except bad_data as error:
        partial.unlink(missing_ok=True)
        raise VerifyError(f"{source} is not a valid gzip file ({error})") from None
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise KvmTasksError(f"decompressing {source} to {partial}: {error.strerror or error}") from None
    os.replace(partial, dest)
    return hasher.hexdigests()


def _write_sparse(writer: io.RawIOBase, chunk: bytes | bytearray) -> None:
    """Write chunk, seeking over its zero blocks: the image is sparse, as qemu-img makes them.

    Disk images are often half zeros; a hole costs neither disk space nor the
    time to write it, and reads back as zeros.
    """
    view = memoryview(chunk)
    written = 0
    for start, end in _holes(chunk):
        _write_all(writer, view[written:start])
        writer.seek(end - start, os.SEEK_CUR)
        written = end
    _write_all(writer, view[written:])


def _holes(chunk: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """The (start, end) of each run of whole zero blocks in chunk (or all of it, when it
    is all zeros), in order."""
    if chunk and _ZERO_CHUNK.startswith(chunk):
        yield 0, len(chunk)
        return
    position = 0
    # find() skips through data fast, the length of the probe at a time.
    while (found := chunk.find(_ZERO_PROBE, position)) >= 0:
        start = end = -(-found // _BLOCK) * _BLOCK  # the zero run, from its first whole block
        while chunk.startswith(_ZERO_RUN, end):
            end += len(_ZERO_RUN)
        while chunk.startswith(_ZERO_BLOCK, end):
            end += _BLOCK
        if end > start:
            yield start, end
        position = max(end, found + 1)


def _write_all(writer: io.RawIOBase, data: memoryview) -> None:
    while data:
        count = writer.write(data)
        data = data[count or 0:]


def _gzip_reader() -> tuple[Callable[[Path], gzip.GzipFile], tuple[type[Exception], ...]]:
    """How to open a gzip file for reading, and the errors its bad data raises.

    zlib-ng inflates several times faster than zlib, which would otherwise be the
    slowest part of provisioning; the standard library is the fallback. Imported
    here, so that a doit run with nothing to decompress never loads it.
    """
    try:
        from zlib_ng import gzip_ng, zlib_ng
    except ImportError:
        return (lambda path: gzip.open(path, "rb")), (gzip.BadGzipFile, EOFError, zlib.error)
    # Its stub declares error as an instance; it is the exception class.
    fast_error = cast("type[Exception]", zlib_ng.error)
    return (
        lambda path: gzip_ng.open(path, "rb"),  # type: ignore[no-untyped-call]  # untyped package
        (gzip.BadGzipFile, EOFError, zlib.error, fast_error),
    )
