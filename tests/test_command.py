"""command.run: real child processes (this Python), their output, exit status and timeout."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from kvmtasks import command
from kvmtasks.errors import CommandError, CommandFailed, CommandNotFound, CommandTimedOut


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_output_and_exit_status_come_back_with_or_without_a_timeout(timeout: float | None) -> None:
    result = command.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); "
                                                "sys.exit(3)"], timeout=timeout)
    assert result == command.Result(3, "out\n", "err\n")


def test_a_program_past_its_timeout_is_killed_and_named(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    program = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    started = time.monotonic()

    with pytest.raises(CommandError, match=r"^\S+python\S* did not finish within 0.5 s$"):
        command.run([sys.executable, "-c", program], timeout=0.5)

    assert time.monotonic() - started < 30, "the program ran on after its timeout"
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


def test_a_missing_program_says_what_to_install() -> None:
    with pytest.raises(CommandError, match=r"^qemu-img-missing not found$"):
        command.run(["qemu-img-missing"], timeout=1)


def test_checked_names_the_work_the_status_and_the_last_error_line() -> None:
    program = ("import sys; print('trying', file=sys.stderr); "
               "print('error: disk full', file=sys.stderr); sys.exit(4)")
    with pytest.raises(CommandFailed) as raised:
        command.checked([sys.executable, "-c", program], doing="writing x")
    name = Path(sys.executable).name
    assert str(raised.value) == f"writing x: {name} exited 4: disk full"
    assert (raised.value.exit_code, raised.value.reason) == (4, "disk full")
    assert "trying" in raised.value.stderr


def test_checked_returns_the_output_of_a_success() -> None:
    assert command.checked([sys.executable, "-c", "print('fine')"]).stdout == "fine\n"


def test_the_three_failures_are_told_apart(tmp_path: Path) -> None:
    with pytest.raises(CommandNotFound):
        command.checked(["qemu-img-missing"])
    with pytest.raises(CommandTimedOut):
        command.checked([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3)
    with pytest.raises(CommandFailed, match=r"exited 1$"):
        command.checked([sys.executable, "-c", "raise SystemExit(1)"])
