"""The boundary between doit and kvmtasks: the callables doit runs as actions.

An expected failure (a KvmTasksError) becomes a one-line doit failure; Ctrl-C
and SIGTERM end the run with one line and doit's state saved.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from doit.exceptions import TaskFailed

from kvmtasks.config.part import Part
from kvmtasks.engines.running import current
from kvmtasks.errors import KvmTasksError


class Terminated(KeyboardInterrupt):
    """SIGTERM during a step: it ends the step like Ctrl-C does."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While a step runs, SIGTERM interrupts it instead of killing doit, which then keeps the
    record of the steps that completed (killed, it would redo them all)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a signal handler
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded(step: Callable[[Part], None], part: Part, name: str) -> Callable[[], TaskFailed | None]:
    """A doit action that turns an expected failure into one line, not a traceback."""

    def action() -> TaskFailed | None:
        try:
            with _sigterm_interrupts():
                step(part)
        except KvmTasksError as error:
            return TaskFailed(error.report(f"{name}:{part.name}"))
        except KeyboardInterrupt as interrupt:
            signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        else:
            return None
        # One line, then doit stops as a whole, saving what completed; exit 128 + the signal.
        # Raised out here, the exit holds no traceback: the step's objects (hash threads)
        # are released now, not during the interpreter's shutdown.
        print(f"{name}:{part.name}: interrupted ({signum.name}); run it again to carry on",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    action.__name__ = f"{name}:{part.name}"
    return action


def clean_unless_running(part: Part) -> Callable[..., TaskFailed | None]:
    """A clean action for ``doit clean``: remove the task's targets, never a running VM's disk."""

    def clean(task: Any, dryrun: bool = False) -> TaskFailed | None:
        if current(part).running:
            return TaskFailed(f"clean:{part.name}: {part.name} is running; stop it first: "
                              f"doit stop:{part.name}")
        for target in map(Path, task.targets):
            if target.is_file():
                print(f"{task.name} - removing file '{target}'")
                if not dryrun:
                    target.unlink()
        return None

    return clean
