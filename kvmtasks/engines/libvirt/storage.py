"""A libvirt part's storage on its host: the pool, the image and seed volumes uploaded from
this machine (once per content), and the overlay volume backed by the image's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from kvmtasks.config.part import Part
from kvmtasks.engines.libvirt.domain import Disk
from kvmtasks.engines.libvirt.virsh import VirshError, virsh
from kvmtasks.provision.digest import hash_file
from kvmtasks.provision.overlay import base_format, image_info

Say = Callable[[str], None]
POOL_ROOT = "/var/lib/libvirt"


def volume_record(part: Part) -> Path:
    return part.state_directory / "libvirt-volume.json"


def volume_name(part: Part) -> str:
    """The part's copy of its verified image in the pool: the base of its overlay volume,
    or, with overlay = false, the disk the guest writes to."""
    return f"{part.name}-{part.image_path.name}"


def overlay_volume_name(part: Part) -> str:
    return part.overlay_path.name


def overlay_record(part: Part) -> Path:
    return part.state_directory / "libvirt-overlay.json"


def ensure_pool(part: Part) -> None:
    """The pool defined, built and started when it is not. Parts started at once (`doit -n 3`)
    may each find it missing: one defines it, the others' "already exists" and "already active"
    are no failure, and every one builds it (a no-op on a built folder) before it starts it."""
    pools = virsh(part, "pool-list", "--all", "--name").split()
    if part.libvirt_pool not in pools:
        target = f"{POOL_ROOT}/{part.libvirt_pool}"
        _unless(part, "already exists", "pool-define-as", part.libvirt_pool, "dir", "--target", target)
        _unless(part, "already active", "pool-build", part.libvirt_pool)
        virsh(part, "pool-autostart", part.libvirt_pool)
    info = virsh(part, "pool-info", part.libvirt_pool)
    if "running" not in info:
        _unless(part, "already active", "pool-start", part.libvirt_pool)


def _unless(part: Part, done: str, *args: str) -> None:
    """virsh args, where a refusal saying done means another start did it first."""
    try:
        virsh(part, *args)
    except VirshError as error:
        if done not in error.reason:
            raise


def seed_volume_name(part: Part) -> str:
    return f"{part.name}-seed.iso"


def seed_volume(part: Part) -> Disk | None:
    """The cloud-init seed's volume, for a part with a seed."""
    return Disk(part.libvirt_pool, seed_volume_name(part), "raw") if part.cloud_init else None


def seed_record(part: Part) -> Path:
    return part.state_directory / "libvirt-seed.json"


def _recorded(path: Path) -> dict[str, object]:
    try:
        data: dict[str, object] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def upload(part: Part, source: Path, volume: str, record: Path, say: Say) -> None:
    """Stream a local file into a raw volume of the pool, unless the volume already holds
    those bytes: a sha256 recorded at the upload says so (size and mtime spare the hash)."""
    info = source.stat()
    recorded = _recorded(record)
    where = {"uri": part.libvirt_uri, "pool": part.libvirt_pool, "volume": volume}
    exists = volume_exists(part, volume)
    present = exists and all(recorded.get(k) == v for k, v in where.items())
    if present and [recorded.get("size"), recorded.get("mtime_ns")] == [info.st_size, info.st_mtime_ns]:
        return
    sha256 = hash_file(source, ["sha256"])["sha256"]
    if present and recorded.get("sha256") == sha256:
        return
    say(f"{part.name}: uploading {source.name} ({info.st_size} bytes) to pool {part.libvirt_pool} "
        f"on {part.libvirt_uri}")
    if exists:
        virsh(part, "vol-delete", "--pool", part.libvirt_pool, volume)
    virsh(part, "vol-create-as", part.libvirt_pool, volume, str(info.st_size), "--format", "raw")
    virsh(part, "vol-upload", "--pool", part.libvirt_pool, volume, str(source), timeout=3600)
    record.write_text(json.dumps(
        {**where, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha256}
    ))


def ensure_overlay_volume(part: Part, image_format: str | None = None) -> None:
    """The part's overlay volume on the host, backed by its image volume (of image_format, else
    the image's own: a volume made from a top layer is a qcow2 whatever the image was).

    It follows the local overlay: made again whenever that is (re-provisioning, reset,
    disk_size), which the local overlay's size and mtime tell, since no guest writes it.
    """
    info = part.overlay_path.stat()
    made_from = {"uri": part.libvirt_uri, "pool": part.libvirt_pool, "base": volume_name(part),
                 "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    try:
        recorded = json.loads(overlay_record(part).read_text())
    except (OSError, ValueError):
        recorded = None
    exists = volume_exists(part, overlay_volume_name(part))
    if exists and recorded == made_from:
        return
    if exists:
        forget_snapshots(part)
        virsh(part, "vol-delete", "--pool", part.libvirt_pool, overlay_volume_name(part))
    capacity = image_info(part.overlay_path, "qcow2")["virtual-size"]  # disk_size, or the image's
    virsh(part, "vol-create-as", part.libvirt_pool, overlay_volume_name(part), str(capacity),
          "--format", "qcow2", "--backing-vol", volume_name(part),
          "--backing-vol-format", image_format or base_format(part))
    overlay_record(part).write_text(json.dumps(made_from))


def forget_snapshots(part: Part) -> None:
    """Drop libvirt's records of the snapshots of a boot volume made again (reset): they lived in
    the old volume, and libvirt would otherwise offer to revert to them."""
    if part.name not in virsh(part, "list", "--all", "--name").split():
        return
    for name in virsh(part, "snapshot-list", part.name, "--name").split():
        virsh(part, "snapshot-delete", part.name, name, "--metadata")


def boot_volume(part: Part) -> Disk:
    if part.overlay:
        return Disk(part.libvirt_pool, overlay_volume_name(part), "qcow2")
    return Disk(part.libvirt_pool, volume_name(part), base_format(part))


def volume_exists(part: Part, name: str) -> bool:
    try:
        virsh(part, "vol-info", "--pool", part.libvirt_pool, name)
    except VirshError as error:
        if error.not_found:
            return False
        raise
    return True
