"""The host files a libvirt part's QEMU opens itself, checked readable by the user it runs as:
the paths in kvm_extra_args, and the folders of live shares.

libvirt gives QEMU the disks as volumes it manages (and chowns them to QEMU's
user, dynamic_ownership), but the paths in kvm_extra_args (-kernel, -initrd,
``file=...``) reach QEMU untouched: QEMU opens them as the user and group of
qemu.conf (libvirt-qemu on Debian), and a file that user cannot read would fail
the start after the domain is defined, with QEMU's message. The running
libvirtd names that user in its capabilities (the DAC model's label), readable
without root, unlike qemu.conf.

Only on a local host: on a remote one the paths name that host's files, which
this machine cannot look at; QEMU's message stands there.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from kvmtasks.config.part import Part
from kvmtasks.config.remote import remote_of
from kvmtasks.config.shares import Share
from kvmtasks.engines import sharing
from kvmtasks.engines.libvirt.fileaccess import READ, SEARCH, User, obstacle
from kvmtasks.engines.libvirt.virsh import virsh
from kvmtasks.errors import VmError

# Options whose value is no host path: the guest kernel's command line.
NOT_HOST_PATHS = frozenset({"-append"})


def _items(argument: str) -> list[str]:
    """A QEMU option value's comma-separated items, ",," being a comma within one."""
    # No argv string holds a NUL: it stands in for the escaped comma while splitting.
    return [item.replace("\0", ",") for item in argument.replace(",,", "\0").split(",")]


def host_paths(arguments: Sequence[str]) -> list[Path]:
    """The absolute paths among QEMU arguments: whole ones (``-kernel /k``) and the values of
    ``key=value`` items (``-drive file=/d,format=raw``), in order, once each."""
    paths: list[Path] = []
    previous: str | None = None
    for argument in arguments:
        option, previous = previous, argument
        if option in NOT_HOST_PATHS:
            continue
        for item in _items(argument):
            value = item if item.startswith("/") else item.partition("=")[2]
            if value.startswith("/"):
                paths.append(Path(value))
    return list(dict.fromkeys(paths))


def _user(label: str) -> User | None:
    """The user of a DAC label (``+64055:+64055``, or ``user:group``) with every group it holds,
    as libvirt gives QEMU the user's supplementary groups too; None for names unknown here."""
    owner, _, group = label.partition(":")
    try:
        uid = int(owner[1:]) if owner.startswith("+") else pwd.getpwnam(owner).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        return None
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return User(f"uid {uid}", uid, frozenset({gid}))
    return User(name, uid, frozenset({gid, *os.getgrouplist(name, gid)}))


def qemu_users(capabilities: str) -> list[User]:
    """The users libvirt runs QEMU as (one per domain type, the same as a rule), from its
    capabilities XML; none without the DAC security model."""
    host = ET.fromstring(capabilities).find("host")  # noqa: S314 (libvirtd's own answer)
    models = [] if host is None else host.iterfind("secmodel")
    labels = [label.text or "" for model in models if model.findtext("model") == "dac"
              for label in model.iterfind("baselabel")]
    users = (_user(label) for label in dict.fromkeys(labels))
    return [user for user in users if user is not None]


def _files(part: Part) -> list[Path]:
    """The existing files kvm_extra_args names: what QEMU would open (a path QEMU writes first
    does not exist yet, a socket it connects to is no file to read)."""
    files = []
    for path in host_paths(part.kvm_extra_args):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            files.append(path)
    return files


def check_readable(part: Part) -> None:
    """Refuse, before anything is defined, a file in kvm_extra_args that QEMU could not read,
    or a live share's folder it could not enter."""
    if remote_of(part) is not None:
        return
    files, shares = _files(part), [share for _index, share, _carrier in sharing.live(part)]
    if not files and not shares:
        return
    for user in qemu_users(virsh(part, "capabilities")):
        if user.uid == 0:
            continue  # root's QEMU: whether libvirt left it its capabilities decides, not the modes
        check_share_folders(part, shares, user)
        for file in files:
            try:
                lacking = obstacle(file, user)
            except OSError:
                continue  # this process cannot look itself: QEMU's own message will do
            if lacking is not None:
                kind = "folder" if lacking.permission == "x" else "file"
                raise VmError(
                    f"kvm_extra_args names {file}, which libvirt's QEMU cannot read: it runs as "
                    f"{user.name} on {part.libvirt_uri} and lacks {lacking.permission} permission on "
                    f"the {kind} {lacking.path}; grant it (say, setfacl -m u:{user.name}:"
                    f"{lacking.permission} {lacking.path}) or move the file where {user.name} can read it"
                )


def check_share_folders(part: Part, shares: Sequence[Share], user: User) -> None:
    """Refuse a live share whose HOSTDIR user cannot list and enter: libvirt hands QEMU the
    folder's path untouched (no chown, unlike its volumes): QEMU would fail the start after the
    domain is defined (it opens the folder), or the guest's mount every lookup (no x on it)."""
    for share in shares:
        try:
            lacking = obstacle(Path(share.host), user, READ | SEARCH)
        except OSError:
            continue  # this process cannot look itself: QEMU's own message will do
        if lacking is not None:
            raise VmError(
                f"{part.config_file}: [{part.name}] share: line {share.line()!r}: libvirt's QEMU "
                f"cannot open the folder {share.host}: it runs as {user.name} on {part.libvirt_uri} "
                f"and lacks {lacking.permission} permission on the folder {lacking.path}; grant it "
                f"(say, setfacl -m u:{user.name}:{lacking.permission} {lacking.path}) or share a "
                f"folder {user.name} can open"
            )
