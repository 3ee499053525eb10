"""virsh, the one way kvmtasks talks to libvirt: an argv per call against the part's host."""

from __future__ import annotations

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.errors import CommandFailed, VmError

# virsh domstate words for a domain whose QEMU process lives.
LIVE_DOMAIN_STATES = frozenset({"running", "paused", "in shutdown", "pmsuspended", "blocked", "idle"})
# virsh domstate words for a domain whose QEMU process is gone.
STOPPED_DOMAIN_STATES = frozenset({"shut off", "crashed"})


def virsh_argv(part: Part, *args: str) -> list[str]:
    return ["virsh", "-q", "-c", part.libvirt_uri, *args]


class VirshError(VmError):
    """virsh refused or failed; what it said is classified here, once."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def not_found(self) -> bool:
        """No domain, pool or volume of that name. virsh says so as libvirt's "Domain not found:
        ..." or, when its lookup by name, uuid and id reset that error, as "failed to get domain"."""
        return "not found" in self.reason.lower() or self.reason.startswith("failed to get ")

    @property
    def not_running(self) -> bool:
        """The domain is not running ("Requested operation is not valid: domain is not running")."""
        return "not running" in self.reason.lower()


def virsh(part: Part, *args: str, timeout: float = 120) -> str:
    """Run virsh against the part's libvirt host; its reason (its last error line) becomes a
    VirshError."""
    try:
        return command.checked(virsh_argv(part, *args), timeout=timeout).stdout
    except CommandFailed as error:
        # virsh says what it tried, then why: the last line is the reason.
        reason = error.reason or f"exit status {error.exit_code}"
        raise VirshError(f"virsh {args[0]} on {part.libvirt_uri}: {reason}", reason) from None
