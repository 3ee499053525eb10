"""Write a part's control scripts: PART-ctl, -ssh, -sendfile, -getfile, -runscript, -sync, and its
ssh config file (guest/sshconfig.py), which the scripts use.

A script holds no config value in shell code: it is a few lines of Python
that load the part's JSON snapshot and call kvmtasks.scripts.cli.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import kvmtasks
from kvmtasks.config import bounded, partjson
from kvmtasks.config.part import Part
from kvmtasks.errors import ProvisionError
from kvmtasks.guest import sshconfig
from kvmtasks.scripts import leanscript

SCRIPTS = ("ctl", "ssh", "sendfile", "getfile", "runscript", "sync")
PACKAGE_ROOT = Path(kvmtasks.__file__).resolve().parent.parent


def script_path(part: Part, kind: str) -> Path:
    return part.kvm_bin_directory / f"{part.name}-{kind}"


def snapshot_path(part: Part) -> Path:
    return part.state_directory / "part.json"


def script_text(part: Part, kind: str, snapshot_file: Path) -> str:
    """PART-ssh and -runscript only exec ssh (leanscript.py); the others load kvmtasks."""
    if leanscript.applies(part, kind):
        return leanscript.text(part, kind, snapshot_file, PACKAGE_ROOT)
    part_name = part.name
    return (
        f"#!{sys.executable}\n"
        f"# {part_name}-{kind}: written by kvmtasks (doit render:{part_name}); edits are overwritten.\n"
        "import sys\n"
        f"sys.path.insert(0, {str(PACKAGE_ROOT)!r})\n"
        "from kvmtasks.scripts.cli import main\n"
        f"sys.exit(main({kind!r}, {str(snapshot_file)!r}))\n"
    )


def _write(path: Path, text: str, mode: int) -> None:
    """path holds text, or (a full disk, Ctrl-C) what it held before: never half of it."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text, encoding="utf-8")
        temporary.chmod(mode)
        os.replace(temporary, path)
    except OSError as error:
        raise ProvisionError(f"writing {path}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)


def written(part: Part) -> bool:
    """The snapshot and the scripts hold what render writes (its up-to-date check): one damaged
    or edited since is written again by the next render."""
    for path, text in _files(part).items():
        try:
            if bounded.read_text(path) != text:
                return False
        except (OSError, ValueError):
            return False
    return True


def _files(part: Part) -> dict[Path, str]:
    return {snapshot_path(part): runtime_snapshot(part),
            **{script_path(part, kind): script_text(part, kind, snapshot_path(part))
               for kind in SCRIPTS}}


def runtime_snapshot(part: Part) -> str:
    """The part as the scripts need it: image checksums and setup steps play no part at run time,
    so changing one re-runs only its verification, not this step."""
    return partjson.to_json(dataclasses.replace(part, download_digests={}, image_digests={}, setup=()))


def render(part: Part) -> None:
    _write(snapshot_path(part), runtime_snapshot(part), 0o644)
    sshconfig.write(part)
    for kind in SCRIPTS:
        _write(script_path(part, kind), script_text(part, kind, snapshot_path(part)), 0o755)
