"""Asking a guest to power off: the ACPI button, then over ssh for a guest that ignores it.

Both engines use it; they differ only in how the button is pressed and how they see the VM gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvmtasks.config.part import Part
from kvmtasks.guest import ssh

# Seconds a guest gets to act on the ACPI power button before it is asked over ssh.
ACPI_GRACE = 3.0
STOPPED_HOW = {
    "acpi": "the guest powered off on the ACPI power button",
    "ssh": "the guest ignored the ACPI power button and powered off when asked over ssh",
}


def power_off(
    part: Part, seconds: float, press_button: Callable[[], object], gone_within: Callable[[float], bool]
) -> str | None:
    """How the guest powered off ("acpi" or "ssh"), or None when it did not within seconds.

    The ACPI button first. A guest still up ACPI_GRACE seconds later that lets us in over ssh
    is asked to run poweroff, then waited for up to seconds more; otherwise the wait for the
    button goes on, to seconds in all.
    """
    press_button()
    deadline = time.monotonic() + seconds
    if gone_within(min(ACPI_GRACE, seconds)):
        return "acpi"
    if seconds > 0 and part.ssh_port is not None and ssh.request_poweroff(part):
        return "ssh" if gone_within(seconds) else None
    return "acpi" if gone_within(deadline - time.monotonic()) else None
