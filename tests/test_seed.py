"""The cloud-init seed: its files (read back as cloud-init reads them), the ISO volume (read back
with pycdlib and probed by blkid), the keys kvmtasks makes, and what the config refuses."""

from __future__ import annotations

import dataclasses
import email
import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from kvmtasks.config import seedrules
from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.errors import ConfigError
from kvmtasks.provision import keys
from kvmtasks.provision.seed import MERGE_TYPE, SeedInput, cloud_config, seed_files, user_data
from kvmtasks.provision.seedstep import write_seed

HOST_PRIVATE = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
                "-----END OPENSSH PRIVATE KEY-----\n")
SEED = SeedInput(
    hostname="web-1",
    user="root",
    # A comment with YAML's own syntax in it: it must arrive as written.
    authorized_key='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFaKe me@host: "quoted" # not a comment',
    host_private_key=HOST_PRIVATE,
    host_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHoSt host",
)


def config_of(text: str) -> dict[str, Any]:
    assert text.startswith("#cloud-config\n")
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def meta_data(seed: SeedInput) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(seed_files(seed)["meta-data"])
    return loaded


def load(tmp_path: Path, body: str, name: str = "vm") -> Part:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[{name}]\nfile = {tmp_path}/disk.img\n{body}")
    (part,) = load_file(path, tmp_path)
    return part


def config_error(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, body)
    message = str(raised.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{tmp_path / 'kvm.cfg'}: [vm] "), message
    return message


# -- what kvmtasks' cloud-config says ----------------------------------------------------------------

def test_root_logs_in_by_key_with_the_pinned_host_key() -> None:
    config = config_of(cloud_config(SEED))
    assert config["disable_root"] is False
    assert config["ssh_pwauth"] is False
    assert config["hostname"] == "web-1"
    assert config["users"] == [{"name": "root", "ssh_authorized_keys": [SEED.authorized_key]}]
    # Exactly kvmtasks' host key: the guest's own deleted, none generated.
    assert config["ssh_deletekeys"] is True
    assert config["ssh_genkeytypes"] == ["ed25519"]  # given below: none is generated
    assert config["ssh_keys"] == {"ed25519_private": HOST_PRIVATE, "ed25519_public": SEED.host_public_key}


def test_another_user_is_created_with_the_key_and_passwordless_sudo() -> None:
    config = config_of(cloud_config(dataclasses.replace(SEED, user="alice")))
    assert "disable_root" not in config
    assert config["users"] == [{
        "name": "alice", "shell": "/bin/bash", "lock_passwd": True, "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "ssh_authorized_keys": [SEED.authorized_key],
    }]  # fmt: skip


def test_without_user_data_of_their_own_the_user_data_is_kvmtasks_cloud_config() -> None:
    assert user_data(SEED) == cloud_config(SEED)
    assert "network-config" not in seed_files(SEED)


@pytest.mark.parametrize(("theirs", "mime_type"), [
    ("#cloud-config\nruncmd:\n  - [touch, /root/été]\n", "text/cloud-config"),
    ("#!/bin/sh\necho 'ünïcode' > /root/hello\n", "text/x-shellscript"),
])
def test_their_user_data_is_a_second_readable_part_unchanged(theirs: str, mime_type: str) -> None:
    text = user_data(dataclasses.replace(SEED, user_data=theirs))
    assert "base64" not in text
    message = email.message_from_string(text)
    assert message.get_content_type() == "multipart/mixed"
    ours, their_part = message.get_payload()
    assert ours.get_content_type() == "text/cloud-config"
    assert config_of(ours.get_payload()) == config_of(cloud_config(SEED))
    assert their_part.get_content_type() == mime_type
    assert their_part["Content-Transfer-Encoding"] == "8bit"
    assert their_part.get_payload() == theirs
    # Lists append for a cloud-config; a script merges nothing.
    assert their_part["Merge-Type"] == (MERGE_TYPE if mime_type == "text/cloud-config" else None)
    assert "list(append)" in MERGE_TYPE


def test_their_mime_user_data_is_nested_and_every_part_of_it_arrives() -> None:
    theirs = (
        'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
        "--XX\nContent-Type: text/x-shellscript\n\n#!/bin/sh\ntrue\n"
        "--XX\nContent-Type: text/cloud-config\n\n#cloud-config\npackages: [htop]\n--XX--\n"
    )
    message = email.message_from_string(user_data(dataclasses.replace(SEED, user_data=theirs)))
    leaves = [part for part in message.walk() if not part.is_multipart()]
    assert [part.get_content_type() for part in leaves] == [
        "text/cloud-config", "text/x-shellscript", "text/cloud-config"]
    assert leaves[1].get_payload() == "#!/bin/sh\ntrue"  # the line break before a boundary is its own


# -- instance-id: changes when, and only when, what the guest is given changes ------------------------

def test_meta_data_names_the_instance_and_the_host() -> None:
    meta = meta_data(SEED)
    assert meta["local-hostname"] == "web-1"
    assert meta["instance-id"].startswith("iid-kvmtasks-")
    assert meta == meta_data(dataclasses.replace(SEED))
    assert seed_files(SEED) == seed_files(dataclasses.replace(SEED))  # byte for byte


@pytest.mark.parametrize("change", [
    {"hostname": "web-2"}, {"user": "alice"}, {"authorized_key": "ssh-ed25519 AAAAother"},
    {"host_private_key": HOST_PRIVATE + "\n"}, {"host_public_key": "ssh-ed25519 AAAAnew"},
    {"user_data": "#cloud-config\n"}, {"network_config": "version: 2\n"},
])
def test_any_change_in_the_content_changes_the_instance_id(change: dict[str, str]) -> None:
    changed = dataclasses.replace(SEED, **change)
    assert meta_data(changed)["instance-id"] != meta_data(SEED)["instance-id"]


def test_a_changed_user_data_changes_the_instance_id() -> None:
    first = dataclasses.replace(SEED, user_data="#cloud-config\nruncmd: [[touch, /a]]\n")
    second = dataclasses.replace(SEED, user_data="#cloud-config\nruncmd: [[touch, /b]]\n")
    assert meta_data(first)["instance-id"] != meta_data(second)["instance-id"]
    assert meta_data(first)["instance-id"] == meta_data(dataclasses.replace(first))["instance-id"]


# -- the volume ----------------------------------------------------------------------------------------

def read_back(iso_path: Path) -> tuple[str, dict[str, str], dict[str, bytes], list[str]]:
    """Label, plain ISO 9660 name -> Rock Ridge name, Rock Ridge contents, Joliet names."""
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        names: dict[str, str] = {}
        contents: dict[str, bytes] = {}
        for record in iso.list_children(iso_path="/"):
            if record.is_dot() or record.is_dotdot():
                continue
            rr_name = record.rock_ridge.name().decode()
            names[record.file_identifier().decode()] = rr_name
            buffer = io.BytesIO()
            iso.get_file_from_iso_fp(buffer, rr_path=f"/{rr_name}")
            contents[rr_name] = buffer.getvalue()
        joliet = sorted(
            record.file_identifier().decode("utf-16-be")
            for record in iso.list_children(joliet_path="/")
            if not (record.is_dot() or record.is_dotdot())
        )
    finally:
        iso.close()
    return label, names, contents, joliet


def test_the_seed_volume_reads_back_with_label_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "user-data.yaml").write_text("#cloud-config\nruncmd:\n  - [touch, /root/seeded]\n")
    (tmp_path / "net.yaml").write_text("version: 2\nethernets: {eth0: {dhcp4: true}}\n")
    part = load(tmp_path, "cloud_init = true\ncloud_init_user_data = user-data.yaml\n"
                          "cloud_init_network_config = net.yaml\nssh_user = alice\n")
    write_seed(part)
    label, names, contents, joliet = read_back(seedrules.seed_path(part))
    assert label == "cidata"
    assert names == {"METADATA.;1": "meta-data", "USERDATA.;1": "user-data", "NETWORKC.;1": "network-config"}
    assert joliet == ["meta-data", "network-config", "user-data"]
    assert contents["network-config"] == (tmp_path / "net.yaml").read_bytes()
    meta = yaml.safe_load(contents["meta-data"])
    assert meta["local-hostname"] == "vm"
    their_part = email.message_from_bytes(contents["user-data"]).get_payload()[1]
    assert their_part.get_payload() == (tmp_path / "user-data.yaml").read_text()
    # What went in is what the pure function makes of the same inputs: the same instance.
    written = contents["user-data"].decode()
    ours = config_of(email.message_from_string(written).get_payload()[0].get_payload())
    assert ours["users"][0]["ssh_authorized_keys"] == [keys.read_public(seedrules.generated_key_path(part))]
    assert ours["ssh_keys"]["ed25519_private"] == seedrules.host_key_path(part).read_text()
    # Linux's own probe (what cloud-init's blkid call sees) finds the label and the type.
    probe = subprocess.run(["blkid", "-o", "export", str(seedrules.seed_path(part))],
                           capture_output=True, text=True, check=True).stdout
    assert "LABEL=cidata" in probe.splitlines() and "TYPE=iso9660" in probe.splitlines()
    assert not list(part.state_directory.glob("*.part"))
    # It holds the guest's private host key: for the owner's eyes only.
    assert stat.S_IMODE(seedrules.seed_path(part).stat().st_mode) == 0o600


def test_keys_are_made_once_private_and_kept(tmp_path: Path) -> None:
    part = load(tmp_path, "cloud_init = true\n")
    write_seed(part)
    paths = (seedrules.generated_key_path(part), seedrules.host_key_path(part))
    made = {path: path.read_bytes() for path in paths}
    for path in made:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert keys.read_public(path).startswith("ssh-ed25519 ")
        assert b"OPENSSH PRIVATE KEY" in path.read_bytes()
    write_seed(part)
    assert {path: path.read_bytes() for path in made} == made
    assert seedrules.identity_file(part) == seedrules.generated_key_path(part)


def test_a_given_key_goes_into_the_seed_and_no_key_is_made(tmp_path: Path) -> None:
    key = tmp_path / "my key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    part = load(tmp_path, f"cloud_init = true\nssh_key_path = {key}\n")
    write_seed(part)
    assert not seedrules.generated_key_path(part).exists()
    assert seedrules.identity_file(part) == key
    _, _, contents, _ = read_back(seedrules.seed_path(part))
    assert keys.read_public(key) in contents["user-data"].decode()


def test_without_cloud_init_there_is_no_identity_file_but_the_given_key(tmp_path: Path) -> None:
    assert seedrules.identity_file(load(tmp_path, "")) is None
    assert seedrules.identity_file(load(tmp_path, "ssh_key_path = /k\n")) == Path("/k")
    assert not seedrules.pins_host_key(load(tmp_path, ""))


# -- config time ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "hostname"), [
    ("vm", "vm"), ("web_1", "web-1"), ("a.b", "a.b"), ("db+replica", "db-replica"), ("x_", "x"),
])
def test_the_host_name_defaults_to_the_part_name(tmp_path: Path, name: str, hostname: str) -> None:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[{name}]\nfile = /d.img\ncloud_init = true\n")
    (part,) = load_file(path, tmp_path)
    assert part.cloud_init_hostname == hostname
    assert seedrules.default_hostname(name) == hostname


@pytest.mark.parametrize(("text", "expected"), [
    ("#cloud-config\nusers: []\n", "text/cloud-config"), ("#cloud-config \r\n", "text/cloud-config"),
    ("#!/bin/bash\ntrue\n", "text/x-shellscript"),
    ("Content-Type: multipart/mixed; boundary=x\n", "multipart"), ("MIME-Version: 1.0\n", "multipart"),
    ("", None), ("users: []\n", None), ("# cloud-config\n", None), ("#cloud-config-archive\n", None),
    ("\n#cloud-config\n", None),
])
def test_user_data_kinds(text: str, expected: str | None) -> None:
    assert seedrules.user_data_kind(text) == expected


def test_user_data_cloud_init_would_ignore_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "ud").write_text("users:\n  - name: x\n")
    message = config_error(tmp_path, "cloud_init = true\ncloud_init_user_data = ud\n")
    assert "cloud_init_user_data = 'ud'" in message and "#cloud-config" in message


@pytest.mark.parametrize(("make", "problem"), [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_bytes(b"#cloud-config\n\xff\xfe"), "is not UTF-8 text"),
])
def test_unreadable_user_files_are_one_line(tmp_path: Path, make: Any, problem: str) -> None:
    make(tmp_path / "f")
    for option in ("cloud_init_user_data", "cloud_init_network_config"):
        message = config_error(tmp_path, f"cloud_init = true\n{option} = f\n")
        assert f"{option} = 'f'" in message and problem in message, message


def test_a_given_key_needs_its_public_half(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("private")
    message = config_error(tmp_path, "cloud_init = true\nssh_key_path = key\n")
    assert "ssh_key_path = 'key'" in message and f"{tmp_path}/key.pub not found" in message


@pytest.mark.parametrize("user", ["adm", "sudo", "users", "wheel", "docker"])
def test_a_user_name_that_is_a_group_is_refused(tmp_path: Path, user: str) -> None:
    message = config_error(tmp_path, f"cloud_init = true\nssh_user = {user}\n")
    assert f"ssh_user = {user!r}" in message and "group" in message
    assert load(tmp_path, f"ssh_user = {user}\n").ssh_user == user  # without a seed, nothing is created


@pytest.mark.parametrize("option", ["cloud_init_hostname = vm2", "cloud_init_user_data = ud",
                                    "cloud_init_network_config = nc"])
def test_seed_options_without_cloud_init_are_refused(tmp_path: Path, option: str) -> None:
    assert "needs cloud_init = true" in config_error(tmp_path, f"{option}\n")


def test_the_seed_works_with_the_libvirt_engine_and_its_checks_hold(tmp_path: Path) -> None:
    """On libvirt the seed is uploaded to the pool (tests/test_libvirt.py); the config checks are
    the same as with QEMU started directly."""
    part = load(tmp_path, "cloud_init = true\nkvm_engine = libvirt\n")
    assert part.cloud_init and seedrules.seed_path(part) == tmp_path / "var" / "vm" / "seed.iso"
    message = config_error(tmp_path, "cloud_init = true\nkvm_engine = libvirt\nssh_user = sudo\n")
    assert "ssh_user = 'sudo'" in message and "cloud-init cannot create the user" in message


# -- what cloud-init's own schema check says of it -----------------------------------------------

# The packages cloud-init's schema check imports, as the Debian test guest has them.
CLOUD_INIT_DEBS = ("cloud-init", "python3-jsonschema", "python3-attr", "python3-pyrsistent",
                   "python3-configobj", "python3-jinja2", "python3-markupsafe", "python3-jsonpatch",
                   "python3-json-pointer", "python3-requests", "python3-urllib3", "python3-idna",
                   "python3-certifi", "python3-chardet", "python3-charset-normalizer",
                   "python3-six", "python3-netifaces", "python3-oauthlib")
VALIDATE = """
import sys, yaml
from cloudinit.config.schema import SchemaValidationError, get_schema, validate_cloudconfig_schema
for path in sys.argv[1:]:
    try:
        validate_cloudconfig_schema(yaml.safe_load(open(path)), get_schema(), strict=True)
    except SchemaValidationError as error:
        print(path, error)
"""


@pytest.fixture(scope="module")
def cloud_init_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cloud-init 22.4 and what its schema check imports, unpacked from the packages the Debian
    test guest is built from (downloaded by its first build)."""
    from tests.debian_guest import CACHE, CLOUD_INIT, ensure_debian_guest

    if not list((CACHE / "debs").glob("cloud-init_*.deb")):
        ensure_debian_guest(variant=CLOUD_INIT)
    root = tmp_path_factory.mktemp("cloud-init")
    for name in CLOUD_INIT_DEBS:
        deb = sorted((CACHE / "debs").glob(f"{name}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / "usr" / "lib" / "python3" / "dist-packages"


def cloud_init_schema_errors(packages: Path, *configs: Path) -> str:
    checked = subprocess.run([sys.executable, "-W", "ignore", "-c", VALIDATE, *map(str, configs)],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, "PYTHONPATH": str(packages)})
    assert checked.returncode == 0, checked.stderr
    return checked.stdout


def test_the_cloud_config_passes_cloud_init_s_own_schema_check(
    cloud_init_root: Path, tmp_path: Path
) -> None:
    paths = []
    for number, seed in enumerate([SEED, dataclasses.replace(SEED, user="alice")]):
        path = tmp_path / f"user-data-{number}"
        path.write_text(cloud_config(seed))
        paths.append(path)
    assert cloud_init_schema_errors(cloud_init_root, *paths) == ""
    # The check finds what the generated cloud-config once held.
    broken = tmp_path / "broken"
    broken.write_text(cloud_config(SEED).replace("ssh_genkeytypes: [ed25519]", "ssh_genkeytypes: []"))
    assert "ssh_genkeytypes: [] is too short" in cloud_init_schema_errors(cloud_init_root, broken)
