"""A part's run files and the facts read from them (pid, accelerator): what provisioning, the
engines and ssh all need. Nothing here runs a program; "is it running" is engines/running.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kvmtasks.config.networks import NetworkLink
from kvmtasks.config.part import Part


@dataclass(frozen=True)
class RunFiles:
    """The files QEMU and the control scripts share in a part's state folder."""

    pidfile: Path
    qmp_socket: Path
    console_log: Path
    known_hosts: Path
    accel: Path
    domain: Path  # kvm_engine = libvirt: the domain started, and the accelerator, as JSON
    first_boot: Path  # the boot disk a guest last answered on: its first boot is behind it

    @classmethod
    def of(cls, part: Part) -> RunFiles:
        folder = part.state_directory
        return cls(
            pidfile=folder / "qemu.pid",
            qmp_socket=qmp_socket(folder),
            console_log=folder / "console.log",
            known_hosts=folder / "known_hosts",
            accel=folder / "accel",
            domain=folder / "libvirt-domain.json",
            first_boot=folder / "first-boot-done",
        )


# A unix socket path holds at most 104 bytes on some systems (108 on Linux), and ssh adds a
# 17-character suffix while it creates one: a runtime folder longer than this is not used.
RUNTIME_FOLDER_MAX = 50


# Linux's limit for a unix socket's path (108 bytes with its final NUL).
SOCKET_PATH_MAX = 107


def qmp_socket(state_directory: Path) -> Path:
    """QEMU's QMP socket: in the part's folder, or where that path is too long for a socket (a
    deep project, a setup builder's folder inside its part's), under a hashed name in
    /tmp/kvmtasks-UID, the same whatever the environment, so every later run finds it."""
    beside = state_directory / "qmp.sock"
    if len(str(beside.absolute())) <= SOCKET_PATH_MAX:
        return beside
    key = hashlib.sha256(str(state_directory.absolute()).encode()).hexdigest()[:20]
    return long_path_socket_folder() / f"qmp-{key}"


def long_path_socket_folder() -> Path:
    return Path("/tmp") / f"kvmtasks-{os.getuid()}"  # noqa: S108 (used once it is ours alone)


def runtime_folder() -> Path:
    """The user's private folder for sockets: short whatever the run directory's length."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/") and len(xdg) <= RUNTIME_FOLDER_MAX:
        return Path(xdg) / "kvmtasks"
    # Not TMPDIR (of any length); used only once is_private_folder says it is ours alone.
    return long_path_socket_folder()


def is_private_folder(path: Path) -> bool:
    """True for a real folder that only we own and can enter (no other user's socket in it)."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and stat.S_IMODE(info.st_mode) & 0o077 == 0)


def control_socket(part: Part) -> Path:
    """The ssh master's socket of the part: a short hashed name in the private runtime folder."""
    key = hashlib.sha256(str(part.state_directory.absolute()).encode()).hexdigest()[:20]
    return runtime_folder() / key


def network_folder(link: NetworkLink) -> Path:
    """A private network's sockets: one folder per project and network, in the runtime folder
    (for libvirt's parts, in the folder libvirt's QEMU user may enter)."""
    return (libvirt_network_root() if link.libvirt else runtime_folder()) / f"net-{link.key}"


def libvirt_network_root() -> Path:
    """Where the networks of libvirt parts keep their sockets. libvirt runs QEMU as a user of its
    own, which may not enter the private runtime folder (nor the user's XDG_RUNTIME_DIR): a folder
    of ours in /tmp instead, shut to every other user but that one (engines/libvirt/netfolder.py)."""
    return long_path_socket_folder().with_name(f"{long_path_socket_folder().name}-libvirt")


def network_socket(link: NetworkLink, sender: str, receiver: str) -> Path:
    """The datagram socket sender's QEMU binds to talk with receiver's on link's network.
    Hashed names keep the path short (108 bytes) whatever the part names."""
    def short(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()[:8]

    return network_folder(link) / f"{short(sender)}-{short(receiver)}"


def clean_network_sockets(part: Part) -> None:
    """The sockets a stopped part's QEMU bound (QEMU leaves them), and a folder left empty."""
    for link in part.links:
        for peer in link.peers:
            network_socket(link, part.name, peer.part).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other parts' sockets are still in it
            network_folder(link).rmdir()


@dataclass(frozen=True)
class Status:
    """Whether the VM runs (engines.running.current says), with its pid and accelerator."""

    running: bool
    pid: int | None = None
    accel: str | None = None


def command_line(pid: int) -> list[str]:
    """The process's argv, from /proc ([] once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def is_our_qemu(pid: int, files: RunFiles) -> bool:
    """True only for a live qemu started with this part's pid file (never another process)."""
    return str(files.pidfile) in command_line(pid)


def read_pid(files: RunFiles) -> int | None:
    try:
        text = files.pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def clean_run_files(files: RunFiles) -> None:
    for path in (files.pidfile, files.qmp_socket, files.accel):
        path.unlink(missing_ok=True)
