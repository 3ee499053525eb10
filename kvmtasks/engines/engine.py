"""The engine seam: what runs a part's VM, chosen by ``kvm_engine``.

Each engine gives its primitives as a lifecycle.Machine (its ``vm`` module's ``machine_of``)
and has a module of named snapshots; lifecycle.py runs start, stop and suspend over the
machine, the same for both. "Is it running" is engines/running.py, whatever the engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, cast

from kvmtasks.config.options import Engine as EngineName
from kvmtasks.config.part import Part
from kvmtasks.engines import statusreport
from kvmtasks.engines.statusreport import Facts

if TYPE_CHECKING:  # the lifecycle is loaded by what starts or stops a VM, not by every script
    from kvmtasks.engines.lifecycle import Machine

Say = Callable[[str], None]


class Snapshots(Protocol):
    def save(self, part: Part, name: str, say: Say = ...) -> None: ...

    def restore(self, part: Part, name: str, say: Say = ...) -> None: ...

    def delete(self, part: Part, name: str, say: Say = ...) -> None: ...

    def describe(self, part: Part) -> list[str]: ...


def machine_of(part: Part) -> Machine:
    """The part's VM as its engine runs it."""
    return cast("Machine", _engine_module(part, "vm").machine_of(part))


def start(part: Part, say: Say = print) -> None:
    from kvmtasks.engines import lifecycle

    lifecycle.start(machine_of(part), say)


def stop(part: Part, say: Say = print) -> None:
    from kvmtasks.engines import lifecycle

    lifecycle.stop(machine_of(part), say)


def restart(part: Part, say: Say = print) -> None:
    stop(part, say)
    start(part, say)


def suspend(part: Part, say: Say = print) -> None:
    from kvmtasks.engines import lifecycle

    lifecycle.suspend(machine_of(part), say)


def facts(part: Part) -> Facts:
    """What status reports, gathered once: describe() and ``status --json`` format it."""
    return machine_of(part).facts()


def describe(part: Part) -> list[str]:
    return statusreport.describe(facts(part))


def snapshots(part: Part) -> Snapshots:
    """The named snapshots of the part's engine: QEMU's in its qcow2 boot disk, or libvirt's."""
    return cast(Snapshots, _engine_module(part, "snapshots"))


def _engine_module(part: Part, name: str) -> ModuleType:
    # Imported on demand: a script of a direct-QEMU part never loads the libvirt engine.
    folder = "libvirt" if part.kvm_engine is EngineName.LIBVIRT else "qemu"
    return importlib.import_module(f"kvmtasks.engines.{folder}.{name}")
