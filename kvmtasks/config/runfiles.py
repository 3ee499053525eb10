"""A part's run files, and whether its VM runs: what provisioning, the engine and ssh all need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmtasks.config.part import Part


@dataclass(frozen=True)
class RunFiles:
    """The files QEMU and the control scripts share in a part's state folder."""

    pidfile: Path
    qmp_socket: Path
    console_log: Path
    known_hosts: Path
    accel: Path

    @classmethod
    def of(cls, part: Part) -> RunFiles:
        folder = part.state_directory
        return cls(
            pidfile=folder / "qemu.pid",
            qmp_socket=folder / "qmp.sock",
            console_log=folder / "console.log",
            known_hosts=folder / "known_hosts",
            accel=folder / "accel",
        )


@dataclass(frozen=True)
class Status:
    running: bool
    pid: int | None = None
    accel: str | None = None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def is_our_qemu(pid: int, files: RunFiles) -> bool:
    """True only for a live qemu started with this part's pid file (never another process)."""
    return str(files.pidfile) in _cmdline(pid)


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
    files = RunFiles.of(part)
    pid = read_pid(files)
    if pid is not None and is_our_qemu(pid, files):
        accel = files.accel.read_text().strip() if files.accel.exists() else None
        return Status(True, pid, accel)
    if files.pidfile.exists():
        clean_run_files(files)
    return Status(False)


