"""Checksums computed while data streams past, and the records that keep them.

A record is a small JSON file remembering a file's size, mtime and digests,
so that no step ever reads an image a second time to verify it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kvmtasks.errors import VerifyError

CHUNK = 1 << 20


class MultiHasher:
    """Feeds every chunk to each requested hash algorithm."""

    def __init__(self, algorithms: Iterable[str]) -> None:
        self._hashes = {name: hashlib.new(name) for name in sorted(set(algorithms))}

    def update(self, chunk: bytes | memoryview) -> None:
        for hash_object in self._hashes.values():
            hash_object.update(chunk)

    def hexdigests(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self._hashes.items()}


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
