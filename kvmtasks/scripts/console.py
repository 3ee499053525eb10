"""``PART-ctl console``: the part's serial console log, printed once or followed like ``tail -F``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import BinaryIO

from kvmtasks.config.part import Part
from kvmtasks.config.remote import remote_of
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.errors import VmError

POLL_SECONDS = 0.2
CHUNK = 64 * 1024


def show(part: Part, *, follow: bool) -> int:
    """Print the console log so far; with follow, keep printing until interrupted (Ctrl-C)."""
    if remote_of(part) is not None:
        raise VmError(f"the serial console of {part.name} is logged on its libvirt host "
                      f"({part.libvirt_uri}), not here")
    log = RunFiles.of(part).console_log
    target = sys.stdout.buffer
    if not log.exists() and not follow:
        raise VmError(f"no console log yet ({log}): the VM of {part.name} has not been started")
    if follow:
        _follow(log, target)
    else:
        _copy_all(log, target)
    return 0


def _copy_all(log: Path, target: BinaryIO) -> None:
    with open(log, "rb") as reader:
        while chunk := reader.read(CHUNK):
            target.write(chunk)
    target.flush()


def _follow(log: Path, target: BinaryIO) -> None:
    """Print log as it grows. Each start moves the old log aside and QEMU begins a new one:
    a new file (or a shorter one) is read from its start."""
    reader: BinaryIO | None = None
    identity: tuple[int, int] | None = None
    try:
        while True:
            try:
                info = log.stat()
            except FileNotFoundError:
                info = None
            if info is not None and (
                reader is None or (info.st_dev, info.st_ino) != identity or info.st_size < reader.tell()
            ):
                if reader is not None:
                    _drain(reader, target)  # what the old file got before it was moved aside
                    reader.close()
                reader, identity = open(log, "rb"), (info.st_dev, info.st_ino)  # noqa: SIM115
            if reader is None or not _drain(reader, target):
                time.sleep(POLL_SECONDS)
    finally:
        if reader is not None:
            reader.close()


def _drain(reader: BinaryIO, target: BinaryIO) -> bool:
    """Copy what is new in reader; True when there was something."""
    copied = False
    while chunk := reader.read(CHUNK):
        target.write(chunk)
        copied = True
    if copied:
        target.flush()
    return copied
