"""One ssh connection per running VM: an OpenSSH master that runscript, sendfile and getfile share.

``start`` and resume open it; ``stop``, ``suspend`` and a snapshot close it (a restored guest
has no memory of the TCP connection). Clients name its socket in ``ssh.common_options`` and
connect directly when no master runs, so a missing master only costs speed.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import control_socket, is_private_folder
from kvmtasks.errors import VmError
from kvmtasks.guest import ssh

# The master notices a guest that went away (killed VM) within about this many seconds.
ALIVE_INTERVAL = 5
ALIVE_COUNT = 3
EXIT_WAIT = 5.0


def _answers(path: Path) -> bool:
    """True when a process accepts connections on the unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except OSError as error:
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return False
            raise VmError(f"cannot check the ssh master socket {path}: {error.strerror}") from None
    return True


def _private_folder(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise VmError(f"cannot create {path} for the ssh master socket: {error.strerror}") from None
    if not is_private_folder(path):
        raise VmError(f"{path} is not a folder only you can use (owner, mode 0700): "
                      "the ssh master socket is not put there")


def master_argv(part: Part) -> list[str]:
    """ssh that logs in, then stays in the background as the master (never holds our output)."""
    argv = ssh.ssh_argv(part, [])
    host = argv.index("--")
    return [
        argv[0],
        # First: ssh keeps the first value it reads for an option.
        "-o", "ControlMaster=yes",
        "-o", "ControlPersist=yes",
        "-o", f"ServerAliveInterval={ALIVE_INTERVAL}",
        "-o", f"ServerAliveCountMax={ALIVE_COUNT}",
        "-N", "-f",
        *argv[1:host], *argv[host:],
    ]


def control_argv(part: Part, operation: str) -> list[str]:
    """``ssh -O operation``: ask the master (check, exit) through its socket."""
    argv = ssh.ssh_argv(part, [])
    host = argv.index("--")
    return [argv[0], "-O", operation, *argv[1:host], *argv[host:]]


def close(part: Part) -> None:
    """Stop the part's master if one runs; remove its socket if nothing answers on it."""
    path = control_socket(part)
    if not path.exists() and not path.is_symlink():
        return
    if _answers(path):
        command.run(control_argv(part, "exit"), timeout=EXIT_WAIT)
        deadline = time.monotonic() + EXIT_WAIT
        while path.exists() and _answers(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _answers(path):
            raise VmError(f"the ssh master on {path} did not exit")
    path.unlink(missing_ok=True)


def open_master(part: Part) -> bool:
    """A fresh master for a VM that just started or resumed; False when ssh could not log in.

    Its login is the proof that the guest answers: start waits on this, not on a login of its own.
    """
    if part.ssh_port is None:
        return False
    path = control_socket(part)
    _private_folder(path.parent)
    close(part)  # a master left from an earlier run of this VM talks to a guest that is gone
    result = command.run(master_argv(part), timeout=ssh.CONNECT_TIMEOUT + 20)
    ssh.check_host_key(part, result)
    return result.exit_code == 0 and _answers(path)


def is_open(part: Part) -> bool:
    return os.path.exists(control_socket(part)) and _answers(control_socket(part))
