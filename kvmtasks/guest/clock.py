"""The guest's clock after a jump in time (resume, snapshot restore): set from the host's.

Through ssh with ``date -s @EPOCH``: it needs no guest agent and both busybox and GNU date
read it; the host's time is taken just before the command leaves, through the VM's ssh master.
"""

from __future__ import annotations

import time

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.errors import CommandError
from kvmtasks.guest import ssh

TIMEOUT = ssh.CONNECT_TIMEOUT + 20


def set_from_host(part: Part) -> str | None:
    """None when the guest's clock now reads the host's time; else why not, in a few words."""
    if part.ssh_port is None:
        return "no ssh_port to reach the guest"
    argv = ssh.ssh_argv(part, ["date", "-u", "-s", f"@{round(time.time())}"])
    try:
        command.checked(argv, timeout=TIMEOUT, doing="date -s")
    except CommandError as error:
        return str(error)
    return None
