"""A private network of three Debian cloud-init guests, set up by their seeds alone (network-config
matched by MAC, the other parts in /etc/hosts), in a fresh network namespace under tcpdump.

The three boot at once (`doit -n 3`), as overlays of the one cached image, in one module-scoped
fixture that serves every check: ping and TCP (ssh's port) by part name between each pair, in
both directions; the capture holds no packet with an address outside 127.0.0.0/8.
The tiny guests cover the other network, the other project and a part restarted
(test_networks_guest.py).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.debian_guest import CLOUD_INIT
from tests.netns import FOREIGN, Netns, NetnsProject, capture, packets
from tests.test_debian_guest import debian_guest_or_skip
from tests.vmfixtures import free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.timeout(1800)]  # the first test boots all three

PARTS = ("db", "app", "web")
# Three Debian first boots at once on two cores, beside another worker's guest: a ceiling only.
BOOT_TIMEOUT = 900
# The test image has no ping: an ICMP echo from Python (which cloud-init brings), by name.
PING = (
    "python3 -c 'import socket, struct, sys\n"
    "address = socket.gethostbyname(sys.argv[1])\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n"
    "s.settimeout(5)\n"
    "packet = struct.pack(\"!BBHHH\", 8, 0, 0, 7, 1) + b\"kvmtasks\"\n"
    "total = sum(struct.unpack(\"!8H\", packet))\n"
    "total = (total >> 16) + (total & 0xFFFF)\n"
    "packet = packet[:2] + struct.pack(\"!H\", ~(total + (total >> 16)) & 0xFFFF) + packet[4:]\n"
    "s.sendto(packet, (address, 0))\n"
    "while True:\n"
    "    data, sender = s.recvfrom(1500)\n"
    "    if sender[0] == address and data[20] == 0:\n"
    "        print(\"echo reply from\", address)\n"
    "        break\n"
    "' "
)


@dataclass
class Cluster:
    project: NetnsProject
    pcap: Path
    addresses: dict[str, str]

    def run(self, part: str, command: str) -> str:
        done = self.project.script(f"{part}-runscript", command, timeout=120)
        assert done.returncode == 0, f"{part}: {command!r}: {done.stdout}{done.stderr}"
        return done.stdout

    def reaches(self, source: str, target: str) -> None:
        """ping and a TCP connection (to sshd) by part name, answered from the right address."""
        out = self.run(source, PING + target)
        assert self.addresses[target] in out, out
        self.run(source, f"timeout 10 bash -c 'echo > /dev/tcp/{target}/22'")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    guest = debian_guest_or_skip(CLOUD_INIT)
    root = tmp_path_factory.mktemp("cluster")
    netns = Netns()
    project = NetnsProject(root / "buildout", netns)
    project.root.mkdir()
    extra_args = "".join(f"  {arg}\n" for arg in guest.kvm_extra_args())
    project.write("".join(
        f"[{name}]\nfile = {guest.image}\noverlay = true\ncloud_init = true\n"
        f"ssh_port = {free_port()}\nkvm_memory = 768M\nkvm_accel = tcg\n"
        f"kvm_boot_timeout = {BOOT_TIMEOUT}\n"
        "kvm_net =\n  user,restrict=on\n  nic,model=virtio\n"
        f"kvm_extra_args =\n{extra_args}networks = cluster\n\n"
        for name in PARTS))
    pcap = root / "capture.pcap"
    try:
        with capture(netns, pcap):
            started = project.run("-n", "3", *(f"start:{name}" for name in PARTS),
                                  timeout=3 * BOOT_TIMEOUT)
            assert started.returncode == 0, started.describe()
            status = json.loads(project.script("db-ctl", "status", "--json").stdout)
            (link,) = status["networks"]
            addresses = {"db": link["address"].split("/")[0],
                         **{p["part"]: p["address"].split("/")[0] for p in link["peers"]}}
            yield Cluster(project, pcap, addresses)
            project.run("-n", "3", *(f"stop:{name}" for name in PARTS), timeout=300)
    finally:
        for pid in qemu_pids_under(root):
            os.kill(pid, signal.SIGKILL)
        netns.close()


def test_the_seed_brings_up_each_nic_with_its_address(cluster: Cluster) -> None:
    subnets = {ipaddress.IPv4Interface(a + "/24").network for a in cluster.addresses.values()}
    assert len(subnets) == 1 and len(set(cluster.addresses.values())) == 3
    for name in PARTS:
        assert f"inet {cluster.addresses[name]}/24" in cluster.run(name, "ip -4 addr show kvmnet0")
        # the user-mode NIC kept its DHCP address beside it
        assert "inet 10.0.2.15/24" in cluster.run(name, "ip -4 addr show eth0")


def test_each_part_reaches_the_others_by_name(cluster: Cluster) -> None:
    # A part restarted and reached again is checked with the tiny guests
    # (test_networks_guest.py): a second Debian boot would cost minutes of the suite.
    for source, target in itertools.permutations(PARTS, 2):
        cluster.reaches(source, target)


def test_no_packet_on_the_host_has_an_address_outside_loopback(cluster: Cluster) -> None:
    # Read while the guests run: pings and TCP between them happened in the tests before.
    assert len(packets(cluster.pcap, "tcp")) > 100  # the ssh logins, on loopback
    assert packets(cluster.pcap, FOREIGN) == []
    assert packets(cluster.pcap, "icmp") == []  # the guests' pings never touch the host's IP stack
