"""virtiofsd, one per virtiofs share, started before QEMU and stopped with it (even when the
start fails). It serves one folder, in a sandbox (mount namespace, pivot_root into HOSTDIR),
so nothing the guest does through it reaches past that folder."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.config.shares import Carrier, virtiofs_socket
from kvmtasks.engines import sharing
from kvmtasks.errors import VmError

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # what QEMU 7.2 ships (package qemu-system-common)
SOCKET_WAIT = 15.0
STOP_WAIT = 5.0


def _pidfile(part: Part, index: int) -> Path:
    return part.state_directory / f"virtiofsd{index}.pid"


def _log(part: Part, index: int) -> Path:
    return part.state_directory / f"virtiofsd{index}.log"


def _fuse_value(text: str) -> str:
    """A value inside virtiofsd's -o list, where a comma separates options."""
    return text.replace("\\", "\\\\").replace(",", "\\,")


def argv(part: Part, index: int, host: str) -> list[str]:
    return [VIRTIOFSD, f"--socket-path={virtiofs_socket(part.state_directory, index)}",
            "-o", f"source={_fuse_value(host)}", "-o", "sandbox=namespace", "-o", "cache=auto"]


def start(part: Part) -> None:
    """A virtiofsd for each virtiofs share, listening before QEMU connects; none left on failure."""
    try:
        for index, share, carrier in sharing.live(part):
            if carrier is not Carrier.VIRTIOFS:
                continue
            socket = virtiofs_socket(part.state_directory, index)
            socket.unlink(missing_ok=True)
            _log(part, index).unlink(missing_ok=True)
            pid = command.spawn(argv(part, index, share.host), log_file=str(_log(part, index)))
            _pidfile(part, index).write_text(str(pid))
            deadline = time.monotonic() + SOCKET_WAIT
            while not socket.exists():
                if not _alive(pid) or time.monotonic() > deadline:
                    said = _log(part, index).read_text(errors="replace").strip().splitlines()
                    raise VmError(f"virtiofsd for share {share.guest} did not start"
                                  + (f": {said[-1]}" if said else ""))
                time.sleep(0.05)
    except BaseException:
        stop(part)
        raise


def _alive(pid: int) -> bool:
    """pid is a virtiofsd that runs (not a zombie). Its name from /proc/PID/stat: cmdline is
    empty for a moment while the program is exec'd."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            name, _, rest = stat.read().partition("(")[2].rpartition(")")
    except OSError:
        return False
    return name == "virtiofsd" and rest.split()[:1] not in (["Z"], ["X"])


def stop(part: Part) -> None:
    """End every virtiofsd of the part (they also end by themselves once QEMU has gone)."""
    for pidfile in part.state_directory.glob("virtiofsd*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not _alive(pid):
                    break
                os.kill(pid, sig)
                deadline = time.monotonic() + STOP_WAIT
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        pidfile.unlink(missing_ok=True)
    for socket in part.state_directory.glob("virtiofs*.sock"):
        socket.unlink(missing_ok=True)
