"""Benchmark a private network between two guests against the host's port forwards.

    python bench/networks.py

Builds the tiny guest image of the demo (as bench/boot.py does), starts two parts a and b on
one private network (`networks = bench`), b with a port forward of the host's 127.0.0.1 to its
port 5001, and measures, in turns, repeated:

- over the network: a sends SIZE bytes (256 MiB) to b by its name, `dd | nc b 5001`;
- through a hub process, the design kvmtasks did not choose, for comparison: a QEMU with no
  guest (`-machine none`) whose hub joins one `-netdev stream` server (unix socket) per part,
  each part a stream client on a NIC of its own (given through kvm_extra_args);
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
    hub_s: list[float] = field(default_factory=list)
    ping_hub_ms: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    ping_network_ms: list[float] = field(default_factory=list)
    ping_host_ms: list[float] = field(default_factory=list)


HUB_MACS = {"a": "02:00:00:00:77:0a", "b": "02:00:00:00:77:0b"}
HUB_ADDRESSES = {"a": "192.168.77.1/24", "b": "192.168.77.2/24"}


def hub_argv(folder: Path) -> list[str]:
    """The hub process: one stream server per part, all on one hub, no guest."""
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
    for index, name in enumerate(HUB_MACS):
        argv += ["-netdev", f"stream,id=s{index},server=on,addr.type=unix,"
                            f"addr.path={folder / f'hub-{name}.sock'}",
                 "-netdev", f"hubport,id=p{index},hubid=0,netdev=s{index}"]
    return argv


def make_project(folder: Path, image: Path, key: Path, forward_port: int) -> dict[str, str]:
    sections = []
    for name in ("a", "b"):
        redirect = f"kvm_redir = tcp:{forward_port}::{LISTEN_PORT}\n" if name == "b" else ""
        hub_nic = (f"  -netdev\n  stream,id=hub,server=off,addr.type=unix,"
                   f"addr.path={folder / f'hub-{name}.sock'}\n"
                   f"  -device\n  virtio-net-pci,netdev=hub,mac={HUB_MACS[name]}\n")
        sections.append(
            f"[{name}]\nfile = {image}\nkvm_snapshot = true\nssh_port = {free_port()}\n"
            f"ssh_key_path = {key}\nkvm_memory = 256M\nkvm_accel = tcg\n"
            f"kvm_boot_timeout = {BOOT_TIMEOUT:g}\nkvm_shutdown_timeout = 5\nnetworks = bench\n"
            f"kvm_extra_args =\n{hub_nic}{redirect}")
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
    """b listens; a sends size bytes to target:port; a's busybox `time` of the whole copy,
    once b says it received every byte (a refused connection would time nothing)."""
    # nc's input never ends (at the end of its input, busybox nc would close the connection).
    in_guest(folder, env, "b", "rm -f /tmp/received; setsid sh -c "
             f"'sleep 900 | nc -l -p {LISTEN_PORT} | wc -c > /tmp/received' "
             "</dev/null >/dev/null 2>&1 &")
    time.sleep(1)
    out = in_guest(folder, env, "a", f"time sh -c 'dd if=/dev/zero bs=64k count={size // (64 << 10)}"
                                     f" 2>/dev/null | nc {target} {port}'")
    match = REAL.search(out)
    if match is None:
        raise SystemExit(f"no time in {out!r}")
    for _ in range(50):
        received = in_guest(folder, env, "b", "cat /tmp/received 2>/dev/null || true").strip()
        if received:
            break
        time.sleep(0.2)
    if received != str(size):
        raise SystemExit(f"b received {received or 'nothing'} bytes of {size} from {target}:{port}")
    return int(match.group(1) or 0) * 60 + float(match.group(2))


def join_hub(folder: Path, env: dict[str, str]) -> None:
    """The hub's NIC up in each guest, found by its MAC (kvmtasks knows nothing of it)."""
    for name, mac in HUB_MACS.items():
        in_guest(folder, env, name, "for d in /sys/class/net/*; do "
                 f"if [ $(cat $d/address) = {mac} ]; then ip addr add {HUB_ADDRESSES[name]} "
                 "dev ${d##*/}; ip link set ${d##*/} up; fi; done")


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
            row(f"{size_label(size)} a to b through a hub process (not chosen)",
                results.hub_s, "s", rate=True),
            row(f"{size_label(size)} a to b through the host (b's port forward)",
                results.forward_s, "s", rate=True),
            row("ping a to b on the private network", results.ping_network_ms, "ms"),
            row("ping a to b through a hub process (not chosen)", results.ping_hub_ms, "ms"),
            row("ping a to the host's user-mode address (10.0.2.2)", results.ping_host_ms, "ms"),
        ]),
        "",
        "```",
        summary_line(size, results),
        "```",
    ])


def summary_line(size: int, results: Results) -> str:
    network, forward = median(results.network_s), median(results.forward_s)
    hub = median(results.hub_s)
    return (f"network_mib_s={size / MiB / network:.1f} hub_mib_s={size / MiB / hub:.1f} "
            f"forward_mib_s={size / MiB / forward:.1f} "
            f"network/forward={forward / network:.2f} ping_network_ms="
            f"{median(results.ping_network_ms):.2f} ping_hub_ms={median(results.ping_hub_ms):.2f} "
            f"ping_host_ms={median(results.ping_host_ms):.2f}")


def wait_for_sockets(folder: Path, hub: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not all((folder / f"hub-{name}.sock").exists() for name in HUB_MACS):
        if hub.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the hub process did not listen")
        time.sleep(0.05)


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
        folder.mkdir()
        env = make_project(folder, image, key, forward_port)
        hub = subprocess.Popen(hub_argv(folder), stdin=subprocess.DEVNULL)
        try:
            wait_for_sockets(folder, hub)
            with killed_afterwards(work):
                measure(doit_argv("-n", "2", "start:a", "start:b"), env=env, cwd=folder).check()
                join_hub(folder, env)
                for round_number in range(options.repeat):
                    ways = ["network", "hub", "forward"]
                    for way in ways[round_number % 3:] + ways[:round_number % 3]:
                        quiet.wait()
                        if way == "network":
                            results.network_s.append(copy_seconds(folder, env, "b", LISTEN_PORT, size))
                        elif way == "hub":
                            results.hub_s.append(copy_seconds(folder, env, "192.168.77.2", LISTEN_PORT,
                                                              size))
                        else:
                            results.forward_s.append(copy_seconds(folder, env, "10.0.2.2",
                                                                  forward_port, size))
                    results.ping_network_ms.append(ping_ms(folder, env, "b"))
                    results.ping_hub_ms.append(ping_ms(folder, env, "192.168.77.2"))
                    results.ping_host_ms.append(ping_ms(folder, env, "10.0.2.2"))
                    print(f"  round {round_number + 1}/{options.repeat} done", file=sys.stderr)
                measure(doit_argv("-n", "2", "stop:a", "stop:b"), env=env, cwd=folder).check()
        finally:
            hub.kill()
            hub.wait()
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        text = report(size, results, options.repeat, quiet, uptime)
    write_section(options.output, "networks", text)
    print(text)
    print(summary_line(size, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
