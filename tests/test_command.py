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


def test_run_logged_streams_and_keeps_the_output_and_its_last_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "step.log"
    with open(log, "wb") as output:
        result = command.run_logged(
            ["sh", "-c", "for i in 1 2 3 4; do echo line $i; done; echo oops >&2; exit 4"],
            output, timeout=30, tail_lines=2)
    assert result == command.Logged(4, "line 4\noops")
    assert log.read_text() == "line 1\nline 2\nline 3\nline 4\noops\n"
    assert capsys.readouterr().out == log.read_text()


def test_run_logged_ends_at_its_timeout_even_when_a_child_holds_the_output(tmp_path: Path) -> None:
    # What an ssh client does with its ControlMaster: the pipe outlives the process killed.
    began = time.monotonic()
    with open(tmp_path / "step.log", "wb") as output:
        result = command.run_logged(["sh", "-c", "echo started; sleep 6 & wait"], output, timeout=1)
    assert result.exit_code is None and result.tail == "started"
    assert time.monotonic() - began < 5
