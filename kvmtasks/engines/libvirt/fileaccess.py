"""Whether another user may read a file on this host, as the kernel decides it.

Every folder on the way needs search (x) permission and the file read (r)
permission for that user's uid and groups, from the mode bits or, where one is
set, the POSIX ACL (``setfacl -m u:USER:x FOLDER`` is the usual way to let a
service in). Symbolic links are followed as the kernel follows them.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

READ = 4
SEARCH = 1
MAX_LINKS = 40  # the kernel's limit on symbolic links in one lookup
# The ACL xattr: a version word, then (tag, permissions, id) entries (linux/posix_acl_xattr.h).
ACL_XATTR = "system.posix_acl_access"
ACL_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@dataclass(frozen=True)
class User:
    """A process's credentials: its uid and every group it holds."""

    name: str
    uid: int
    gids: frozenset[int]


@dataclass(frozen=True)
class AclEntry:
    tag: int
    permissions: int
    id: int


def permits(mode: int, owner: int, group: int, user: User, want: int,
            acl: tuple[AclEntry, ...] = ()) -> bool:
    """Whether user gets the want bits (READ, SEARCH) on a file of that mode, owner, group and ACL.

    Without capabilities, as the kernel checks: the owner's bits alone apply to the owner, the
    group's to a member, the others' to the rest; an ACL adds named users and groups, masked.
    """
    if not acl:
        if user.uid == owner:
            return mode >> 6 & want == want
        if group in user.gids:
            return mode >> 3 & want == want
        return mode & want == want
    mask = next((e.permissions for e in acl if e.tag == ACL_MASK), 0o7)
    if user.uid == owner:
        return any(e.tag == ACL_USER_OBJ and e.permissions & want == want for e in acl)
    for entry in acl:
        if entry.tag == ACL_USER and entry.id == user.uid:
            return entry.permissions & mask & want == want
    groups = [e for e in acl if (e.tag == ACL_GROUP_OBJ and group in user.gids)
              or (e.tag == ACL_GROUP and e.id in user.gids)]
    if groups:
        return any(e.permissions & mask & want == want for e in groups)
    return any(e.tag == ACL_OTHER and e.permissions & want == want for e in acl)


def parse_acl(data: bytes) -> tuple[AclEntry, ...]:
    """The entries of a ``system.posix_acl_access`` value; none for one in another version."""
    body = data[4:]
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != ACL_VERSION or len(body) % 8:
        return ()
    return tuple(AclEntry(*entry) for entry in struct.iter_unpack("<HHI", body))


def _acl(path: Path) -> tuple[AclEntry, ...]:
    try:
        return parse_acl(os.getxattr(path, ACL_XATTR, follow_symlinks=False))
    except OSError as error:
        if error.errno in (errno.ENODATA, errno.ENOTSUP):
            return ()
        raise


def _denied(path: Path, user: User, want: int) -> bool:
    info = os.stat(path)
    return not permits(info.st_mode, info.st_uid, info.st_gid, user, want, _acl(path))


@dataclass(frozen=True)
class Obstacle:
    """The first thing on the way to a file that a user lacks: x on a folder, r on the file."""

    path: Path
    permission: str


def obstacle(path: Path, user: User, want: int = READ) -> Obstacle | None:
    """None when user can open path (absolute) for reading (want READ, a file) or list and enter
    it (want READ | SEARCH, a folder); else the first permission it lacks.

    Raises OSError when this process cannot look the path up itself (it cannot tell then), and
    with ELOOP past the kernel's limit on symbolic links.
    """
    folder = Path("/")
    pending = list(path.parts[1:])
    links = 0
    while pending:
        if _denied(folder, user, SEARCH):
            return Obstacle(folder, "x")
        name = pending.pop(0)
        if name == "..":
            folder = folder.parent
            continue
        candidate = folder / name
        if stat.S_ISLNK(os.lstat(candidate).st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                folder = Path("/")
            pending[:0] = target.parts[1:] if target.is_absolute() else target.parts
            continue
        folder = candidate
    for bit, letter in ((READ, "r"), (SEARCH, "x")):
        if want & bit and _denied(folder, user, bit):
            return Obstacle(folder, letter)
    return None
