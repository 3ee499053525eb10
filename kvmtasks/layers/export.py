"""`export:PART`: a part's top layer as one self-contained, compressed qcow2 with a SHA256SUMS.

The whole backing chain (the layers and the verified image under them) is flattened by
`qemu-img convert -c` into one file that another config can name as its `image`, with
`sha256_download` set to the URL of the SHA256SUMS beside it: what Packer is used for.
The file is written under a temporary name, synced and renamed, so a reader (a web server
publishing the folder) sees the old export or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from kvmtasks import command
from kvmtasks.config import bounded
from kvmtasks.config.diskformat import disk_format
from kvmtasks.config.part import Part
from kvmtasks.errors import ProvisionError
from kvmtasks.provision import digest
from kvmtasks.provision.steps import record_directory

Say = Callable[[str], None]
SUMS = "SHA256SUMS"
# Compressing a guest of a few GiB takes minutes; a limit only against a hung qemu-img.
CONVERT_TIMEOUT = 4 * 3600.0


def export_path(part: Part) -> Path:
    """Where `export:PART` writes: LOCATION/export/PART.qcow2, its SHA256SUMS beside it."""
    return part.location / "export" / f"{part.name}.qcow2"


def record_path(part: Part) -> Path:
    """What the last export was made from, so an unchanged top layer is not exported again."""
    return record_directory(part) / f"{part.name}.export.json"


def export(top_layer: Path, destination: Path, say: Say = print) -> Path:
    """Flatten top_layer's chain into destination (compressed qcow2) and list its sha256 in
    destination's folder's SHA256SUMS (other files' lines there are kept). Returns destination."""
    if not top_layer.is_file():
        raise ProvisionError(f"cannot export {top_layer}: no such layer")
    folder = destination.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ProvisionError(f"cannot create {folder}: {error.strerror or error}") from None
    temporary = folder / f".{destination.name}.{os.getpid()}.part"
    sums_temporary = folder / f".{SUMS}.{os.getpid()}.part"
    try:
        # -f: the layer's format is read from its header, never probed by qemu-img.
        argv = ["qemu-img", "convert", "-q", "-c", "-f", disk_format(top_layer), "-O", "qcow2",
                str(top_layer), str(temporary)]
        command.checked(argv, timeout=CONVERT_TIMEOUT, doing=f"exporting {top_layer}")
        _sync(temporary)
        sha256 = digest.hash_file(temporary, [digest.CONTENT])[digest.CONTENT]
        sums_temporary.write_text(_sums_text(folder / SUMS, destination.name, sha256))
        _sync(sums_temporary)
        # The image first: a SHA256SUMS never names bytes that are not there yet.
        os.replace(temporary, destination)
        os.replace(sums_temporary, folder / SUMS)
        _sync(folder)
    except OSError as error:
        raise ProvisionError(f"exporting {top_layer} to {destination}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
        sums_temporary.unlink(missing_ok=True)
    say(f"exported {top_layer} to {destination} ({destination.stat().st_size} bytes, "
        f"sha256 {sha256}, listed in {folder / SUMS})")
    return destination


def _sums_text(sums: Path, name: str, sha256: str) -> str:
    """The SHA256SUMS with name's line replaced (GNU format, as `sha256sum -c` reads it)."""
    try:
        lines = bounded.read_text(sums).splitlines()
    except (OSError, ValueError):
        lines = []
    kept = [line for line in lines if line.strip() and line.split(maxsplit=1)[-1].lstrip("*") != name]
    return "".join(f"{line}\n" for line in [*kept, f"{sha256}  {name}"])


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def up_to_date(part: Part, top_layer: Path) -> bool:
    """True while the export exists, unchanged, made from this top layer (its path holds its key)."""
    destination = export_path(part)
    try:
        recorded = json.loads(bounded.read_text(record_path(part)))
        info = destination.stat()
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded == _identity(top_layer, info)


def _identity(top_layer: Path, info: os.stat_result) -> dict[str, object]:
    return {"top_layer": str(top_layer), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def export_part(part: Part, top_layer: Path, say: Say = print) -> Path:
    """export:PART's action: export the top layer to export_path(part), and record from what."""
    destination = export(top_layer, export_path(part), say)
    record = record_path(part)
    temporary = record.with_name(record.name + ".tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(_identity(top_layer, destination.stat())))
        os.replace(temporary, record)
    except OSError as error:
        raise ProvisionError(f"writing {record}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return destination
