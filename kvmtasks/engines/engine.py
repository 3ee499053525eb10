"""The engine seam: what runs a part's VM, chosen by ``kvm_engine``.

An engine is a module with start, stop, suspend and facts (what status reports), and a
module of named snapshots; both engines share
engines.running.current for "is it running", so provisioning, ``doit clean``
and the scripts ask the same question whatever the engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Protocol, cast

from kvmtasks.config.options import Engine as EngineName
from kvmtasks.config.part import Part
from kvmtasks.engines import statusreport
from kvmtasks.engines.statusreport import Facts

Say = Callable[[str], None]


class Engine(Protocol):
    def start(self, part: Part, say: Say = ...) -> None: ...

    def stop(self, part: Part, say: Say = ...) -> None: ...

    def facts(self, part: Part) -> Facts: ...

    def suspend(self, part: Part, say: Say = ...) -> None: ...


class Snapshots(Protocol):
    def save(self, part: Part, name: str, say: Say = ...) -> None: ...

    def restore(self, part: Part, name: str, say: Say = ...) -> None: ...

    def delete(self, part: Part, name: str, say: Say = ...) -> None: ...

    def describe(self, part: Part) -> list[str]: ...


def engine_for(part: Part) -> Engine:
    return cast(Engine, _engine_module(part, "vm"))


def start(part: Part, say: Say = print) -> None:
    engine_for(part).start(part, say)


def stop(part: Part, say: Say = print) -> None:
    engine_for(part).stop(part, say)


def restart(part: Part, say: Say = print) -> None:
    stop(part, say)
    start(part, say)


def facts(part: Part) -> Facts:
    """What status reports, gathered once: describe() and ``status --json`` format it."""
    return engine_for(part).facts(part)


def describe(part: Part) -> list[str]:
    return statusreport.describe(facts(part))


def suspend(part: Part, say: Say = print) -> None:
    engine_for(part).suspend(part, say)


def snapshots(part: Part) -> Snapshots:
    """The named snapshots of the part's engine: QEMU's in its qcow2 boot disk, or libvirt's."""
    return cast(Snapshots, _engine_module(part, "snapshots"))


def _engine_module(part: Part, name: str) -> ModuleType:
    # Imported on demand: a script of a direct-QEMU part never loads the libvirt engine.
    folder = "libvirt" if part.kvm_engine is EngineName.LIBVIRT else "qemu"
    return importlib.import_module(f"kvmtasks.engines.{folder}.{name}")
