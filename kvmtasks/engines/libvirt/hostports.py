"""The forwarded host ports of a libvirt part, checked free on the libvirt host before it starts.

Otherwise QEMU fails inside libvirt with a long error that names no holder. On this machine
the probe is engines/portprobe's (a bind, as QEMU would); on a remote host it is ``ss``
there, over the ssh connection the part's scripts use (fixed argv words, no config value),
its listeners read here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmtasks import command
from kvmtasks.config.part import Part, forwards
from kvmtasks.config.remote import remote_of
from kvmtasks.engines import portprobe
from kvmtasks.errors import CommandFailed, VmError
from kvmtasks.guest import ssh, sshconfig

SS_ARGV = ("ss", "-H", "-l", "-n", "-t", "-u", "-p")
# Listening on these takes the port on every address, 127.0.0.1 included.
WILDCARDS = frozenset({"0.0.0.0", "*", "::", "[::]"})  # noqa: S104 - read from ss, never bound
PROCESS = re.compile(r'\(\("([^"]*)",pid=(\d+)')


@dataclass(frozen=True)
class Listener:
    protocol: str
    address: str
    port: int
    holder: str  # "sshd (pid 12)", or "" when ss could not say


def parse_ss(text: str) -> list[Listener]:
    """The listening sockets in ``ss -H -l -n -t -u -p`` output."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] not in ("tcp", "udp") or ":" not in fields[4]:
            continue
        address, _, port = fields[4].rpartition(":")
        if not port.isdigit():
            continue
        match = PROCESS.search(line)
        holder = f"{match.group(1)} (pid {match.group(2)})" if match else ""
        found.append(Listener(fields[0], address.split("%", 1)[0], int(port), holder))
    return found


def clash(listeners: list[Listener], protocol: str, address: str, port: int) -> Listener | None:
    for listener in listeners:
        if (listener.protocol, listener.port) == (protocol, port) and \
                listener.address in WILDCARDS | {address, f"[{address}]"}:
            return listener
    return None


def check_free(part: Part, address: str) -> None:
    """Refuse, in one line naming the port and its holder, a forward the libvirt host cannot listen on."""
    wanted = forwards(part)
    if not wanted:
        return
    remote = remote_of(part)
    if remote is None:
        for forward in wanted:
            portprobe.check_free(forward.protocol, address, forward.host_port)
        return
    argv = ["ssh", "-F", str(sshconfig.path(part)), sshconfig.jump_host(part), *SS_ARGV]
    try:
        result = command.checked(argv, timeout=ssh.CONNECT_TIMEOUT + 20)
    except CommandFailed:
        return  # no ss there, or no login: libvirt's own start reports what is wrong
    listeners = parse_ss(result.stdout)
    for forward in wanted:
        found = clash(listeners, forward.protocol, address, forward.host_port)
        if found is not None:
            by = f" by {found.holder}" if found.holder else ""
            raise VmError(f"host port {forward.host_port} ({forward.protocol} on {address}) is already "
                          f"in use on the libvirt host {remote.host}{by}")
