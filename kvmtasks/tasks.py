"""Task dicts for doit: one sub-task per step and part, named STEP:PART.

Pure functions of the parsed parts, so tests can pin the graph without
running anything.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from doit.dependency import FileChangedChecker
from doit.exceptions import TaskFailed
from doit.tools import config_changed

from kvmtasks import provision, render, vm
from kvmtasks.config import Part
from kvmtasks.errors import KvmTasksError
from kvmtasks.report import Reporter

Task = dict[str, Any]

STEP_DOCS = {
    "download": "Download the image of a part (resumes an interrupted download)",
    "verify-download": "Check the downloaded file against md5/sha256/sha512_download",
    "decompress": "Decompress a gzipped download into the image",
    "verify-image": "Check the image against md5/sha256/sha512_image",
    "render": "Write the control scripts PART-ctl, -sendfile, -getfile, -runscript",
    "provision": "Download, verify and decompress the image, and write the control scripts",
    "start": "Provision the part, then start its VM and wait until it answers",
    "stop": "Stop the VM of a part (ACPI power-down, then quit, then signals)",
    "status": "Show whether the VM of a part is running",
}


class SizeMtimeChecker(FileChangedChecker):  # type: ignore[misc]
    """A file changed when its size or mtime did: never re-hash multi-GB images."""

    def check_modified(self, file_path: str, file_stat: os.stat_result, state: Any) -> bool:
        return [file_stat.st_mtime_ns, file_stat.st_size] != list(state)

    def get_state(self, dep: str, current_state: Any) -> list[int]:
        info = os.stat(dep)
        return [info.st_mtime_ns, info.st_size]


def doit_config(parts: Sequence[Part], default_var: Path) -> dict[str, Any]:
    var = parts[0].buildout.var_directory if parts else default_var
    var.mkdir(parents=True, exist_ok=True)
    return {
        "dep_file": str(var / ".doit.json"),
        "backend": "json",
        "check_file_uptodate": SizeMtimeChecker,
        "default_tasks": [],
        "reporter": Reporter,
    }


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
            details = getattr(error, "details", "")
            return TaskFailed(f"{name}:{part.name}: {error}" + (f"\n{details}" if details else ""))
        except KeyboardInterrupt as interrupt:
            # One line, then doit stops as a whole, saving what completed; exit 128 + the signal.
            signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
            print(f"{name}:{part.name}: interrupted ({signum.name}); run it again to carry on",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum) from None
        return None

    action.__name__ = f"{name}:{part.name}"
    return action


def part_tasks(part: Part) -> Iterator[Task]:
    """Every task of one part, in the order the steps run."""
    steps: list[str] = []
    if part.image is not None:
        yield {
            "basename": "download",
            "name": part.name,
            "actions": [guarded(provision.download, part, "download")],
            "targets": [str(part.download_path), str(provision.download_record(part))],
            "uptodate": [config_changed({"url": part.image})],
            "clean": True,
            "doc": f"{STEP_DOCS['download']} ({part.image})",
        }
        yield {
            "basename": "verify-download",
            "name": part.name,
            "actions": [guarded(provision.verify_download, part, "verify-download")],
            "file_dep": [str(provision.download_record(part))],
            "uptodate": [config_changed(dict(part.download_digests))],
            "task_dep": [f"download:{part.name}"],
            "doc": STEP_DOCS["verify-download"],
        }
        steps += ["download", "verify-download"]
    if part.gzip:
        yield {
            "basename": "decompress",
            "name": part.name,
            "actions": [guarded(provision.decompress, part, "decompress")],
            "file_dep": [str(part.download_path)],
            "targets": [str(part.image_path), str(provision.image_record(part))],
            "task_dep": [f"verify-download:{part.name}"],
            "clean": True,
            "doc": STEP_DOCS["decompress"],
        }
        steps.append("decompress")
    yield _verify_image_task(part, steps)
    yield _render_task(part)
    steps += ["verify-image", "render"]
    yield {
        "basename": "provision",
        "name": part.name,
        "actions": None,
        "task_dep": [f"{step}:{part.name}" for step in steps],
        "doc": f"{STEP_DOCS['provision']} {part.name}",
    }
    yield from _vm_tasks(part)


def _verify_image_task(part: Part, earlier: list[str]) -> Task:
    task: Task = {
        "basename": "verify-image",
        "name": part.name,
        "actions": [guarded(provision.verify_image, part, "verify-image")],
        "uptodate": [config_changed(dict(part.image_digests))],
        "task_dep": [f"{step}:{part.name}" for step in earlier[-1:]],
        "doc": STEP_DOCS["verify-image"],
    }
    if part.file is None:
        task["file_dep"] = [str(provision.image_record(part))]
    elif part.image_digests:
        # A local file is hashed once, then trusted while its size and mtime hold.
        task["uptodate"].append(lambda: provision.local_file_verified(part))
    return task


def _render_task(part: Part) -> Task:
    scripts = [render.script_path(part, kind) for kind in render.SCRIPTS]
    texts = [render.script_text(part.name, kind, render.snapshot_path(part)) for kind in render.SCRIPTS]
    return {
        "basename": "render",
        "name": part.name,
        "actions": [guarded(render.render, part, "render")],
        "targets": [str(render.snapshot_path(part)), *map(str, scripts)],
        "uptodate": [config_changed({"part": render.runtime_snapshot(part), "scripts": texts})],
        "clean": True,
        "doc": STEP_DOCS["render"],
    }


def _vm_tasks(part: Part) -> Iterator[Task]:
    def status(part: Part) -> None:
        print("\n".join(vm.describe(part)))

    for name, step, deps in (
        ("start", vm.start, [f"provision:{part.name}"]),
        ("stop", vm.stop, []),
        ("status", status, []),
    ):
        yield {
            "basename": name,
            "name": part.name,
            "actions": [guarded(step, part, name)],
            "task_dep": deps,
            "uptodate": [False],
            "verbosity": 2,
            "doc": f"{STEP_DOCS[name]} {part.name}",
        }


def all_tasks(parts: Sequence[Part]) -> Iterator[Task]:
    for basename, doc in STEP_DOCS.items():
        yield {"basename": basename, "name": None, "doc": doc}
    for part in parts:
        yield from part_tasks(part)
