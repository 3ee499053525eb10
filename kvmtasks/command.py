"""The one place that runs external programs (qemu, qemu-img, ssh, scp).

Programs always run from an argv list through ``sh``: no shell ever sees a
config value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from kvmtasks.errors import CommandFailed, CommandNotFound, CommandTimedOut

log = logging.getLogger(__name__)

# The Debian package to suggest when a program is missing.
PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-system-riscv64": "qemu-system-misc",
    "qemu-img": "qemu-utils",
    "ssh": "openssh-client",
    "scp": "openssh-client",
    "virsh": "libvirt-clients",
    "ssh-keygen": "openssh-client",
}


ALL_EXIT_CODES = tuple(range(256))


@dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: str
    stderr: str


def find(program: str) -> str:
    """The program's full path, or a CommandNotFound that says what to install."""
    path = shutil.which(program)
    if path is None:
        package = PACKAGES.get(program.rsplit("/", 1)[-1])
        hint = f"; install the {package} package" if package else ""
        raise CommandNotFound(f"{program} not found{hint}")
    return path


def run(argv: Sequence[str], *, timeout: float | None = None, stdin: str | None = None) -> Result:
    """Run argv to completion, capturing its output; CommandNotFound, CommandTimedOut, but
    never an error for its exit status (checked() is the run for which one is a failure).
    stdin, when given, is the program's input (data, never parsed by a shell of ours)."""
    import sh  # here, not at the top: doit runs that start nothing should not pay for loading it

    command = sh.Command(find(argv[0]))
    log.debug("running %s", shlex.join(argv))
    # The timeout is kept here, not by sh's _timeout: that one is watched by a thread that
    # wakes every 0.1 s, so every command with a timeout would end up to 0.1 s late.
    running = command(*argv[1:], _bg=True, _bg_exc=False, _return_cmd=True, _ok_code=ALL_EXIT_CODES,
                      _tty_out=False, _in=stdin)
    _wait(running, argv[0], timeout)
    return Result(
        running.exit_code,
        running.stdout.decode(errors="replace"),
        running.stderr.decode(errors="replace"),
    )


def checked(argv: Sequence[str], *, timeout: float | None = None, doing: str | None = None,
            stdin: str | None = None) -> Result:
    """Run argv as run() does; a non-zero exit status is a CommandFailed that says what was being
    done (doing), which program exited with which status, and the program's last error line."""
    result = run(argv, timeout=timeout, stdin=stdin)
    if result.exit_code != 0:
        reason = last_error_line(result.stderr)
        program = os.path.basename(argv[0])
        message = (f"{doing}: " if doing else "") + f"{program} exited {result.exit_code}"
        raise CommandFailed(message + (f": {reason}" if reason else ""), result.exit_code, result.stderr,
                            reason)
    return result


def last_error_line(stderr: str) -> str:
    """A program's reason, as most say it: the last line they wrote to stderr, without "error: "."""
    lines = [line.strip().removeprefix("error: ") for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class _Deadline:
    """Kills a process that is still running after timeout seconds (SIGKILL, as sh's _timeout)."""

    def __init__(self, process: Any, timeout: float) -> None:
        self.fired = False
        self._process = process
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        alive, _ = self._process.is_alive()
        if alive:
            self.fired = True
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def cancel(self) -> None:
        self._timer.cancel()


def run_foreground(argv: Sequence[str]) -> int:
    """Run argv with the caller's stdin, stdout and stderr; return its exit status."""
    import sh

    command = sh.Command(find(argv[0]))
    log.debug("running %s", shlex.join(argv))
    try:
        command(*argv[1:], _fg=True)
    except sh.ErrorReturnCode as error:
        return int(error.exit_code)
    except sh.SignalException as error:
        return 128 + abs(int(error.exit_code))
    return 0


def replace_process(argv: Sequence[str]) -> NoReturn:
    """Become argv (exec): its output, signals and exit status are the caller's, and no
    Python stays behind waiting for it (the fast path of PART-runscript)."""
    path = find(argv[0])
    log.debug("running %s", shlex.join(argv))
    os.execv(path, [argv[0], *argv[1:]])  # noqa: S606 (an argv list: no shell, as everywhere)


@dataclass(frozen=True)
class Logged:
    """What run_logged saw: the exit status (None when the timeout ended it) and the last lines."""

    exit_code: int | None
    tail: str


def run_logged(argv: Sequence[str], log_file: Any, *, timeout: float, tail_lines: int = 20) -> Logged:
    """Run argv with its output (stdout and stderr, as they come) streamed to our stdout and to
    log_file (an open binary file); at timeout it is killed. Ctrl-C or SIGTERM kill it too."""
    import select
    import subprocess
    import sys

    log.debug("running %s", shlex.join(argv))
    process = subprocess.Popen([find(argv[0]), *argv[1:]], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timer = _Deadline(_Process(process), timeout)
    seen = b""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    try:
        # Not "until end of file": an ssh client hands its output pipe to its ControlMaster,
        # which keeps it open after the client is killed, as long as the remote command runs.
        while not timer.fired:
            if not select.select([fd], [], [], 0.2)[0]:
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            log_file.write(data)
            log_file.flush()
            sys.stdout.write(data.decode(errors="replace"))  # doit may hold a text-only stdout
            sys.stdout.flush()
            seen = (seen + data)[-65536:]
        process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    tail = "\n".join(seen.decode(errors="replace").rstrip("\n").splitlines()[-tail_lines:])
    return Logged(None if timer.fired else process.returncode, tail)


class _Process:
    """A subprocess.Popen as _Deadline sees a process."""

    def __init__(self, process: Any) -> None:
        self._process = process

    def is_alive(self) -> tuple[bool, None]:
        return self._process.poll() is None, None

    def kill(self) -> None:
        self._process.kill()
def _wait(running: Any, program: str, timeout: float | None) -> None:
    """Wait for an sh command started in the background, killing it at timeout (CommandTimedOut)."""
    import sh

    timer = _Deadline(running.process, timeout) if timeout is not None else None
    try:
        running.wait()
    except sh.SignalException:
        if timer is None or not timer.fired:
            raise
        raise CommandTimedOut(f"{program} did not finish within {timeout:g} s") from None
    finally:
        if timer is not None:
            timer.cancel()


def run_with_files(argv: Sequence[str], *, stdin: str | None = None, stdout: str | None = None,
                   timeout: float | None = None) -> Result:
    """run(), with stdin read from a file and/or stdout written to one (binary streams, such as
    a tar archive to or from a guest); the Result's stdout is then empty."""
    import sh

    command = sh.Command(find(argv[0]))
    log.debug("running %s", shlex.join(argv))
    with contextlib.ExitStack() as files:
        source = files.enter_context(open(stdin, "rb")) if stdin is not None else None
        sink = files.enter_context(open(stdout, "wb")) if stdout is not None else None
        running = command(*argv[1:], _bg=True, _bg_exc=False, _return_cmd=True,
                          _ok_code=ALL_EXIT_CODES, _tty_out=False, _in=source, _out=sink)
        _wait(running, argv[0], timeout)
    out = b"" if sink is not None else running.stdout
    return Result(running.exit_code, out.decode(errors="replace"), running.stderr.decode(errors="replace"))


def spawn(argv: Sequence[str], *, log_file: str) -> int:
    """Start argv in the background, in a session of its own, its output to log_file; its pid.

    For a daemon that lives as long as a VM (virtiofsd): it outlives this process, and the
    caller stops it by its pid."""
    import subprocess

    path = find(argv[0])
    log.debug("starting %s", shlex.join(argv))
    with open(log_file, "ab") as output:
        process = subprocess.Popen([path, *argv[1:]], stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=output, start_new_session=True)
    return process.pid
