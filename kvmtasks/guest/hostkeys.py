"""The part's known_hosts, set before each boot: pinned when kvmtasks gave the guest its host
key, forgotten when the guest's disk starts pristine and makes a new one."""

from __future__ import annotations

import os

from kvmtasks.config import bounded, seedrules
from kvmtasks.config.part import Part, listen_address
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.errors import VmError


def host_patterns(part: Part) -> str:
    """The names ssh looks the guest up by: ``[host]:port`` unless the port is 22."""
    assert part.ssh_port is not None
    names = dict.fromkeys([part.ssh_hostname, listen_address(part.ssh_hostname)])
    if part.ssh_port == 22:
        return ",".join(names)
    return ",".join(f"[{name}]:{part.ssh_port}" for name in names)


def known_hosts_line(part: Part, public_key: str) -> str:
    """One known_hosts line: the patterns, then the key type and key (the comment dropped)."""
    key_type, key = public_key.split()[:2]
    return f"{host_patterns(part)} {key_type} {key}\n"


def prepare(part: Part) -> None:
    """Before a boot: write the pinned key, or forget a key a pristine disk will not have."""
    known_hosts = RunFiles.of(part).known_hosts
    if part.ssh_port is None:
        return
    if seedrules.pins_host_key(part):
        public = seedrules.host_key_path(part).with_suffix(".pub")
        try:
            public_key = bounded.read_text(public, bounded.KEY_LIMIT)
        except (OSError, ValueError):
            raise VmError(f"the host key {public} is missing or damaged; delete it and run: "
                          f"doit provision:{part.name}") from None
        temporary = known_hosts.with_name(known_hosts.name + ".new")
        temporary.write_text(known_hosts_line(part, public_key))
        os.replace(temporary, known_hosts)
    elif part.kvm_snapshot:
        known_hosts.unlink(missing_ok=True)
