"""Listing and pruning the layer cache from the command line:

    python -m kvmtasks.layers.cachelist list [--json] [--cache DIR]
    python -m kvmtasks.layers.cachelist prune [--unused] [--older-than DAYS] [--dry-run]
                                              [--json] [--cache DIR]

Without --cache: the layer caches of the parts in the configs doit reads (KVMTASKS_CONFIG, else
configs/*.cfg in the current folder), else ${XDG_CACHE_HOME:-~/.cache}/kvmtasks/layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from kvmtasks.errors import KvmTasksError
from kvmtasks.layers import entries as cache
from kvmtasks.layers import prune
from kvmtasks.layers.entries import Entry


def roots_of_configs(cwd: Path) -> list[Path]:
    """The layer caches of the parts doit would load from cwd: <download cache>/layers."""
    from kvmtasks.config import loader

    paths = loader.config_paths(cwd, cwd)
    found: dict[Path, None] = {}
    for part in loader.load_parts(paths, cwd):
        download_cache = part.buildout.download_cache
        found[download_cache / "layers" if download_cache else cache.default_root()] = None
    return list(found) or [cache.default_root()]


def size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment else "-"


def lines(root: Path, found: Sequence[Entry], using: dict[str, set[str]]) -> list[str]:
    """The listing: one line per entry, then a total."""
    header = ("ENTRY", "KIND", "STEP", "ON DISK", "MADE", "LAST USE", "PARENT", "USED BY")
    rows = [header] + [
        (cache.short(entry.name), entry.kind,
         entry.step or ("-" if entry.problem is None else entry.problem), size_text(entry.allocated),
         _when(entry.made), _when(entry.last_used), cache.short(entry.parent),
         ", ".join(sorted(using.get(entry.name, set()))) or "-")
        for entry in found
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    text = [f"layer cache {root}"]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        text.append("  ".join([*cells, row[-1]]).rstrip())
    unused = [entry for entry in found if not using.get(entry.name)]
    total = size_text(sum(entry.allocated for entry in found))
    text.append(f"{_count(len(found), 'entry')}, {total} on disk; "
                f"{len(unused)} used by no part ({size_text(sum(entry.allocated for entry in unused))})")
    return text


def as_json(found: Sequence[Entry], using: dict[str, set[str]]) -> list[dict[str, Any]]:
    return [{
        "entry": entry.name, "kind": entry.kind, "step": entry.step, "parent": entry.parent,
        "allocated": entry.allocated,
        "made": entry.made.isoformat(timespec="seconds") if entry.made else None,
        "last_used": entry.last_used.isoformat(timespec="seconds") if entry.last_used else None,
        "used_by": dict(entry.used_by), "parts_using": sorted(using.get(entry.name, set())),
        "top": entry.top,
        "problem": entry.problem,
    } for entry in found]


def list_cache(root: Path, *, json_output: bool) -> list[str] | list[dict[str, Any]]:
    found = cache.scan(root)
    using = cache.users(found, root)
    return as_json(found, using) if json_output else lines(root, found, using)


def prune_cache(root: Path, *, older_than: float | None, unused: bool, dry_run: bool,
                json_output: bool) -> dict[str, Any]:
    """Prune root; print what goes and what stays (as lines, unless json_output); the outcome."""
    found = cache.scan(root)
    chosen = prune.plan(found, root, datetime.now(UTC), older_than=older_than, unused=unused)
    said: list[str] = []
    say = said.append if json_output else print
    for name, why in sorted(chosen.kept.items()):
        say(f"kept {cache.short(name)}: {why}")
    count, freed = prune.remove(root, chosen, say, dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    summary = f"layer cache {root}: {_count(count, 'entry')}, {verb} {size_text(freed)}"
    if older_than is None and not unused:
        summary += " (only leftovers and damaged entries: add --unused and/or --older-than DAYS)"
    say(summary)
    return {"cache": str(root), "dry_run": dry_run, "removed": count, "freed": freed, "lines": said}


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line (and exit 2), as every error of kvmtasks is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun.replace('entry', 'entries')}"


def parser() -> argparse.ArgumentParser:
    top = _OneLineParser(prog="python -m kvmtasks.layers.cachelist",
                                  description="List or prune the layer cache of guest setup steps.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    listing = commands.add_parser("list", help="the entries: kind, step, size on disk, made, last use, "
                                               "parent, the parts using them")
    pruning = commands.add_parser("prune", help="remove leftovers, damaged entries, and the entries "
                                                 "asked for")
    pruning.add_argument("--unused", action="store_true", help="entries no part uses")
    pruning.add_argument("--older-than", type=_days, metavar="DAYS",
                         help="entries not used for more than DAYS days")
    pruning.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    for command in (listing, pruning):
        command.add_argument("--cache", type=Path, action="append", metavar="DIR",
                             help="the layer cache (a download cache's layers/ folder); may repeat")
        command.add_argument("--json", action="store_true", help="JSON on stdout")
    return top


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not days >= 0:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}")
    return days


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(argv)
    try:
        roots = [path.absolute() for path in options.cache] if options.cache else roots_of_configs(Path.cwd())
        results: list[Any] = []
        for root in roots:
            if options.command == "list":
                shown = list_cache(root, json_output=options.json)
                if options.json:
                    results.append({"cache": str(root), "entries": shown})
                else:
                    print("\n".join(str(line) for line in shown))
            else:
                results.append(prune_cache(root, older_than=options.older_than, unused=options.unused,
                                           dry_run=options.dry_run, json_output=options.json))
    except KvmTasksError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if options.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
