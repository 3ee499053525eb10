"""What the direct QEMU engine keeps of a part's machine, for ``destroy`` (engines/destroy.py):
the suspended state, the pinned machine type and the run files of a stopped QEMU."""

from __future__ import annotations

from collections.abc import Callable

from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.engines import destroy
from kvmtasks.engines.qemu import machine, savestate

Say = Callable[[str], None]


def remove_own(part: Part, say: Say) -> int:
    files = RunFiles.of(part)
    return destroy.remove([savestate.state_file(part), savestate.record_file(part),
                           part.state_directory / machine.CACHE_NAME, files.pidfile, files.qmp_socket],
                          say)
