"""The engine seam: what runs a part's VM, chosen by ``kvm_engine``.

An engine is a module with start, stop and facts (what status reports); both engines share
config.runfiles.current for "is it running", so provisioning, ``doit clean``
and the scripts ask the same question whatever the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kvmtasks.config.options import Engine as EngineName
from kvmtasks.config.part import Part
from kvmtasks.engines import status
from kvmtasks.engines.status import Facts
from kvmtasks.errors import VmError

Say = Callable[[str], None]


class Engine(Protocol):
    def start(self, part: Part, say: Say = ...) -> None: ...

    def stop(self, part: Part, say: Say = ...) -> None: ...

    def facts(self, part: Part) -> Facts: ...


def engine_for(part: Part) -> Engine:
    # Imported here: a script of a direct-QEMU part never loads the libvirt engine.
    if part.kvm_engine is EngineName.LIBVIRT:
        from kvmtasks.engines import libvirt

        return libvirt
    from kvmtasks.engines import vm

    return vm


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
    return status.describe(facts(part))


def direct_qemu(part: Part, what: str) -> None:
    """Saved states (suspend, snapshots) are QEMU's, driven over its QMP socket: only for a VM
    kvmtasks runs itself."""
    if part.kvm_engine is not EngineName.QEMU:
        raise VmError(f"{what} needs kvm_engine = qemu (this part runs on {part.kvm_engine.value})")


def suspend(part: Part, say: Say = print) -> None:
    direct_qemu(part, "suspend")
    from kvmtasks.engines import vm

    vm.suspend(part, say)
