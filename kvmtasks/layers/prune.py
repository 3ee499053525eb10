"""Pruning the layer cache: which entries go, and removing them under their locks.

What is chosen: entries unused by any part (`unused`), entries not used for more than
`older_than` days, both when both are given; always the tmp-* leftovers of builds that died
(untouched for TMP_GRACE, so a build under way keeps its files) and entries whose record
cannot be read. What is kept whatever was asked: an entry another entry still backs onto
(unless that one goes too), an entry a part's overlay backs onto, an entry whose lock is held.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from kvmtasks.errors import ProvisionError
from kvmtasks.layers import entries as cache
from kvmtasks.layers.entries import Entry

Say = Callable[[str], None]
TMP_GRACE = timedelta(hours=1)


@dataclass(frozen=True)
class Plan:
    """The entries to remove (children before their parents), and why the others asked for stay."""

    remove: list[Entry] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # entry name -> why it goes
    kept: dict[str, str] = field(default_factory=dict)  # entry name -> why it stays


def plan(found: Sequence[Entry], root: Path, now: datetime, *, older_than: float | None = None,
         unused: bool = False) -> Plan:
    using = cache.users(found, root)
    backed = cache.overlay_backed(found, root)
    below = cache.children(found)
    chosen: dict[str, str] = {}
    for entry in found:
        why = _why(entry, now, older_than, unused, using.get(entry.name, set()))
        if why is not None:
            chosen[entry.name] = why
    kept: dict[str, str] = {}
    for name in list(chosen):
        if backed.get(name):
            kept[name] = f"the overlay of {', '.join(sorted(backed[name]))} backs onto it"
            del chosen[name]
    changed = True
    while changed:  # a kept entry keeps its parents: walk until nothing more is kept
        changed = False
        for name in sorted(chosen):
            staying = sorted(child for child in below.get(name, set()) if child not in chosen)
            if staying:
                kept[name] = f"{cache.short(staying[0])} backs onto it"
                del chosen[name]
                changed = True
    ordered = _children_first([entry for entry in found if entry.name in chosen], below)
    return Plan(ordered, {entry.name: chosen[entry.name] for entry in ordered}, kept)


def _why(entry: Entry, now: datetime, older_than: float | None, unused: bool,
         using: set[str]) -> str | None:
    if entry.kind == "tmp":
        if entry.made is not None and now - entry.made < TMP_GRACE:
            return None
        return "left by a build that did not finish"
    if entry.kind == "damaged":
        return f"damaged ({entry.problem})"
    if entry.kind == "foreign":
        return None
    if older_than is None and not unused:
        return None
    reasons = []
    if unused:
        if using:
            return None
        reasons.append("no part uses it")
    if older_than is not None:
        last = entry.last_activity
        if last is not None and now - last <= timedelta(days=older_than):
            return None
        reasons.append(f"not used for more than {older_than:g} days")
    return ", ".join(reasons)


def _children_first(chosen: list[Entry], below: dict[str, set[str]]) -> list[Entry]:
    names = {entry.name for entry in chosen}
    depth: dict[str, int] = {}

    def height(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name not in depth:
            above = [child for child in below.get(name, set()) if child in names and child not in seen]
            depth[name] = 1 + max((height(child, seen | {name}) for child in above), default=0)
        return depth[name]

    return sorted(chosen, key=lambda entry: (height(entry.name), entry.name))


def remove(root: Path, chosen: Plan, say: Say, *, dry_run: bool = False) -> tuple[int, int]:
    """Remove the plan's entries, each under its lock; an entry whose lock is held is skipped
    and said. Returns (entries removed, bytes freed)."""
    count = freed = 0
    skipped: set[str] = set()
    below = cache.children(chosen.remove)
    for entry in chosen.remove:
        child = next((name for name in below.get(entry.name, set()) if name in skipped), None)
        if child is not None:
            skipped.add(entry.name)
            say(f"kept {cache.short(entry.name)}: {cache.short(child)} backs onto it and was kept")
            continue
        verb = "would remove" if dry_run else "removed"
        line = (f"{verb} {cache.short(entry.name)} ({entry.kind}, {entry.allocated} bytes): "
                f"{chosen.reasons[entry.name]}")
        if dry_run:
            say(line)
            count, freed = count + 1, freed + entry.allocated
            continue
        with _locked(entry) as holder:
            if holder is not None:
                skipped.add(entry.name)
                say(f"kept {cache.short(entry.name)}: its lock is held "
                    f"(pid {holder}, lock {entry.folder / cache.LOCK})")
                continue
            _delete(root, entry)
        say(line)
        count, freed = count + 1, freed + entry.allocated
    return count, freed


@contextmanager
def _locked(entry: Entry) -> Iterator[str | None]:
    """Hold the entry's lock while it goes; yield None, or the holder's pid when it is held.
    A tmp-* folder has no lock: its grace time stands for one."""
    lock = entry.folder / cache.LOCK
    if entry.kind == "tmp" or not lock.exists():
        yield None
        return
    try:
        handle = open(lock, "a+")  # noqa: SIM115 (closed below, after the folder is gone)
    except OSError as error:
        raise ProvisionError(f"cannot open {lock}: {error.strerror or error}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            yield (handle.read().split() or ["unknown"])[0]
            return
        yield None
    finally:
        handle.close()


def _delete(root: Path, entry: Entry) -> None:
    """Rename the folder out of the way (a reader sees the whole entry or none), then remove it."""
    doomed = root / f"{cache.TEMPORARY}removing-{entry.name}-{os.getpid()}"
    try:
        os.rename(entry.folder, doomed)
        for path in doomed.rglob("*"):  # the cache's files are 0444: let rmtree through
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(doomed)
    except OSError as error:
        raise ProvisionError(f"removing {entry.folder}: {error.strerror or error}") from None
