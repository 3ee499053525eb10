"""Checksums computed while data streams past, and the records that keep them.

A record is a small JSON file remembering a file's size, mtime and digests,
so that no step ever reads an image a second time to verify it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmtasks.errors import VerifyError

CHUNK = 1 << 20
# Chunks waiting for one hash: enough to ride out scheduling jitter, little memory.
_QUEUE_CHUNKS = 8


class MultiHasher:
    """Feeds every chunk to each requested hash algorithm, each in a thread of its own.

    hashlib releases the GIL on large buffers, so md5 and sha256 run on other cores
    while the caller receives, inflates or writes the next chunk: hashing a chunk
    costs the caller a queue put, not the hash.
    """

    def __init__(self, algorithms: Iterable[str]) -> None:
        self._hashes = {name: hashlib.new(name) for name in sorted(set(algorithms))}
        self._queues: list[queue.Queue[bytes | None]] = []
        self._threads: list[threading.Thread] = []

    def update(self, chunk: bytes | memoryview) -> None:
        if not self._hashes:
            return
        if not self._threads:
            self._start()
        # The threads hash it later: never hand them a buffer the caller may reuse.
        data = chunk if isinstance(chunk, bytes) else bytes(chunk)
        for pending in self._queues:
            pending.put(data)

    def hexdigests(self) -> dict[str, str]:
        self._finish()
        return {name: h.hexdigest() for name, h in self._hashes.items()}

    def _start(self) -> None:
        for name, hash_object in self._hashes.items():
            pending: queue.Queue[bytes | None] = queue.Queue(_QUEUE_CHUNKS)
            thread = threading.Thread(target=_hash_chunks, args=(hash_object, pending),
                                      name=f"hash-{name}", daemon=True)
            thread.start()
            self._queues.append(pending)
            self._threads.append(thread)
        # A hasher dropped half-way (a failed download) must not leave its threads waiting.
        weakref.finalize(self, _stop, list(self._queues))

    def _finish(self) -> None:
        _stop(self._queues)
        for thread in self._threads:
            thread.join()
        self._queues, self._threads = [], []


def _hash_chunks(hash_object: Any, pending: queue.Queue[bytes | None]) -> None:
    while (chunk := pending.get()) is not None:
        hash_object.update(chunk)


def _stop(queues: list[queue.Queue[bytes | None]]) -> None:
    for pending in queues:
        pending.put(None)


def hash_file(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    hasher = MultiHasher(algorithms)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigests()


@dataclass(frozen=True)
class Record:
    """What was known about a file when it was produced or last hashed."""

    size: int
    mtime_ns: int
    digests: Mapping[str, str]

    def matches(self, path: Path) -> bool:
        try:
            info = path.stat()
        except OSError:
            return False
        return (info.st_size, info.st_mtime_ns) == (self.size, self.mtime_ns)


def write_record(record_path: Path, file_path: Path, digests: Mapping[str, str]) -> Record:
    info = file_path.stat()
    record = Record(info.st_size, info.st_mtime_ns, dict(digests))
    record_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = record_path.with_name(record_path.name + ".tmp")
    temporary.write_text(json.dumps(
        {"size": record.size, "mtime_ns": record.mtime_ns, "digests": record.digests}
    ))
    os.replace(temporary, record_path)
    return record


def read_record(record_path: Path) -> Record | None:
    try:
        data = json.loads(record_path.read_text())
        return Record(int(data["size"]), int(data["mtime_ns"]), dict(data["digests"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compare(what: str, expected: Mapping[str, str], actual: Mapping[str, str]) -> None:
    """Raise VerifyError naming the option, expected and actual on a mismatch."""
    for algorithm, digest in expected.items():
        if actual[algorithm] != digest:
            raise VerifyError(
                f"{algorithm}_{what} mismatch: expected {digest}, got {actual[algorithm]}"
            )
