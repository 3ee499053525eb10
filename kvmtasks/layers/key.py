"""A setup step's key: the hash of everything that shapes the layer it makes, and nothing else.

Not the part's name, port or memory: two parts, or two projects, with the same image and the
same steps share the layers.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from kvmtasks.config.setupsteps import SetupStep

# Raised whenever what a capture leaves in a layer changes (the identity removed, the trim):
# every cached layer is then made again.
CAPTURE_VERSION = 3
CHUNK = 1 << 20


def base_key(image_sha256: str, disk_size: str | None, cloud_init_user: str | None) -> str:
    """The key below the first step: the verified image, and what else shapes the disk the first
    step sees (the disk's size; under cloud-init, the login user its first boot creates)."""
    digest = hashlib.sha256(b"kvmtasks-setup-base\0")
    for value in (str(CAPTURE_VERSION), image_sha256, disk_size or "", cloud_init_user or ""):
        digest.update(value.encode() + b"\0")
    return digest.hexdigest()


def step_key(parent: str, step: SetupStep) -> str:
    """The step's key over its parent's: its command or script, and every file it copies."""
    digest = hashlib.sha256(b"kvmtasks-setup-step\0")
    digest.update(f"{CAPTURE_VERSION}\0{parent}\0".encode())
    if step.run is not None:
        digest.update(b"run\0" + step.run.encode() + b"\0")
    if step.script is not None:
        digest.update(b"script\0")
        _file(digest, step.script)
    for copy in step.copies:
        digest.update(b"copy\0" + copy.target.encode() + b"\0")
        for relative, path in walk(copy.source):
            mode = stat.S_IMODE(path.lstat().st_mode)
            kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
            digest.update(f"{kind}\0{relative}\0{mode:o}\0".encode())
            if kind == "l":
                digest.update(os.readlink(path).encode() + b"\0")
            elif kind == "f":
                _file(digest, path)
    return digest.hexdigest()


def flat_key(top: str) -> str:
    """The key of a chain's top flattened over its base (layers/flatten.py): its top's, renamed.
    The top's key holds the whole chain's, so a changed step, image or capture is a new one."""
    digest = hashlib.sha256(b"kvmtasks-setup-flat\0")
    digest.update(f"{CAPTURE_VERSION}\0{top}\0".encode())
    return digest.hexdigest()


def walk(source: Path) -> Iterator[tuple[str, Path]]:
    """source and, for a folder, everything under it, sorted (the same order on every host)."""
    yield ".", source
    if not source.is_dir():
        return
    for folder, folders, files in os.walk(source):
        folders.sort()
        for name in sorted([*folders, *files]):
            path = Path(folder) / name
            yield str(path.relative_to(source)), path


def _file(digest: hashlib._Hash, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
