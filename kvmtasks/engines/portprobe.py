"""Probing a host port as QEMU would listen on it, and naming the program that holds one."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from kvmtasks.errors import VmError

PROC = Path("/proc")
TCP_LISTEN = "0A"  # the socket state column of /proc/net/tcp


def check_free(protocol: str, address: str, port: int) -> None:
    """Refuse a port QEMU could not listen on, naming the program that holds it when known.

    QEMU's forward listener sets SO_REUSEADDR, so the probe does too: a TCP port held only by
    TIME-WAIT connections (say, ssh attempts at a guest that just stopped) is free for QEMU and
    so for us. UDP has no TIME-WAIT; there SO_REUSEADDR would let two programs share the port,
    so the UDP probe goes without it and refuses any bound socket.
    """
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        if protocol == "tcp":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise VmError(f"host port {port} ({protocol} on {address}) is already in use"
                              f"{holder_text(protocol, port)}") from None
            raise VmError(f"cannot listen on {address}:{port}: {error.strerror}") from None


def holder_text(protocol: str, port: int) -> str:
    """`` by PROGRAM (pid N)``, or why the holder cannot be named, or nothing."""
    inodes = socket_inodes(protocol, port)
    if not inodes:
        return ""
    holders = processes_holding(inodes)
    if not holders:
        return " by a process this user cannot see (another user's or another namespace's)"
    return " by " + ", ".join(f"{name} (pid {pid})" for pid, name in holders)


def socket_inodes(protocol: str, port: int) -> set[int]:
    """The inodes of the sockets bound to port: listening ones for TCP, any for UDP."""
    inodes: set[int] = set()
    for table in (f"net/{protocol}", f"net/{protocol}6"):
        try:
            lines = (PROC / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue
            if protocol == "tcp" and fields[3] != TCP_LISTEN:
                continue  # a connection, TIME-WAIT or not, does not keep QEMU from listening
            if int(fields[9]):
                inodes.add(int(fields[9]))
    return inodes


def processes_holding(inodes: set[int]) -> list[tuple[int, str]]:
    """(pid, program name) of each process with one of these sockets open, by pid."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:
            continue  # gone, or another user's: its fds cannot be read
        if any(_link(entry / "fd" / fd) in wanted for fd in fds):
            holders.append((int(entry.name), program_name(entry)))
    return sorted(holders)


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""  # closed meanwhile


def program_name(proc_entry: Path) -> str:
    try:
        argv0 = (proc_entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        return os.path.basename(argv0) or (proc_entry / "comm").read_text().strip()
    except OSError:
        return "a program that just exited"
