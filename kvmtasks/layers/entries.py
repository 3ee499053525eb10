"""The layer cache as it is on disk: its entries, their records, and the parts that use them.

Read-only: listing takes no lock and writes nothing. An entry is LAYERS/<key> (a layer, or
a deep chain flattened over its base: kind "flat"), LAYERS/base-<sha256> (a verified image) or
LAYERS/tmp-* (a build under way, or left by one that died). A part counts as using an entry
while its overlay backs onto the entry's chain; when its overlay is not where a part's overlay
is by default, its record's word is taken.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kvmtasks.config import bounded
from kvmtasks.errors import ProvisionError

RECORD = "record.json"
LOCK = "lock"
TEMPORARY = "tmp-"
BASE = "base-"
MAX_RECORD_BYTES = 1 << 20
_QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Entry:
    name: str
    folder: Path
    # "layer", "flat", "base", "tmp", "damaged" (no record that can be read), "foreign" (a version not 1)
    kind: str
    allocated: int  # bytes on disk of everything in the folder
    step: str | None = None
    parent: str | None = None
    made: datetime | None = None
    last_used: datetime | None = None
    used_by: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None
    top: str | None = None  # a flat entry's top layer: the chain a part using it stands on

    @property
    def disk_file(self) -> Path:
        return self.folder / ("image" if self.kind == "base" else "layer.qcow2")

    @property
    def last_activity(self) -> datetime | None:
        """When it was last used, else made; a tmp-* or damaged entry: its newest file's mtime."""
        return self.last_used or self.made


def default_root() -> Path:
    """The layer cache of the default download cache: ${XDG_CACHE_HOME:-~/.cache}/kvmtasks/layers."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "kvmtasks" / "layers"


def scan(root: Path) -> list[Entry]:
    """Every entry under root, sorted by name; an absent root is an empty cache."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ProvisionError(f"layer cache {root}: {error.strerror or error}") from None
    return [read_entry(root / name) for name in names if (root / name).is_dir()]


def read_entry(folder: Path) -> Entry:
    allocated, newest = _usage(folder)
    if folder.name.startswith(TEMPORARY):
        return Entry(folder.name, folder, "tmp", allocated, made=newest)
    try:
        record = json.loads(bounded.read_text(folder / RECORD, MAX_RECORD_BYTES))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        kind = record["kind"]
        if record.get("version") != 1:  # another kvmtasks' layout: listed, never pruned
            return Entry(folder.name, folder, "foreign", allocated, made=newest,
                         problem=f"{RECORD}: version {record.get('version')!r}, not 1")
        if kind not in ("layer", "flat", "base"):
            raise ValueError(f"kind {kind!r}")
        return Entry(
            folder.name, folder, kind, allocated,
            step=record.get("step"), parent=record.get("parent"),
            made=_when(record.get("made")), last_used=_when(record.get("last_used")),
            used_by={str(k): str(v) for k, v in (record.get("used_by") or {}).items()},
            top=record.get("top") if kind == "flat" else None,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return Entry(folder.name, folder, "damaged", allocated, made=newest,
                     problem=f"{RECORD}: {reason}")


def _when(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _usage(folder: Path) -> tuple[int, datetime | None]:
    """Allocated bytes of the files under folder, and the newest mtime among them."""
    total, newest = 0, 0.0
    for directory, _, files in os.walk(folder):
        for name in (".", *files):
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            total += info.st_blocks * 512 if name != "." else 0
            newest = max(newest, info.st_mtime)
    return total, datetime.fromtimestamp(newest, UTC) if newest else None


def short(name: str | None) -> str:
    """An entry's name as listings show it: a key's first 12 digits, a base's 12 after base-."""
    if not name:
        return "-"
    if name.startswith(BASE):
        return name[:len(BASE) + 12]
    return name if name.startswith(TEMPORARY) else name[:12]


def backing_file(path: Path) -> Path | None:
    """The backing file a qcow2 names in its header (relative to its folder), or None."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
            if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not size or size > 4096:
                return None
            handle.seek(offset)
            name = handle.read(size).decode("utf-8", errors="replace")
    except OSError:
        return None
    return path.parent / name


def chain_entries(disk: Path, root: Path, limit: int = 256) -> list[str]:
    """The entries of root that disk's backing chain goes through, top first."""
    found: list[str] = []
    resolved_root = root.resolve()
    current: Path | None = disk
    while current is not None and len(found) < limit:
        current = backing_file(current)
        if current is None:
            break
        folder = current.resolve().parent
        if folder.parent == resolved_root:
            found.append(folder.name)
    return found


def part_overlay(user: str) -> Path | None:
    """Where the overlay of "BUILDOUT_DIR::PART" is by default, or None when the folder is gone."""
    directory, _, part = user.rpartition("::")
    if not directory or not part or not os.path.isdir(directory):
        return None
    return Path(directory) / "parts" / part / f"{part}.overlay.qcow2"


def users(entries: Iterable[Entry], root: Path) -> dict[str, set[str]]:
    """entry name -> the parts ("BUILDOUT_DIR::PART") that use it, directly or through the
    layers above it. A part whose buildout folder is gone uses nothing; one whose overlay is
    found uses what the overlay's chain goes through; otherwise its record is believed. A part
    over a flat entry uses its chain's layers too: its next changed step is built over them."""
    listed = list(entries)
    by_name = {entry.name: entry for entry in listed}
    using: dict[str, set[str]] = {entry.name: set() for entry in listed}
    claimed = {user for entry in listed for user in entry.used_by}
    for user in sorted(claimed):
        overlay = part_overlay(user)
        if overlay is None:
            continue
        if overlay.is_file():
            names = chain_entries(overlay, root)
        else:
            names = [entry.name for entry in listed if user in entry.used_by]
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in by_name and user not in using[name]:
                using[name].add(user)
                todo += [by_name[name].parent or "", by_name[name].top or ""]
    return using


def overlay_backed(entries: Iterable[Entry], root: Path) -> dict[str, set[str]]:
    """entry name -> the parts whose overlay, found on disk, backs onto it (through any layers):
    removing such an entry would take the part's disk with it."""
    listed = list(entries)
    backed: dict[str, set[str]] = {entry.name: set() for entry in listed}
    for user in sorted({user for entry in listed for user in entry.used_by}):
        overlay = part_overlay(user)
        if overlay is not None and overlay.is_file():
            for name in chain_entries(overlay, root):
                backed.setdefault(name, set()).add(user)
    return backed


def children(entries: Iterable[Entry]) -> dict[str, set[str]]:
    """entry name -> the entries whose layer backs onto it (by record, and by the qcow2 header)."""
    listed = list(entries)
    below: dict[str, set[str]] = {entry.name: set() for entry in listed}
    for entry in listed:
        parents = {entry.parent} if entry.parent else set()
        if entry.kind in ("layer", "flat", "damaged", "tmp"):
            for path in entry.folder.glob("*.qcow2"):
                backing = backing_file(path)
                if backing is not None:
                    parents.add(backing.parent.name)
        for parent in parents - {entry.name}:
            below.setdefault(parent, set()).add(entry.name)
    return below
