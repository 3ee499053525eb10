"""Reading an input file with a bound: a regular file, no larger than a limit.

A path option may name /dev/urandom, a FIFO or a file of gigabytes: read whole, it
would hang the tool or fill its memory. Every file kvmtasks reads whole goes through
here, opened without blocking (a FIFO with no writer would wait forever) and read no
further than its limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

KIB = 1 << 10
MIB = 1 << 20
# kvmtasks' own small files (records, part.json, keys): far below this.
RECORD_LIMIT = 1 * MIB
# A config file, and what the seed carries (cloud-init reads them whole, in the guest's memory).
CONFIG_LIMIT = 4 * MIB
USER_DATA_LIMIT = 16 * MIB
NETWORK_CONFIG_LIMIT = 1 * MIB
KEY_LIMIT = 64 * KIB


class NotReadable(ValueError):
    """The file is not a regular file, or larger than the limit; the message says which."""


def size_text(limit: int) -> str:
    return f"{limit // MIB} MiB" if limit >= MIB and limit % MIB == 0 else f"{limit // KIB} KiB"


def read_bytes(path: Path, limit: int) -> bytes:
    """path's bytes; NotReadable when it is no regular file or holds more than limit bytes
    (OSError as open and read raise it: not found, no permission)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise NotReadable("is a folder")
        if not stat.S_ISREG(mode):
            raise NotReadable(f"is not a regular file ({_kind(mode)})")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(descriptor, min(limit + 1 - total, MIB)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise NotReadable(f"is larger than the limit of {size_text(limit)}")
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def read_text(path: Path, limit: int = RECORD_LIMIT, encoding: str = "utf-8") -> str:
    return read_bytes(path, limit).decode(encoding)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"
