"""A lock file that names its holder: a second run waits for the first, and says so."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


@contextmanager
def held(handle: TextIO, waiting: str, doing: str = "") -> Iterator[None]:
    """Hold an exclusive lock on handle (a lock file opened "a+"), writing our pid into it,
    and what we do (doing), for the next one to say whom it waits for.

    While another process holds it, print waiting, with that process's pid and the lock's
    path, and wait for it.
    """
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        print(f"{waiting} (pid {holder}, lock {handle.name})", file=sys.stderr, flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:  # unbuffered: a write that fails here must not fail again when the handle closes
        os.ftruncate(handle.fileno(), 0)
        os.pwrite(handle.fileno(), (f"{os.getpid()} {doing}".rstrip() + "\n").encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, only its holder's name is missing
    yield
