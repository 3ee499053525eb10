"""The copy-on-write overlay a part boots, so that the verified image is never written.

The overlay is a qcow2 file backed by the image (``qemu-img create -b``): the
guest's writes land in it, QEMU opens the image read-only, and a reset is a
new, empty overlay, made in a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmtasks import command
from kvmtasks.config import bounded
from kvmtasks.config.diskformat import disk_format
from kvmtasks.config.options import Engine, Firmware, size_bytes
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.errors import CommandError, CommandFailed, ProvisionError, VerifyError, VmError
from kvmtasks.provision import digest
from kvmtasks.provision.steps import VmStatus, exclusive, image_record, record_directory

QEMU_IMG_TIMEOUT = 60.0


@dataclass(frozen=True)
class Base:
    """What an overlay is made over when it is not the part's image: a setup layer (its own
    backing chain below it, by design), its format and its content's digest."""

    path: Path
    fmt: str
    content: str


def _recorded_base(part: Part) -> Base | None:
    """The setup layer the part's overlay was last made over, as its record says (a reset from
    the control script, which knows nothing of setup steps, makes the new one over it too)."""
    try:
        recorded = json.loads(bounded.read_text(record_path(part)))
        layer = recorded["layer"]
        return Base(Path(layer["path"]), layer["format"], layer["content"]) if layer else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def create(part: Part, vm_status: VmStatus, base: Base | None = None) -> None:
    """The overlay step: a fresh overlay over the verified image (the base changed, or disk_size),
    or over base, the part's top setup layer."""
    with exclusive(part, "overlay"):
        if vm_status(part).running:
            raise VmError(f"{part.name} is running; its disk is not replaced under it: "
                          f"stop it first: doit stop:{part.name}")
        _make(part, base)


def reset(part: Part, say: Callable[[str], None] = print, *, vm_status: VmStatus,
          base: Base | None = None) -> None:
    """Bring the disk back to the verified image (or to base, the top setup layer, else the one
    the overlay was made over): a new overlay, and a new host key to accept."""
    if not part.overlay:
        raise ProvisionError(f"reset needs overlay = true; {part.name} boots {part.image_path} itself, "
                            "so there is nothing to throw away")
    with exclusive(part, "reset"):
        status = vm_status(part)
        if status.running:
            raise VmError(f"{part.name} is running (pid {status.pid}); stop it first, then reset")
        base = base or _recorded_base(part)
        _make(part, base)
        reset_varstore(part, say)
    say(f"{part.name}: disk reset to {base.path if base else part.image_path} "
        f"(new overlay {part.overlay_path})")


def reset_varstore(part: Part, say: Callable[[str], None]) -> None:
    """The part's UEFI variables go with its disk: the next start copies the template again."""
    if part.kvm_engine is Engine.LIBVIRT and part.firmware is not Firmware.BIOS:
        # The domain's nvram is on the libvirt host, which may be out of reach now: its next
        # start asks libvirt for a fresh one (engines/libvirt/vm.py).
        part.nvram_reset_mark.parent.mkdir(parents=True, exist_ok=True)
        part.nvram_reset_mark.touch()
        say(f"{part.name}: UEFI variables reset (the domain's nvram is copied from its template "
            "at the next start)")
    elif part.varstore_path.exists():
        part.varstore_path.unlink()
        say(f"{part.name}: UEFI variables reset (removed {part.varstore_path})")


def record_path(part: Part) -> Path:
    return record_directory(part) / f"{part.name}.overlay.json"


def up_to_date(part: Part, base: Base | None = None) -> bool:
    """True while the overlay exists over an image of the content it was made on, at the
    disk_size asked.

    The image's content decides, not its size and mtime: an image made again from the same
    bytes (a touched download, a cache entry fetched again) keeps the guest's disk and its
    snapshots. Kept beside the overlay rather than in doit's state, which doit forgets when
    the step fails: a change refused while the VM runs, then undone, must not wipe the
    guest's disk.
    """
    if not part.overlay_path.exists():
        return False
    try:
        recorded = json.loads(bounded.read_text(record_path(part)))
        now = _identity(part, base)
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or \
            {key: recorded.get(key) for key in ("base", "disk_size")} != \
            {key: now[key] for key in ("base", "disk_size")}:
        return False
    if (recorded.get("size"), recorded.get("mtime_ns")) == (now["size"], now["mtime_ns"]):
        return True
    content = recorded.get(digest.CONTENT)
    if not isinstance(content, str):
        return False  # an overlay from before the record held the content: by mtime, as then
    try:
        if (base.content if base else image_content(part)) != content:
            return False
    except OSError:
        return False
    with contextlib.suppress(OSError):  # not remembered: compared again next time
        _write_record(part, content, base)
    return True


def image_content(part: Part, hash_now: bool = True) -> str | None:
    """The image's content digest: its record's while the image is the one recorded, else
    hashed now (None when that is not wanted)."""
    record = digest.read_record(image_record(part))
    if record is not None and record.matches(part.image_path) and digest.CONTENT in record.digests:
        return record.digests[digest.CONTENT]
    if not hash_now or part.is_block_device:
        return None
    return digest.hash_file(part.image_path, {digest.CONTENT})[digest.CONTENT]


def _identity(part: Part, base: Base | None = None) -> dict[str, Any]:
    """What the overlay depends on, but its content: the image or setup layer (path, size,
    mtime) and disk_size."""
    path = base.path if base else part.image_path
    info = path.stat()
    return {"base": str(path.absolute()), "size": info.st_size,
            "mtime_ns": info.st_mtime_ns, "disk_size": part.disk_size}


def _write_record(part: Part, content: str | None, base: Base | None = None) -> None:
    record = record_path(part)
    temporary = record.with_name(record.name + ".tmp")
    layer = None if base is None else {"path": str(base.path), "format": base.fmt, "content": base.content}
    try:
        temporary.write_text(json.dumps({**_identity(part, base), digest.CONTENT: content, "layer": layer}))
        os.replace(temporary, record)
    finally:
        temporary.unlink(missing_ok=True)


def base_format(part: Part) -> str:
    """The image's format, from its header; a block device is always raw."""
    return "raw" if part.is_block_device else disk_format(part.image_path)


def _make(part: Part, layer: Base | None = None) -> None:
    base = (layer.path if layer else part.image_path).absolute()
    if not base.exists():
        raise ProvisionError(f"image {base} not found; run: doit provision:{part.name}")
    fmt = layer.fmt if layer else base_format(part)
    # A raw image has no backing file; only disk_size needs its size: reset stays one qemu-img run.
    info = image_info(base, fmt) if fmt != "raw" or part.disk_size is not None else {}
    backing = info.get("backing-filename")
    if backing and layer is None:
        raise VerifyError(f"{base} has a backing file of its own ({backing}); an overlay needs a "
                          "self-contained image (qemu-img convert makes one)")
    size: list[str] = []
    if part.disk_size is not None:
        wanted, virtual = size_bytes(part.disk_size), int(info["virtual-size"])
        if wanted < virtual:
            raise ProvisionError(f"disk_size = {part.disk_size} ({wanted} bytes) is smaller than the "
                                f"image {base} ({virtual} bytes); a disk is never shrunk")
        size = [str(wanted)]
    overlay = part.overlay_path.absolute()
    partial = overlay.with_name(overlay.name + ".part")
    # -F always: QEMU never probes the base's format (a raw image could pass for anything).
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base), str(partial), *size]
    try:
        command.checked(argv, timeout=QEMU_IMG_TIMEOUT, doing=f"creating the overlay {partial}")
    except CommandError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, overlay)
    # A local file with no checksum is not read whole for this: it is told by its mtime.
    _write_record(part, layer.content if layer else image_content(part, hash_now=False), layer)
    # A fresh disk is a fresh machine: its host key is new too.
    RunFiles.of(part).known_hosts.unlink(missing_ok=True)


def image_info(path: Path, fmt: str) -> dict[str, Any]:
    """qemu-img's view of an image (virtual size, backing file); shared lock, format given."""
    argv = ["qemu-img", "info", "-U", "--output=json", "-f", fmt, str(path)]
    try:
        result = command.checked(argv, timeout=QEMU_IMG_TIMEOUT)
    except CommandFailed as error:
        # An image qemu-img cannot read is a provisioning result to refuse, not a broken tool.
        raise VerifyError(f"qemu-img cannot read {path} as {fmt}: {error.reason or 'no message'}") from None
    info: dict[str, Any] = json.loads(result.stdout)
    return info
