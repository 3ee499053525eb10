"""Following the frames of a zstd stream as it passes, to tell a whole stream from a cut one.

zstandard's decoders stop without an error where a truncated input stops; the
frame and block headers (RFC 8878) say where each frame ends, and reading them
costs a few bytes per 128 KiB block.
"""

from __future__ import annotations

_FRAME_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC, _SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0
_RLE_BLOCK = 1


class ZstdFrames:
    """Fed every byte of a zstd stream in order; complete() once it ends where a frame ends."""

    def __init__(self) -> None:
        self._expect, self._need = "magic", 4  # the header read next, and its size
        self._header = bytearray()
        self._skip = 0  # bytes of content before the next header
        self._checksum = 0  # bytes of checksum after the current frame's last block
        self._frames = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view, position = memoryview(data), 0
        while position < len(view):
            if self._skip:
                count = min(self._skip, len(view) - position)
                self._skip -= count
                position += count
                continue
            count = min(self._need - len(self._header), len(view) - position)
            self._header += view[position:position + count]
            position += count
            if len(self._header) == self._need:
                header = int.from_bytes(self._header, "little")
                self._header.clear()
                self._advance(header)

    def complete(self) -> bool:
        """True when the bytes so far are whole frames (at least one)."""
        return self._frames > 0 and self._expect == "magic" and not self._header and not self._skip

    def _next(self, expect: str, need: int, skip: int = 0) -> None:
        self._expect, self._need, self._skip = expect, need, skip

    def _advance(self, header: int) -> None:
        if self._expect == "magic":
            if header == _FRAME_MAGIC:
                self._next("descriptor", 1)
            elif header & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._next("skippable", 4)
            else:
                raise ValueError("data after the last frame is not a zstd frame")
        elif self._expect == "skippable":
            self._frames += 1
            self._next("magic", 4, skip=header)
        elif self._expect == "descriptor":
            single_segment = bool(header & 0x20)
            self._checksum = 4 if header & 0x04 else 0
            window = 0 if single_segment else 1
            dictionary = (0, 1, 2, 4)[header & 0x03]
            content_size = (1 if single_segment else 0, 2, 4, 8)[header >> 6]
            self._next("block", 3, skip=window + dictionary + content_size)
        else:  # a block header: last-block bit, type, size
            block_type, size = (header >> 1) & 0x03, header >> 3
            skip = 1 if block_type == _RLE_BLOCK else size
            if header & 0x01:
                self._frames += 1
                self._next("magic", 4, skip=skip + self._checksum)
            else:
                self._next("block", 3, skip=skip)
