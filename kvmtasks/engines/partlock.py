"""One lock per part, held across every operation on its VM (start, stop, suspend, resume,
reset, snapshots): a second operation on the same part waits for the first, and says for whom.

Without it two starts both launch QEMU, and the one that loses deletes the winner's pid file;
a reset replaces the disk of a VM another command is starting. The lock is a file in the
part's run directory (flock: the kernel drops it when its holder dies, even by kill -9).
An operation made of others (restart, a snapshot restore that starts the VM) takes it once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from kvmtasks.config.part import Part
from kvmtasks.errors import VmError
from kvmtasks.provision.locking import held

T = TypeVar("T")
_HELD: dict[Path, int] = {}  # the locks this process holds, and how deep


def lock_path(part: Part) -> Path:
    return part.state_directory / "vm.lock"


@contextmanager
def operation(part: Part, doing: str) -> Iterator[None]:
    """Hold part's VM lock while doing ("start", "snapshot save", ...)."""
    path = lock_path(part).absolute()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 (closed below, after the lock is released)
    except OSError as error:
        raise VmError(f"cannot open {path}, the lock of {part.name}'s VM: "
                      f"{error.strerror or error}") from None
    with handle, held(handle, f"{part.name}: {doing} waits for another operation on {part.name}",
                      doing):
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]


def locked(doing: str, step: Callable[..., T]) -> Callable[..., T]:
    """step(part, ...) run while holding part's VM lock."""
    def run(part: Part, *args: Any, **kwargs: Any) -> T:
        with operation(part, doing):
            return step(part, *args, **kwargs)
    return run
