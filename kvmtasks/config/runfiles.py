"""A part's run files, and whether its VM runs: what provisioning, the engine and ssh all need."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kvmtasks import command
from kvmtasks.config.options import Engine
from kvmtasks.config.part import Part
from kvmtasks.errors import VmError

# virsh domstate words for a domain whose QEMU process lives.
LIVE_DOMAIN_STATES = frozenset({"running", "paused", "in shutdown", "pmsuspended", "blocked", "idle"})


@dataclass(frozen=True)
class RunFiles:
    """The files QEMU and the control scripts share in a part's state folder."""

    pidfile: Path
    qmp_socket: Path
    console_log: Path
    known_hosts: Path
    accel: Path
    domain: Path  # kvm_engine = libvirt: the domain started, and the accelerator, as JSON

    @classmethod
    def of(cls, part: Part) -> RunFiles:
        folder = part.state_directory
        return cls(
            pidfile=folder / "qemu.pid",
            qmp_socket=folder / "qmp.sock",
            console_log=folder / "console.log",
            known_hosts=folder / "known_hosts",
            accel=folder / "accel",
            domain=folder / "libvirt-domain.json",
        )


# A unix socket path holds at most 104 bytes on some systems (108 on Linux), and ssh adds a
# 17-character suffix while it creates one: a runtime folder longer than this is not used.
RUNTIME_FOLDER_MAX = 50


def runtime_folder() -> Path:
    """The user's private folder for sockets: short whatever the run directory's length."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/") and len(xdg) <= RUNTIME_FOLDER_MAX:
        return Path(xdg) / "kvmtasks"
    # Not TMPDIR (of any length); used only once is_private_folder says it is ours alone.
    return Path("/tmp") / f"kvmtasks-{os.getuid()}"  # noqa: S108


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


@dataclass(frozen=True)
class Status:
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


def current(part: Part) -> Status:
    """The VM's state; a stale pid file is removed on the way."""
    if part.kvm_engine is Engine.LIBVIRT:
        return _domain_state(part)
    files = RunFiles.of(part)
    pid = read_pid(files)
    if pid is not None and is_our_qemu(pid, files):
        accel = files.accel.read_text().strip() if files.accel.exists() else None
        return Status(True, pid, accel)
    if files.pidfile.exists():
        clean_run_files(files)
    return Status(False)




def virsh_argv(part: Part, *args: str) -> list[str]:
    return ["virsh", "-q", "-c", part.libvirt_uri, *args]


def virsh(part: Part, *args: str, timeout: float = 120) -> str:
    """Run virsh against the part's libvirt host; its first error line becomes a VmError."""
    result = command.run(virsh_argv(part, *args), timeout=timeout)
    if result.exit_code != 0:
        # virsh says what it tried, then why: the last line is the reason.
        lines = [line.removeprefix("error: ").strip() for line in result.stderr.splitlines()]
        reason = next((line for line in reversed(lines) if line), f"exit status {result.exit_code}")
        raise VmError(f"virsh {args[0]} on {part.libvirt_uri}: {reason}")
    return result.stdout


def _domain_state(part: Part) -> Status:
    """A libvirt part runs when kvmtasks started its domain and libvirt says it lives.

    Only a part kvmtasks started is asked about, so a no-op doit run never calls virsh.
    """
    files = RunFiles.of(part)
    if not files.domain.exists():
        return Status(False)
    try:
        state = virsh(part, "domstate", part.name, timeout=60).strip()
    except VmError as error:
        if "not found" not in str(error).lower():
            raise
        state = "undefined"
    if state in LIVE_DOMAIN_STATES:
        accel = files.accel.read_text().strip() if files.accel.exists() else None
        return Status(True, None, accel)
    files.domain.unlink(missing_ok=True)
    return Status(False)
