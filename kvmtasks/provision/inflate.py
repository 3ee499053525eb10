"""Incremental decompression: compressed bytes in, in whatever pieces they arrive; data out.

The download step feeds each received chunk to an inflater, so the image is
written while the bytes still arrive. Each format is one small class over its
library's incremental decompressor object (for gzip: zlib's ``decompressobj``
with the gzip wrapper, one per member).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, Protocol, cast

from kvmtasks.provision.digest import CHUNK

# zlib's window bits: 15, plus 16 for the gzip header and trailer (checked: CRC-32 and size).
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class BadStream(Exception):
    """The compressed stream is corrupt, or ends in the middle."""


class Inflater(Protocol):
    def inflate(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """The data that data decompresses to, in pieces of at most CHUNK bytes."""

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

    def inflate(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        pending: bytes | bytearray | memoryview = data
        try:
            while pending:
                if self._member is None:
                    pending = _without_padding(pending)
                    if not pending:
                        return
                    self._member = self._module.decompressobj(wbits=_GZIP_WBITS)
                # At most CHUNK out per call: a MiB of zeros can shrink to a kilobyte.
                out = self._member.decompress(pending, CHUNK)
                while True:
                    if out:
                        yield out
                    tail = self._member.unconsumed_tail
                    if not tail or self._member.eof:
                        break
                    out = self._member.decompress(tail, CHUNK)
                if self._member.eof:
                    pending, self._member = self._member.unused_data, None
                else:
                    pending = b""
        except self._errors as error:
            raise BadStream(str(error)) from None

    def end(self) -> None:
        if self._member is not None:
            raise BadStream("the stream ends in the middle of a member (truncated)")


def _without_padding(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    view = memoryview(data)
    start = 0
    while start < len(view) and view[start] == 0:
        start += 1
    return view[start:]


INFLATERS: dict[str, type[GzipInflater]] = {"gzip": GzipInflater}
