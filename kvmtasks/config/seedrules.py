"""A part's cloud-init files (seed, generated keys) and what a seed may hold.

The floor of the package: provisioning writes these files, the engine attaches
the seed, ssh logs in with the key and checks the host key, and the loader
refuses at config time what cloud-init would refuse at first boot.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvmtasks.config.part import Part

# Groups that exist on common cloud images without a user of the same name. cloud-init's
# useradd fails on such a name ("group X exists") and the guest comes up without the user:
# refused at config time. Debian's base-passwd groups, systemd's and udev's, and the admin
# groups of Ubuntu and Fedora. Names that are also users (daemon, bin, sys, ...) are fine:
# cloud-init then only adds the key to the existing user.
RESERVED_GROUPS = frozenset({
    "adm", "tty", "disk", "kmem", "dialout", "fax", "voice", "cdrom", "floppy", "tape", "sudo",
    "audio", "dip", "operator", "src", "shadow", "utmp", "video", "sasl", "plugdev", "staff",
    "users", "nogroup", "netdev", "input", "kvm", "render", "sgx", "systemd-journal", "crontab",
    "ssh", "_ssh", "wheel", "admin", "docker", "lxd",
})  # fmt: skip

# The first line of a user-data cloud-init accepts, and the MIME type it becomes in a multipart.
CLOUD_CONFIG = "text/cloud-config"
SHELL_SCRIPT = "text/x-shellscript"
MIME = "multipart"
MIME_HEADER = re.compile(r"(?i)(content-type|mime-version):")


def seed_path(part: Part) -> Path:
    """The NoCloud seed ISO the guest sees as a CD-ROM."""
    return part.state_directory / "seed.iso"


def generated_key_path(part: Part) -> Path:
    """The part's own ssh key pair, made when cloud_init has no ssh_key_path."""
    return part.state_directory / "id_ed25519"


def host_key_path(part: Part) -> Path:
    """The guest's ssh host key, made by kvmtasks and handed over in the seed."""
    return part.state_directory / "ssh_host_ed25519_key"


def identity_file(part: Part) -> Path | None:
    """The private key ssh and scp log in with: ssh_key_path, else the generated one."""
    if part.ssh_key_path is not None:
        return part.ssh_key_path
    return generated_key_path(part) if part.cloud_init else None


def pins_host_key(part: Part) -> bool:
    """True when kvmtasks knows the guest's host key before the guest boots."""
    return part.cloud_init


def default_hostname(part_name: str) -> str:
    """The part name as a host name: characters a host name cannot hold become '-'."""
    labels = re.sub(r"[^A-Za-z0-9.-]", "-", part_name).split(".")
    return ".".join(label.strip("-")[:63] or "vm" for label in labels)[:253]


def user_data_kind(text: str) -> str | None:
    """The MIME type of a user-data text, or None for one cloud-init would not run."""
    first = text.split("\n", 1)[0].rstrip("\r")
    if first.rstrip() == "#cloud-config":
        return CLOUD_CONFIG
    if first.startswith("#!"):
        return SHELL_SCRIPT
    if MIME_HEADER.match(first):
        return MIME
    return None
