"""PART-ssh and PART-runscript as scripts that start in milliseconds: they only exec ssh.

Python starts isolated and without its site (``-IS``): no site-packages, no kvmtasks import,
nothing read at run time but the arguments. The script execs ``ssh -F`` the part's ssh config
(guest/sshconfig.py) with the part's host name; the values it holds are Python literals, never
seen by a shell. Asked for help (or runscript without a command), it loads the full entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import control_socket
from kvmtasks.guest import sshconfig

KINDS = ("ssh", "runscript")

TEMPLATE = '''#!{python} -IS
# {part}-{kind}: written by kvmtasks (doit render:{part}); edits are overwritten.
# Execs ssh with the part's ssh config at once; kvmtasks itself is loaded only for --help.
import os
import sys

KIND = {kind!r}
CONFIG = {config!r}
HOST = {part!r}
# The folder of the VM's ssh master socket: used only when it is ours alone (owner, mode 0700).
SOCKETS = {sockets!r}

args = sys.argv[1:]
if args[:1] in (["-h"], ["--help"]) or (KIND == "runscript" and not args):
    import site

    site.main()
    sys.path.insert(0, {root!r})
    from kvmtasks.scripts.cli import main

    sys.exit(main(KIND, {snapshot!r}))
argv = ["ssh", "-F", CONFIG, "-o", "BatchMode=yes"]
try:
    info = os.lstat(SOCKETS)
    private = info.st_uid == os.getuid() and info.st_mode & 0o170077 == 0o040000
except OSError:
    private = False
if not private:
    argv += ["-o", "ControlPath=none"]
if KIND == "ssh":
    # Options the user gives may follow the host (-L ...); a terminal gets a terminal.
    argv += [*(["-t"] if os.isatty(0) else []), HOST, *args]
else:
    argv += ["--", HOST, *args]
try:
    os.execvp("ssh", argv)
except OSError as error:
    print(f"{{HOST}}-{{KIND}}: cannot run ssh ({{error.strerror}}); install the openssh-client package",
          file=sys.stderr)
    sys.exit(1)
'''


def applies(part: Part, kind: str) -> bool:
    """The lean script serves a part whose guest ssh reaches."""
    return kind in KINDS and part.ssh_port is not None


def text(part: Part, kind: str, snapshot_file: Path, package_root: Path) -> str:
    return TEMPLATE.format(
        python=sys.executable, part=part.name, kind=kind, config=str(sshconfig.path(part)),
        sockets=str(control_socket(part).parent), root=str(package_root), snapshot=str(snapshot_file),
    )
