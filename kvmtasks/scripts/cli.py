"""Entry point of the generated scripts (PART-ctl, -ssh, -sendfile, -getfile, -runscript, -sync)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from kvmtasks.config import bounded, partjson
from kvmtasks.config.part import Part
from kvmtasks.engines import destroy, engine, partlock, sharing, statusreport
from kvmtasks.engines.running import current
from kvmtasks.errors import KvmTasksError, VmError
from kvmtasks.guest import ssh
from kvmtasks.provision import overlay
from kvmtasks.scripts import console

EXIT_STOPPED = 3  # LSB: program is not running

CTL_ACTIONS = {
    "start": "start the VM and wait until it answers",
    "stop": "stop the VM: ACPI power-down, then poweroff over ssh, then quit",
    "restart": "stop, then start",
    "status": "whether the VM runs (exit 0) or not (exit 3), and how to reach it",
    "console": "print the serial console log of the VM (the current boot's)",
    "reset": "throw the guest's disk changes away: a new overlay over the verified image",
    "suspend": "save the running VM's state and stop it; start resumes it",
    "destroy": "stop the VM, then remove everything the part made for its machine (overlay, seed, "
               "suspended state, snapshots, the keys and known_hosts kvmtasks made, the ssh config; "
               "on libvirt the domain and the part's volumes); never the image or the download cache",
    "snapshot": "named snapshots of the VM's disk and memory, kept in its qcow2 boot disk: "
                "save NAME (the VM runs), restore NAME (a running VM jumps back, a stopped one "
                "starts from it), list (name, date, size), delete NAME",
}

USAGE = {"ssh": "%(prog)s [SSH OPTIONS] [COMMAND...]", "runscript": "%(prog)s COMMAND..."}
HELP = {
    "ctl": "Start, stop, restart or suspend the VM of part {part}, show its status "
           "(exit 0 when running, 3 when stopped or suspended) or its serial console; start resumes "
           "a suspended VM; reset throws the guest's disk changes away (a new overlay over the "
           "verified image; the VM must be stopped); snapshot manages named snapshots; destroy "
           "removes the VM's machine, as vagrant destroy.",
    "ssh": "Log in to the guest of part {part} over ssh, or run COMMAND there, with the options "
           "the other scripts use (the part's key, user, port and known_hosts); SSH OPTIONS such as "
           "-L go to ssh. A terminal gets a terminal in the guest. Exit status: COMMAND's.",
    "sendfile": "Copy LOCALFILE into the guest of part {part} as REMOTEFILE "
                "(argument order as in erp5.recipe.kvm: remote first).",
    "getfile": "Copy REMOTEFILE from the guest of part {part} to LOCALFILE "
               "(remote first, as in erp5.recipe.kvm).",
    "runscript": "Run COMMAND in the guest of part {part} over ssh; its output streams through "
                 "and its exit status is returned. The words go to the guest's shell, as with ssh.",
    "sync": "Copy the copied folders of part {part} (option share, carried by rsync, or by tar when "
            "the guest lacks rsync) into the guest again: deletions follow, excluded names stay. "
            "--pull brings the guest's copies back to the host instead (read-only ones never). "
            "Live shares (9p, virtiofs) need nothing.",
}


def _parser(part: Part, kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{part.name}-{kind}", description=HELP[kind].format(part=part.name),
        usage=USAGE.get(kind),
    )
    if kind == "ctl":
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        for action, text in CTL_ACTIONS.items():
            actions.add_parser(action, help=text, description=text)
        actions.choices["status"].add_argument(
            "--json", action="store_true", help="one JSON object, for programs")
        actions.choices["console"].add_argument(
            "-f", "--follow", action="store_true", help="keep printing what comes, until Ctrl-C")
        snapshot = actions.choices["snapshot"]
        snapshot.add_argument("operation", choices=("save", "restore", "list", "delete"))
        snapshot.add_argument("name", metavar="NAME", nargs="?")
    elif kind == "sync":
        parser.add_argument("--pull", action="store_true",
                            help="copy the guest's folders back to the host (deletions too)")
        parser.add_argument("guest_dirs", metavar="GUESTDIR", nargs="*",
                            help="only these shares (default: all)")
    elif kind in ("sendfile", "getfile"):
        parser.add_argument("remotefile", metavar="REMOTEFILE")
        parser.add_argument("localfile", metavar="LOCALFILE", type=Path)
    return parser


def _snapshot(part: Part, operation: str, name: str | None) -> int:
    snapshots = engine.snapshots(part)
    if operation == "list":
        if name is not None:
            raise VmError("snapshot list takes no NAME")
        print("\n".join(snapshots.describe(part)))
        return 0
    if name is None:
        raise VmError(f"snapshot {operation} needs a NAME")
    step = {"save": snapshots.save, "restore": snapshots.restore, "delete": snapshots.delete}
    with partlock.operation(part, f"snapshot {operation}"):
        engine.machine_of(part).recover(print)
        step[operation](part, name, print)
    return 0


def _ctl(part: Part, options: argparse.Namespace) -> int:
    if options.action == "status":
        facts = engine.facts(part)
        print(statusreport.as_json(facts) if options.json else "\n".join(statusreport.describe(facts)))
        return 0 if facts.running else EXIT_STOPPED
    if options.action == "console":
        return console.show(part, follow=options.follow)
    if options.action == "snapshot":
        return _snapshot(part, options.operation, options.name)
    steps: dict[str, Callable[[Part, engine.Say], None]] = {
        "start": engine.start, "stop": engine.stop, "restart": engine.restart,
        "reset": partlock.locked("reset", partial(overlay.reset, vm_status=current)),
        "suspend": engine.suspend, "destroy": partlock.locked("destroy", destroy.destroy)}
    steps[options.action](part, print)
    return 0


def _names(parser: argparse.ArgumentParser, args: Sequence[str]) -> tuple[str, Path]:
    """REMOTEFILE and LOCALFILE: two names, never options ("-rf" names a file).

    A lone -h/--help asks for help; a leading "--" (once needed) is still accepted. argparse
    only prints the help or the usage error: it drops a second "--" even after the first.
    """
    if len(args) == 3 and args[0] == "--":
        args = args[1:]
    if len(args) != 2:
        parser.parse_args(args if list(args) in (["-h"], ["--help"]) else ["--", *args])
        parser.error("give REMOTEFILE and LOCALFILE")
    return args[0], Path(args[1])


def run(part: Part, kind: str, args: Sequence[str]) -> int:
    if kind in ("runscript", "ssh"):
        if list(args[:1]) in (["-h"], ["--help"]) or (kind == "runscript" and not args):
            _parser(part, kind).print_help()
            return 0 if args else 2
        if kind == "ssh":
            return ssh.login(part, args, tty=sys.stdin.isatty())
        return ssh.runscript(part, list(args))
    if kind == "ctl":
        return _ctl(part, _parser(part, kind).parse_args(args))
    if kind == "sync":
        options = _parser(part, kind).parse_args(args)
        with partlock.operation(part, "sync"):
            sharing.sync(part, options.guest_dirs, pull=options.pull, say=print)
        return 0
    remote_file, local_file = _names(_parser(part, kind), args)
    if kind == "sendfile":
        ssh.sendfile(part, remote_file, local_file)
    else:
        ssh.getfile(part, remote_file, local_file)
    return 0


def main(kind: str, snapshot_file: str, args: Sequence[str] | None = None) -> int:
    try:
        part = partjson.from_json(bounded.read_text(Path(snapshot_file)))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        # render writes it again (its check reads the file), under the part's name.
        script = Path(sys.argv[0]).name
        name = script.removesuffix(f"-{kind}") if script.endswith(f"-{kind}") else "PART"
        why = error.strerror if isinstance(error, OSError) and error.strerror else error
        print(f"{script}: cannot read {snapshot_file} ({' '.join(str(why).split())}); write it "
              f"again: doit render:{name}", file=sys.stderr)
        return 1
    try:
        return run(part, kind, sys.argv[1:] if args is None else args)
    except KvmTasksError as error:
        print(error.report(f"{part.name}-{kind}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as a program killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
