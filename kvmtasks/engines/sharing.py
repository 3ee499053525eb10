"""A part's shares on a running VM, for both engines: what the VM is launched with, the mounts
and copies once the guest answers (start, resume, snapshot restore), the mounts taken down
before its state is saved, and PART-sync.

`auto` offers a live 9p share where QEMU runs on this machine (the direct engine, or a local
libvirt) and tries the mount over ssh; a guest that cannot mount it (no 9p in its kernel) gets
a copy instead. On a remote libvirt host, `auto` is a copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

from kvmtasks.config.options import Engine
from kvmtasks.config.part import Part
from kvmtasks.config.remote import remote_of
from kvmtasks.config.shares import LIVE, Carrier, Share, carried, record_path, tag
from kvmtasks.engines.running import current
from kvmtasks.errors import VmError
from kvmtasks.guest import copies, mounts

Say = Callable[[str], None]


def offered(part: Part, share: Share) -> Carrier:
    """How the VM is launched to carry the share: a live device (9p, virtiofs), or a copy."""
    if share.carrier is Carrier.AUTO:
        local = part.kvm_engine is Engine.QEMU or remote_of(part) is None
        return Carrier.NINEP if local else Carrier.RSYNC
    return share.carrier


def live(part: Part) -> list[tuple[int, Share, Carrier]]:
    """The shares the VM carries live: (index for the tag, share, carrier)."""
    return [(index, share, offered(part, share)) for index, share in enumerate(part.shares)
            if offered(part, share) in LIVE]


def attach(part: Part, say: Say) -> None:
    """Mount the live shares and push the copies into a guest that answers; record how each goes.

    A share the guest cannot take leaves the VM running, with one line that says which and why.
    """
    if not part.shares:
        return
    how: dict[str, str] = {}
    try:
        for index, share in enumerate(part.shares):
            carrier = offered(part, share)
            if carrier in LIVE:
                problem = mounts.mount(part, share, tag(index), carrier)
                if problem is None:
                    how[share.guest] = carrier.value
                    continue
                if share.carrier is not Carrier.AUTO:
                    raise VmError(f"share {share.guest}: the guest cannot mount {carrier} ({problem})")
                say(f"{part.name}: share {share.guest}: the guest cannot mount 9p ({problem}); "
                    "copying it instead")
            how[share.guest] = copies.push(part, share)
    except VmError as error:
        raise VmError(f"{part.name} is running, but {error}") from None
    finally:
        _record(part, how)


def _record(part: Part, how: dict[str, str]) -> None:
    path = record_path(part.state_directory)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(how, indent=1))
    os.replace(temporary, path)


def detach(part: Part, doing: str) -> None:
    """Take the live shares down before the VM's state is saved (suspend, snapshot save):
    QEMU refuses to save a guest with a 9p folder mounted, and cannot save a virtiofs device."""
    for _index, share, carrier in live(part):
        if carrier is Carrier.VIRTIOFS:
            raise VmError(f"cannot {doing}: share {share.guest} is carried by virtiofs, whose "
                          "device QEMU 7.2 cannot save; use 9p or rsync for a VM you suspend "
                          "or snapshot")
    for _index, share, _carrier in live(part):
        problem = mounts.unmount(part, share)
        if problem is not None:
            raise VmError(f"cannot {doing}: share {share.guest} could not be unmounted in the guest "
                          f"({problem}); QEMU cannot save a guest with it mounted")


def sync(part: Part, guest_dirs: Sequence[str], *, pull: bool, say: Say) -> None:
    """PART-sync: push the copied folders again (or pull them back); live shares need nothing."""
    chosen = [s for s in part.shares if not guest_dirs or s.guest in guest_dirs]
    unknown = sorted(set(guest_dirs) - {s.guest for s in part.shares})
    if unknown:
        raise VmError(f"no share on {', '.join(unknown)} (shares: "
                      f"{', '.join(s.guest for s in part.shares) or 'none'})")
    if not current(part).running:
        raise VmError(f"{part.name} is not running: start it (start copies the folders too)")
    now = carried(part.state_directory)
    for share in chosen:
        # No record (a VM started by an older kvmtasks): a share offered live is taken as live.
        way = now.get(share.guest) or (offered(part, share).value if offered(part, share) in LIVE else None)
        if way in (Carrier.NINEP, Carrier.VIRTIOFS):
            say(f"{share.guest}: live ({way}), nothing to copy")
            continue
        if pull and share.read_only:
            say(f"{share.guest}: read-only, not pulled back")
            continue
        how = copies.pull(part, share) if pull else copies.push(part, share)
        arrow = f"{share.guest} -> {share.host}" if pull else f"{share.host} -> {share.guest}"
        say(f"{arrow} ({how})")
