"""The layer cache: one folder per entry under LAYERS, each with its lock and its record.

    LAYERS/base-<sha256>/image        the verified image (hard link, else copy), 0444
    LAYERS/<key>/layer.qcow2          0444 qcow2, backed by "../<parent>/layer.qcow2" or
                                      "../base-<sha256>/image" (relative: the cache can move)
    LAYERS/<flat key>/layer.qcow2     a deep chain's top flattened over its base (flatten.py)
    LAYERS/<name>/record.json         what the entry is, its size and sha256, when made and used
    LAYERS/<name>/lock                the entry's lock (provision/locking.py: names its holder)
    LAYERS/tmp-*                      a build under way; never trusted

The lock lives in the entry's folder, so the folder exists before the entry does: an entry
is whole once its record is there, and the record is written last (renamed into place after
the layer, each fsynced). Every read or write of an entry holds its lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmtasks import command
from kvmtasks.config import bounded
from kvmtasks.config.part import Part
from kvmtasks.config.setupsteps import SetupStep
from kvmtasks.errors import CommandError, ProvisionError
from kvmtasks.layers import key as keys
from kvmtasks.provision import digest, overlay
from kvmtasks.provision.locking import held

RECORD_VERSION = 1
LAYER = "layer.qcow2"
IMAGE = "image"
RECORD = "record.json"
VERIFIED = "verified.json"  # the verdict of the last full check, by the layer's size and mtime
RECORD_LIMIT = 1 << 20
READ_ONLY = 0o444


@dataclass(frozen=True)
class Link:
    """One step of a part's chain: its entry's key and the entry below it."""

    step: str
    key: str
    parent: str  # a key, or base-<sha256>


def layers_root(part: Part) -> Path:
    """LAYERS: beside the download cache when there is one, else the user's cache folder."""
    if part.buildout.download_cache is not None:
        return part.buildout.download_cache / "layers"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "kvmtasks" / "layers"


def base_name(image_sha256: str) -> str:
    return f"base-{image_sha256}"


def layer_path(root: Path, name: str) -> Path:
    """The entry's disk file: a base's image, a step's layer."""
    return root / name / (IMAGE if name.startswith("base-") else LAYER)


def user_of(part: Part) -> str:
    """How a record's used_by names a part: its buildout folder and name."""
    return f"{part.buildout.directory}::{part.name}"


_IMAGE_SHA256: dict[tuple[Path, int, int, int], str] = {}  # hashed once per run, by size and mtime


def image_sha256(part: Part) -> str:
    """The verified image's sha256: its record's, else hashed (once while its size and mtime hold)."""
    try:
        info = part.image_path.stat()
    except OSError as error:
        raise ProvisionError(f"{part.name}: the image {part.image_path} cannot be read "
                             f"({error.strerror}); run: doit provision:{part.name}") from None
    stamp = (part.image_path, info.st_size, info.st_mtime_ns, info.st_ino)
    if stamp not in _IMAGE_SHA256:
        _IMAGE_SHA256[stamp] = _image_content(part)
    return _IMAGE_SHA256[stamp]


def _image_content(part: Part) -> str:
    content = overlay.image_content(part)
    if content is None:
        raise ProvisionError(f"{part.name}: the image {part.image_path} has no digest to key its "
                             f"setup layers by; run: doit provision:{part.name}")
    return content


def chain(part: Part) -> list[Link]:
    """The part's steps with their keys, bottom up (each key computed from the one below)."""
    sha = image_sha256(part)
    parent = base_name(sha)
    below = keys.base_key(sha, part.disk_size, part.ssh_user if part.cloud_init else None)
    links = []
    for step in part.setup:
        below = _step_key(below, step)
        links.append(Link(step.name, below, parent))
        parent = below
    return links


_STEP_KEYS: dict[tuple[object, ...], str] = {}  # hashed once per run while the files' stats hold


def _step_key(parent: str, step: SetupStep) -> str:
    """keys.step_key, remembered in this process by its inputs' sizes and mtimes: the doit tasks
    of one run ask for a part's chain several times, and copied files may be large."""
    files = [step.script] if step.script else []
    for copy in step.copies:
        files += [path for _, path in keys.walk(copy.source)]
    stamp = (parent, step, tuple((str(p), p.lstat().st_size, p.lstat().st_mtime_ns, p.lstat().st_mode)
                                 for p in files))
    if stamp not in _STEP_KEYS:
        _STEP_KEYS[stamp] = keys.step_key(parent, step)
    return _STEP_KEYS[stamp]


def top_layer(part: Part) -> Path:
    """The layer the part's own overlay is made over: the entry of its last step."""
    return layer_path(layers_root(part), chain(part)[-1].key)


_HELD: set[Path] = set()  # the entry locks this process holds (taken again, they are held already)


@contextlib.contextmanager
def entry_lock(root: Path, name: str, doing: str) -> Iterator[None]:
    """Hold the entry's lock (its folder made if need be); a second holder waits, saying for whom."""
    folder = root / name
    if folder in _HELD:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / "lock", "a+")  # noqa: SIM115 (closed below, after the lock is released)
    except OSError as error:
        raise ProvisionError(f"cannot lock the layer cache entry {folder}: "
                             f"{error.strerror or error}") from None
    with handle, held(handle, f"layer cache: {doing} waits for another run using {folder}", doing):
        _HELD.add(folder)
        try:
            yield
        finally:
            _HELD.discard(folder)


def read_record(root: Path, name: str) -> dict[str, Any] | None:
    try:
        record = json.loads(bounded.read_text(root / name / RECORD, RECORD_LIMIT))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RECORD_VERSION else None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    """path written whole or not at all: a temporary name, fsync, rename, then the folder's fsync."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(temporary, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backing_file(path: Path) -> str | None:
    """The backing file name a qcow2 header holds (read here, no qemu-img: checked on every start)."""
    with open(path, "rb") as handle:
        header = handle.read(20)
        if len(header) < 20 or header[:4] != b"QFI\xfb":
            raise ValueError("not a qcow2 file")
        offset, length = struct.unpack(">QI", header[8:20])
        if offset == 0:
            return None
        handle.seek(offset)
        return handle.read(length).decode(errors="replace")


def expected_backing(parent: str) -> str:
    return f"../{parent}/{IMAGE if parent.startswith('base-') else LAYER}"


def problem(root: Path, name: str, parent: str | None = None) -> str | None:
    """Why the entry cannot be used (missing, its bytes or its parent changed), or None.

    The caller holds the entry's lock. The layer is hashed once; then trusted while its size
    and mtime stay those of that check (as provisioning trusts a verified image).
    """
    record = read_record(root, name)
    path = layer_path(root, name)
    if record is None:
        return "no record" if path.exists() else "missing"
    try:
        info = path.stat()
        if parent is not None:
            if record.get("parent") != parent:
                return f"its record names parent {record.get('parent')}, not {parent}"
            backing = backing_file(path)
            if backing != expected_backing(parent):
                return f"its backing file is {backing}, not {expected_backing(parent)}"
            below = read_record(root, parent)
            if below is None or below.get("sha256") != record.get("parent_sha256"):
                return f"its parent {parent} is missing or was made again since"
    except (OSError, ValueError) as error:
        return f"{path} cannot be read ({getattr(error, 'strerror', None) or error})"
    if info.st_size != record.get("size"):
        return f"{path} is {info.st_size} bytes, its record says {record.get('size')}"
    stamp = [info.st_size, info.st_mtime_ns, info.st_ino, record.get("sha256")]
    with contextlib.suppress(OSError, ValueError):
        if json.loads(bounded.read_text(root / name / VERIFIED, RECORD_LIMIT)) == stamp:
            return None
    sha = digest.hash_file(path, {"sha256"})["sha256"]
    if sha != record.get("sha256"):
        return f"{path} has sha256 {sha}, its record says {record.get('sha256')}"
    with contextlib.suppress(OSError):  # not remembered: hashed again next time
        _write_json(root / name / VERIFIED, stamp)
    return None


def discard(root: Path, name: str) -> None:
    """Remove a damaged or half-made entry's files (its lock stays: the caller holds it)."""
    for file in (RECORD, VERIFIED, LAYER, IMAGE):
        (root / name / file).unlink(missing_ok=True)


def ensure_base(part: Part, root: Path) -> str:
    """The verified image as the chain's base entry (hard link, else copy); its name."""
    sha = image_sha256(part)
    name = base_name(sha)
    with entry_lock(root, name, f"the base of {part.name}"):
        if problem(root, name) is None:
            return name
        discard(root, name)
        target = layer_path(root, name)
        temporary = target.with_name(f".{IMAGE}.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        try:
            _link_or_copy(part.image_path, temporary)
            os.chmod(temporary, READ_ONLY)
            os.replace(temporary, target)
        except (OSError, CommandError) as error:
            temporary.unlink(missing_ok=True)
            raise ProvisionError(f"cannot put {part.image_path} into the layer cache as {target}: "
                                 f"{getattr(error, 'strerror', None) or error}") from None
        info = target.stat()
        _write_json(root / name / RECORD, {
            "version": RECORD_VERSION, "kind": "base", "sha256": sha, "size": info.st_size,
            "made": _now(), "last_used": _now(), "used_by": {user_of(part): _now()}})
        # Hashed by provisioning already: the verdict is the image's record's.
        _write_json(root / name / VERIFIED, [info.st_size, info.st_mtime_ns, info.st_ino, sha])
    return name


def _link_or_copy(image: Path, target: Path) -> None:
    """A hard link of an image that is read-only already (kvmtasks' own verified images); else a
    copy, holes kept: making the link 0444 would change the mode of a file of the user's."""
    if not image.stat().st_mode & 0o222:
        with contextlib.suppress(OSError):  # another file system: a copy
            os.link(image, target)
            return
    command.checked(["cp", "--sparse=always", "--reflink=auto", "--", str(image), str(target)],
                    doing=f"copying {image} into the layer cache")


def insert(root: Path, link: Link, layer: Path, sha256: str, user: str, *, kind: str = "layer",
           extra: Mapping[str, object] | None = None) -> None:
    """Make layer (checked, backed by its parent, fsynced) the entry of link; the caller holds
    the entry's lock. The layer first, the record last: a reader sees a whole entry or none.
    kind and extra: a flattened chain's (layers/flatten.py) record, else a step's."""
    folder = root / link.key
    os.chmod(layer, READ_ONLY)
    with open(layer, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(layer, folder / LAYER)
    fsync_folder(folder)
    info = (folder / LAYER).stat()
    now = _now()
    _write_json(folder / RECORD, {
        **(extra or {}), "version": RECORD_VERSION, "kind": kind, "key": link.key, "parent": link.parent,
        "step": link.step, "size": info.st_size, "sha256": sha256, "made": now, "last_used": now,
        # The parent's bytes this layer was written over: a parent made again outdates it.
        "parent_sha256": (read_record(root, link.parent) or {}).get("sha256"),
        "used_by": {user: now}})
    _write_json(folder / VERIFIED, [info.st_size, info.st_mtime_ns, info.st_ino, sha256])


def admit(root: Path, link: Link, layer: Path, user: str, *, check_timeout: float, doing: str,
          kind: str = "layer", extra: Mapping[str, object] | None = None) -> None:
    """layer, once `qemu-img check` passes, hashed and inserted as link's entry (the caller holds
    its lock). A failed or timed-out check raises CommandFailed or CommandTimedOut, saying doing."""
    command.checked(["qemu-img", "check", "-U", "-q", "-f", "qcow2", str(layer)],
                    timeout=check_timeout, doing=doing)
    sha = digest.hash_file(layer, {"sha256"})["sha256"]
    insert(root, link, layer, sha, user, kind=kind, extra=extra)


def mark_used(root: Path, name: str, user: str) -> None:
    """The entry's last_used and used_by, now (under its lock)."""
    with entry_lock(root, name, "marking it used"):
        record = read_record(root, name)
        if record is None:
            return
        now = _now()
        used_by = record.get("used_by")
        used_by = used_by if isinstance(used_by, dict) else {}
        _write_json(root / name / RECORD, {**record, "last_used": now, "used_by": {**used_by, user: now}})


def mark_chain_used(part: Part) -> None:
    """Every entry the part's disk stands on: used by it, now."""
    root = layers_root(part)
    links = chain(part)
    for name in [links[0].parent, *(link.key for link in links)]:
        mark_used(root, name, user_of(part))
