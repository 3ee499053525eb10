"""Benchmark a private network between two guests against the host's port forwards.

    python bench/networks.py

Builds the tiny guest image of the demo (as bench/boot.py does), starts two parts a and b on
one private network (`networks = bench`), b with a port forward of the host's 127.0.0.1 to its
port 5001, and measures, in turns, repeated:

- over the network: a sends SIZE bytes (256 MiB) to b by its name, `dd | nc b 5001`;
- through the forwards: the same copy from a to the host (10.0.2.2, QEMU's user-mode network)
  on the port forwarded to b: guest to host to guest, what parts without a private network do;
- latency: `ping` from a to b on the network, and from a to the host's user-mode address.

Each copy is timed inside a (busybox `time`), from the first byte written to the last byte
taken by the receiver. Guests run under TCG: the figures are the emulator's, and a loaded
machine shows. The VMs are killed when the run ends, whatever happened. Writes a table into
docs/benchmarks.md (or --output).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    MiB,
    Quiet,
    bench_parser,
    doit_argv,
    environment,
    free_port,
    machine_lines,
    measure,
    median,
    parse_size,
    require,
    size_label,
    table,
    write_section,
)
from boot import BOOT_TIMEOUT, GUEST_CACHE, killed_afterwards

from kvmtasks.demo.guestimage import build_guest_image

LISTEN_PORT = 5001
PINGS = 20
REAL = re.compile(r"real\s+(?:(\d+)m\s*)?([\d.]+)s")
ROUND_TRIP = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")


@dataclass
class Results:
    network_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    ping_network_ms: list[float] = field(default_factory=list)
    ping_host_ms: list[float] = field(default_factory=list)


def make_project(folder: Path, image: Path, key: Path, forward_port: int) -> dict[str, str]:
    folder.mkdir(parents=True)
    sections = []
    for name in ("a", "b"):
        redirect = f"kvm_redir = tcp:{forward_port}::{LISTEN_PORT}\n" if name == "b" else ""
        sections.append(
            f"[{name}]\nfile = {image}\nkvm_snapshot = true\nssh_port = {free_port()}\n"
            f"ssh_key_path = {key}\nkvm_memory = 256M\nkvm_accel = tcg\n"
            f"kvm_boot_timeout = {BOOT_TIMEOUT:g}\nkvm_shutdown_timeout = 5\nnetworks = bench\n"
            f"{redirect}")
    config = folder / "networks.cfg"
    config.write_text(f"[buildout]\ndirectory = {folder}\n\n" + "\n".join(sections))
    return environment(KVMTASKS_CONFIG=str(config), HOME=str(folder / "home"))


def in_guest(folder: Path, env: dict[str, str], part: str, command: str) -> str:
    done = subprocess.run([str(folder / "bin" / f"{part}-ssh"), command], env=env, cwd=folder,
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{part}: {command!r} failed (exit {done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def copy_seconds(folder: Path, env: dict[str, str], target: str, port: int, size: int) -> float:
    """b listens; a sends size bytes to target:port; a's busybox `time` of the whole copy."""
    in_guest(folder, env, "b", f"nc -l -p {LISTEN_PORT} </dev/null >/dev/null 2>&1 &")
    time.sleep(0.5)
    out = in_guest(folder, env, "a", f"time sh -c 'dd if=/dev/zero bs=64k count={size // (64 << 10)}"
                                     f" 2>/dev/null | nc {target} {port}'")
    match = REAL.search(out)
    if match is None:
        raise SystemExit(f"no time in {out!r}")
    return int(match.group(1) or 0) * 60 + float(match.group(2))


def ping_ms(folder: Path, env: dict[str, str], target: str) -> float:
    out = in_guest(folder, env, "a", f"ping -c {PINGS} -i 0.2 {target}")
    match = ROUND_TRIP.search(out)
    if match is None:
        raise SystemExit(f"no round-trip times in {out!r}")
    return float(match.group(2))


def report(size: int, results: Results, repeat: int, quiet: Quiet, uptime: str) -> str:
    def row(label: str, values: list[float], unit: str, rate: bool = False) -> list[str]:
        middle = median(values)
        shown = f"{middle:.2f} {unit}" + (f" ({size / MiB / middle:.1f} MiB/s)" if rate else "")
        return [label, shown, ", ".join(f"{value:.2f}" for value in values)]

    return "\n".join([
        "## A private network between two guests",
        "",
        f"`python bench/networks.py`: median of {repeat} rounds, the two copies taking turns "
        f"going first; {size_label(size)} from a to b, and {PINGS} pings. " + quiet.note(),
        "",
        "Guests: the demo's tiny image, 256 MB of memory, 1 CPU each, TCG; virtio NICs. "
        f"Load when the run ended: `{uptime}`.",
        "",
        *machine_lines(["qemu-system-x86_64", "--version"]),
        "",
        table(["measurement", "median", "runs"], [
            row(f"{size_label(size)} a to b over the private network (by name)",
                results.network_s, "s", rate=True),
            row(f"{size_label(size)} a to b through the host (b's port forward)",
                results.forward_s, "s", rate=True),
            row("ping a to b on the private network", results.ping_network_ms, "ms"),
            row("ping a to the host's user-mode address (10.0.2.2)", results.ping_host_ms, "ms"),
        ]),
        "",
        "```",
        summary_line(size, results),
        "```",
    ])


def summary_line(size: int, results: Results) -> str:
    network, forward = median(results.network_s), median(results.forward_s)
    return (f"network_mib_s={size / MiB / network:.1f} forward_mib_s={size / MiB / forward:.1f} "
            f"network/forward={forward / network:.2f} ping_network_ms="
            f"{median(results.ping_network_ms):.2f} ping_host_ms={median(results.ping_host_ms):.2f}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the VMs are killed on the way out
    parser = bench_parser(__doc__)
    parser.add_argument("--size", default="256M", help="bytes copied, e.g. 8M or 256M (default 256M)")
    options = parser.parse_args(argv)
    require(parser, "qemu-system-x86_64", "ssh", "ssh-keygen")
    size = parse_size(options.size)
    quiet, results = Quiet(patience=options.patience), Results()
    with tempfile.TemporaryDirectory(prefix="kvmtasks-networks-") as work_name:
        work = Path(work_name)
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        image = build_guest_image(work / "guest.img", key.with_suffix(".pub"), GUEST_CACHE).path
        folder, forward_port = work / "project", free_port()
        env = make_project(folder, image, key, forward_port)
        with killed_afterwards(work):
            measure(doit_argv("-n", "2", "start:a", "start:b"), env=env, cwd=folder).check()
            for round_number in range(options.repeat):
                order = ["network", "forward"] if round_number % 2 == 0 else ["forward", "network"]
                for way in order:
                    quiet.wait()
                    if way == "network":
                        results.network_s.append(copy_seconds(folder, env, "b", LISTEN_PORT, size))
                    else:
                        results.forward_s.append(copy_seconds(folder, env, "10.0.2.2", forward_port,
                                                              size))
                results.ping_network_ms.append(ping_ms(folder, env, "b"))
                results.ping_host_ms.append(ping_ms(folder, env, "10.0.2.2"))
                print(f"  round {round_number + 1}/{options.repeat} done", file=sys.stderr)
            measure(doit_argv("-n", "2", "stop:a", "stop:b"), env=env, cwd=folder).check()
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        text = report(size, results, options.repeat, quiet, uptime)
    write_section(options.output, "networks", text)
    print(text)
    print(summary_line(size, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
