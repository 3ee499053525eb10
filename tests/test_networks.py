"""Private networks resolved from the config: subnets, addresses, MACs, refusals (pure)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtasks.config import networks
from kvmtasks.config.loader import load_parts
from kvmtasks.config.part import Part
from kvmtasks.config.partjson import from_json, to_json
from kvmtasks.config.runfiles import network_socket
from kvmtasks.engines.qemu.argv import private_network_args, qemu_argv
from kvmtasks.engines.statusreport import Facts, State, as_json, describe
from kvmtasks.errors import ConfigError
from kvmtasks.guest import netsetup
from kvmtasks.provision import seednetwork, seedstep
from kvmtasks.provision.seed import seed_files
from kvmtasks.provision.seednetwork import PrivateNic

IMAGE = "http://127.0.0.1:9/images/disk.img"


def project(folder: Path, parts: dict[str, str], name: str = "kvm.cfg") -> Path:
    """A config file in folder, its buildout directory, with one part per entry (its networks)."""
    folder.mkdir(parents=True, exist_ok=True)
    body = [f"[buildout]\ndirectory = {folder}\n"]
    for part, lines in parts.items():
        indented = "\n    ".join(lines.splitlines())
        body.append(f"[{part}]\nimage = {IMAGE}\nnetworks =\n    {indented}\n")
    path = folder / name
    path.write_text("\n".join(body))
    return path


def load(*paths: Path) -> dict[str, Part]:
    return {part.name: part for part in load_parts(paths, cwd=paths[0].parent)}


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as error:
        load_parts([path], cwd=path.parent)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert str(path) in message and "networks = " in message
    return message


def test_three_parts_on_a_chosen_subnet_each_reach_the_other_two(tmp_path: Path) -> None:
    parts = load(project(tmp_path, {"db": "back", "app": "back\nfront", "web": "front"}))
    (db,) = parts["db"].links
    app_back, app_front = parts["app"].links
    assert (app_back.network, app_front.network) == ("back", "front")
    subnet = ipaddress.IPv4Network(db.subnet)
    assert subnet.prefixlen == 24 and subnet.is_private
    assert not subnet.overlaps(ipaddress.IPv4Network("10.0.0.0/16"))  # the user-mode network's
    assert ipaddress.IPv4Interface(db.address).network == subnet
    assert db.address != app_back.address
    assert [(p.part, p.address, p.mac) for p in db.peers] == [("app", app_back.address, app_back.mac)]
    assert [p.part for p in app_front.peers] == ["web"]
    assert db.key == app_back.key != app_front.key
    first_byte = int(db.mac.split(":")[0], 16)
    assert first_byte & 0b10 and not first_byte & 0b1  # locally administered, unicast
    assert parts["web"].links[0].mac != app_front.mac


def test_everything_is_the_same_on_the_next_run_and_in_another_file_order(tmp_path: Path) -> None:
    one = project(tmp_path, {"a": "net", "b": "net"}, "one.cfg")
    two = project(tmp_path, {"c": "net"}, "two.cfg")
    first, again = load(one, two), load(two, one)
    assert {n: p.links for n, p in first.items()} == {n: p.links for n, p in again.items()}


def test_the_same_network_name_in_two_projects_is_two_networks(tmp_path: Path) -> None:
    left = load(project(tmp_path / "left", {"a": "net", "b": "net"}))
    right = load(project(tmp_path / "right", {"c": "net"}))
    assert left["a"].links[0].key != right["c"].links[0].key
    assert [p.part for p in right["c"].links[0].peers] == []
    assert left["a"].links[0].mac != networks.mac_address(str(tmp_path / "right"), "net", "a")


def test_given_addresses_name_the_subnet_and_the_others_are_assigned_from_it(tmp_path: Path) -> None:
    parts = load(project(tmp_path, {"a": "lan 192.168.77.10/24", "b": "lan", "c": "lan"}))
    assert parts["a"].links[0].address == "192.168.77.10/24"
    assert parts["a"].links[0].subnet == "192.168.77.0/24"
    others = {parts[n].links[0].address for n in "bc"}
    assert len(others) == 2 and "192.168.77.10/24" not in others
    assert all(ipaddress.IPv4Interface(a).network == ipaddress.IPv4Network("192.168.77.0/24")
               for a in others)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=2, max_size=6,
                unique=True))
def test_a_full_small_subnet_still_gives_every_part_its_own_address(names: list[str]) -> None:
    # A /29 holds 6 hosts: every hash collision is resolved, the same way whatever the order.
    class Fake:
        def __init__(self, name: str) -> None:
            self.part = type("P", (), {"name": name, "config_file": "f"})()
            self.line = "n"
            self.interface = None

    subnet = ipaddress.IPv4Network("10.9.9.0/29")
    members = [Fake(name) for name in names]
    chosen = networks._addresses("/p", "n", subnet, members)  # type: ignore[arg-type]
    assert len(set(chosen.values())) == len(names)
    assert chosen == networks._addresses("/p", "n", subnet, members[::-1])  # type: ignore[arg-type]


@pytest.mark.parametrize(("lines", "needle"), [
    ({"a": "b@d"}, "not a plain word"),
    ({"a": "9lives"}, "not a plain word"),
    ({"a": "lan 10.1.1.300/24"}, "not an IPv4 ADDRESS/PREFIX"),
    ({"a": "lan 10.1.1.3"}, "not an IPv4 ADDRESS/PREFIX"),
    ({"a": "lan 10.1.1.0/24"}, "not a host address"),
    ({"a": "lan 8.8.8.8/24"}, "not a private address"),
    ({"a": "lan 10.1.1.1/31"}, "prefix of 30 or less"),
    ({"a": "lan\nlan"}, "joined twice"),
    ({"a": "lan 10.1.1.1/24 extra"}, "NAME or NAME ADDRESS/PREFIX"),
    ({"a": "\n".join(f"n{i}" for i in range(9))}, "more than the 8 NIC slots"),
    ({"a": "lan 10.1.1.5/24", "b": "lan 10.1.1.5/24"}, "part a's address on network lan"),
    ({"a": "lan 10.1.1.5/24", "b": "lan 10.1.2.5/24"}, "10.1.2.5 is outside 10.1.1.0/24"),
    ({"a": "lan 10.1.1.5/24", "b": "lan 10.1.1.6/16"}, "outside 10.1.1.0/24"),
    ({"a": "lan 10.1.1.1/30", "b": "lan", "c": "lan"}, "no address left in 10.1.1.0/30"),
])
def test_bad_networks_are_one_line(tmp_path: Path, lines: dict[str, str], needle: str) -> None:
    assert needle in refusal(project(tmp_path, lines))


def test_a_part_on_a_remote_libvirt_host_is_refused_in_one_line(tmp_path: Path) -> None:
    path = project(tmp_path, {"a": "lan"})
    path.write_text(path.read_text() + "kvm_engine = libvirt\n"
                    "libvirt_uri = qemu+ssh://root@host.example/system\n")
    assert "[a] networks = 'lan': private networks join parts on this machine only, not on " \
           "qemu+ssh://root@host.example/system" in refusal(path)


def test_links_survive_the_scripts_json(tmp_path: Path) -> None:
    part = load(project(tmp_path, {"a": "lan 10.4.4.4/24\nother", "b": "lan"}))["a"]
    assert from_json(to_json(part)) == part


def test_status_names_each_network_its_address_mac_and_peers(tmp_path: Path) -> None:
    parts = load(project(tmp_path, {"a": "lan 10.4.4.4/24", "b": "lan 10.4.4.5/24"}))
    (link,) = parts["a"].links
    facts = Facts(part="a", state=State.RUNNING, engine="qemu", libvirt_uri=None, pid=1,
                  accelerator="tcg", forwards=(), vnc=None, ssh_command=None, console_log=None,
                  disks={}, networks=parts["a"].links)
    assert describe(facts)[-1] == f"  network lan 10.4.4.4/24 mac {link.mac} (with b 10.4.4.5)"
    assert json.loads(as_json(facts))["networks"] == [{
        "network": "lan", "subnet": "10.4.4.0/24", "address": "10.4.4.4/24", "mac": link.mac,
        "peers": [{"part": "b", "address": "10.4.4.5/24", "mac": parts["b"].links[0].mac}]}]


# -- the seed: network-config and /etc/hosts ------------------------------------------------------

NICS = (PrivateNic("kvmnet0", "02:aa:bb:cc:dd:01", "10.4.4.4/24"),
        PrivateNic("kvmnet1", "02:aa:bb:cc:dd:02", "10.5.5.5/24"))


def test_without_a_file_of_the_users_the_user_nic_keeps_dhcp_beside_the_private_ones() -> None:
    text = seednetwork.network_config(None, NICS, "52:54:00:12:34:56")
    assert text is not None
    assert yaml.safe_load(text) == {"version": 2, "ethernets": {
        "eth0": {"match": {"macaddress": "52:54:00:12:34:56"}, "set-name": "eth0", "dhcp4": True},
        "kvmnet0": {"match": {"macaddress": "02:aa:bb:cc:dd:01"}, "set-name": "kvmnet0",
                    "addresses": ["10.4.4.4/24"], "dhcp4": False},
        "kvmnet1": {"match": {"macaddress": "02:aa:bb:cc:dd:02"}, "set-name": "kvmnet1",
                    "addresses": ["10.5.5.5/24"], "dhcp4": False}}}
    assert seednetwork.network_config("anything: 1\n", (), None) == "anything: 1\n"


@pytest.mark.parametrize("users", [
    "version: 2\nethernets:\n  ens3:\n    dhcp4: true\n",
    "network:\n  version: 2\n  ethernets:\n    ens3:\n      dhcp4: true\n",
])
def test_the_users_version_2_network_config_gets_the_private_nics(users: str) -> None:
    text = seednetwork.network_config(users, NICS[:1], "52:54:00:12:34:56")
    assert text is not None
    assert list(yaml.safe_load(text)["ethernets"]) == ["ens3", "kvmnet0"]


@pytest.mark.parametrize(("users", "needle"), [
    ("version: 1\nconfig: []\n", "version 2 network-config only"),
    ("version: 2\nethernets:\n  kvmnet0: {}\n", "names kvmnet0"),
    ("version: [2\n", "not YAML"),
])
def test_a_network_config_that_cannot_take_them_is_one_line(users: str, needle: str) -> None:
    with pytest.raises(seednetwork.NetworkConfigError, match=needle):
        seednetwork.network_config(users, NICS, None)


def test_the_user_nic_mac_is_qemus_first_or_the_one_kvm_net_gives() -> None:
    assert networks.user_nic_mac(()) == "52:54:00:12:34:56"
    assert networks.user_nic_mac(("user,restrict=on", "nic,model=virtio")) == "52:54:00:12:34:56"
    assert networks.user_nic_mac(("nic,model=e1000,macaddr=52:54:00:AA:00:01", "user")) == (
        "52:54:00:aa:00:01")
    assert networks.user_nic_mac(("none",)) is None


def test_the_hosts_boot_command_replaces_its_own_lines_in_every_hosts_file(tmp_path: Path) -> None:
    (line,) = [line for line in seednetwork.hosts_bootcmd([("10.4.4.5", "b"), ("10.4.4.6", "c")])
               if line.startswith("  - ")]
    argv = json.loads(line[4:])
    # Run for real against copies: /etc/hosts and a template, twice (every boot).
    script = argv[2].replace("/etc/hosts ", f"{tmp_path}/hosts ").replace(
        "/etc/cloud/templates/", f"{tmp_path}/")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n10.9.9.9 old # kvmtasks network\n")
    (tmp_path / "hosts.debian.tmpl").write_text("## template:jinja\n127.0.0.1 {{fqdn}}\n")
    for _ in range(2):
        subprocess.run([*argv[:2], script, *argv[3:]], check=True)
    assert (tmp_path / "hosts").read_text() == (
        "127.0.0.1 localhost\n10.4.4.5 b # kvmtasks network\n10.4.4.6 c # kvmtasks network\n")
    assert (tmp_path / "hosts.debian.tmpl").read_text() == (
        "## template:jinja\n127.0.0.1 {{fqdn}}\n10.4.4.5 b # kvmtasks network\n"
        "10.4.4.6 c # kvmtasks network\n")


def test_a_seed_of_a_part_on_networks_holds_both(tmp_path: Path) -> None:
    path = project(tmp_path, {"a": "lan 10.4.4.4/24", "b": "lan 10.4.4.5/24"})
    path.write_text(path.read_text().replace(f"image = {IMAGE}",
                                             f"file = {tmp_path}/disk.img\ncloud_init = true"))
    part = load(path)["a"]
    seed = seedstep.seed_input(part)
    files = seed_files(seed)
    network = yaml.safe_load(files["network-config"])
    assert network["ethernets"]["kvmnet0"]["addresses"] == ["10.4.4.4/24"]
    assert network["ethernets"]["kvmnet0"]["match"]["macaddress"] == part.links[0].mac
    cloud = yaml.safe_load(files["user-data"])
    assert cloud["bootcmd"][0][4:] == ["10.4.4.5 b"]
    # b's address is among a's seed inputs: were it to change, a's seed is written again.
    assert "10.4.4.5/24" in json.dumps(seedstep.user_inputs(part))


def test_the_no_seed_script_finds_nics_by_mac_and_writes_hosts(tmp_path: Path) -> None:
    parts = load(project(tmp_path, {"a": "lan 10.4.4.4/24", "b": "lan 10.4.4.5/24"}))
    assert netsetup.plan(parts["a"]) == (
        f"nic {parts['a'].links[0].mac} 10.4.4.4/24\nhost 10.4.4.5 b\n")
    assert "MARK" not in netsetup.SCRIPT and netsetup.HOSTS_MARK == seednetwork.HOSTS_MARK


def test_each_network_is_a_nic_on_a_hub_with_a_datagram_socket_to_each_peer(tmp_path: Path) -> None:
    parts = load(project(tmp_path, {"a": "lan", "b": "lan", "c": "lan\nside"}))
    argv = private_network_args(parts["c"])
    lan, side = parts["c"].links
    assert argv[:4] == ["-netdev", "hubport,id=kvmnet0,hubid=100",
                        "-device", f"virtio-net-pci,netdev=kvmnet0,mac={lan.mac}"]
    sockets = [value for value in argv if value.startswith("dgram,")]
    assert len(sockets) == 2  # a and b on lan; nobody else on side
    own = network_socket(lan, "c", "a")
    assert f"local.path={own}," in sockets[0]
    assert sockets[0].endswith(f"remote.path={network_socket(lan, 'a', 'c')}")
    assert len(str(own)) < 108 and own.parent.name == f"net-{lan.key}"
    # a's socket towards c is the one c sends to: the pairs match up.
    assert f"local.path={network_socket(lan, 'a', 'c')}," in " ".join(
        private_network_args(parts["a"]))
    assert "hubport,id=kvmnet1h0" not in argv and f"mac={side.mac}" in " ".join(argv)
    full = qemu_argv(parts["c"], accel="tcg", disk_format="raw", listen_address="127.0.0.1")
    assert "\0".join(argv) in "\0".join(full)
