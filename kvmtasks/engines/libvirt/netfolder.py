"""The folders of a libvirt part's private networks, opened to the user libvirt runs QEMU as.

A libvirt part joins its networks as a part of the direct engine does (a hub in its own QEMU,
datagram unix sockets to every other part: domain.py), but its QEMU runs as libvirt's user
(libvirt-qemu on Debian), which must enter the folders and bind its sockets there. The folders
are ours, in /tmp (runfiles.libvirt_network_root), mode 0700 with a POSIX ACL that lets that
user alone in: search on the root, read, write and search on each network's folder. The ACL is
written whole at each start, so whatever was granted before is taken back.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import libvirt_network_root, network_folder
from kvmtasks.engines.libvirt.fileaccess import (
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER,
    ACL_USER_OBJ,
    ACL_VERSION,
    ACL_XATTR,
    SEARCH,
    User,
)
from kvmtasks.engines.libvirt.qemufiles import qemu_users
from kvmtasks.engines.libvirt.virsh import virsh
from kvmtasks.errors import VmError

ALL = 0o7  # read, write and search


def acl_bytes(users: Sequence[User], permissions: int) -> bytes:
    """A ``system.posix_acl_access`` value: the owner's rwx, the users' permissions, nothing for
    the group and others (entries in the kernel's order: by tag, then by id)."""
    entries = [(ACL_USER_OBJ, ALL, 0xFFFFFFFF)]
    entries += [(ACL_USER, permissions, uid) for uid in sorted({user.uid for user in users})]
    entries += [(ACL_GROUP_OBJ, 0, 0xFFFFFFFF), (ACL_MASK, permissions, 0xFFFFFFFF),
                (ACL_OTHER, 0, 0xFFFFFFFF)]
    return struct.pack("<I", ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def open_folder(path: Path, users: Sequence[User], permissions: int) -> None:
    """path made (0700) if missing, refused unless it is a real folder of ours, then opened to
    users with permissions and to no one else."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError as error:
        raise VmError(f"cannot create {path} for the private networks' sockets: "
                      f"{error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise VmError(f"{path} is not a folder of yours: the private networks' sockets of "
                      "libvirt parts are not put there")
    try:
        os.chmod(path, 0o700, follow_symlinks=False)
        if users:
            os.setxattr(path, ACL_XATTR, acl_bytes(users, permissions), follow_symlinks=False)
        else:
            os.removexattr(path, ACL_XATTR, follow_symlinks=False)
    except OSError as error:
        if not users and error.errno in (errno.ENODATA, errno.ENOTSUP):
            return  # no ACL to take back
        names = ", ".join(user.name for user in users)
        raise VmError(f"cannot let libvirt's QEMU ({names}) into {path} for the private "
                      f"networks' sockets: {error.strerror}") from None


def prepare(part: Part) -> None:
    """The part's network folders ready for libvirt's QEMU, before its domain starts."""
    if not part.links:
        return
    me = os.getuid()
    users = [user for user in qemu_users(virsh(part, "capabilities"))
             if user.uid not in (0, me)]  # root and we need no grant
    open_folder(libvirt_network_root(), users, SEARCH)
    for link in part.links:
        open_folder(network_folder(link), users, ALL)
