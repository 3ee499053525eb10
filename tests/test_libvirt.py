"""kvm_engine = libvirt: the domain XML (pure), then real libvirtd, real guests under TCG.

The end-to-end tests start libvirtd (and virtlogd) as root when none runs, and
stop what they started. The remote case reaches the same libvirtd through a
real sshd on a loopback port (``qemu+ssh://root@127.0.0.1:PORT/system``), so
the generated ssh and scp go through the libvirt host with ProxyJump.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmtasks.config import seedrules
from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.config.remote import RemoteHost, remote_host
from kvmtasks.engines.libvirt import hostports, qemufiles
from kvmtasks.engines.libvirt.domain import KVMTASKS_NS, QEMU_NS, Disk, domain_xml, made_by_kvmtasks
from kvmtasks.engines.libvirt.fileaccess import User
from kvmtasks.guest.sshconfig import jump_entry
from kvmtasks.provision import keys
from tests.conftest import Project
from tests.debian_guest import CLOUD_INIT, DebianGuest
from tests.httpserver import FileServer
from tests.test_debian_guest import debian_guest_or_skip
from tests.test_fileaccess import grant_search
from tests.test_vm_e2e import script
from tests.vmfixtures import Guest, free_port, needs_qemu

SOCKET = Path("/run/libvirt/libvirt-sock")


def load(tmp_path: Path, body: str, name: str = "vm") -> Part:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[{name}]\nfile = /srv/disk.img\n"
                    f"kvm_engine = libvirt\n{body}")
    (part,) = load_file(path, tmp_path)
    return part


def xml_of(part: Part, **overrides: object) -> ET.Element:
    arguments: dict[str, object] = {
        "domain_type": "qemu", "disk": Disk("pool", "vm-disk.img", "qcow2"),
        "listen_address": "127.0.0.1", "console_log": Path("/run/vm/console.log"),
    }
    arguments.update(overrides)
    return ET.fromstring(domain_xml(part, **arguments))  # type: ignore[arg-type]


def qemu_args(domain: ET.Element) -> list[str]:
    return [arg.attrib["value"] for arg in domain.iter(f"{{{QEMU_NS}}}arg")]


def test_the_domain_carries_every_option(tmp_path: Path) -> None:
    part = load(tmp_path, (
        "kvm_memory = 2G\nkvm_smp = 2\nssh_port = 2222\n"
        "kvm_redir =\n  tcp:8080::80\n"
        "kvm_net =\n  user,hostname=vm,restrict=on\n  nic,model=virtio\n"
        "kvm_vnc = 127.0.0.1:3\nkvm_graphic = std\nkvm_snapshot = true\n"
        "kvm_extra_args =\n  -rtc\n  base=utc\n"
    ))
    domain = xml_of(part)

    assert domain.attrib["type"] == "qemu"
    assert domain.findtext("name") == "vm"
    assert domain.find(f"metadata/{{{KVMTASKS_NS}}}part") is not None
    assert (domain.find("memory").attrib["unit"], domain.findtext("memory")) == ("GiB", "2")  # type: ignore[union-attr]
    assert domain.findtext("vcpu") == "2"
    disk = domain.find("devices/disk")
    assert disk is not None
    assert disk.find("source").attrib == {"pool": "pool", "volume": "vm-disk.img"}  # type: ignore[union-attr]
    assert disk.find("driver").attrib["type"] == "qcow2"  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    assert disk.find("transient") is not None
    assert domain.find("devices/serial/source").attrib["path"] == "/run/vm/console.log"  # type: ignore[union-attr]
    assert domain.find("devices/graphics").attrib["port"] == "5903"  # type: ignore[union-attr]
    assert domain.find("devices/video/model").attrib["type"] == "vga"  # type: ignore[union-attr]
    assert qemu_args(domain) == [
        "-netdev", "user,id=kvmtasks-net0,hostname=vm,restrict=on,"
                   "hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", "virtio-net-pci,netdev=kvmtasks-net0,bus=pci.0,addr=0x10",
        "-rtc", "base=utc",
    ]


def test_defaults_hda_and_a_redefinition(tmp_path: Path) -> None:
    part = load(tmp_path, "image_type = hda\nssh_port = 2222\n")
    domain = xml_of(part, domain_type="kvm", console_log=None, uuid="6e1b8c8e-0b7c-4d0e-8a31-6c7f7e0b7f11")

    assert domain.attrib["type"] == "kvm"
    assert domain.findtext("uuid") == "6e1b8c8e-0b7c-4d0e-8a31-6c7f7e0b7f11"
    assert (domain.find("memory").attrib["unit"], domain.findtext("memory")) == ("MiB", "512")  # type: ignore[union-attr]
    assert domain.find("devices/disk/target").attrib == {"dev": "hda", "bus": "ide"}  # type: ignore[union-attr]
    assert domain.find("devices/disk/transient") is None
    assert domain.find("devices/serial").attrib["type"] == "pty"  # type: ignore[union-attr]
    assert domain.find("devices/graphics") is None
    assert qemu_args(domain) == [
        "-netdev", "user,id=kvmtasks-net0,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", "e1000,netdev=kvmtasks-net0,bus=pci.0,addr=0x10",
    ]
    assert made_by_kvmtasks(domain_xml(part, domain_type="qemu", disk=Disk("p", "v", "raw"),
                                       listen_address="127.0.0.1", console_log=None))
    assert not made_by_kvmtasks("<domain type='kvm'><name>vm</name></domain>")


def test_values_are_xml_data_not_markup(tmp_path: Path) -> None:
    part = load(tmp_path, "kvm_extra_args =\n  -append\n  console=ttyS0 x='<y>' & \"z\"\n")
    assert qemu_args(xml_of(part))[-1] == "console=ttyS0 x='<y>' & \"z\""


def test_a_network_libvirt_cannot_carry_is_one_line(tmp_path: Path) -> None:
    from kvmtasks.errors import VmError

    part = load(tmp_path, "kvm_net =\n  tap,ifname=tap0\n")
    with pytest.raises(VmError, match="only user and nic networks work with kvm_engine = libvirt"):
        xml_of(part)


def test_remote_uris_and_the_jump_config(tmp_path: Path) -> None:
    assert remote_host("qemu:///system") is None
    remote = remote_host("qemu+ssh://root@host.example:2222/system?keyfile=/k/id&no_verify=1")
    assert remote == RemoteHost("host.example", "root", 2222, Path("/k/id"), verify_host_key=False)
    text = "\n".join(jump_entry("vm-libvirt-host", remote, tmp_path / "known hosts"))
    assert "HostName host.example" in text and "Port 2222" in text and "User root" in text
    assert 'IdentityFile "/k/id"' in text and "StrictHostKeyChecking no" in text
    assert f'UserKnownHostsFile "{tmp_path}/known hosts"' in text


@pytest.mark.parametrize(("value", "message"), [
    ("http://host/system", "not a libvirt QEMU URI"),
    ("qemu+ssh://root@host/other", "not a libvirt QEMU URI"),
    ("qemu+ssh://r%20t@host/system", "the user and host must be plain names"),
])
def test_a_bad_libvirt_uri_is_one_line(project: Project, value: str, message: str) -> None:
    project.write(f"[vm]\nfile = /srv/disk.img\nkvm_engine = libvirt\nlibvirt_uri = {value}\n")
    done = project.run("list")
    assert done.returncode == 3 and message in done.stderr and "Traceback" not in done.output


def test_the_host_paths_among_qemu_arguments() -> None:
    assert qemufiles.host_paths([
        "-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd.img", "-append", "root=/dev/vda console=/x",
        "-drive", "file=/srv/a,,b.img,format=raw,if=virtio", "-fw_cfg", "name=opt/x,file=/srv/blob",
        "-rtc", "base=utc", "-kernel", "/boot/vmlinuz", "relative/file",
    ]) == [Path("/boot/vmlinuz"), Path("/boot/initrd.img"), Path("/srv/a,b.img"), Path("/srv/blob")]
    assert qemufiles.host_paths(["-append", "/boot/not-a-host-path"]) == []


def test_the_users_libvirt_runs_qemu_as() -> None:
    capabilities = """<capabilities><host>
      <secmodel><model>none</model><doi>0</doi></secmodel>
      <secmodel><model>dac</model><doi>0</doi>
        <baselabel type='kvm'>+65534:+65534</baselabel><baselabel type='qemu'>+65534:+65534</baselabel>
      </secmodel></host></capabilities>"""
    (nobody,) = qemufiles.qemu_users(capabilities)
    assert (nobody.name, nobody.uid) == ("nobody", 65534) and 65534 in nobody.gids
    (unnamed,) = qemufiles.qemu_users(capabilities.replace("+65534:+65534", "+4000000:+4000001"))
    assert unnamed == User("uid 4000000", 4000000, frozenset({4000001}))
    assert qemufiles.qemu_users("<capabilities><host/></capabilities>") == []


# ---- real libvirtd ----


def _virsh(*args: str, uri: str = "qemu:///system") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """A running libvirtd on qemu:///system, started (and stopped) here when none runs."""
    if os.geteuid() != 0:
        pytest.skip("libvirt's system daemon needs root")
    if shutil.which("libvirtd") is None or shutil.which("virsh") is None:
        pytest.skip("libvirt is not installed (./dev installs libvirt-daemon-system)")
    kvm = Path("/dev/kvm")
    if kvm.exists() and kvm.stat().st_mode & 0o060 == 0:
        # Without udev /dev/kvm stays root-only: libvirt then finds its cached QEMU
        # capabilities stale on every call and re-probes QEMU for ~50 s. udev's usual mode.
        shutil.chown(kvm, group="kvm")
        kvm.chmod(0o660)
    started = []
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True, check=False).returncode != 0:
            subprocess.run([daemon, "-d"], check=True)
            started.append(daemon)
    deadline = time.monotonic() + 30
    while _virsh("version").returncode != 0:
        assert time.monotonic() < deadline, "libvirtd did not answer within 30 s"
        time.sleep(0.2)
    try:
        yield
    finally:
        for daemon in reversed(started):
            subprocess.run(["pkill", "-x", daemon], check=False)


@pytest.fixture
def pool(libvirtd: None) -> Iterator[str]:
    """A storage pool of this test's own, removed with its volumes afterwards."""
    name = f"kvmtasks-test-{uuid.uuid4().hex[:8]}"
    yield name
    for line in _virsh("vol-list", name).stdout.splitlines():
        if line.split():
            _virsh("vol-delete", "--pool", name, line.split()[0])
    _virsh("pool-destroy", name)
    _virsh("pool-undefine", name)
    shutil.rmtree(f"/var/lib/libvirt/{name}", ignore_errors=True)


@pytest.fixture
def domain_name(libvirtd: None) -> Iterator[str]:
    """A unique part (and domain) name; the domain is destroyed and undefined afterwards."""
    name = f"lv{uuid.uuid4().hex[:8]}"
    yield name
    _virsh("destroy", name)
    _virsh("undefine", "--snapshots-metadata", "--managed-save", name)


def libvirt_config(guest: Guest, name: str, source: str, pool: str, ssh_port: int, extra: str = "") -> str:
    return (
        f"[{name}]\n{source}\n"
        "kvm_engine = libvirt\n"
        f"libvirt_pool = {pool}\n"
        f"ssh_port = {ssh_port}\n"
        f"ssh_key_path = {guest.key}\n"
        "kvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 180\nkvm_shutdown_timeout = 3\n"
        "kvm_net =\n  user,restrict=on\n  nic,model=virtio\n"
        f"{extra}"
    )


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_a_part_runs_on_local_libvirt(project: Project, guest: Guest, http_server: FileServer,
                                       pool: str, domain_name: str, tmp_path: Path) -> None:
    name = domain_name
    url = http_server.put("v1/guest.img", guest.image.path.read_bytes())
    ssh_port = free_port()
    project.write(libvirt_config(guest, name, f"image = {url}", pool, ssh_port))

    started = project.run(f"start:{name}", timeout=400)
    assert started.returncode == 0, started.describe()
    assert "uploading guest.img" in started.stdout and f"{name} is running (libvirt domain" in started.stdout
    assert _virsh("domstate", name).stdout.strip() == "running"
    assert made_by_kvmtasks(_virsh("dumpxml", name).stdout)
    assert _virsh("vol-info", "--pool", pool, f"{name}-guest.img").returncode == 0
    # The guest boots a qcow2 overlay volume backed by the image's volume.
    overlay = ET.fromstring(_virsh("vol-dumpxml", "--pool", pool, f"{name}.overlay.qcow2").stdout)
    assert overlay.find("target/format").attrib["type"] == "qcow2"  # type: ignore[union-attr]
    assert overlay.findtext("backingStore/path", "").endswith(f"/{name}-guest.img")
    disk = ET.fromstring(_virsh("dumpxml", name).stdout).find("devices/disk/source")
    assert disk is not None and disk.attrib["volume"] == f"{name}.overlay.qcow2"
    write = "echo kept > /mnt/kept.txt && sync"
    assert script(project, f"{name}-runscript", write).returncode == 0

    uname = script(project, f"{name}-runscript", "uname", "-r")
    assert (uname.returncode, uname.stdout.strip()) == (0, guest.image.kernel_release)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(1 << 20))
    assert script(project, f"{name}-sendfile", "/tmp/p.bin", str(payload)).returncode == 0
    assert script(project, f"{name}-getfile", "/tmp/p.bin", str(tmp_path / "back.bin")).returncode == 0
    assert (tmp_path / "back.bin").read_bytes() == payload.read_bytes()
    status = script(project, f"{name}-ctl", "status")
    assert status.returncode == 0 and "libvirt domain" in status.stdout
    facts = json.loads(script(project, f"{name}-ctl", "status", "--json").stdout)
    assert (facts["state"], facts["engine"], facts["libvirt_uri"]) == ("running", "libvirt", "qemu:///system")
    assert facts["console_log"] == str(project.var / name / "console.log")

    # A new image while the domain runs: refused, the domain runs on.
    second = http_server.put("v2/guest.img", guest.image.path.read_bytes())
    project.write(libvirt_config(guest, name, f"image = {second}", pool, ssh_port))
    refused = project.run(f"provision:{name}")
    assert refused.returncode != 0
    assert f"download:{name}: {name} is running; stop it first" in refused.stderr
    project.write(libvirt_config(guest, name, f"image = {url}", pool, ssh_port))

    stopped = script(project, f"{name}-ctl", "stop")
    assert stopped.returncode == 0
    assert stopped.stdout == f"{name} stopped (the guest powered off on the ACPI power button)\n"
    assert script(project, f"{name}-ctl", "status").returncode == 3
    assert _virsh("domstate", name).stdout.strip() == "shut off"

    # Started again: the volume holds the same bytes, so nothing is uploaded; the guest's write stays.
    again = script(project, f"{name}-ctl", "start")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "uploading" not in again.stdout
    assert script(project, f"{name}-runscript", "cat /mnt/kept.txt").stdout.strip() == "kept"
    # A reset makes a new overlay volume: the write is gone, the image volume is not uploaded again.
    assert script(project, f"{name}-ctl", "stop").returncode == 0
    assert script(project, f"{name}-ctl", "reset").returncode == 0
    fresh = script(project, f"{name}-ctl", "start")
    assert fresh.returncode == 0 and "uploading" not in fresh.stdout, fresh.stdout + fresh.stderr
    assert script(project, f"{name}-runscript", "test -e /mnt/kept.txt").returncode == 1
    # Killed from outside: status says stopped, start works again.
    assert _virsh("destroy", name).returncode == 0
    assert script(project, f"{name}-ctl", "status").returncode == 3
    assert script(project, f"{name}-ctl", "stop").stdout.strip() == f"{name} is not running"

    # destroy: the domain and the part's volumes go, and the local files of its machine;
    # the download and the verified image stay. A start after it builds the machine again.
    (part,) = load_file(project.configs[0], project.root)
    image = (part.image_path.stat().st_ino, part.image_path.read_bytes())
    destroyed = script(project, f"{name}-ctl", "destroy")
    assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
    assert f"removed libvirt domain {name} on qemu:///system" in destroyed.stdout
    for volume in (f"{name}.overlay.qcow2", f"{name}-guest.img"):
        assert f"removed volume {volume} of pool {pool}" in destroyed.stdout
    assert name not in _virsh("list", "--all", "--name").stdout.split()
    assert _virsh("vol-list", pool).stdout.split() == []
    assert sorted(p.name for p in (project.var / name).iterdir()) == ["part.json", "vm.lock"]
    assert not part.overlay_path.exists()
    assert (part.image_path.stat().st_ino, part.image_path.read_bytes()) == image
    rebuilt = project.run(f"start:{name}", timeout=400)
    assert rebuilt.returncode == 0, rebuilt.describe()
    assert "uploading guest.img" in rebuilt.stdout
    assert script(project, f"{name}-runscript", "test -e /mnt/kept.txt").returncode == 1
    by_doit = project.run(f"destroy:{name}", timeout=200)
    assert by_doit.returncode == 0 and f"removed libvirt domain {name}" in by_doit.stdout, by_doit.describe()
    assert name not in _virsh("list", "--all", "--name").stdout.split()


@pytest.mark.usefixtures("libvirtd")
def test_a_foreign_domain_of_the_same_name_is_left_alone(
    project: Project, guest: Guest, pool: str, domain_name: str, tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign.xml"
    foreign.write_text(f"<domain type='qemu'><name>{domain_name}</name><memory unit='MiB'>64</memory>"
                       "<os><type arch='x86_64'>hvm</type></os></domain>")
    assert _virsh("define", str(foreign)).returncode == 0
    before = _virsh("dumpxml", domain_name).stdout
    project.write(libvirt_config(guest, domain_name, f"file = {guest.image.path}", pool, free_port()))

    refused = project.run(f"start:{domain_name}", timeout=120)

    assert refused.returncode != 0
    assert f"a domain named {domain_name} exists on qemu:///system and was not made by kvmtasks" \
        in refused.stderr
    assert "Traceback" not in refused.output
    assert _virsh("dumpxml", domain_name).stdout == before
    # destroy leaves a domain kvmtasks did not define, and everything else, alone.
    assert project.run(f"render:{domain_name}").returncode == 0
    files = sorted(p.name for p in (project.var / domain_name).iterdir())
    kept = script(project, f"{domain_name}-ctl", "destroy")
    assert kept.returncode == 1 and "was not made by kvmtasks; it is left alone" in kept.stderr
    assert _virsh("dumpxml", domain_name).stdout == before
    assert sorted(p.name for p in (project.var / domain_name).iterdir()) == files


def test_an_unreachable_libvirt_host_is_one_line(project: Project, guest: Guest) -> None:
    if shutil.which("virsh") is None:
        pytest.skip("libvirt-clients is not installed")
    project.write(libvirt_config(guest, "vm", f"file = {guest.image.path}", "kvmtasks", free_port(),
                                 "libvirt_uri = qemu+ssh://root@127.0.0.1:1/system?no_verify=1\n"))

    refused = project.run("start:vm", timeout=120)

    assert refused.returncode != 0
    lines = refused.error_lines("start:vm:")
    assert len(lines) == 1 and "qemu+ssh://root@127.0.0.1:1/system" in lines[0], refused.describe()
    assert "Traceback" not in refused.output


@pytest.mark.usefixtures("no_vm_left")
def test_a_pool_kvmtasks_may_not_write_is_one_line(
    project: Project, guest: Guest, pool: str, domain_name: str, tmp_path: Path
) -> None:
    """A pool the URI's user may not write to. Everything here runs as root, whom libvirt lets
    do anything, so the pool's folder is a read-only mount: libvirt fails the same way."""
    folder = tmp_path / "read-only-pool"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
    try:
        assert _virsh("pool-define-as", pool, "dir", "--target", str(folder)).returncode == 0
        assert _virsh("pool-start", pool).returncode == 0
        project.write(libvirt_config(guest, domain_name, f"file = {guest.image.path}", pool,
                                     free_port()))

        refused = project.run(f"start:{domain_name}", timeout=120)

        assert refused.returncode != 0
        lines = refused.error_lines(f"start:{domain_name}:")
        assert len(lines) == 1, refused.describe()
        assert "Read-only file system" in lines[0] and "qemu:///system" in lines[0], lines[0]
        assert "Traceback" not in refused.output
        assert _virsh("domstate", domain_name).returncode != 0  # nothing was defined
    finally:
        _virsh("pool-destroy", pool)
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


@pytest.fixture
def loopback_sshd(tmp_path: Path, libvirtd: None) -> Iterator[tuple[int, Path, Path]]:
    """A real sshd for root on a loopback port: (port, client key, its log)."""
    sshd = shutil.which("sshd", path="/usr/sbin:/usr/bin")
    if sshd is None:
        pytest.skip("openssh-server is not installed (./dev installs it)")
    folder = tmp_path / "sshd"
    folder.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "client")], check=True)
    (folder / "authorized_keys").write_text((folder / "client.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation folder
    port, log = free_port(), folder / "sshd.log"
    daemon = subprocess.Popen([
        sshd, "-D", "-e", "-p", str(port), "-h", str(folder / "host"),
        "-o", "ListenAddress=127.0.0.1", "-o", f"AuthorizedKeysFile={folder / 'authorized_keys'}",
        "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", "PermitRootLogin=prohibit-password",
        "-o", "LogLevel=VERBOSE",
    ], stderr=open(log, "w"))  # noqa: SIM115 - closed with the process
    try:
        deadline = time.monotonic() + 20
        while b"Server listening" not in log.read_bytes():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield port, folder / "client", log
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_a_part_runs_on_a_remote_libvirt_host_through_ssh(
    project: Project, guest_with_shares: Guest, pool: str, domain_name: str,
    loopback_sshd: tuple[int, Path, Path], tmp_path: Path,
) -> None:
    """The guest reached through the libvirt host; its share (auto) a folder copied over the same
    connection, pushed again and pulled back by PART-sync."""
    guest = guest_with_shares
    port, key, log = loopback_sshd
    uri = f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={key}&no_verify=1"
    image = tmp_path / "guest.img"
    shutil.copyfile(guest.image.path, image)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("a\n")
    project.write(libvirt_config(guest, domain_name, f"file = {image}", pool, free_port(),
                                 f"libvirt_uri = {uri}\nshare =\n  {source} /srv/src\n"))

    started = project.run(f"start:{domain_name}", timeout=400)
    assert started.returncode == 0, started.describe()
    assert f"on {uri}" in started.stdout
    logins = log.read_text().count("Accepted publickey")

    uname = script(project, f"{domain_name}-runscript", "uname", "-r")
    assert (uname.returncode, uname.stdout.strip()) == (0, guest.image.kernel_release)
    # The guest was reached through the libvirt host: one more login there, forwarding to the guest.
    assert log.read_text().count("Accepted publickey") > logins
    # The console log is written on the libvirt host: status says there is none here, console why.
    facts = json.loads(script(project, f"{domain_name}-ctl", "status", "--json").stdout)
    assert (facts["libvirt_uri"], facts["console_log"]) == (uri, None)
    console = script(project, f"{domain_name}-ctl", "console")
    assert (console.returncode, console.stderr) == (
        1, f"{domain_name}-ctl: the serial console of {domain_name} is logged on its libvirt host "
           f"({uri}), not here\n")
    # The share: no live device on a remote host (the domain has none), a copy by rsync instead.
    assert [(s["guest"], s["carried_by"]) for s in facts["shares"]] == [("/srv/src", "rsync")]
    assert ET.fromstring(_virsh("dumpxml", domain_name).stdout).findall("devices/filesystem") == []
    in_guest = script(project, f"{domain_name}-runscript", "cat /srv/src/a.txt")
    assert (in_guest.returncode, in_guest.stdout) == (0, "a\n"), in_guest.stderr
    (source / "b.txt").write_text("b\n")
    pushed = script(project, f"{domain_name}-sync")
    assert pushed.returncode == 0 and "(rsync)" in pushed.stdout, pushed.stdout + pushed.stderr
    worked = script(project, f"{domain_name}-runscript",
                    "cat /srv/src/b.txt && echo result > /srv/src/result.txt && rm /srv/src/a.txt")
    assert (worked.returncode, worked.stdout) == (0, "b\n"), worked.stderr
    pulled = script(project, f"{domain_name}-sync", "--pull")
    assert pulled.returncode == 0 and "/srv/src -> " in pulled.stdout, pulled.stdout + pulled.stderr
    assert sorted(p.name for p in source.iterdir()) == ["b.txt", "result.txt"]
    assert (source / "result.txt").read_text() == "result\n"

    # Any ssh tool reaches the guest through the part's ssh config, by the same jump.
    config = project.var / domain_name / "ssh_config"
    assert facts["ssh_config"] == str(config)
    logins = log.read_text().count("Accepted publickey")
    assert script(project, f"{domain_name}-ctl", "status").returncode == 0
    through = subprocess.run(["ssh", "-F", str(config), domain_name, "uname", "-r"], capture_output=True,
                             text=True, timeout=120, check=False)
    assert (through.returncode, through.stdout.strip()) == (0, guest.image.kernel_release), through.stderr
    assert log.read_text().count("Accepted publickey") > logins
    copied = tmp_path / "copied"
    assert subprocess.run(["scp", "-F", str(config), f"{domain_name}:/proc/version", str(copied)],
                          capture_output=True, timeout=120, check=False).returncode == 0
    assert guest.image.kernel_release in copied.read_text()

    stopped = script(project, f"{domain_name}-ctl", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert script(project, f"{domain_name}-ctl", "status").returncode == 3
    # destroy on the remote host: the domain and the volumes there go, the file stays.
    destroyed = script(project, f"{domain_name}-ctl", "destroy")
    assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
    assert f"removed libvirt domain {domain_name} on {uri}" in destroyed.stdout
    assert domain_name not in _virsh("list", "--all", "--name").stdout.split()
    assert _virsh("vol-list", pool).stdout.split() == []
    assert image.read_bytes() == guest.image.path.read_bytes()


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_a_libvirt_guest_that_ignores_acpi_is_powered_off_over_ssh(
    project: Project, guest_without_acpi: Guest, pool: str, domain_name: str, tmp_path: Path
) -> None:
    image = tmp_path / "guest.img"
    shutil.copyfile(guest_without_acpi.image.path, image)
    project.write(libvirt_config(guest_without_acpi, domain_name, f"file = {image}", pool, free_port())
                  .replace("kvm_shutdown_timeout = 3", "kvm_shutdown_timeout = 30"))
    started = project.run(f"start:{domain_name}", timeout=400)
    assert started.returncode == 0, started.describe()

    began = time.monotonic()
    stopped = script(project, f"{domain_name}-ctl", "stop")
    took = time.monotonic() - began
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == (f"{domain_name} stopped (the guest ignored the ACPI power button and "
                              "powered off when asked over ssh)\n")
    assert took < 30, f"stop took {took:.1f} s: it waited for kvm_shutdown_timeout"
    assert _virsh("domstate", domain_name).stdout.strip() == "shut off"


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_a_file_libvirts_qemu_cannot_read_is_one_line_before_anything_is_defined(
    project: Project, guest: Guest, pool: str, domain_name: str, shared_folder: Path,
) -> None:
    """QEMU opens the files in kvm_extra_args itself, as libvirt's user for it: one it cannot
    reach is refused first, naming it; the ACL the message suggests lets QEMU in."""
    private = shared_folder / "private"
    private.mkdir(mode=0o700)
    blob = private / "blob.bin"
    blob.write_bytes(b"kvmtasks\n")
    blob.chmod(0o644)
    extra = f"kvm_extra_args =\n  -fw_cfg\n  name=opt/kvmtasks/blob,file={blob}\n"
    project.write(libvirt_config(guest, domain_name, f"file = {guest.image.path}", pool, free_port(), extra))
    (user,) = qemufiles.qemu_users(_virsh("capabilities").stdout)

    refused = project.run(f"start:{domain_name}", timeout=120)

    assert refused.returncode != 0
    (line,) = refused.error_lines(f"start:{domain_name}:")
    assert line == (
        f"ERROR: start:{domain_name}: kvm_extra_args names {blob}, which libvirt's QEMU cannot read: "
        f"it runs as {user.name} on qemu:///system and lacks x permission on the folder {private}; "
        f"grant it (say, setfacl -m u:{user.name}:x {private}) or move the file where {user.name} "
        "can read it"), refused.describe()
    assert "uploading" not in refused.stdout and "Traceback" not in refused.output
    assert domain_name not in _virsh("list", "--all", "--name").stdout.split()

    # The grant the message suggests: QEMU, which refuses to start without the file, reads it.
    grant_search(private, user.uid)
    started = project.run(f"start:{domain_name}", timeout=400)
    assert started.returncode == 0, started.describe()
    assert _virsh("domstate", domain_name).stdout.strip() == "running"
    assert script(project, f"{domain_name}-ctl", "stop").returncode == 0


def test_the_seed_is_a_read_only_ide_cdrom(tmp_path: Path) -> None:
    part = load(tmp_path, "ssh_port = 2222\n")
    domain = xml_of(part, seed=Disk("pool", "vm-seed.iso", "raw"))

    disk, cdrom = domain.findall("devices/disk")
    assert disk.attrib["device"] == "disk"
    assert cdrom.attrib == {"type": "volume", "device": "cdrom", "snapshot": "no"}
    assert cdrom.find("source").attrib == {"pool": "pool", "volume": "vm-seed.iso"}  # type: ignore[union-attr]
    assert cdrom.find("driver").attrib["type"] == "raw"  # type: ignore[union-attr]
    assert cdrom.find("target").attrib == {"dev": "hdc", "bus": "ide"}  # type: ignore[union-attr]
    assert cdrom.find("readonly") is not None
    assert len(xml_of(part).findall("devices/disk")) == 1


@dataclass(frozen=True)
class CloudGuest:
    """The cloud-init Debian guest, and the folder its kernel and initramfs are read from."""

    guest: DebianGuest
    boot: Path


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder of the test's own that every user may enter (libvirt's QEMU runs as its own user,
    and the checkout may lie in a folder only its owner may enter, as under /root); removed after."""
    folder = Path(tempfile.mkdtemp(prefix="kvmtasks-shared-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def cloud(shared_folder: Path) -> CloudGuest:
    """The cloud-init Debian guest, its kernel and initramfs copied where libvirt's QEMU can read
    them: QEMU opens the -kernel and -initrd files itself, not through libvirt."""
    built = debian_guest_or_skip(CLOUD_INIT)
    for file in (built.kernel, built.initrd):
        shutil.copyfile(file, shared_folder / file.name)
        (shared_folder / file.name).chmod(0o644)
    return CloudGuest(built, shared_folder)


def cloud_part(cloud: CloudGuest, name: str, pool: str, extra: str) -> str:
    """A libvirt part booting the cloud-init Debian guest with a seed, reached by 127.0.0.1 only."""
    extra_args = "".join(f"  {arg}\n" for arg in cloud.guest.kvm_extra_args(cloud.boot))
    return (
        f"[{name}]\nfile = {cloud.guest.image}\nkvm_engine = libvirt\nlibvirt_pool = {pool}\n"
        f"ssh_port = {free_port()}\ncloud_init = true\n{extra}"
        "kvm_memory = 1G\nkvm_accel = tcg\nkvm_boot_timeout = 400\nkvm_shutdown_timeout = 10\n"
        f"kvm_net =\n  user,restrict=on\n  nic,model=virtio\nkvm_extra_args =\n{extra_args}"
    )


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
@pytest.mark.timeout(1800)  # a cold image build (~4 min) and a cloud-init boot under TCG
def test_a_cloud_image_gets_its_seed_on_libvirt(project: Project, pool: str, domain_name: str,
                                                 cloud: CloudGuest) -> None:
    """The cloud-init Debian guest (no key, no host key inside) on libvirt: its seed is uploaded
    as a volume, the guest is reached with the key kvmtasks made and the host key it pinned."""
    name = domain_name
    (project.root / "user-data").write_text("#cloud-config\nruncmd:\n  - [touch, /root/from-user-data]\n")
    config_file = project.write(
        cloud_part(cloud, name, pool, "cloud_init_user_data = user-data\n"))

    started = project.run(f"start:{name}", timeout=900)

    assert started.returncode == 0, started.describe()
    assert "uploading seed.iso" in started.stdout and "warning" not in started.output, started.describe()
    seed = ET.fromstring(_virsh("dumpxml", name).stdout).find("devices/disk[@device='cdrom']")
    assert seed is not None and seed.find("readonly") is not None
    assert seed.find("source").attrib["volume"] == f"{name}-seed.iso"  # type: ignore[union-attr]
    assert _virsh("vol-info", "--pool", pool, f"{name}-seed.iso").returncode == 0

    def guest(command: str) -> str:
        done = script(project, f"{name}-runscript", command)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    assert guest("id -un") == "root"
    assert guest("cloud-init status") == "status: done"
    assert guest("ls /root/from-user-data") == "/root/from-user-data"
    assert guest("blkid -L cidata") == "/dev/sr0"
    # The one host key is the one kvmtasks made, checked strictly from the first login on.
    (part,) = load_file(config_file, project.root)
    ours = keys.read_public(seedrules.host_key_path(part)).split()[:2]
    assert guest("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2] == ours
    # Every ssh of the scripts reads the part's ssh config, which checks the host key strictly.
    status = json.loads(script(project, f"{name}-ctl", "status", "--json").stdout)
    assert status["ssh_command"][1:3] == ["-F", status["ssh_config"]]
    assert "StrictHostKeyChecking yes" in Path(status["ssh_config"]).read_text()
    assert script(project, f"{name}-ctl", "stop").returncode == 0


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_warm_starts_on_libvirt(project: Project, guest: Guest, http_server: FileServer,
                                pool: str, domain_name: str) -> None:
    """suspend is a managed save, snapshots are the domain's internal ones in its overlay volume.
    The busybox guest's / and /tmp live in memory, /mnt is its disk."""
    name = domain_name
    url = http_server.put("guest.img", guest.image.path.read_bytes())
    project.write(libvirt_config(guest, name, f"image = {url}", pool, free_port()))
    assert project.run(f"start:{name}", timeout=400).returncode == 0

    def guest_run(command: str) -> subprocess.CompletedProcess[str]:
        return script(project, f"{name}-runscript", command)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        done = script(project, f"{name}-ctl", *args)
        assert done.returncode in (0, 3), done.stdout + done.stderr
        return done

    assert guest_run("echo one > /tmp/mem && echo one > /mnt/disk && sync && "
                     "(sleep 100000 </dev/null >/dev/null 2>&1 & echo $! > /tmp/sleeper)").returncode == 0

    # suspend: the domain's managed save; status says suspended; start resumes it.
    suspended = ctl("suspend")
    assert suspended.stdout == (f"{name} suspended (libvirt managed save on qemu:///system); "
                                "start resumes it\n")
    assert "Managed save:   yes" in _virsh("dominfo", name).stdout
    status = ctl("status")
    assert (status.returncode, status.stdout) == (3, f"{name} is suspended; start resumes it\n")
    assert json.loads(ctl("status", "--json").stdout)["state"] == "suspended"
    resumed = ctl("start")
    assert f"{name} resumed (libvirt domain {name}" in resumed.stdout, resumed.stdout
    assert guest_run("kill -0 $(cat /tmp/sleeper) && cat /tmp/mem /mnt/disk").stdout == "one\none\n"
    assert "Managed save:   no" in _virsh("dominfo", name).stdout

    # snapshot, a change, revert: memory and disk come back, the change is gone.
    saved = ctl("snapshot", "save", "ready")
    assert saved.stdout == f"{name}: snapshot ready saved (libvirt domain {name} on qemu:///system)\n"
    assert guest_run("echo two > /tmp/mem && echo two > /mnt/disk && sync && kill $(cat /tmp/sleeper)"
                     ).returncode == 0
    listed = ctl("snapshot", "list").stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["NAME", "ready"] and listed[1].endswith(" -")
    restored = ctl("snapshot", "restore", "ready")
    assert restored.stdout.endswith(f"{name}: restored snapshot ready\n"), restored.stdout
    assert guest_run("kill -0 $(cat /tmp/sleeper) && cat /tmp/mem /mnt/disk").stdout == "one\none\n"

    # A stopped domain starts from the snapshot; a suspended one's state is replaced by it.
    assert guest_run("echo three > /mnt/disk && sync").returncode == 0
    assert ctl("stop").returncode == 0
    from_stopped = ctl("snapshot", "restore", "ready")
    assert "started from snapshot ready" in from_stopped.stdout, from_stopped.stdout + from_stopped.stderr
    assert guest_run("cat /tmp/mem /mnt/disk").stdout == "one\none\n"
    assert ctl("status").returncode == 0

    # stop of a suspended domain discards its state; delete leaves no snapshot.
    assert ctl("suspend").returncode == 0
    stopped = ctl("stop")
    assert stopped.stdout == f"{name} was suspended: its saved state is discarded, {name} is stopped\n"
    assert "Managed save:   no" in _virsh("dominfo", name).stdout
    assert ctl("snapshot", "delete", "ready").stdout == f"{name}: snapshot ready deleted\n"
    assert ctl("snapshot", "list").stdout.startswith("no snapshots of libvirt domain")
    assert _virsh("snapshot-list", name, "--name").stdout.strip() == ""

    # A state saved with other kvm_* values does not fit: discarded with a notice, a cold boot.
    assert ctl("start").returncode == 0 and ctl("suspend").returncode == 0
    project.write(libvirt_config(guest, name, f"image = {url}", pool, free_port(), "kvm_smp = 2\n"))
    changed = project.run(f"start:{name}", timeout=400)
    assert changed.returncode == 0, changed.describe()
    assert (f"{name}: the suspended state is discarded, the part changed since (re-provisioned, reset, "
            "or kvm_* options); booting afresh") in changed.stdout
    assert guest_run("test -e /tmp/mem").returncode == 1 and guest_run("nproc").stdout == "2\n"


SS_OUTPUT = """\
tcp   LISTEN 0      128          0.0.0.0:2024       0.0.0.0:*
tcp   LISTEN 0      5          127.0.0.1:2222       0.0.0.0:*    users:(("sshd",pid=812,fd=3))
tcp   LISTEN 0 4096 [::]:8080 [::]:* users:(("nginx",pid=9,fd=6),("nginx",pid=10,fd=6))
udp   UNCONN 0      0      127.0.0.53%lo:53         0.0.0.0:*    users:(("systemd-resolve",pid=7,fd=13))
"""


def test_the_listeners_ss_reports_on_a_remote_host() -> None:
    listeners = hostports.parse_ss(SS_OUTPUT)
    assert listeners == [
        hostports.Listener("tcp", "0.0.0.0", 2024, ""),
        hostports.Listener("tcp", "127.0.0.1", 2222, "sshd (pid 812)"),
        hostports.Listener("tcp", "[::]", 8080, "nginx (pid 9)"),
        hostports.Listener("udp", "127.0.0.53", 53, "systemd-resolve (pid 7)"),
    ]
    assert hostports.clash(listeners, "tcp", "127.0.0.1", 2222) == listeners[1]
    assert hostports.clash(listeners, "tcp", "127.0.0.1", 2024) == listeners[0]  # every address
    assert hostports.clash(listeners, "tcp", "127.0.0.1", 8080) == listeners[2]
    assert hostports.clash(listeners, "udp", "127.0.0.1", 2222) is None
    assert hostports.clash(listeners, "tcp", "127.0.0.1", 53) is None
    assert hostports.clash(listeners, "udp", "127.0.0.1", 53) is None  # another address


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something on this machine listens on, as a forgotten server would."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_forwarded_port_in_use_on_the_libvirt_host_is_one_line(
    project: Project, guest: Guest, pool: str, domain_name: str, held_port: int,
) -> None:
    project.write(libvirt_config(guest, domain_name, f"file = {guest.image.path}", pool, held_port))

    refused = project.run(f"start:{domain_name}", timeout=120)

    assert refused.returncode != 0
    (line,) = refused.error_lines(f"start:{domain_name}:")
    assert line == (f"ERROR: start:{domain_name}: host port {held_port} (tcp on 127.0.0.1) is already in use "
                    f"by {Path(sys.executable).name} (pid {os.getpid()})"), refused.describe()
    assert domain_name not in _virsh("list", "--all", "--name").stdout.split()  # nothing defined


def test_a_forwarded_port_in_use_on_a_remote_libvirt_host_is_one_line(
    project: Project, guest: Guest, pool: str, domain_name: str, held_port: int,
    loopback_sshd: tuple[int, Path, Path],
) -> None:
    port, key, _ = loopback_sshd
    uri = f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={key}&no_verify=1"
    project.write(libvirt_config(guest, domain_name, f"file = {guest.image.path}", pool, held_port,
                                 f"libvirt_uri = {uri}\n"))

    refused = project.run(f"start:{domain_name}", timeout=120)

    assert refused.returncode != 0
    (line,) = refused.error_lines(f"start:{domain_name}:")
    assert line.startswith(f"ERROR: start:{domain_name}: host port {held_port} (tcp on 127.0.0.1) is "
                           "already in use on the libvirt host 127.0.0.1 by "), refused.describe()
    assert line.endswith(f"(pid {os.getpid()})")
    assert domain_name not in _virsh("list", "--all", "--name").stdout.split()


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_kvm_accel_auto_on_libvirt_starts_a_guest_that_answers(
    project: Project, guest: Guest, pool: str, domain_name: str, tmp_path: Path
) -> None:
    """auto asks the host's domcapabilities for kvm; on a host where guests die or hang under KVM
    (nested virtualisation, as on the test machines) the domain is started again under TCG."""
    image = tmp_path / "guest.img"
    shutil.copyfile(guest.image.path, image)
    project.write(libvirt_config(guest, domain_name, f"file = {image}", pool, free_port())
                  .replace("kvm_accel = tcg", "kvm_accel = auto"))

    started = project.run(f"start:{domain_name}", timeout=600)

    assert started.returncode == 0, started.describe()
    facts = json.loads(script(project, f"{domain_name}-ctl", "status", "--json").stdout)
    offered = _virsh("domcapabilities", "--virttype", "kvm").returncode == 0
    fell_back = f"{domain_name}: the guest stopped under KVM" in started.stdout
    assert facts["accelerator"] == ("kvm" if offered and not fell_back else "tcg"), started.describe()
    domain_type = ET.fromstring(_virsh("dumpxml", domain_name).stdout).attrib["type"]
    assert domain_type == ("kvm" if facts["accelerator"] == "kvm" else "qemu")
    uname = script(project, f"{domain_name}-runscript", "uname", "-r")
    assert (uname.returncode, uname.stdout.strip()) == (0, guest.image.kernel_release)
    assert script(project, f"{domain_name}-ctl", "stop").returncode == 0


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
@pytest.mark.timeout(1800)
def test_a_cloud_image_gets_its_seed_on_a_remote_libvirt_host(
    project: Project, pool: str, domain_name: str, loopback_sshd: tuple[int, Path, Path],
    cloud: CloudGuest,
) -> None:
    """The same seed through qemu+ssh: uploaded over the libvirt connection, the guest reached
    through the host with the pinned host key; a second start uploads nothing."""
    port, key, _ = loopback_sshd
    uri = f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={key}&no_verify=1"
    name = domain_name
    project.write(cloud_part(cloud, name, pool, f"libvirt_uri = {uri}\n"))

    started = project.run(f"start:{name}", timeout=900)

    assert started.returncode == 0, started.describe()
    assert "uploading seed.iso" in started.stdout and f"on {uri}" in started.stdout
    assert "warning" not in started.output, started.describe()
    whoami = script(project, f"{name}-runscript", "id -un && cloud-init status")
    assert whoami.stdout == "root\nstatus: done\n", whoami.stdout + whoami.stderr
    assert script(project, f"{name}-ctl", "stop").returncode == 0

    again = script(project, f"{name}-ctl", "start", timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "uploading" not in again.stdout
    assert script(project, f"{name}-runscript", "cloud-init status").stdout == "status: done\n"
    assert script(project, f"{name}-ctl", "stop").returncode == 0


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_a_live_9p_share_on_local_libvirt(project: Project, guest_with_shares: Guest, pool: str,
                                          domain_name: str, shared_folder: Path) -> None:
    """The domain carries the share as <filesystem accessmode='mapped'>; mounted over ssh. A folder
    libvirt's QEMU cannot open is refused first, in one line."""
    name = domain_name
    live, readonly = shared_folder / "live", shared_folder / "ro"
    for folder in (live, readonly):
        folder.mkdir()
    (live / "hello.txt").write_text("hello\n")
    (readonly / "fixed.txt").write_text("fixed\n")
    extra = f"share =\n  {live} /srv/live\n  {readonly} /srv/ro ro\n"
    config = project.write(libvirt_config(guest_with_shares, name, f"file = {guest_with_shares.image.path}",
                                          pool, free_port(), extra))
    (user,) = qemufiles.qemu_users(_virsh("capabilities").stdout)
    # A folder libvirt's QEMU cannot list: one line before anything is defined.
    live.chmod(0o700)
    refused = project.run(f"start:{name}", timeout=120)
    assert refused.returncode != 0
    assert refused.error_lines(f"start:{name}:") == [
        f"ERROR: start:{name}: {config}: [{name}] share: line '{live} /srv/live auto': libvirt's QEMU "
        f"cannot open the folder {live}: it runs as {user.name} on qemu:///system and lacks r "
        f"permission on the folder {live}; grant it (say, setfacl -m u:{user.name}:r {live}) or share "
        f"a folder {user.name} can open"], refused.describe()
    assert name not in _virsh("list", "--all", "--name").stdout.split()
    live.chmod(0o777)  # libvirt's QEMU, its own user, writes there

    started = project.run(f"start:{name}", timeout=400)
    assert started.returncode == 0, started.describe()
    filesystems = ET.fromstring(_virsh("dumpxml", name).stdout).findall("devices/filesystem")
    assert [fs.find("target").attrib["dir"] for fs in filesystems] == ["kvmtasks0", "kvmtasks1"]  # type: ignore[union-attr]
    facts = json.loads(script(project, f"{name}-ctl", "status", "--json").stdout)
    assert [share["carried_by"] for share in facts["shares"]] == ["9p", "9p"]
    assert script(project, f"{name}-runscript", "cat /srv/live/hello.txt").stdout == "hello\n"
    (live / "new.txt").write_text("from the host\n")
    assert script(project, f"{name}-runscript", "cat /srv/live/new.txt").stdout == "from the host\n"
    assert script(project, f"{name}-runscript", "echo back > /srv/live/back.txt").returncode == 0
    assert (live / "back.txt").read_text() == "back\n"
    assert (live / "back.txt").stat().st_uid == user.uid  # the user libvirt runs QEMU as
    assert script(project, f"{name}-runscript", "touch /srv/ro/new").returncode != 0
    assert sorted(p.name for p in readonly.iterdir()) == ["fixed.txt"]
    assert script(project, f"{name}-ctl", "stop").returncode == 0
