"""doit's console reporter, with an expected failure shown as its one line."""

from __future__ import annotations

import sys
from typing import Any

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter


class Reporter(ConsoleReporter):  # type: ignore[misc]
    """Prints ``ERROR: STEP:PART: message`` on stderr for the failures kvmtasks expects.

    Unexpected errors (a bug) keep doit's report with the traceback.
    """

    failures: list[dict[str, Any]]  # set by ConsoleReporter, which has no type hints

    def _write_failure(self, result: dict[str, Any], write_exception: bool = True) -> None:
        failure = result["exception"]
        if _expected(failure):
            sys.stderr.write(f"ERROR: {failure.message}\n")
            return
        super()._write_failure(result, write_exception)

    def complete_run(self) -> None:
        # Keep doit's epilogue (captured output) only where there is something to show.
        shown = [
            result for result in self.failures
            if not _expected(result["exception"]) or any(a.out for a in result["task"].actions)
        ]
        self.failures = shown
        super().complete_run()


def _expected(failure: object) -> bool:
    return isinstance(failure, TaskFailed) and not failure.traceback
