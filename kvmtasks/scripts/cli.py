"""Entry point of the generated scripts (PART-ctl, -sendfile, -getfile, -runscript)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kvmtasks.config import snapshot
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import current
from kvmtasks.engines import engine
from kvmtasks.errors import KvmTasksError, VmError
from kvmtasks.guest import ssh
from kvmtasks.provision import overlay

EXIT_STOPPED = 3  # LSB: program is not running

HELP = {
    "ctl": "Start, stop, restart, suspend the VM of part {part}, or show its status "
           "(exit 0 when running, 3 when stopped or suspended); start resumes a suspended VM. "
           "reset throws the guest's disk changes away (a new overlay over the verified image; "
           "the VM must be stopped). "
           "snapshot save|restore|list|delete manages named snapshots of its disk and memory.",
    "sendfile": "Copy LOCALFILE into the guest of part {part} as REMOTEFILE "
                "(argument order as in erp5.recipe.kvm: remote first).",
    "getfile": "Copy REMOTEFILE from the guest of part {part} to LOCALFILE "
               "(remote first, as in erp5.recipe.kvm).",
    "runscript": "Run COMMAND in the guest of part {part} over ssh; its output streams through "
                 "and its exit status is returned. The words go to the guest's shell, as with ssh.",
}


def _parser(part: Part, kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{part.name}-{kind}", description=HELP[kind].format(part=part.name)
    )
    if kind == "ctl":
        parser.add_argument(
            "action", choices=("start", "stop", "status", "restart", "reset", "suspend", "snapshot"))
    elif kind in ("sendfile", "getfile"):
        parser.add_argument("remotefile", metavar="REMOTEFILE")
        parser.add_argument("localfile", metavar="LOCALFILE", type=Path)
    return parser


def _snapshot(part: Part, args: Sequence[str]) -> int:
    from kvmtasks.engines import snapshots

    parser = argparse.ArgumentParser(
        prog=f"{part.name}-ctl snapshot",
        description=f"Named snapshots of the VM of part {part.name}, disk and memory together, kept "
                    "in its qcow2 boot disk: save (the VM runs), restore (a running VM jumps back, a "
                    "stopped one starts from it), list (name, date, size), delete.",
    )
    parser.add_argument("operation", choices=("save", "restore", "list", "delete"))
    parser.add_argument("name", metavar="NAME", nargs="?")
    options = parser.parse_args(args)
    if options.operation == "list":
        if options.name is not None:
            parser.error("list takes no NAME")
        print("\n".join(snapshots.describe(part)))
        return 0
    if options.name is None:
        parser.error(f"{options.operation} needs a NAME")
    step = {"save": snapshots.save, "restore": snapshots.restore, "delete": snapshots.delete}
    step[options.operation](part, options.name, print)
    return 0


def _ctl(part: Part, action: str) -> int:
    if action == "status":
        print("\n".join(engine.describe(part)))
        return 0 if current(part).running else EXIT_STOPPED
    steps = {"start": engine.start, "stop": engine.stop, "restart": engine.restart,
             "reset": overlay.reset, "suspend": engine.suspend}
    steps[action](part, print)
    return 0


def run(part: Part, kind: str, args: Sequence[str]) -> int:
    if kind == "runscript":
        if not args or args[0] in ("-h", "--help"):
            _parser(part, kind).print_help()
            return 0 if args else 2
        return ssh.runscript(part, list(args))
    if kind == "ctl" and args and args[0] == "snapshot":
        return _snapshot(part, args[1:])
    options = _parser(part, kind).parse_args(args)
    if kind == "ctl":
        return _ctl(part, options.action)
    if kind == "sendfile":
        ssh.sendfile(part, options.remotefile, options.localfile)
    else:
        ssh.getfile(part, options.remotefile, options.localfile)
    return 0


def main(kind: str, snapshot_file: str, args: Sequence[str] | None = None) -> int:
    try:
        part = snapshot.from_json(Path(snapshot_file).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError) as error:
        print(f"kvmtasks: cannot read {snapshot_file} ({error}); run doit render again",
              file=sys.stderr)
        return 1
    try:
        return run(part, kind, sys.argv[1:] if args is None else args)
    except KvmTasksError as error:
        print(f"{part.name}-{kind}: {error}", file=sys.stderr)
        if isinstance(error, VmError) and error.details:
            print(error.details, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
