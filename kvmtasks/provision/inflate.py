"""Incremental decompression: compressed bytes in, in whatever pieces they arrive; data out.

The download step feeds each received chunk to an inflater, so the image is
written while the bytes still arrive. Each format is one small class over its
library's incremental decompressor, and hands its output on in bounded pieces
(a MiB of compressed zeros can stand for gigabytes). Each accepts what the
matching reader of decompress.decompress accepts, so an image comes out the
same whether it is inflated while downloading or from the file afterwards.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import IO, Any, Protocol, cast

from kvmtasks.config.options import Compression
from kvmtasks.provision.digest import CHUNK
from kvmtasks.provision.zstdframes import ZstdFrames

# zlib's window bits: 15, plus 16 for the gzip header and trailer (checked: CRC-32 and size).
_GZIP_WBITS = 16 + zlib.MAX_WBITS

Data = bytes | bytearray | memoryview
Output = Callable[[bytes], None]


class BadStream(Exception):
    """The compressed stream is corrupt, or ends in the middle."""


class Inflater(Protocol):
    def inflate(self, data: Data, out: Output) -> None:
        """Pass what data decompresses to, in pieces of at most CHUNK bytes, to out.

        What out raises (a full disk) goes through unchanged."""

    def end(self) -> None:
        """Raise BadStream unless the bytes fed so far were a whole stream."""


class GzipInflater:
    """One or more gzip members, back to back (zero bytes between them are padding, as
    for gzip(1) and Python's gzip module).

    zlib-ng inflates several times faster than zlib; the standard library is the fallback.
    """

    def __init__(self) -> None:
        try:
            from zlib_ng import zlib_ng
        except ImportError:
            self._module: Any = zlib
            self._errors: tuple[type[Exception], ...] = (zlib.error,)
        else:
            self._module = zlib_ng
            # Its stub declares error as an instance; it is the exception class.
            self._errors = (zlib.error, cast("type[Exception]", zlib_ng.error))
        self._member: Any = None  # the decompressor of the current member, None between members

    def inflate(self, data: Data, out: Output) -> None:
        pending: Data = data
        while pending:
            if self._member is None:
                pending = _without_padding(pending)
                if not pending:
                    return
                self._member = self._module.decompressobj(wbits=_GZIP_WBITS)
            pending = self._inflate_member(pending, out)

    def _inflate_member(self, pending: Data, out: Output) -> Data:
        """Inflate pending into the current member; what follows the member's end."""
        member = self._member
        try:
            # At most CHUNK out per call: a MiB of zeros can shrink to a kilobyte.
            piece = member.decompress(pending, CHUNK)
            while True:
                if piece:
                    out(piece)
                tail = member.unconsumed_tail
                if not tail or member.eof:
                    break
                piece = member.decompress(tail, CHUNK)
        except self._errors as error:
            raise BadStream(str(error)) from None
        if member.eof:
            self._member = None
            return cast("bytes", member.unused_data)
        return b""

    def end(self) -> None:
        if self._member is not None:
            raise BadStream("the stream ends in the middle of a member (truncated)")


def _without_padding(data: Data) -> memoryview:
    view = memoryview(data)
    start = 0
    while start < len(view) and view[start] == 0:
        start += 1
    return view[start:]


class _StreamsInflater:
    """One or more xz or bz2 streams, back to back, as LZMAFile and BZ2File read them:
    bytes after a whole stream that do not start another one are ignored, as theirs are."""

    _errors: tuple[type[Exception], ...]

    def __init__(self) -> None:
        self._stream: Any = self._new()
        self._started = False  # the current stream was fed a byte
        self._produced = True  # it gave out data (for the first stream: it must be whole)
        self._ignoring = False  # trailing bytes, after the last stream

    def _new(self) -> Any:
        raise NotImplementedError

    def inflate(self, data: Data, out: Output) -> None:
        pending: Data = data
        while pending and not self._ignoring:
            if self._stream.eof:
                self._stream, self._produced = self._new(), False
            self._started = True
            pending = self._inflate_stream(pending, out)

    def _inflate_stream(self, pending: Data, out: Output) -> Data:
        stream = self._stream
        try:
            piece = stream.decompress(pending, CHUNK)
            while True:
                if piece:
                    self._produced = True
                    out(piece)
                if stream.eof or stream.needs_input:
                    break
                piece = stream.decompress(b"", CHUNK)
        except self._errors as error:
            if not self._produced:
                self._ignoring = True  # not the start of another stream: trailing garbage
                return b""
            raise BadStream(" ".join(str(error).split()) or type(error).__name__) from None
        return cast("bytes", stream.unused_data) if stream.eof else b""

    def end(self) -> None:
        if not self._ignoring and not self._stream.eof:
            raise BadStream("the stream ends in the middle (truncated)" if self._started
                            else "the stream is empty")


class XzInflater(_StreamsInflater):
    _errors = (lzma.LZMAError,)

    def _new(self) -> Any:
        return lzma.LZMADecompressor()


class Bz2Inflater(_StreamsInflater):
    _errors = (OSError, ValueError)  # bz2 reports bad data as an OSError

    def _new(self) -> Any:
        return bz2.BZ2Decompressor()


class ZstdInflater:
    """One or more zstd frames (skippable ones too), as zstandard's stream writer inflates
    them: in pieces it hands on as it goes. It says nothing when the input stops in the
    middle of a frame: the frame headers, followed as the bytes pass, tell."""

    def __init__(self) -> None:
        import zstandard  # here: only a zstd download needs it

        self._errors: tuple[type[Exception], ...] = (zstandard.ZstdError, ValueError)
        self._frames = ZstdFrames()
        self._output = _Forward()
        # It only ever calls write() on its destination.
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            cast("IO[bytes]", self._output), write_size=CHUNK, write_return_read=True)

    def inflate(self, data: Data, out: Output) -> None:
        self._output.out = out
        try:
            self._frames.feed(data)
            self._writer.write(data)
        except self._errors as error:
            raise BadStream(" ".join(str(error).split()) or type(error).__name__) from None

    def end(self) -> None:
        if not self._frames.complete():
            raise BadStream("the stream ends in the middle of a frame (truncated)")


class _Forward:
    """The file-like object zstandard's writer writes to: each piece goes to out."""

    def __init__(self) -> None:
        self.out: Output = lambda piece: None

    def write(self, piece: bytes) -> int:
        self.out(piece)
        return len(piece)


INFLATERS: dict[Compression, Callable[[], Inflater]] = {
    Compression.GZIP: GzipInflater,
    Compression.XZ: XzInflater,
    Compression.ZSTD: ZstdInflater,
    Compression.BZ2: Bz2Inflater,
}
