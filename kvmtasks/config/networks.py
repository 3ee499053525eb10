"""Private networks between the parts of one project: the subnet, addresses and MACs each part
gets on each network it joins, decided from the config alone (pure, stable from run to run).

A project is a buildout directory: the same network name in two projects is two networks (its
key, which names its sockets, hashes the directory's absolute path with the name).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvmtasks.errors import ConfigError

if TYPE_CHECKING:
    from kvmtasks.config.part import Part

# The user-mode network's default subnet is 10.0.2.0/24: chosen subnets stay out of 10.0.0.0/16.
_CHOSEN_SECOND_OCTETS = range(16, 256)


@dataclass(frozen=True)
class Member:
    """Another part on the same network."""

    part: str
    address: str  # with its prefix, e.g. 10.23.7.12/24
    mac: str


@dataclass(frozen=True)
class NetworkLink:
    """One network a part joins: its NIC there and the other parts it reaches."""

    network: str
    key: str  # 16 hex digits of (project, network): names the network's socket folder
    subnet: str
    address: str  # this part's, with its prefix
    mac: str
    peers: tuple[Member, ...]
    # Its parts run on a local libvirt host: the sockets go where libvirt's QEMU user reaches them.
    libvirt: bool = False

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]


def _digest(*words: str) -> bytes:
    return hashlib.sha256("\0".join(words).encode()).digest()


def network_key(project: str, network: str) -> str:
    return _digest("network", project, network).hex()[:16]


def chosen_subnet(project: str, network: str) -> ipaddress.IPv4Network:
    """A private /24 chosen stably per project and network, outside 10.0.0.0/16."""
    digest = _digest("subnet", project, network)
    second = _CHOSEN_SECOND_OCTETS[digest[0] % len(_CHOSEN_SECOND_OCTETS)]
    return ipaddress.IPv4Network(f"10.{second}.{digest[1]}.0/24")


def mac_address(project: str, network: str, part: str) -> str:
    """A stable MAC per part and network: locally administered (0x02), unicast."""
    digest = _digest("mac", project, network, part)
    return ":".join(f"{byte:02x}" for byte in (0x02, *digest[:5]))


# QEMU gives the first NIC without a MAC of its own this one (later ones count up from it).
QEMU_FIRST_MAC = "52:54:00:12:34:56"


def user_nic_mac(kvm_net: Sequence[str]) -> str | None:
    """The MAC of the user-mode NIC that kvm_net makes (a `nic` line's macaddr, else QEMU's
    first), for a seed that brings it up with DHCP beside the private NICs; None without one."""
    lines = list(kvm_net) or ["nic"]
    for line in lines:
        kind, _, rest = line.partition(",")
        if kind == "nic":
            for option in rest.split(","):
                name, _, value = option.partition("=")
                if name == "macaddr":
                    return value.lower()
            return QEMU_FIRST_MAC
    return QEMU_FIRST_MAC if "user" in [line.split(",", 1)[0] for line in lines] else None


@dataclass(frozen=True)
class _Joined:
    part: Part
    line: str
    interface: ipaddress.IPv4Interface | None


def _where(joined: _Joined) -> str:
    return f"{joined.part.config_file}: [{joined.part.name}] networks = {joined.line!r}"


def _subnet(project: str, network: str, members: Sequence[_Joined]) -> ipaddress.IPv4Network:
    """The subnet the given addresses name (they must agree), else the chosen one."""
    given = [m for m in members if m.interface is not None]
    if not given:
        return chosen_subnet(project, network)
    first = given[0]
    assert first.interface is not None
    subnet = first.interface.network
    for member in given[1:]:
        assert member.interface is not None
        if member.interface.network != subnet:
            raise ConfigError(f"{_where(member)}: {member.interface.ip} is outside {subnet}, the "
                              f"subnet part {first.part.name} gives network {network}")
    return subnet


def _addresses(project: str, network: str, subnet: ipaddress.IPv4Network,
               members: Sequence[_Joined]) -> dict[str, ipaddress.IPv4Address]:
    """Given addresses kept; the others from a hash of the part name, probing upwards on a
    collision, the parts taken in (hash, name) order so the outcome never depends on file order."""
    taken: dict[ipaddress.IPv4Address, _Joined] = {}
    for member in members:
        if member.interface is None:
            continue
        ip = member.interface.ip
        if ip in (subnet.network_address, subnet.broadcast_address):
            raise ConfigError(f"{_where(member)}: {ip} is not a host address of {subnet}")
        if ip in taken:
            raise ConfigError(f"{_where(member)}: {ip} is part {taken[ip].part.name}'s address "
                              f"on network {network} already")
        taken[ip] = member
    hosts = [ip for ip in subnet.hosts() if ip not in taken]
    result = {m.part.name: m.interface.ip for m in members if m.interface is not None}

    def start(member: _Joined) -> int:
        return int.from_bytes(_digest("address", project, network, member.part.name)[:8], "big")

    free = set(hosts)
    for member in sorted((m for m in members if m.interface is None),
                         key=lambda m: (start(m) % max(len(hosts), 1), m.part.name)):
        if not free:
            raise ConfigError(f"{_where(member)}: no address left in {subnet} for this part")
        index = start(member) % len(hosts)
        while hosts[index] not in free:
            index = (index + 1) % len(hosts)
        free.discard(hosts[index])
        result[member.part.name] = hosts[index]
    return result


def _one_engine(network: str, members: Sequence[_Joined]) -> bool:
    """Whether the network's parts run on libvirt; refused when they do not all run on the same
    engine and libvirt host (QEMU started directly and libvirt's QEMU run as different users, and
    only one of them can own the network's folder)."""
    def engine(joined: _Joined) -> str:
        part = joined.part
        return part.libvirt_uri if part.kvm_engine.value == "libvirt" else "kvm_engine = qemu"

    first = members[0]
    for member in members[1:]:
        if engine(member) != engine(first):
            raise ConfigError(f"{_where(member)}: network {network} has part {first.part.name} on "
                              f"{engine(first)} and this part on {engine(member)}; a network's parts "
                              "run on one engine and libvirt host")
    return first.part.kvm_engine.value == "libvirt"


def join(parts: Iterable[Part]) -> list[Part]:
    """The parts with their links: every network of every project resolved together."""
    parts = list(parts)
    networks: dict[tuple[str, str], list[_Joined]] = {}
    for part in parts:
        for request in part.networks:
            project = str(part.buildout.directory.absolute())
            interface = (ipaddress.IPv4Interface(request.address)
                         if request.address is not None else None)
            networks.setdefault((project, request.name), []).append(
                _Joined(part, request.line, interface))
    links: dict[str, list[NetworkLink]] = {}
    for (project, network), members in networks.items():
        members.sort(key=lambda m: m.part.name)  # peers in name order, whatever the file order
        libvirt = _one_engine(network, members)
        subnet = _subnet(project, network, members)
        addresses = _addresses(project, network, subnet, members)
        everyone = [Member(m.part.name, f"{addresses[m.part.name]}/{subnet.prefixlen}",
                           mac_address(project, network, m.part.name)) for m in members]
        for me in everyone:
            links.setdefault(me.part, []).append(NetworkLink(
                network=network, key=network_key(project, network), subnet=str(subnet),
                address=me.address, mac=me.mac,
                peers=tuple(m for m in everyone if m.part != me.part), libvirt=libvirt))
    order = {part.name: [r.name for r in part.networks] for part in parts}
    return [replace(part, links=tuple(sorted(links.get(part.name, ()),
                                             key=lambda link: order[part.name].index(link.network))))
            if part.networks else part
            for part in parts]
