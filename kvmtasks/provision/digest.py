"""Checksums computed while data streams past, and the records that keep them.

A record is a small JSON file remembering a file's size, mtime and digests,
so that no step ever reads an image a second time to verify it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvmtasks.config.bounded import read_text
from kvmtasks.errors import VerifyError

CHUNK = 1 << 20
# Chunks waiting for one hash: enough to ride out scheduling jitter, little memory.
_QUEUE_CHUNKS = 8

_Pending = queue.Queue["tuple[bytes | bytearray | memoryview, _Countdown | None] | None"]


class Consumer(Protocol):
    """What else takes every chunk, in a thread of its own, besides the hashes (it must
    not raise: it keeps its failure for its owner to ask about)."""

    def update(self, chunk: bytes | bytearray | memoryview, /) -> None: ...


class MultiHasher:
    """Feeds every chunk to each requested hash algorithm, each in a thread of its own.

    hashlib releases the GIL on large buffers, so md5 and sha256 run on other cores
    while the caller receives, inflates or writes the next chunk: hashing a chunk
    costs the caller a queue put, not the hash.
    """

    def __init__(self, algorithms: Iterable[str], also: Iterable[Consumer] = ()) -> None:
        self._hashes = {name: hashlib.new(name) for name in sorted(set(algorithms))}
        self._also = tuple(also)
        self._queues: list[_Pending] = []
        self._threads: list[threading.Thread] = []

    def update(self, chunk: bytes | bytearray | memoryview,
               release: Callable[[], None] | None = None) -> None:
        """Hash chunk, later, in the threads.

        Without release, a chunk that could change (not bytes) is copied first. With
        release, the caller lends chunk: it stays unchanged until release() is called,
        once every hash is done with it (see Buffers).
        """
        if not self._hashes and not self._also:
            if release is not None:
                release()
            return
        if not self._threads:
            self._start()
        if release is None:
            data: bytes | bytearray | memoryview = chunk if isinstance(chunk, bytes) else bytes(chunk)
            countdown = None
        else:
            data = chunk  # lent: unchanged until release()
            countdown = _Countdown(len(self._queues), release)
        for pending in self._queues:
            pending.put((data, countdown))

    def hexdigests(self) -> dict[str, str]:
        """The digests, once every chunk was hashed (and consumed)."""
        self._finish()
        return {name: h.hexdigest() for name, h in self._hashes.items()}

    def _start(self) -> None:
        consumers: list[tuple[str, Consumer]] = [*self._hashes.items(),
                                                 *(("consumer", also) for also in self._also)]
        for name, hash_object in consumers:
            pending: _Pending = queue.Queue(_QUEUE_CHUNKS)
            thread = threading.Thread(target=_hash_chunks, args=(hash_object, pending),
                                      name=f"hash-{name}", daemon=True)
            thread.start()
            self._queues.append(pending)
            self._threads.append(thread)
        # A hasher dropped half-way (a failed download, Ctrl-C) must not leave its threads waiting.
        weakref.finalize(self, _abandon, list(self._queues))

    def _finish(self) -> None:
        _stop(self._queues)
        for thread in self._threads:
            thread.join()
        self._queues, self._threads = [], []


class Buffers:
    """A fixed set of chunk buffers to read into, lent to a MultiHasher and given back.

    Reusing them spares the allocator, and the kernel, a fresh MiB for every chunk:
    with chunks freed by the hash threads, that churn costs more system time than
    the writes.
    """

    def __init__(self, count: int = _QUEUE_CHUNKS + 2, size: int = CHUNK) -> None:
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def get(self) -> bytearray:
        """A free buffer; waits while all are lent (the hashes are behind)."""
        return self._free.get()

    def give_back(self, buffer: bytearray) -> Callable[[], None]:
        """What puts buffer back into the free set: a release for MultiHasher.update."""
        return lambda: self._free.put(buffer)


class _Countdown:
    """Calls release once count threads have each called done()."""

    def __init__(self, count: int, release: Callable[[], None]) -> None:
        self._count, self._release, self._lock = count, release, threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._count -= 1
            finished = self._count == 0
        if finished:
            self._release()


def _hash_chunks(hash_object: Consumer, pending: _Pending) -> None:
    while (item := pending.get()) is not None:
        chunk, countdown = item
        hash_object.update(chunk)
        if countdown is not None:
            countdown.done()


def _stop(queues: list[_Pending]) -> None:
    for pending in queues:
        pending.put(None)


def _abandon(queues: list[_Pending]) -> None:
    """Stop the threads of a dropped hasher without ever blocking.

    This runs from the garbage collector, possibly while the interpreter shuts down,
    when daemon threads no longer run: a put into a full queue would wait forever.
    The chunks still queued are not wanted any more.
    """
    for pending in queues:
        with contextlib.suppress(queue.Empty):
            while True:
                pending.get_nowait()
        with contextlib.suppress(queue.Full):
            pending.put_nowait(None)


def hash_file(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    hasher = MultiHasher(algorithms)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigests()


# The digest that tells one content from another: every download and image record holds it,
# so that a file with a new mtime (touched, linked again, fetched again) is known for the same.
CONTENT = "sha256"


@dataclass(frozen=True)
class Source:
    """The download an image was made from: its size and mtime then, and its content."""

    size: int
    mtime_ns: int
    content: str | None = None

    def is_now(self, path: Path) -> bool:
        """path is still that file, by size and mtime (no reading)."""
        try:
            return identity(path) == (self.size, self.mtime_ns)
        except OSError:
            return False


@dataclass(frozen=True)
class Record:
    """What was known about a file when it was produced or last hashed."""

    size: int
    mtime_ns: int
    digests: Mapping[str, str]
    # For an image: the download it was made from.
    source: Source | None = None

    def matches(self, path: Path) -> bool:
        try:
            info = path.stat()
        except OSError:
            return False
        return (info.st_size, info.st_mtime_ns) == (self.size, self.mtime_ns)


def identity(path: Path) -> tuple[int, int]:
    """What tells one version of a file from another without reading it: size and mtime."""
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def source_of(path: Path, content: str | None) -> Source:
    """path as the source of an image: its identity now, and its content digest."""
    return Source(*identity(path), content)


def write_record(record_path: Path, file_path: Path, digests: Mapping[str, str],
                 made_from: Source | None = None) -> Record:
    """Record file_path's size, mtime and digests (and the download it was made from)."""
    info = file_path.stat()
    return save_record(record_path, Record(info.st_size, info.st_mtime_ns, dict(digests), made_from))


def save_record(record_path: Path, record: Record) -> Record:
    """Write record as it is (through a temporary name: never half written)."""
    record_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = record_path.with_name(record_path.name + ".tmp")
    data: dict[str, object] = {"size": record.size, "mtime_ns": record.mtime_ns,
                               "digests": dict(record.digests)}
    if record.source is not None:
        data["source"] = {"size": record.source.size, "mtime_ns": record.source.mtime_ns,
                          **({CONTENT: record.source.content} if record.source.content else {})}
    try:
        temporary.write_text(json.dumps(data))
        os.replace(temporary, record_path)
    finally:
        temporary.unlink(missing_ok=True)
    return record


def read_record(record_path: Path) -> Record | None:
    try:
        data = json.loads(read_text(record_path))
        record = Record(int(data["size"]), int(data["mtime_ns"]), dict(data["digests"]))
        if "source" in data:
            source = data["source"]
            content = source.get(CONTENT)
            return Record(record.size, record.mtime_ns, record.digests,
                          Source(int(source["size"]), int(source["mtime_ns"]),
                                 content if isinstance(content, str) else None))
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def content_of(path: Path, record_path: Path) -> str:
    """path's CONTENT digest: its record's while the file is the one recorded, else hashed now."""
    record = read_record(record_path)
    if record is not None and record.matches(path) and CONTENT in record.digests:
        return record.digests[CONTENT]
    return hash_file(path, {CONTENT})[CONTENT]


def compare(what: str, expected: Mapping[str, str], actual: Mapping[str, str],
            sources: Mapping[str, str] | None = None) -> None:
    """Raise VerifyError naming the option (and the list it came from), expected and actual
    on a mismatch."""
    for algorithm, digest in expected.items():
        if actual[algorithm] != digest:
            source = (sources or {}).get(algorithm)
            origin = f" ({source})" if source else ""
            raise VerifyError(
                f"{algorithm}_{what} mismatch{origin}: expected {digest}, got {actual[algorithm]}"
            )
