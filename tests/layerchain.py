"""Hand-made layer caches, laid out as the layer store lays them out (docs: LAYERS-SPEC in
kvmtasks/layers): real qcow2 files with relative backing files, and their records.

The layers are made without a guest: the chain is flattened to a raw file, files are put into
its FAT file system with mtools (or bytes written with qemu-io), and `qemu-img rebase` keeps
only what differs from the parent. Ages come from the records' timestamps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


def days_ago(days: float) -> str:
    return iso(datetime.now(UTC) - timedelta(days=days))


def entry_file(root: Path, entry: str) -> Path:
    """The disk file of an entry: a base's image or a layer's layer.qcow2."""
    return root / entry / ("image" if entry.startswith("base-") else "layer.qcow2")


def _format(path: Path) -> str:
    with open(path, "rb") as handle:
        return "qcow2" if handle.read(4) == b"QFI\xfb" else "raw"


def add_base(root: Path, image: Path, *, made: str | None = None, last_used: str | None = None) -> str:
    """LAYERS/base-<sha256>/image (a copy, 0444) and its record; the entry's name."""
    data = image.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    name = f"base-{sha256}"
    folder = root / name
    if folder.exists():
        return name
    folder.mkdir(parents=True)
    target = folder / "image"
    shutil.copyfile(image, target)
    target.chmod(0o444)
    now = days_ago(0)
    _write_record(folder, {"version": 1, "kind": "base", "sha256": sha256, "size": len(data),
                           "made": made or now, "last_used": last_used or now, "used_by": {}})
    return name


def add_layer(root: Path, parent: str, step: str, *, files: Mapping[str, bytes] | None = None,
              writes: Sequence[tuple[int, int, int]] = (), made: str | None = None,
              last_used: str | None = None, used_by: Mapping[str, str] | None = None,
              key: str | None = None) -> str:
    """LAYERS/<key>/layer.qcow2 over parent (relative backing file), holding files (put into the
    FAT file system) and writes ((pattern, offset, length) by qemu-io); its record; the key
    (given: a part's chain's, from store.chain; else a hash of the arguments)."""
    parent_file = entry_file(root, parent)
    key = key or hashlib.sha256(json.dumps([parent, step, sorted((files or {}).items(), key=str),
                                            list(writes)], default=repr).encode()).hexdigest()
    backing = f"../{parent}/{parent_file.name}"
    parent_format = _format(parent_file)
    staging = Path(tempfile.mkdtemp(prefix="tmp-", dir=root))
    layer = staging / "layer.qcow2"
    if files:
        with tempfile.TemporaryDirectory() as work_name:
            work = Path(work_name)
            flat = work / "flat.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(parent_file), str(flat)], check=True)
            for name, data in files.items():
                (work / name).write_bytes(data)
                subprocess.run(["mcopy", "-o", "-i", str(flat), str(work / name), f"::{name}"], check=True)
            # Empty over the changed disk, then rebased onto the parent: qemu-img copies in the
            # clusters that differ, and only those, as a step's layer holds what the step wrote.
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(flat), "-F", "raw",
                            str(layer)], check=True)
            subprocess.run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", backing, "-F", parent_format,
                            str(layer)], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", parent_format,
                        str(layer)], check=True)
    for pattern, offset, length in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(layer)],
                       check=True, capture_output=True)
    layer.chmod(0o444)
    now = days_ago(0)
    data = layer.read_bytes()
    _write_record(staging, {
        "version": 1, "kind": "layer", "key": key, "parent": parent, "step": step, "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "made": made or now, "last_used": last_used or now,
        "used_by": dict(used_by or {}),
        "parent_sha256": json.loads((root / parent / "record.json").read_text())["sha256"],
    })
    os.rename(staging, root / key)
    return key


def make_chain(root: Path, image: Path, steps: Sequence[Mapping[str, bytes]]) -> list[str]:
    """A base and one layer per step, each putting its files in; the entries, bottom first."""
    entries = [add_base(root, image)]
    for number, files in enumerate(steps, 1):
        entries.append(add_layer(root, entries[-1], f"step{number}", files=files))
    return entries


def _write_record(folder: Path, record: Mapping[str, object]) -> None:
    (folder / "record.json").write_text(json.dumps(record, indent=1, sort_keys=True))
