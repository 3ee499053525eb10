"""Host folders in the guest (option ``share``): one line each, ``HOSTDIR GUESTDIR [FLAG...]``.

Parsing and the config-time checks live here; carrying a share (a live 9p or virtiofs mount,
or a copy by rsync or tar over ssh) is the business of guest/ and engines/.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# 9p's mount tag is at most 31 bytes; the index keeps each share's tag unique.
TAG_PREFIX = "kvmtasks"
EXCLUDE_FLAG = "exclude="


class Carrier(enum.StrEnum):
    """How a share reaches the guest."""

    AUTO = "auto"  # a live share where the guest can mount it, else a copy
    NINEP = "9p"
    VIRTIOFS = "virtiofs"
    RSYNC = "rsync"  # a copy: rsync over the VM's ssh master (tar when the guest lacks rsync)


LIVE = frozenset({Carrier.NINEP, Carrier.VIRTIOFS})
FLAGS = ("ro", *(c.value for c in Carrier), f"{EXCLUDE_FLAG}PATTERN")


@dataclass(frozen=True)
class Share:
    """One share line. host is as written until the loader makes it absolute and checks it."""

    host: str
    guest: str
    read_only: bool = False
    carrier: Carrier = Carrier.AUTO
    excludes: tuple[str, ...] = ()

    @property
    def host_path(self) -> Path:
        return Path(self.host)

    def line(self) -> str:
        """The share as a config line (status, messages)."""
        flags = [*(["ro"] if self.read_only else []), self.carrier.value,
                 *(f"{EXCLUDE_FLAG}{pattern}" for pattern in self.excludes)]
        return shlex.join([self.host, self.guest, *flags])


def tag(index: int) -> str:
    """The mount tag of the index-th share (9p and virtiofs)."""
    return f"{TAG_PREFIX}{index}"


def _share(line: str) -> Share:
    try:
        words = shlex.split(line)  # quotes let a path hold spaces; no shell is involved
    except ValueError as error:
        raise ValueError(f"line {line!r}: {error}") from None
    if len(words) < 2:
        raise ValueError(f"line {line!r} is not HOSTDIR GUESTDIR [FLAG...]")
    host, guest, *flags = words
    if not PurePosixPath(guest).is_absolute():
        raise ValueError(f"line {line!r}: GUESTDIR {guest!r} must be an absolute path")
    if any(c in guest for c in "\n\x00") or any(part == ".." for part in PurePosixPath(guest).parts):
        raise ValueError(f"line {line!r}: GUESTDIR {guest!r} must be a plain absolute path")
    if PurePosixPath(guest) == PurePosixPath("/"):
        raise ValueError(f"line {line!r}: GUESTDIR cannot be / (the guest's root)")
    read_only, carriers, excludes = False, [], []
    for flag in flags:
        if flag == "ro":
            read_only = True
        elif flag in {c.value for c in Carrier}:
            carriers.append(Carrier(flag))
        elif flag.startswith(EXCLUDE_FLAG) and flag != EXCLUDE_FLAG:
            excludes.append(flag.removeprefix(EXCLUDE_FLAG))
        else:
            raise ValueError(f"line {line!r}: unknown flag {flag!r} (flags: {', '.join(FLAGS)})")
    if len(carriers) > 1:
        raise ValueError(f"line {line!r}: one of {', '.join(Carrier)}, not {' and '.join(carriers)}")
    carrier = carriers[0] if carriers else Carrier.AUTO
    if excludes and carrier in LIVE:
        raise ValueError(f"line {line!r}: exclude= applies to copied folders (rsync, auto), "
                         f"not to a live {carrier} share")
    return Share(host, str(PurePosixPath(guest)), read_only, carrier, tuple(excludes))


def parse_shares(value: str) -> tuple[Share, ...]:
    """The share lines; two shares on one GUESTDIR are refused (the second would hide the first)."""
    shares: list[Share] = []
    for line in (line.strip() for line in value.splitlines()):
        if not line:
            continue
        share = _share(line)
        if any(other.guest == share.guest for other in shares):
            raise ValueError(f"line {line!r}: GUESTDIR {share.guest} is already shared")
        shares.append(share)
    return tuple(shares)


def resolved(shares: Iterable[Share], directory: Path) -> tuple[Share, ...]:
    """Each HOSTDIR absolute (relative to the buildout directory) and an existing folder;
    ValueError naming the line otherwise."""
    out = []
    for share in shares:
        host = Path(share.host).expanduser()
        host = host if host.is_absolute() else directory / host
        if not host.is_dir():
            why = "is not a folder" if host.exists() else "does not exist"
            raise ValueError(f"line {share.line()!r}: host folder {host} {why}")
        out.append(Share(str(host.resolve()), share.guest, share.read_only, share.carrier,
                         share.excludes))
    return tuple(out)


RECORD_NAME = "shares.json"


def virtiofs_socket(state_directory: Path, index: int) -> Path:
    """The vhost-user socket between QEMU and the index-th share's virtiofsd."""
    return state_directory / f"virtiofs{index}.sock"


def record_path(state_directory: Path) -> Path:
    """Where start writes how each share is carried this boot (status reads it)."""
    return state_directory / RECORD_NAME


def carried(state_directory: Path) -> dict[str, str]:
    """GUESTDIR -> how it is carried now ("9p", "virtiofs", "rsync", "tar"), as start recorded."""
    import json  # only status reads it

    try:
        data = json.loads(record_path(state_directory).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def problem(share: Share, *, engine: str, remote: bool, has_ssh: bool) -> str | None:
    """What the part's other options make impossible for a share, or None. engine is
    kvm_engine's value; remote: a libvirt host other than this machine."""
    if not has_ssh:
        return f"line {share.line()!r}: shares are mounted or copied over ssh: set ssh_port"
    if share.carrier in LIVE and remote:
        return (f"line {share.line()!r}: a live {share.carrier} share needs the VM on this machine; "
                "on a remote libvirt host use auto or rsync (a copied folder)")
    if share.carrier is Carrier.VIRTIOFS and engine != "qemu":
        return (f"line {share.line()!r}: virtiofs shares need kvm_engine = qemu; "
                "on libvirt use 9p, auto or rsync")
    if share.carrier is Carrier.VIRTIOFS and share.read_only:
        return (f"line {share.line()!r}: QEMU 7.2's virtiofsd cannot export a folder read-only "
                "(the guest's root could remount it read-write); use 9p or rsync for ro")
    return None
