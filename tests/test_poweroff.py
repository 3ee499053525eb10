"""The power-off policy both engines share, driven by fake callables.

A fake stands where a VM would: the policy is only about order and time (the button, the
grace, the wait), which the guest tests show with real guests for both engines.
"""

from __future__ import annotations

import time
from pathlib import Path

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.engines import poweroff


def load(tmp_path: Path) -> Part:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\nfile = disk.img\n")  # no ssh_port
    (part,) = load_file(path, tmp_path)
    return part


class FakeVm:
    """Goes away a given number of seconds after its power button is pressed (None: never)."""

    def __init__(self, after: float | None) -> None:
        self.after = after
        self.pressed_at: float | None = None
        self.waits: list[float] = []

    def press(self) -> None:
        self.pressed_at = time.monotonic()

    def gone_within(self, seconds: float) -> bool:
        self.waits.append(seconds)
        assert self.pressed_at is not None, "waited before the button was pressed"
        if self.after is None:
            return False
        gone_at = self.pressed_at + self.after
        time.sleep(max(0.0, min(seconds, gone_at - time.monotonic())))
        return time.monotonic() >= gone_at


def test_a_guest_that_acts_on_the_button_within_the_grace(tmp_path: Path) -> None:
    vm = FakeVm(after=0.0)
    assert poweroff.power_off(load(tmp_path), 10, vm.press, vm.gone_within) == "acpi"
    assert vm.waits == [poweroff.ACPI_GRACE]


def test_a_slow_guest_without_ssh_is_waited_for_to_the_timeout(tmp_path: Path) -> None:
    vm = FakeVm(after=0.3)
    assert poweroff.power_off(load(tmp_path), 0.6, vm.press, vm.gone_within) == "acpi"


def test_a_guest_that_never_goes_is_reported_after_the_timeout(tmp_path: Path) -> None:
    vm = FakeVm(after=None)
    started = time.monotonic()
    assert poweroff.power_off(load(tmp_path), 0.5, vm.press, vm.gone_within) is None
    assert vm.waits[0] == 0.5  # the grace never outlasts the timeout
    assert time.monotonic() - started < poweroff.ACPI_GRACE


def test_no_time_at_all_still_presses_the_button_and_looks_once(tmp_path: Path) -> None:
    vm = FakeVm(after=None)
    assert poweroff.power_off(load(tmp_path), 0, vm.press, vm.gone_within) is None
    assert vm.pressed_at is not None and vm.waits[0] == 0
