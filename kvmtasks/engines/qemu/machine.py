"""The QEMU machine type, pinned: ``pc`` resolved once to its versioned name (pc-i440fx-7.2);
``q35`` for Secure Boot and ``virt`` on aarch64 the same way.

A saved state (suspend, snapshots) restores only on the machine it was saved on; with the
versioned name in the argv, a QEMU upgrade changes the argv, and the state is then known
not to fit instead of failing to load.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.engines.qemu.firmware import machine_alias

ALIAS = re.compile(r"^pc\s.*\(alias of (\S+)\)\s*$", re.MULTILINE)
ANY_ALIAS = r"^{alias}\s.*\(alias of (\S+)\)\s*$"
CACHE_NAME = "machine.json"


def chooses_own_machine(extra_args: Sequence[str]) -> bool:
    return any(arg in ("-machine", "-M") or arg.startswith(("-machine=", "-M=")) for arg in extra_args)


def _binary_identity(path: str) -> list[object]:
    info = os.stat(path)
    return [os.path.realpath(path), info.st_size, info.st_mtime_ns]


def resolve(part: Part) -> str | None:
    """The versioned machine type that ``pc`` (or the part's other alias) stands for in the
    part's QEMU; None when the binary has no such alias or kvm_extra_args chooses a machine.

    Cached in the part's state folder while the binary stays the same file.
    """
    if chooses_own_machine(part.kvm_extra_args):
        return None
    binary = command.find(part.kvm_binary)
    identity = _binary_identity(binary)
    alias = machine_alias(part.kvm_arch, part.firmware)
    cache = part.state_directory / CACHE_NAME
    try:
        cached = json.loads(cache.read_text())
        if cached["binary"] == identity and cached.get("alias", "pc") == alias:
            return cached["machine"]  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = command.run([binary, "-machine", "help"], timeout=30)
    machine = parse_alias(result.stdout, alias) if result.exit_code == 0 else None
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_name(cache.name + ".tmp")
    temporary.write_text(json.dumps({"binary": identity, "alias": alias, "machine": machine}))
    temporary.replace(cache)
    return machine


def parse_help(text: str) -> str | None:
    """The versioned name in ``-machine help``'s line ``pc ... (alias of pc-i440fx-7.2)``."""
    found = ALIAS.search(text)
    return found.group(1) if found else None


def parse_alias(text: str, alias: str) -> str | None:
    """The versioned name of any alias (``q35``, aarch64's ``virt``) in ``-machine help``."""
    found = re.search(ANY_ALIAS.format(alias=re.escape(alias)), text, re.MULTILINE)
    return found.group(1) if found else None
