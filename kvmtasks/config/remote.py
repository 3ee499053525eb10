"""The host behind a remote libvirt URI (``qemu+ssh://user@host:port/system?keyfile=K``).

Forwarded ports listen on that host's loopback; ssh and scp reach the guest
through it (ProxyJump), never by opening a port to the network.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from kvmtasks.config import sshvalue
from kvmtasks.config.options import Engine
from kvmtasks.config.part import Part
from kvmtasks.errors import ConfigError

_HOST = re.compile(r"[0-9A-Za-z][0-9A-Za-z.-]*")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RemoteHost:
    """Where a part's libvirt domain runs, as ssh reaches it."""

    host: str
    user: str | None
    port: int | None
    keyfile: Path | None
    verify_host_key: bool


def remote_host(uri: str) -> RemoteHost | None:
    """The ssh host of a ``qemu+ssh://`` URI; None for a local one (``qemu:///system``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "qemu+ssh" or not parts.hostname:
        return None
    where = f"libvirt_uri = {uri!r}"
    if not _HOST.fullmatch(parts.hostname) or (parts.username and not _USER.fullmatch(parts.username)):
        raise ConfigError(f"{where}: the user and host must be plain names")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{where}: not a port number") from None
    query = urllib.parse.parse_qs(parts.query)
    keyfile = query.get("keyfile", [None])[0]
    reason = None if keyfile is None else sshvalue.problem(keyfile)
    if reason is not None:
        raise ConfigError(f"{where}: keyfile {keyfile!r}: {reason}")
    return RemoteHost(
        host=parts.hostname,
        user=parts.username,
        port=port,
        keyfile=Path(keyfile) if keyfile else None,
        verify_host_key=query.get("no_verify", ["0"])[0] != "1",
    )


def remote_of(part: Part) -> RemoteHost | None:
    """The remote libvirt host of a part, or None when its VM runs on this machine."""
    if part.kvm_engine is not Engine.LIBVIRT:
        return None
    return remote_host(part.libvirt_uri)
