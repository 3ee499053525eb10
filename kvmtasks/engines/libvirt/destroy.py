"""What the libvirt engine keeps of a part's machine, for ``destroy`` (engines/destroy.py): the
domain kvmtasks defined (with its managed save and snapshot records) and the part's volumes on
the libvirt host, then the records of them here.

A domain of the part's name that kvmtasks did not define is left alone, and so are the volumes
(which may be its disks); the pool stays, other parts may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.engines import destroy
from kvmtasks.engines.libvirt import managedsave, storage
from kvmtasks.engines.libvirt.domain import made_by_kvmtasks
from kvmtasks.engines.libvirt.virsh import virsh
from kvmtasks.engines.libvirt.vm import nvram_record
from kvmtasks.errors import VmError

Say = Callable[[str], None]


def _records(part: Part) -> list[Path]:
    return [storage.volume_record(part), storage.overlay_record(part), storage.seed_record(part),
            managedsave.record_file(part), part.state_directory / "libvirt-domain.xml",
            RunFiles.of(part).domain, RunFiles.of(part).accel, part.nvram_reset_mark,
            nvram_record(part)]


def _pool_exists(part: Part) -> bool:
    return part.libvirt_pool in virsh(part, "pool-list", "--all", "--name").split()


def remove_own(part: Part, say: Say) -> int:
    count = 0
    if part.name in virsh(part, "list", "--all", "--name").split():
        if not made_by_kvmtasks(virsh(part, "dumpxml", part.name)):
            raise VmError(f"a domain named {part.name} exists on {part.libvirt_uri} and was not made by "
                          "kvmtasks; it is left alone, and so are the pool's volumes")
        # --nvram: a UEFI domain's variables go with it (libvirt refuses to guess).
        virsh(part, "undefine", part.name, "--managed-save", "--snapshots-metadata", "--nvram")
        say(f"  removed libvirt domain {part.name} on {part.libvirt_uri}")
        count += 1
    if _pool_exists(part):
        names = [storage.overlay_volume_name(part), storage.seed_volume_name(part), storage.volume_name(part)]
        for name in names:  # the overlay before the image volume it is backed by
            if storage.volume_exists(part, name):
                virsh(part, "vol-delete", "--pool", part.libvirt_pool, name)
                say(f"  removed volume {name} of pool {part.libvirt_pool} on {part.libvirt_uri}")
                count += 1
    return count + destroy.remove(_records(part), say)

