"""virsh, the one way kvmtasks talks to libvirt: an argv per call against the part's host."""

from __future__ import annotations

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.errors import VmError

# virsh domstate words for a domain whose QEMU process lives.
LIVE_DOMAIN_STATES = frozenset({"running", "paused", "in shutdown", "pmsuspended", "blocked", "idle"})
# virsh domstate words for a domain whose QEMU process is gone.
STOPPED_DOMAIN_STATES = frozenset({"shut off", "crashed"})


def virsh_argv(part: Part, *args: str) -> list[str]:
    return ["virsh", "-q", "-c", part.libvirt_uri, *args]


def virsh(part: Part, *args: str, timeout: float = 120) -> str:
    """Run virsh against the part's libvirt host; its first error line becomes a VmError."""
    result = command.run(virsh_argv(part, *args), timeout=timeout)
    if result.exit_code != 0:
        # virsh says what it tried, then why: the last line is the reason.
        lines = [line.removeprefix("error: ").strip() for line in result.stderr.splitlines()]
        reason = next((line for line in reversed(lines) if line), f"exit status {result.exit_code}")
        raise VmError(f"virsh {args[0]} on {part.libvirt_uri}: {reason}")
    return result.stdout
