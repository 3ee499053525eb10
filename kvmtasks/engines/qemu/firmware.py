"""UEFI firmware found through QEMU's firmware descriptors (docs/interop/firmware.json).

Packages describe what they ship in /usr/share/qemu/firmware/*.json (the administrator may
override or add files of the same name in /etc/qemu/firmware): the interface (uefi), the
architectures and machine types it runs on, its features (secure-boot, enrolled-keys,
requires-smm), its code and its variable-store template. As libvirt does, the files are read in
file-name order (the name's number is its priority) and the first that fits wins.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmtasks.config.options import Arch, Firmware

# Searched in this order; a file name in an earlier folder hides the same name in a later one.
DESCRIPTOR_FOLDERS = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))


@dataclass(frozen=True)
class Descriptor:
    """One firmware descriptor that maps its firmware to flash (code + variable store)."""

    path: Path
    interfaces: frozenset[str]
    targets: tuple[tuple[str, tuple[str, ...]], ...]  # (architecture, machine globs)
    features: frozenset[str]
    code: Path
    code_format: str
    template: Path
    template_format: str

    def runs(self, arch: Arch, machine: str | None) -> bool:
        """Whether it boots this architecture on this machine type (any, when it is unknown)."""
        return any(target == arch.value and (machine is None or any(
            fnmatch.fnmatchcase(machine, glob) for glob in globs)) for target, globs in self.targets)

    @property
    def requires_smm(self) -> bool:
        return "requires-smm" in self.features


def parse(path: Path, text: str) -> Descriptor | None:
    """The descriptor in text; None for one kvmtasks cannot use (not flash, no variable store,
    or not the format QEMU's descriptors have), as libvirt skips what it does not understand."""
    try:
        data = json.loads(text)
        mapping = data["mapping"]
        if mapping.get("device") != "flash" or "nvram-template" not in mapping:
            return None
        return Descriptor(
            path=path,
            interfaces=frozenset(data["interface-types"]),
            targets=tuple((t["architecture"], tuple(t["machines"])) for t in data["targets"]),
            features=frozenset(data.get("features", ())),
            code=Path(mapping["executable"]["filename"]),
            code_format=mapping["executable"].get("format", "raw"),
            template=Path(mapping["nvram-template"]["filename"]),
            template_format=mapping["nvram-template"].get("format", "raw"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def descriptor_files(folders: Sequence[Path] | None = None) -> list[Path]:
    """The descriptor files in priority order: by file name, the first folder's file of a name."""
    found: dict[str, Path] = {}
    for folder in DESCRIPTOR_FOLDERS if folders is None else folders:
        try:
            for path in folder.iterdir():
                if path.suffix == ".json":
                    found.setdefault(path.name, path)
        except OSError:
            continue  # a folder that is not there holds nothing
    return [found[name] for name in sorted(found)]


def read_all(folders: Sequence[Path] | None = None) -> list[Descriptor]:
    descriptors = []
    for path in descriptor_files(folders):
        try:
            descriptor = parse(path, path.read_text())
        except OSError:
            continue
        if descriptor is not None and descriptor.code.exists() and descriptor.template.exists():
            descriptors.append(descriptor)
    return descriptors


def wanted(firmware: Firmware) -> tuple[frozenset[str], frozenset[str]]:
    """The features a firmware choice needs, and those it must not have: `uefi` is UEFI without
    Secure Boot enforced; `uefi-secure` is Secure Boot with the usual (Microsoft's) keys enrolled,
    so that distributions' signed shims boot."""
    if firmware is Firmware.UEFI_SECURE:
        return frozenset({"secure-boot", "enrolled-keys"}), frozenset()
    return frozenset(), frozenset({"secure-boot", "enrolled-keys"})


def choose(descriptors: Iterable[Descriptor], arch: Arch, machine: str | None,
           firmware: Firmware) -> Descriptor | None:
    """The first descriptor, in priority order, that fits; None when none does."""
    needed, refused = wanted(firmware)
    for descriptor in descriptors:
        if ("uefi" in descriptor.interfaces and descriptor.runs(arch, machine)
                and needed <= descriptor.features and not refused & descriptor.features):
            return descriptor
    return None


def machine_alias(arch: Arch, firmware: Firmware) -> str:
    """The machine type family a part runs: the PC on x86_64 (Q35 for Secure Boot, whose
    variable store only SMM protects), ``virt`` elsewhere."""
    if arch is not Arch.X86_64:
        return "virt"
    return "q35" if firmware is Firmware.UEFI_SECURE else "pc"


@dataclass(frozen=True)
class Flash:
    """What the QEMU argv maps to flash: the packaged code (read-only) and the part's own copy of
    the variable store; secure when the firmware needs SMM to protect that store."""

    code: Path
    code_format: str
    varstore: Path
    secure: bool
