"""Readiness beyond the ssh login: a guest with cloud-init is ready when cloud-init is done."""

from __future__ import annotations

import time
from collections.abc import Callable

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.errors import CommandTimedOut
from kvmtasks.guest import ssh

OUTPUT_LOG = "/var/log/cloud-init-output.log"
TAIL_LINES = 5
NOT_FOUND = 127  # the guest's shell: no such command, so no cloud-init
SSH_FAILED = 255


def wait(part: Part, deadline: float, say: Callable[[str], None]) -> None:
    """Wait for ``cloud-init status --wait`` until deadline; an error is a warning, not a failure."""
    remaining = max(deadline - time.monotonic(), 10.0)
    try:
        result = command.run(ssh.ssh_argv(part, ["cloud-init", "status", "--wait"]), timeout=remaining)
    except CommandTimedOut:
        say(f"{part.name}: warning: cloud-init had not finished within kvm_boot_timeout = "
            f"{part.kvm_boot_timeout:g} s; in the guest, `cloud-init status --long` says where it is")
        return
    if result.exit_code in (0, NOT_FOUND):
        return
    if result.exit_code == SSH_FAILED:
        reason = " ".join(result.stderr.split())
        say(f"{part.name}: warning: could not ask the guest whether cloud-init is done: {reason}")
        return
    statuses = [line for line in result.stdout.splitlines() if line.startswith("status:")]
    status = statuses[-1] if statuses else f"exit status {result.exit_code}"
    say(f"{part.name}: warning: cloud-init reported an error ({status}); "
        f"last lines of {OUTPUT_LOG}: {output_tail(part)}")


def output_tail(part: Part) -> str:
    """The last lines of cloud-init's output log in the guest, joined into one line."""
    tail = ["tail", "-n", str(TAIL_LINES), OUTPUT_LOG]
    argv = tail if part.ssh_user == "root" else ["sudo", "-n", *tail]
    result = command.run(ssh.ssh_argv(part, argv), timeout=ssh.CONNECT_TIMEOUT + 20)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return " | ".join(lines) if lines else "(unreadable)"
