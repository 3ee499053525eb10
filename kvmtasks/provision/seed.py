"""What a NoCloud seed holds: pure functions from the part's inputs to the seed's files.

cloud-config is YAML; every value here is written as a JSON string, which YAML
reads as a double-quoted scalar, so no key, name or path can break the syntax.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.parser import Parser
from email.policy import compat32
from pathlib import Path

from kvmtasks.config.seedrules import CLOUD_CONFIG, MIME, user_data_kind
from kvmtasks.provision.seednetwork import PrivateNic, hosts_bootcmd
from kvmtasks.provision.seednetwork import network_config as merged_network_config

VOLUME_LABEL = "cidata"  # what cloud-init's NoCloud looks for
# ISO 9660 level-1 names (8.3, upper case) for readers that know nothing else; Linux reads the
# Rock Ridge names, Windows-made tools the Joliet ones.
PLAIN_NAMES = {"meta-data": "METADATA.;1", "user-data": "USERDATA.;1", "network-config": "NETWORKC.;1"}
# Later parts merge into earlier ones: lists append (the user's users, runcmd, packages add
# to kvmtasks'), dictionaries merge key by key, the user's scalars win.
MERGE_TYPE = "list(append)+dict(recurse_array,replace)+str()"
SUDO_ANYTHING = "ALL=(ALL) NOPASSWD:ALL"


@dataclass(frozen=True)
class SeedInput:
    """Everything that goes into a part's seed."""

    hostname: str
    user: str
    authorized_key: str  # one public key line
    host_private_key: str  # OpenSSH private key text
    host_public_key: str
    user_data: str | None = None
    network_config: str | None = None
    private_nics: tuple[PrivateNic, ...] = ()
    primary_mac: str | None = None  # the user-mode NIC's, for DHCP beside the private NICs
    hosts: tuple[tuple[str, str], ...] = ()  # (address, part name) of the other parts


def _q(value: str) -> str:
    return json.dumps(value)


def cloud_config(seed: SeedInput) -> str:
    """kvmtasks' own #cloud-config: the login, the pinned host key, the host name."""
    lines = [
        "#cloud-config",
        "# Written by kvmtasks: the login and host key kvmtasks uses, and the host name.",
        f"hostname: {_q(seed.hostname)}",
        "preserve_hostname: false",
        # sudo resolves the host name: without this line it warns on every call.
        "manage_etc_hosts: true",
        "ssh_pwauth: false",
    ]
    if seed.user == "root":
        lines += ["disable_root: false", "users:", "  - name: root"]
    else:
        lines += [
            "users:",
            f"  - name: {_q(seed.user)}",
            "    shell: /bin/bash",
            "    lock_passwd: true",
            f"    sudo: {_q(SUDO_ANYTHING)}",
        ]
    lines += [
        "    ssh_authorized_keys:",
        f"      - {_q(seed.authorized_key.strip())}",
        # Exactly the host key kvmtasks pinned in known_hosts: the guest's own are deleted
        # and none generated, on this and every first boot (given ssh_keys, cloud-init
        # generates none; were it to, the one type listed is the one given). An empty list
        # fails cloud-init's schema check: it wants one type at least.
        "ssh_deletekeys: true",
        "ssh_genkeytypes: [ed25519]",
        "ssh_keys:",
        f"  ed25519_private: {_q(seed.host_private_key)}",
        f"  ed25519_public: {_q(seed.host_public_key.strip())}",
        *hosts_bootcmd(seed.hosts),
    ]
    return "\n".join(lines) + "\n"


def _part(text: str, mime_type: str) -> MIMENonMultipart:
    """A part as readable text: 8bit, never base64 (set through a charset, the email
    package would encode any non-ASCII text in base64)."""
    maintype, subtype = mime_type.split("/")
    part = MIMENonMultipart(maintype, subtype, charset="utf-8")
    part["Content-Transfer-Encoding"] = "8bit"
    part.set_payload(text)
    return part


def user_data(seed: SeedInput) -> str:
    """kvmtasks' cloud-config alone, or a MIME multipart of it and the user's own user-data."""
    ours = cloud_config(seed)
    if seed.user_data is None:
        return ours
    kind = user_data_kind(seed.user_data)
    if kind is None:
        raise ValueError("user-data must start with #cloud-config, #! or a MIME header")
    multipart = MIMEMultipart(boundary=_boundary(ours, seed.user_data))
    multipart.attach(_part(ours, CLOUD_CONFIG))
    if kind == MIME:
        # A multipart inside a multipart: cloud-init walks into it, part by part.
        multipart.attach(Parser(policy=compat32).parsestr(seed.user_data))
    else:
        theirs = _part(seed.user_data, kind)
        if kind == CLOUD_CONFIG:
            theirs["Merge-Type"] = MERGE_TYPE  # their own merge_how, if any, wins over it
        multipart.attach(theirs)
    return multipart.as_string()


def _boundary(*texts: str) -> str:
    """A boundary from the content: the same input gives the same bytes (and instance-id)."""
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return f"==kvmtasks-{digest[:32]}=="


def instance_id(user_data_text: str, network_config: str | None, hostname: str) -> str:
    """Changes when, and only when, what the guest is given changes."""
    content = json.dumps([user_data_text, network_config, hostname])
    return "iid-kvmtasks-" + hashlib.sha256(content.encode()).hexdigest()[:20]


def seed_files(seed: SeedInput) -> dict[str, bytes]:
    """The seed's files by name: meta-data, user-data, and network-config when given."""
    data = user_data(seed)
    network = merged_network_config(seed.network_config, seed.private_nics, seed.primary_mac)
    meta = (f"instance-id: {instance_id(data, network, seed.hostname)}\n"
            f"local-hostname: {_q(seed.hostname)}\n")
    files = {"meta-data": meta.encode(), "user-data": data.encode()}
    if network is not None:
        files["network-config"] = network.encode()
    return files


def write_iso(path: Path, files: Mapping[str, bytes]) -> None:
    """Write the seed volume at path, in one piece: a .part file renamed when complete."""
    import pycdlib  # here, not at the top: only this step needs it

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    for name, data in files.items():
        iso.add_fp(io.BytesIO(data), len(data), f"/{PLAIN_NAMES[name]}", rr_name=name,
                   joliet_path=f"/{name}")
    temporary = path.with_name(path.name + ".part")
    try:
        # Private from the first byte: the volume holds the guest's private host key.
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            iso.write_fp(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        iso.close()
