"""Option share: parsing, the config-time checks, the part's JSON and what status says (no VM)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from kvmtasks.config import partjson
from kvmtasks.config.loader import load_file, load_parts
from kvmtasks.config.part import Part
from kvmtasks.config.shares import Carrier, Share, parse_shares
from kvmtasks.engines import sharing
from kvmtasks.engines.libvirt.domain import Disk, domain_xml
from kvmtasks.engines.qemu import virtiofs
from kvmtasks.engines.qemu.argv import qemu_argv
from kvmtasks.engines.statusreport import Facts, ShareFact, State, as_json, describe
from kvmtasks.errors import ConfigError
from kvmtasks.guest import copies, mounts

IMAGE = "http://127.0.0.1:9/images/disk.img"


def test_a_share_line_gives_its_folders_flags_and_excludes() -> None:
    shares = parse_shares("\n  src /srv/src\n  'my docs' /home/u/docs/ ro 9p\n"
                          "  out /out rsync exclude=*.o exclude=.git\n")

    assert shares == (
        Share("src", "/srv/src"),
        Share("my docs", "/home/u/docs", read_only=True, carrier=Carrier.NINEP),
        Share("out", "/out", carrier=Carrier.RSYNC, excludes=("*.o", ".git")),
    )
    assert shares[1].line() == "'my docs' /home/u/docs ro 9p"


@pytest.mark.parametrize(("value", "needle"), [
    ("src", "is not HOSTDIR GUESTDIR"),
    ("src srv/src", "GUESTDIR 'srv/src' must be an absolute path"),
    ("src /srv/../etc", "plain absolute path"),
    ("src /", "cannot be /"),
    ("src /srv rw", "unknown flag 'rw'"),
    ("src /srv exclude=", "unknown flag 'exclude='"),
    ("src /srv 9p rsync", "not 9p and rsync"),
    ("src /srv 9p exclude=*.o", "exclude= applies to copied folders"),
    ("a /srv\nb /srv/", "GUESTDIR /srv is already shared"),
    ("'src /srv", "No closing quotation"),
])
def test_a_bad_share_line_is_refused(value: str, needle: str) -> None:
    with pytest.raises(ValueError, match=None) as error:
        parse_shares(value)
    assert needle in str(error.value)


def _config_error(tmp_path: Path, share: str) -> str:
    path = tmp_path / "bad.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n[vm]\nimage = {IMAGE}\nssh_port = 2222\n"
                    f"share =\n  {share}\n")
    with pytest.raises(ConfigError) as error:
        load_parts([path], cwd=tmp_path)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(path) in message and "[vm] share" in message
    return message


@pytest.mark.parametrize(("share", "needle"), [
    ("missing /srv", "does not exist"),
    ("file.txt /srv", "is not a folder"),
    ("src relative/dir", "must be an absolute path"),
    ("src /a\n  other /a", "GUESTDIR /a is already shared"),
    ("src /a sync", "unknown flag 'sync'"),
])
def test_bad_shares_are_one_line_naming_file_section_option_and_line(
    tmp_path: Path, share: str, needle: str,
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "file.txt").write_text("x")

    assert needle in _config_error(tmp_path, share)


def test_host_folders_are_relative_to_the_buildout_directory_and_survive_the_json(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[buildout]\ndirectory = {tmp_path}\n[vm]\nimage = {IMAGE}\n"
                      "ssh_port = 2222\nshare =\n  src /srv ro rsync exclude=*.tmp\n")

    (part,) = load_file(config, Path("/nonexistent-cwd"))

    assert part.shares == (Share(str(tmp_path / "src"), "/srv", True, Carrier.RSYNC, ("*.tmp",)),)
    assert partjson.from_json(partjson.to_json(part)) == part
    old = json.loads(partjson.to_json(part))
    del old["shares"]  # a part.json written before the option existed still loads
    assert partjson.from_json(json.dumps(old)).shares == ()


FACTS = Facts(part="web", state=State.RUNNING, engine="qemu", libvirt_uri=None, pid=42, accelerator="tcg",
              forwards=(), vnc=None, ssh_command=None, console_log=None, disks={},
              shares=(ShareFact("/h/src", "/srv", False, "auto", "9p"),
                      ShareFact("/h/doc", "/doc", True, "rsync", "tar")))


def test_status_lists_each_share_and_how_it_is_carried() -> None:
    assert describe(FACTS)[-2:] == ["  share /h/src -> /srv (read-write, auto: 9p)",
                                    "  share /h/doc -> /doc (read-only, rsync: tar)"]
    assert json.loads(as_json(FACTS))["shares"] == [
        {"host": "/h/src", "guest": "/srv", "read_only": False, "carrier": "auto", "carried_by": "9p"},
        {"host": "/h/doc", "guest": "/doc", "read_only": True, "carrier": "rsync", "carried_by": "tar"},
    ]
    stopped = replace(FACTS, state=State.STOPPED)
    assert json.loads(as_json(stopped))["shares"][0]["host"] == "/h/src"


def _part(tmp_path: Path, body: str) -> Part:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "a,b").mkdir(exist_ok=True)
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[buildout]\ndirectory = {tmp_path}\n[vm]\nfile = /srv/disk.img\nssh_port = 2222\n"
                      f"kvm_memory = 512\n{body}")
    (part,) = load_file(config, tmp_path)
    return part


def test_the_qemu_argv_carries_live_shares_and_leaves_copies_to_ssh(tmp_path: Path) -> None:
    part = _part(tmp_path, "share =\n  src /srv ro\n  a,b /vfs virtiofs\n  src /copy rsync\n")

    argv = qemu_argv(part, accel="tcg", disk_format="raw", listen_address="127.0.0.1")

    fsdev = argv[argv.index("-fsdev") + 1]
    assert fsdev == (f"local,id=kvmtasks-fs0,path={tmp_path / 'src'},security_model=mapped-xattr,"
                     "multidevs=remap,readonly=on")
    assert "virtio-9p-pci,fsdev=kvmtasks-fs0,mount_tag=kvmtasks0" in argv
    assert f"socket,id=kvmtasks-vfs1,path={tmp_path / 'var' / 'vm' / 'virtiofs1.sock'}" in argv
    assert "vhost-user-fs-pci,chardev=kvmtasks-vfs1,tag=kvmtasks1" in argv
    # virtiofsd reads the guest's memory: a shared memfd backend, its size as -m reads 512.
    assert "memory-backend-memfd,id=kvmtasks-mem,size=512M,share=on" in argv
    assert "memory-backend=kvmtasks-mem" in argv
    assert argv.count("-fsdev") == 1 and not any("kvmtasks2" in arg for arg in argv)
    daemon = virtiofs.argv(part, 1, str(tmp_path / "a,b"))
    assert f"source={tmp_path}/a\\,b" in daemon and "sandbox=namespace" in daemon


def test_local_libvirt_carries_9p_shares_in_the_domain_and_a_remote_host_copies(tmp_path: Path) -> None:
    local = _part(tmp_path, "kvm_engine = libvirt\nshare =\n  src /srv ro\n  src /copy rsync\n")
    domain = ET.fromstring(domain_xml(local, domain_type="qemu", disk=Disk("pool", "d", "qcow2"),
                                      listen_address="127.0.0.1", console_log=None))
    (filesystem,) = domain.iter("filesystem")
    assert filesystem.attrib == {"type": "mount", "accessmode": "mapped"}
    assert filesystem.find("source").attrib == {"dir": str(tmp_path / "src")}  # type: ignore[union-attr]
    assert filesystem.find("target").attrib == {"dir": "kvmtasks0"}  # type: ignore[union-attr]
    assert filesystem.find("readonly") is not None

    remote = _part(tmp_path, "kvm_engine = libvirt\nlibvirt_uri = qemu+ssh://root@h/system\n"
                             "share =\n  src /srv\n")
    assert sharing.offered(remote, remote.shares[0]) is Carrier.RSYNC
    remote_domain = domain_xml(remote, domain_type="qemu", disk=Disk("pool", "d", "qcow2"),
                               listen_address="127.0.0.1", console_log=None)
    assert not list(ET.fromstring(remote_domain).iter("filesystem"))


@pytest.mark.parametrize(("body", "needle"), [
    ("share =\n  src /srv", "set ssh_port"),
    ("ssh_port = 2222\nkvm_engine = libvirt\nlibvirt_uri = qemu+ssh://h/system\nshare =\n  src /srv 9p",
     "needs the VM on this machine"),
    ("ssh_port = 2222\nkvm_engine = libvirt\nshare =\n  src /srv virtiofs",
     "virtiofs shares need kvm_engine = qemu"),
    ("ssh_port = 2222\nshare =\n  src /srv virtiofs ro", "cannot export a folder read-only"),
])
def test_what_the_other_options_rule_out_is_one_line(tmp_path: Path, body: str, needle: str) -> None:
    (tmp_path / "src").mkdir()
    path = tmp_path / "bad.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n[vm]\nimage = {IMAGE}\n{body}\n")
    with pytest.raises(ConfigError) as error:
        load_parts([path], cwd=tmp_path)
    assert needle in str(error.value) and len(str(error.value).splitlines()) == 1
    assert str(path) in str(error.value) and "[vm] share: line" in str(error.value)


@pytest.mark.parametrize(("name", "is_dir", "patterns", "expected"), [
    ("main.o", False, ("*.o",), True),
    ("sub/deep/main.o", False, ("*.o",), True),
    ("cache", True, ("cache/",), True),
    ("cache", False, ("cache/",), False),  # a trailing / matches folders only
    ("cache/big", False, ("cache/",), True),  # what an excluded folder holds
    ("top", False, ("/top",), True),
    ("sub/top", False, ("/top",), False),  # a leading / anchors at the folder's top
    ("a/b/c.txt", False, ("a/b",), True),
    ("keep.txt", False, ("*.o", "cache/"), False),
])
def test_excludes_follow_rsyncs_rules(name: str, is_dir: bool, patterns: tuple[str, ...],
                                      expected: bool) -> None:
    assert copies.excluded(name, is_dir, patterns) is expected


@pytest.mark.parametrize(("where", "target", "inside"), [
    ("link", "sub/file", True), ("sub/link", "../file", True), ("sub/link", "../../x", False),
    ("link", "../outside", False), ("link", "/etc/passwd", False), ("a/b/link", "./../../c", True),
])
def test_a_link_stays_inside_as_rsyncs_safe_links_says(where: str, target: str, inside: bool) -> None:
    assert copies._link_stays_inside(PurePosixPath(where), target) is inside


def test_the_mount_in_the_guest_is_quoted_for_its_shell_and_goes_through_sudo(tmp_path: Path) -> None:
    share = Share("/h", "/mnt/my dir", read_only=True)
    script = mounts.mount_script(share, "kvmtasks3", Carrier.NINEP)
    assert script == ("mkdir -p -- '/mnt/my dir' && { grep -qF -- ' /mnt/my\\040dir ' /proc/mounts || "
                      "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro kvmtasks3 "
                      "'/mnt/my dir'; }")
    as_user = mounts.as_root(_part(tmp_path, "ssh_user = debian\n"), "mount x")
    assert as_user == "sudo -n sh -c 'mount x'"
    assert mounts.as_root(_part(tmp_path, ""), "mount x") == "mount x"


def test_a_copied_folder_another_user_may_not_create_is_made_through_sudo(tmp_path: Path) -> None:
    assert copies.make_folder_script(_part(tmp_path, ""), "/srv/my dir") == "mkdir -p -- '/srv/my dir'"
    assert copies.make_folder_script(_part(tmp_path, "ssh_user = debian\n"), "/srv/my dir") == (
        "mkdir -p -- '/srv/my dir' 2>/dev/null || { sudo -n mkdir -p -- '/srv/my dir'"
        " && sudo -n chown -- \"$(id -u):$(id -g)\" '/srv/my dir'; }")
