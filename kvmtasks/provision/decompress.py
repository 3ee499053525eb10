"""Decompress a download into the image (gzip, xz, zstd, bz2), hashing the output as it goes.

Two ways: decompress reads a download already on disk; StreamedImage inflates
the download while it arrives (the download step feeds it), so that the
image is complete at the download's last byte.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, cast

from kvmtasks.config.options import Compression
from kvmtasks.errors import KvmTasksError, ProvisionError, VerifyError
from kvmtasks.provision.digest import CHUNK, Buffers, MultiHasher
from kvmtasks.provision.inflate import INFLATERS, BadStream, Inflater
from kvmtasks.provision.zstdframes import ZstdFrames

# A zero run becomes a hole when it covers whole blocks of the file system's usual size.
_BLOCK = 4096
_ZERO_BLOCK = bytes(_BLOCK)
_ZERO_PROBE = bytes(64)  # every zero block holds one; a rarity in data
_ZERO_RUN = bytes(16 * _BLOCK)
_ZERO_CHUNK = bytes(CHUNK)

# The first bytes of each format, as its specification gives them.
MAGIC = (
    (b"\x1f\x8b", Compression.GZIP),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
    (b"BZh", Compression.BZ2),
)

Reader = Any  # a binary file object with readinto (GzipFile, LZMAFile, BZ2File, _ZstdReader)


_MAGIC_LENGTH = max(len(magic) for magic, _ in MAGIC)


def detect(path: Path) -> Compression | None:
    """The compression of the file at path, from its first bytes; None when it is not compressed."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_MAGIC_LENGTH)
    except OSError as error:
        raise ProvisionError(f"cannot read {path}: {error.strerror or error}") from None
    return _kind_of(head)


def _kind_of(head: bytes) -> Compression | None:
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), None)


def gunzip(source: Path, dest: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Decompress source (one or more gzip members) into dest; return dest's digests."""
    return decompress(source, dest, Compression.GZIP, algorithms)


def decompress(source: Path, dest: Path, compression: Compression,
               algorithms: Iterable[str]) -> dict[str, str]:
    """Decompress source (every member, stream or frame in it) into dest in one pass, sparse;
    return dest's digests. A bad or truncated stream leaves nothing at dest."""
    partial = dest.with_name(dest.name + ".part")
    hasher, buffers = MultiHasher(algorithms), Buffers()
    open_reader, bad_data = _READERS[compression]()
    try:
        with open_reader(source) as reader, open(partial, "wb", buffering=0) as writer:
            while count := _read(reader, buffer := buffers.get(), bad_data):
                chunk = buffer if count == len(buffer) else buffer[:count]
                hasher.update(chunk, release=buffers.give_back(buffer))
                _write_sparse(writer, chunk)
            writer.truncate()  # the size, when the image ends with a hole
    except _BadData as error:
        partial.unlink(missing_ok=True)
        raise VerifyError(f"{source} is not a valid {compression.value} file ({error})") from None
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise ProvisionError(f"decompressing {source} to {partial}: {error.strerror or error}") from None
    os.replace(partial, dest)
    return hasher.hexdigests()


class _BadData(Exception):
    """The compressed stream is corrupt or ends too soon."""


def _read(reader: Reader, buffer: bytearray, bad_data: tuple[type[Exception], ...]) -> int:
    try:
        return int(reader.readinto(buffer))
    except bad_data as error:
        raise _BadData(" ".join(str(error).split()) or type(error).__name__) from None
    except OSError as error:
        if error.errno is None:  # bz2 reports bad data as an OSError without errno
            raise _BadData(str(error)) from None
        raise


class StreamedImage:
    """The image, inflated from the download's bytes as they arrive, into ``IMAGE.part``.

    The download hands it every chunk, from byte 0 (a resumed download first re-reads
    what it kept), through its MultiHasher: it runs in a thread of its own, beside the
    hashes, and hashes the image in threads of its own. A failure (a corrupt stream, a
    full disk) removes the .part at once and is kept for check() to raise in the
    download's thread; nothing ever reaches the image's final path before commit().

    With compression = auto, the first bytes say how to inflate, as detect() reads them
    from the file; a download that is not compressed makes no image here (the decompress
    step then links it as the image).
    """

    def __init__(self, dest: Path, compression: Compression, algorithms: Iterable[str],
                 source: str) -> None:
        self.dest = dest
        self.partial = dest.with_name(dest.name + ".part")
        self._compression, self._algorithms, self._source = compression, tuple(algorithms), source
        self._kind: Compression | None = None  # the format, once known
        self._head = b""  # the first bytes, while they do not say the format yet
        self._writer: io.RawIOBase | None = None
        self._inflater: Inflater | None = None
        self._hasher = MultiHasher(())
        self._failure: KvmTasksError | None = None
        self._digests: dict[str, str] | None = None
        # Under auto the .part is opened in the consumer thread, at the first bytes: never
        # after the download's thread abandoned the image (it would stay behind).
        self._opening = threading.Lock()
        self._abandoned = False

    def start(self) -> None:
        """Begin (again) at the download's first byte."""
        self._close()
        self.partial.unlink(missing_ok=True)
        self._failure, self._digests, self._head, self._abandoned = None, None, b"", False
        self._kind = None if self._compression is Compression.AUTO else self._compression
        self._inflater = None
        if self._kind is not None:
            self._begin(self._kind)

    def _begin(self, kind: Compression) -> None:
        self._inflater = INFLATERS[kind]()
        self._hasher = MultiHasher(self._algorithms)
        with self._opening:
            if self._abandoned:
                return
            try:
                self._writer = open(self.partial, "wb", buffering=0)  # noqa: SIM115  # closed by finish/abandon
            except OSError as error:
                failure = ProvisionError(f"writing {self.partial}: {error.strerror or error}")
            else:
                return
        self._fail(failure)

    def update(self, chunk: bytes | bytearray | memoryview, /) -> None:
        """Inflate the download's next chunk (in the consumer thread; never raises)."""
        if self._kind is None:
            chunk = self._sniff(chunk)
        # Held here: the download's thread may abandon (close) them while this runs.
        writer, inflater = self._writer, self._inflater
        if writer is None or inflater is None or not chunk:
            return
        hasher = self._hasher

        def out(piece: bytes) -> None:
            hasher.update(piece)
            _write_sparse(writer, piece)

        try:
            inflater.inflate(chunk, out)
        except BadStream as error:
            self._fail(VerifyError(f"{self._source} is not a valid {self._kind} file ({error})"))
        except (OSError, ValueError) as error:
            if self._writer is None:
                return  # abandoned by the download's thread while writing: nothing to report
            self._fail(ProvisionError(f"decompressing {self._source} to {self.partial}: "
                                     f"{getattr(error, 'strerror', None) or error}"))

    def _sniff(self, chunk: bytes | bytearray | memoryview, end: bool = False) -> bytes:
        """Gather the first bytes until they tell the format (compression = auto); then
        begin, and return them with the rest of chunk, to be inflated."""
        if self._inflater is not None or self._failure is not None:
            return b""  # not compressed (no inflater), or already failed
        self._head += bytes(chunk)
        if len(self._head) < _MAGIC_LENGTH and not end:
            return b""
        head, self._head = self._head, b""
        kind = _kind_of(head)
        if kind is None:
            self._inflater = _NOT_COMPRESSED
            return b""
        self._kind = kind
        self._begin(kind)
        return head

    def check(self) -> None:
        """Raise what went wrong so far, if anything did."""
        if self._failure is not None:
            raise self._failure

    def finish(self) -> None:
        """After the download's last byte was consumed: the .part holds the whole image
        (unless the download turned out not to be compressed)."""
        self.check()
        if self._kind is None:
            self.update(self._sniff(b"", end=True))  # a download shorter than the longest magic
            self.check()
            if self._kind is None:
                return  # not compressed: no image made here
        assert self._writer is not None and self._inflater is not None
        try:
            self._inflater.end()
            self._writer.truncate()  # the size, when the image ends with a hole
        except BadStream as error:
            self._fail(VerifyError(f"{self._source} is not a valid {self._kind} file ({error})"))
        except OSError as error:
            self._fail(ProvisionError(f"writing {self.partial}: {error.strerror or error}"))
        self.check()
        self._close()
        self._digests = self._hasher.hexdigests()

    @property
    def complete(self) -> bool:
        return self._digests is not None

    def commit(self) -> dict[str, str]:
        """Put the finished image at its final path; return its digests."""
        assert self._digests is not None
        os.replace(self.partial, self.dest)
        return self._digests

    def abandon(self) -> None:
        """The download failed or stopped: no image, not even a partial one."""
        with self._opening:
            self._abandoned = True
            self._close()
            self.partial.unlink(missing_ok=True)

    def _fail(self, failure: KvmTasksError) -> None:
        self._failure = failure
        self.abandon()

    def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


class _NotCompressed:
    """The inflater of a download that is not compressed: there is nothing to inflate."""

    def inflate(self, data: bytes | bytearray | memoryview, out: Callable[[bytes], None]) -> None:
        return

    def end(self) -> None:
        return


_NOT_COMPRESSED = _NotCompressed()


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


_Opener = Callable[[Path], Reader]


def _gzip_reader() -> tuple[_Opener, tuple[type[Exception], ...]]:
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


def _xz_reader() -> tuple[_Opener, tuple[type[Exception], ...]]:
    return (lambda path: lzma.open(path, "rb")), (lzma.LZMAError, EOFError)


def _bz2_reader() -> tuple[_Opener, tuple[type[Exception], ...]]:
    return (lambda path: bz2.open(path, "rb")), (EOFError,)


def _zstd_reader() -> tuple[_Opener, tuple[type[Exception], ...]]:
    import zstandard  # here: only a zstd download needs it

    return _ZstdReader, (zstandard.ZstdError, EOFError, ValueError)


class _ZstdReader:
    """A zstd stream of one or more frames, read with zstandard, that fails when it ends too soon.

    zstandard's readers return what they could decode when the input stops in the middle
    of a frame, without an error: the frame headers, followed as the bytes pass, tell.
    """

    def __init__(self, path: Path) -> None:
        import zstandard

        self._source = _Followed(path)
        # It only ever calls read() on its source.
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast("IO[bytes]", self._source), read_size=CHUNK, read_across_frames=True, closefd=False)

    def __enter__(self) -> _ZstdReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._reader.close()  # type: ignore[no-untyped-call]  # the stub leaves it untyped
        self._source.file.close()

    def readinto(self, buffer: bytearray) -> int:
        count = int(self._reader.readinto(buffer))
        if count == 0 and not self._source.frames.complete():
            raise EOFError("the stream ends in the middle of a frame (truncated)")
        return count


class _Followed:
    """The compressed file, as the decompressor reads it, with its frames followed."""

    def __init__(self, path: Path) -> None:
        self.file: IO[bytes] = open(path, "rb")  # noqa: SIM115  # closed by _ZstdReader
        self.frames = ZstdFrames()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.frames.feed(data)
        return data


_READERS: dict[Compression, Callable[[], tuple[_Opener, tuple[type[Exception], ...]]]] = {
    Compression.GZIP: _gzip_reader,
    Compression.XZ: _xz_reader,
    Compression.ZSTD: _zstd_reader,
    Compression.BZ2: _bz2_reader,
}
