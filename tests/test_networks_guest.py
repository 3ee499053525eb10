"""Private networks between real guests (the tiny busybox guest, no seed: kvmtasks sets its NICs
up over ssh), all inside a fresh network namespace with loopback only, under tcpdump.

One scenario: two projects, four parts started at once (three with `doit -n 3`): a and b share
network lan; c is on another network of the same subnet; d is on a network also called lan, in
another project, with an address of the same subnet. a and b reach each other by name (ping,
and HTTP over TCP); neither reaches c or d; b restarted is reached again while a runs on; and
the capture holds no packet with an address outside 127.0.0.0/8 (nor ARP, nor ICMP: the guests'
frames never reach the host's IP stack).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_parts
from kvmtasks.config.runfiles import network_folder
from tests.netns import FOREIGN, Netns, NetnsProject, capture, packets
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]


@pytest.fixture
def netns() -> Iterator[Netns]:
    namespace = Netns()
    yield namespace
    namespace.close()


def part(guest: Guest, name: str, network: str) -> str:
    return (f"[{name}]\nfile = {guest.image.path}\nkvm_snapshot = true\nssh_port = {free_port()}\n"
            f"ssh_key_path = {guest.key}\nkvm_memory = 256M\nkvm_accel = tcg\n"
            f"kvm_boot_timeout = 180\nkvm_shutdown_timeout = 3\nnetworks = {network}\n\n")


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_parts_reach_their_network_only_by_name_through_a_restart_and_nothing_leaves_loopback(
    guest: Guest, netns: Netns, tmp_path: Path
) -> None:
    one, other = NetnsProject(tmp_path / "one", netns), NetnsProject(tmp_path / "other", netns)
    for project in (one, other):
        project.root.mkdir()
    one.write(part(guest, "a", "lan 10.50.0.1/24") + part(guest, "b", "lan 10.50.0.2/24")
              + part(guest, "c", "side 10.50.0.3/24"))
    other.write(part(guest, "d", "lan 10.50.0.4/24"))
    pcap = tmp_path / "capture.pcap"
    with capture(netns, pcap):
        started_d = subprocess.Popen(netns.argv(other.argv("start:d")), env=other.environment(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = one.run("-n", "3", "start:a", "start:b", "start:c", timeout=400)
        assert started.returncode == 0, started.describe()
        assert started_d.wait(timeout=400) == 0, started_d.communicate()[0]

        # a and b: ping and TCP by part name, in both directions.
        assert "10.50.0.2" in ok(one.script("a-ssh", "ping -c 2 -W 5 b"))
        assert "10.50.0.1" in ok(one.script("b-ssh", "ping -c 2 -W 5 a"))
        ok(one.script("b-ssh", "httpd -p 8000 -h /etc"))
        assert "10.50.0.1 a # kvmtasks network" in ok(
            one.script("a-ssh", "wget -q -O - http://b:8000/hosts"))
        # c (another network) and d (another project's lan) have their addresses, unreachable.
        assert "10.50.0.3/24" in ok(one.script("c-ssh", "ip addr"))
        assert "10.50.0.4/24" in ok(other.script("d-ssh", "ip addr"))
        for target in ("10.50.0.3", "10.50.0.4"):
            assert one.script("a-ssh", f"ping -c 2 -W 2 {target}").returncode != 0, target
        assert other.script("d-ssh", "ping -c 2 -W 2 10.50.0.1").returncode != 0
        assert "10.50.0.4" not in ok(other.script("d-ssh", "cat /etc/hosts")).replace(
            "10.50.0.4/24", "")

        status = json.loads(one.script("a-ctl", "status", "--json").stdout)
        (link,) = status["networks"]
        assert (link["network"], link["address"]) == ("lan", "10.50.0.1/24")
        assert [(p["part"], p["address"]) for p in link["peers"]] == [("b", "10.50.0.2/24")]

        # b stops: a runs on, without it; b back: a reaches it again.
        (a_pid,) = qemu_pids_under(one.var / "a")
        assert one.run("stop:b", timeout=120).returncode == 0
        assert one.script("a-ssh", "ping -c 2 -W 2 b").returncode != 0
        assert one.run("start:b", timeout=300).returncode == 0
        assert "10.50.0.2" in ok(one.script("a-ssh", "ping -c 2 -W 5 b"))
        assert qemu_pids_under(one.var / "a") == [a_pid]

        assert one.run("-n", "3", "stop:a", "stop:b", "stop:c", timeout=120).returncode == 0
        assert other.run("stop:d", timeout=120).returncode == 0
    assert qemu_pids_under(tmp_path) == []
    # Stopped parts leave no socket behind (QEMU leaves them; kvmtasks removes them).
    links = [link for p in load_parts([*one.configs, *other.configs], cwd=tmp_path) for link in p.links]
    assert len(links) == 4 and not any(network_folder(link).exists() for link in links)
    # The capture saw the ssh traffic to the guests (on loopback), and nothing else.
    assert len(packets(pcap, "tcp")) > 100
    assert packets(pcap, FOREIGN) == []
    assert packets(pcap, "icmp") == []  # the guests' pings never touch the host's IP stack
