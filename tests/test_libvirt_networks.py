"""Private networks between libvirt parts: the domain's hub and unix sockets (pure), the folders
opened to libvirt's QEMU user alone (real ACLs, checked as that user), the refusals; then three
tiny guests on real libvirtd reaching each other by name through a restart of one."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_parts
from kvmtasks.config.part import Part
from kvmtasks.config.partjson import from_json, to_json
from kvmtasks.config.runfiles import libvirt_network_root, network_folder, network_socket
from kvmtasks.engines.libvirt import netfolder, storage
from kvmtasks.engines.libvirt.domain import QEMU_NS, Disk, domain_xml
from kvmtasks.engines.libvirt.fileaccess import ACL_USER, ACL_XATTR, SEARCH, User, parse_acl
from kvmtasks.engines.qemu.argv import private_network_args
from kvmtasks.errors import ConfigError, VmError
from tests.conftest import Project
from tests.test_libvirt import _virsh, libvirt_config, libvirtd, pool
from tests.vmfixtures import Guest, free_port, needs_qemu

__all__ = ["libvirtd", "pool"]  # the fixtures, shared with test_libvirt.py (its xdist group)


def config(folder: Path, parts: dict[str, str]) -> Path:
    """Libvirt parts (name: their lines) in folder's config file."""
    body = [f"[buildout]\ndirectory = {folder}\n"]
    body += [f"[{name}]\nfile = /srv/disk.img\nkvm_engine = libvirt\n{lines}\n"
             for name, lines in parts.items()]
    path = folder / "kvm.cfg"
    path.write_text("\n".join(body))
    return path


def loaded(path: Path) -> dict[str, Part]:
    return {part.name: part for part in load_parts([path], cwd=path.parent)}


def qemu_args(part: Part) -> list[str]:
    xml = domain_xml(part, domain_type="qemu", disk=Disk("pool", "v", "qcow2"),
                     listen_address="127.0.0.1", console_log=None)
    return [arg.attrib["value"] for arg in ET.fromstring(xml).iter(f"{{{QEMU_NS}}}arg")]


def test_the_domain_joins_each_peer_by_a_unix_socket_in_the_libvirt_folder(tmp_path: Path) -> None:
    parts = loaded(config(tmp_path, {
        "a": "kvm_net =\n  user,restrict=on\n  nic,model=virtio\nnetworks =\n  lan\n  side",
        "b": "networks = lan", "c": "networks = lan", "d": "networks = side",
    }))
    a = parts["a"]
    lan, side = a.links
    assert lan.libvirt and side.libvirt
    assert from_json(to_json(a)) == a  # what the scripts load keeps where the sockets are
    args = qemu_args(a)
    # The user network's NIC on slot 0x10, the private ones from 0x11: the direct engine's
    # hub and sockets, each NIC on a fixed slot of the root bus.
    assert args[:4] == ["-netdev", "user,id=kvmtasks-net0,restrict=on",
                        "-device", "virtio-net-pci,netdev=kvmtasks-net0,bus=pci.0,addr=0x10"]
    assert args[4:] == private_network_args(a, pci_slot=0x11)
    assert args[4:8] == ["-netdev", "hubport,id=kvmnet0,hubid=100",
                         "-device", f"virtio-net-pci,netdev=kvmnet0,bus=pci.0,addr=0x11,mac={lan.mac}"]
    assert f"virtio-net-pci,netdev=kvmnet1,bus=pci.0,addr=0x12,mac={side.mac}" in args
    # Each peer by a pair of unix sockets in the network's folder, in the libvirt root.
    assert network_folder(lan) == libvirt_network_root() / f"net-{lan.key}"
    assert libvirt_network_root() == Path(f"/tmp/kvmtasks-{os.getuid()}-libvirt")
    dgrams = [arg for arg in args if arg.startswith("dgram,")]
    assert dgrams == [
        f"dgram,id=kvmnet0p0,local.type=unix,local.path={network_socket(lan, 'a', 'b')},"
        f"remote.type=unix,remote.path={network_socket(lan, 'b', 'a')}",
        f"dgram,id=kvmnet0p1,local.type=unix,local.path={network_socket(lan, 'a', 'c')},"
        f"remote.type=unix,remote.path={network_socket(lan, 'c', 'a')}",
        f"dgram,id=kvmnet1p0,local.type=unix,local.path={network_socket(side, 'a', 'd')},"
        f"remote.type=unix,remote.path={network_socket(side, 'd', 'a')}",
    ]
    # No address of any kind but the forwards' loopback: nothing of these networks is IP on the host.
    text = " ".join(args)
    assert "inet" not in text and "udp" not in text and "mcast" not in text
    assert set(re.findall(r"\d+\.\d+\.\d+\.\d+", text)) <= {"127.0.0.1"}
    # The part's own sockets, as b sees them: the same paths, the other way round.
    assert f"local.path={network_socket(lan, 'b', 'a')}" in " ".join(qemu_args(parts["b"]))


def test_on_q35_the_private_nics_sit_on_the_pcie_root(tmp_path: Path) -> None:
    part = loaded(config(tmp_path, {"a": "firmware = uefi-secure\nnetworks = lan",
                                    "b": "networks = lan"}))["a"]
    devices = [arg for arg in qemu_args(part) if arg.startswith("virtio-net-pci")]
    # No forward, so no user network: the private NIC takes the first slot.
    assert devices == [f"virtio-net-pci,netdev=kvmnet0,bus=pcie.0,addr=0x10,mac={part.links[0].mac}"]


@pytest.mark.parametrize(("first", "second", "where"), [
    ("", "kvm_engine = qemu\n", "part a on qemu:///system and this part on kvm_engine = qemu"),
    ("libvirt_uri = qemu:///session\n", "", "part a on qemu:///session and this part on qemu:///system"),
])
def test_a_network_across_engines_or_libvirt_hosts_is_one_line(
        tmp_path: Path, first: str, second: str, where: str) -> None:
    path = config(tmp_path, {"a": f"{first}networks = lan", "b": f"networks = lan\n{second}"})
    with pytest.raises(ConfigError) as error:
        loaded(path)
    message = str(error.value)
    assert message.splitlines() == [f"{path}: [b] networks = 'lan': network lan has {where}; a "
                                    "network's parts run on one engine and libvirt host"]


def test_a_part_on_a_remote_host_is_refused_by_the_command_line(project: Project) -> None:
    project.write("[vm]\nfile = /srv/disk.img\nkvm_engine = libvirt\nnetworks = lan\n"
                  "libvirt_uri = qemu+ssh://root@host.example/system\n")
    done = project.run("list")
    assert done.returncode == 3 and "Traceback" not in done.output
    assert "[vm] networks = 'lan': private networks join parts on this machine only, not on " \
           "qemu+ssh://root@host.example/system" in done.stderr


def user(name: str) -> User:
    entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, frozenset({entry.pw_gid}))


def as_user(who: User, code: str) -> subprocess.CompletedProcess[str]:
    """Python code run as who (uid, primary group, no other group): the kernel's own answer."""
    return subprocess.run(["setpriv", f"--reuid={who.uid}", f"--regid={min(who.gids)}",
                           "--clear-groups", "/usr/bin/python3", "-c", code],
                          capture_output=True, text=True, check=False)


BIND = "import socket, sys; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(sys.argv[1])"
LIST = "import os, sys; os.listdir(sys.argv[1])"


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder of ours in /tmp (which every user may search), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="kvmtasks-test-netfolder-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder)


def test_the_folders_let_libvirts_qemu_user_in_and_no_one_else(scratch: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("running code as libvirt's QEMU user needs root")
    qemu, nobody = user("libvirt-qemu"), user("nobody")
    root, network = scratch, scratch / "net-0123456789abcdef"  # root: made 0700 by mkdtemp
    os.setxattr(root, ACL_XATTR, netfolder.acl_bytes([nobody], netfolder.ALL))  # granted before

    netfolder.open_folder(root, [qemu], SEARCH)
    netfolder.open_folder(network, [qemu], netfolder.ALL)

    for folder, permissions in ((root, SEARCH), (network, netfolder.ALL)):
        assert folder.stat().st_mode & 0o7777 == 0o700 | permissions << 3  # the mask shows as group
        assert [(e.tag, e.permissions, e.id) for e in parse_acl(os.getxattr(folder, ACL_XATTR))
                if e.tag == ACL_USER] == [(ACL_USER, permissions, qemu.uid)]
    # As the kernel decides it: libvirt's QEMU binds in the network's folder, cannot list the
    # root; nobody (granted before, taken back) cannot even reach the network's folder.
    bound = as_user(qemu, f"{BIND}\nprint('bound')".replace("sys.argv[1]", repr(str(network / "s"))))
    assert bound.stdout == "bound\n", bound.stderr
    assert (network / "s").stat().st_uid == qemu.uid
    listed = as_user(qemu, LIST.replace("sys.argv[1]", repr(str(root))))
    assert "PermissionError" in listed.stderr
    refused = as_user(nobody, BIND.replace("sys.argv[1]", repr(str(network / "t"))))
    assert "PermissionError" in refused.stderr and not (network / "t").exists()
    # No user to let in (QEMU run as root or as us): the ACL goes, mode 0700 alone.
    netfolder.open_folder(network, [], netfolder.ALL)
    assert network.stat().st_mode & 0o777 == 0o700
    with pytest.raises(OSError):
        os.getxattr(network, ACL_XATTR)


def test_a_folder_that_is_not_ours_is_refused_in_one_line(scratch: Path) -> None:
    (scratch / "elsewhere").mkdir()
    link = scratch / "link"
    link.symlink_to(scratch / "elsewhere")
    with pytest.raises(VmError) as error:
        netfolder.open_folder(link, [], netfolder.ALL)
    assert str(error.value) == (f"{link} is not a folder of yours: the private networks' sockets "
                                "of libvirt parts are not put there")


# ---- real libvirtd, three tiny guests ----


def test_parts_started_at_once_make_their_missing_pool_once(pool: str, tmp_path: Path) -> None:
    """Three starts at once (`doit -n 3`) each find the pool missing: none fails."""
    parts = loaded(config(tmp_path, {name: f"libvirt_pool = {pool}" for name in "abc"}))
    with ThreadPoolExecutor(3) as threads:
        outcomes = list(threads.map(storage.ensure_pool, parts.values()))
    assert outcomes == [None, None, None]
    assert "running" in _virsh("pool-info", pool).stdout
    assert Path(f"/var/lib/libvirt/{pool}").is_dir()


@pytest.fixture
def three_names(libvirtd: None) -> Iterator[list[str]]:
    """Three unique part (and domain) names; their domains are destroyed and undefined afterwards."""
    names = [f"lv{uuid.uuid4().hex[:8]}" for _ in range(3)]
    yield names
    for name in names:
        _virsh("destroy", name)
        _virsh("undefine", "--snapshots-metadata", "--managed-save", name)


def domain_pid(name: str) -> int:
    """The pid of the QEMU libvirt runs for a domain (libvirt writes it down)."""
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())


def inet_sockets(pid: int) -> list[str]:
    """The process's IPv4/IPv6 sockets (TCP and UDP, any state), as ss lists them."""
    listed = subprocess.run(["ss", "-H", "-t", "-u", "-a", "-n", "-p"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    return [line for line in listed if f"pid={pid}," in line]


@contextmanager
def host_capture(pcap: Path, expression: str) -> Iterator[None]:
    """tcpdump on every interface of this host, for the packets that match expression."""
    argv = ["tcpdump", "-i", "any", "-n", "--immediate-mode", "-U", "-w", str(pcap), *expression.split()]
    dump = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert dump.stderr is not None
    deadline = time.monotonic() + 30
    while "listening on" not in dump.stderr.readline():
        assert time.monotonic() < deadline and dump.poll() is None, "tcpdump did not start"
    try:
        yield
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=30)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_three_libvirt_parts_reach_each_other_by_name_through_a_restart(
        project: Project, guest: Guest, pool: str, three_names: list[str], tmp_path: Path) -> None:
    a = three_names[0]  # the pool is missing: the three starts at once each find it so
    project.write("".join(
        libvirt_config(guest, name, f"file = {guest.image.path}", pool, free_port(), "networks = lan\n")
        + "\n" for name in three_names))
    parts = {part.name: part for part in load_parts(project.configs, cwd=project.root)}
    (lan,) = parts[a].links
    addresses = {name: parts[name].links[0].ip for name in three_names}

    pcap = tmp_path / "host.pcap"
    with host_capture(pcap, f"net {lan.subnet}"):
        scenario(project, three_names, addresses)
    # No packet of the network's subnet on any interface of the host (pings and HTTP included).
    assert tmp_path.joinpath("host.pcap").stat().st_size > 0  # the capture ran (its header)
    read = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True, check=True)
    assert read.stdout == ""


def scenario(project: Project, three_names: list[str], addresses: dict[str, str]) -> None:
    a, b, c = three_names
    parts = {part.name: part for part in load_parts(project.configs, cwd=project.root)}
    (lan,) = parts[a].links
    started = project.run("-n", "3", f"start:{a}", f"start:{b}", f"start:{c}", timeout=600)
    assert started.returncode == 0, started.describe()

    # Each reaches the other two by part name: ping, and HTTP over TCP.
    for me in three_names:
        for other in three_names:
            if other != me:
                assert addresses[other] in ok(project_script(project, me, f"ping -c 1 -W 5 {other}"))
    ok(project_script(project, c, "httpd -p 8000 -h /etc"))
    assert f"{addresses[a]} {a} # kvmtasks network" in ok(
        project_script(project, a, f"wget -q -O - http://{c}:8000/hosts"))
    facts = json.loads(ok(script(project, f"{a}-ctl", "status", "--json")))
    assert facts["engine"] == "libvirt"
    (link,) = facts["networks"]
    assert (link["network"], link["address"], link["mac"]) == ("lan", lan.address, lan.mac)
    assert sorted(peer["part"] for peer in link["peers"]) == sorted([b, c])
    status = ok(script(project, f"{a}-ctl", "status"))
    assert f"network lan {lan.address} mac {lan.mac}" in status

    # On the host: libvirt's QEMU bound its sockets in the network's folder, as its own user;
    # its only IP sockets are the forwards' listeners on loopback.
    qemu_uid = pwd.getpwnam("libvirt-qemu").pw_uid
    assert {path.stat().st_uid for path in network_folder(lan).iterdir()} == {qemu_uid}
    assert len(list(network_folder(lan).iterdir())) == 6  # 3 parts x 2 peers
    for name in three_names:
        sockets = inet_sockets(domain_pid(name))
        assert sockets and all(" 127.0.0.1:" in line for line in sockets), sockets

    # b stops: a and c run on without it; b back: both reach it again, a's QEMU the same.
    a_pid = domain_pid(a)
    assert project.run(f"stop:{b}", timeout=200).returncode == 0
    assert not any(network_folder(lan).glob(f"{network_socket(lan, b, a).name[:8]}-*"))
    assert project_script(project, a, f"ping -c 2 -W 2 {b}").returncode != 0
    assert project.run(f"start:{b}", timeout=400).returncode == 0
    for other in (a, c):
        assert addresses[b] in ok(project_script(project, other, f"ping -c 2 -W 5 {b}"))
    assert domain_pid(a) == a_pid

    stopped = project.run("-n", "3", f"stop:{a}", f"stop:{b}", f"stop:{c}", timeout=200)
    assert stopped.returncode == 0, stopped.describe()
    assert not network_folder(lan).exists()  # every socket removed, then the folder


def script(project: Project, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.test_vm_e2e import script as run_script

    return run_script(project, name, *args)


def project_script(project: Project, part: str, command: str) -> subprocess.CompletedProcess[str]:
    """A shell command in the part's guest, through its runscript."""
    return script(project, f"{part}-runscript", command)
