"""A fresh network namespace for tests of private networks: loopback only, so that every IP
packet a test's guests cause on the host is on 127.0.0.0/8, and a tcpdump in it that sees them
all (the proof: the capture is read back and every address checked)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import DoitRun, Project


class Netns:
    """A namespace held by a sleeping process; nsenter runs a program in it."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 3600"],
            stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        assert self.holder.stdout.readline().strip() == "up"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "--", *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 120, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout,
                              check=False, env=env, cwd="/")

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


class NetnsProject(Project):
    """A project whose doit runs and scripts run inside the namespace."""

    def __init__(self, root: Path, netns: Netns) -> None:
        super().__init__(root)
        self.netns = netns

    def run(self, *tasks: str, timeout: float = 60) -> DoitRun:
        done = self.netns.run(self.argv(*tasks), timeout=timeout, env=self.environment())
        return DoitRun(done.returncode, done.stdout, done.stderr)

    def script(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HOME": str(self.root / "home")}
        env.pop("KVMTASKS_ACCEL", None)
        return self.netns.run([str(self.root / "bin" / name), *args], timeout=timeout, env=env)


@contextmanager
def capture(netns: Netns, pcap: Path) -> Iterator[None]:
    """tcpdump on every interface of the namespace while the block runs."""
    # Immediate mode: packets still in the kernel's ring buffer at the end would be lost.
    argv = ["tcpdump", "-i", "any", "-n", "--immediate-mode", "-U", "-w", str(pcap)]
    dump = subprocess.Popen(netns.argv(argv), stderr=subprocess.PIPE, text=True)
    assert dump.stderr is not None
    deadline = time.monotonic() + 30
    while "listening on" not in dump.stderr.readline():  # tcpdump says so once it captures
        assert time.monotonic() < deadline and dump.poll() is None, "tcpdump did not start"
    try:
        yield
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=30)


def packets(pcap: Path, expression: str = "") -> list[str]:
    """The captured packets (one line each) that match a pcap filter expression."""
    read = subprocess.run(["tcpdump", "-r", str(pcap), "-n", *expression.split()],
                          capture_output=True, text=True, check=True)
    return read.stdout.splitlines()


# IPv4 outside 127.0.0.0/8, IPv6 but ::1, and any ARP (a frame of a private network that leaked
# onto a host interface would carry the guests' addresses and ARP).
FOREIGN = ("(ip and not (src net 127.0.0.0/8 and dst net 127.0.0.0/8)) or "
           "(ip6 and not (src host ::1 and dst host ::1)) or arp")
