"""Suspend and resume on libvirt: the domain's managed save, and the record that says whether
it still fits the part.

``virsh managedsave`` writes the running domain's state on the libvirt host and stops it;
``virsh start`` then loads it. As with the direct engine's saved state, a state belongs to
one VM: the record kept here holds a digest of the domain XML kvmtasks defined and the
identity of the local files its volumes follow (image, overlay, seed). A state that no
longer fits is removed before a cold boot, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kvmtasks.config import seedrules
from kvmtasks.config.part import Part
from kvmtasks.engines.libvirt.virsh import VirshError, virsh

# managedsave under TCG writes the whole guest memory: give a large guest its time.
SAVE_TIMEOUT = 600.0


def record_file(part: Part) -> Path:
    return part.state_directory / "libvirt-suspended.json"


def fit(part: Part, xml: str) -> str:
    """What a saved state belongs to: the domain's XML and the files its volumes follow."""
    files = [part.image_path, part.boot_disk, *([seedrules.seed_path(part)] if part.cloud_init else [])]
    identity = [xml, *([str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in files)]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def recorded(part: Part) -> dict[str, str]:
    try:
        data: dict[str, str] = json.loads(record_file(part).read_text())
    except (OSError, ValueError):
        return {}
    return data


def has_managed_save(part: Part) -> bool:
    try:
        info = virsh(part, "dominfo", part.name, timeout=60)
    except VirshError as error:
        if error.not_found:
            return False
        raise
    return any(line.split(":", 1)[0].strip() == "Managed save" and line.split(":", 1)[1].strip() == "yes"
               for line in info.splitlines() if ":" in line)


def suspended(part: Part) -> bool:
    """True when kvmtasks suspended the part's domain and libvirt still holds its state.

    Only a part kvmtasks suspended is asked about, so a stopped part's status calls no virsh.
    """
    if not record_file(part).exists():
        return False
    if has_managed_save(part):
        return True
    record_file(part).unlink(missing_ok=True)  # removed behind kvmtasks' back
    return False


def save(part: Part, domain_type: str, state_fit: str) -> None:
    virsh(part, "managedsave", part.name, timeout=SAVE_TIMEOUT)
    record_file(part).write_text(json.dumps({"domain_type": domain_type, "fit": state_fit}))


def discard(part: Part) -> None:
    try:
        virsh(part, "managedsave-remove", part.name, timeout=60)
    except VirshError as error:
        if not error.not_found:
            raise
    record_file(part).unlink(missing_ok=True)
