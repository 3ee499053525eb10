"""Whether another user may read a file: the permission rules (pure), then the verdict on real
folders, files, symbolic links and ACLs compared with the kernel's, as nobody opening the file;
a live share's folder, listed and entered, and the one line for one libvirt's QEMU cannot open."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.engines import sharing
from kvmtasks.engines.libvirt import qemufiles
from kvmtasks.engines.libvirt.fileaccess import (
    ACL_GROUP,
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER,
    ACL_USER_OBJ,
    ACL_XATTR,
    READ,
    SEARCH,
    AclEntry,
    Obstacle,
    User,
    obstacle,
    parse_acl,
    permits,
)
from kvmtasks.errors import VmError
from tests.otheruser import run_as

ALICE = User("alice", 1000, frozenset({1000, 27}))
OWNER, GROUP = 1000, 27


@pytest.mark.parametrize(("mode", "owner", "group", "want", "allowed"), [
    (0o644, 0, 0, READ, True),            # others may read
    (0o640, 0, 0, READ, False),           # neither owner nor member
    (0o640, 0, GROUP, READ, True),        # a supplementary group is a group
    (0o604, 0, GROUP, READ, False),       # a member gets the group's bits only, not the others'
    (0o077, OWNER, 0, READ, False),       # the owner gets the owner's bits only
    (0o400, OWNER, 0, READ, True),
    (0o701, 0, 0, SEARCH, True),
    (0o706, 0, 0, SEARCH, False),         # r without x: the folder can be listed, not entered
    (0o710, 0, 1000, SEARCH, True),       # the user's primary group
])
def test_mode_bits(mode: int, owner: int, group: int, want: int, allowed: bool) -> None:
    assert permits(mode, owner, group, ALICE, want) is allowed


def acl(*entries: tuple[int, int, int]) -> tuple[AclEntry, ...]:
    return tuple(AclEntry(*entry) for entry in entries)


@pytest.mark.parametrize(("entries", "owner", "group", "allowed"), [
    (acl((ACL_USER_OBJ, 7, 0), (ACL_USER, 1, 1000), (ACL_GROUP_OBJ, 0, 0), (ACL_MASK, 1, 0),
         (ACL_OTHER, 0, 0)), 0, 0, True),           # a named user, within the mask
    (acl((ACL_USER_OBJ, 7, 0), (ACL_USER, 1, 1000), (ACL_GROUP_OBJ, 0, 0), (ACL_MASK, 0, 0),
         (ACL_OTHER, 1, 0)), 0, 0, False),          # masked out; the others' bits do not apply
    (acl((ACL_USER_OBJ, 7, 0), (ACL_GROUP_OBJ, 0, 0), (ACL_GROUP, 1, 27), (ACL_MASK, 7, 0),
         (ACL_OTHER, 0, 0)), 0, 0, True),           # a named group the user holds
    (acl((ACL_USER_OBJ, 7, 0), (ACL_GROUP_OBJ, 0, 0), (ACL_GROUP, 0, 27), (ACL_MASK, 7, 0),
         (ACL_OTHER, 1, 0)), 0, 0, False),          # a matching group without x: no others' bits
    (acl((ACL_USER_OBJ, 0, 0), (ACL_USER, 1, 1000), (ACL_GROUP_OBJ, 0, 0), (ACL_MASK, 1, 0),
         (ACL_OTHER, 1, 0)), OWNER, 0, False),      # the owner's entry alone applies to the owner
    (acl((ACL_USER_OBJ, 7, 0), (ACL_GROUP_OBJ, 0, 0), (ACL_MASK, 0, 0), (ACL_OTHER, 1, 0)),
     0, 0, True),                                   # the others' bits are never masked
])
def test_posix_acls(entries: tuple[AclEntry, ...], owner: int, group: int, allowed: bool) -> None:
    assert permits(0o700, owner, group, ALICE, SEARCH, entries) is allowed


def acl_xattr(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value, as setfacl writes it."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def test_the_acl_xattr_is_read_back() -> None:
    entries = ((ACL_USER_OBJ, 7, 0xFFFFFFFF), (ACL_USER, 1, 64055), (ACL_GROUP_OBJ, 5, 0xFFFFFFFF),
               (ACL_MASK, 5, 0xFFFFFFFF), (ACL_OTHER, 0, 0xFFFFFFFF))
    assert parse_acl(acl_xattr(*entries)) == acl(*entries)
    assert parse_acl(struct.pack("<I", 1) + acl_xattr(*entries)[4:]) == ()  # another version
    assert parse_acl(acl_xattr(*entries)[:-3]) == ()


# ---- real files, the kernel's verdict as nobody ----

NOBODY = User("nobody", 65534, frozenset({65534}))  # as run_as leaves it: its uid and group only
NO_ID = 0xFFFFFFFF


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder nobody may enter: the layouts are built inside (pytest's tmp_path is private)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make files of other owners and to open them as nobody")
    folder = Path(tempfile.mkdtemp(prefix="kvmtasks-access-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def tree(base: Path, folder_mode: int, file_mode: int, *, folder_group: int = 0) -> Path:
    folder = base / "folder"
    folder.mkdir()
    file = folder / "file"
    file.write_text("content")
    file.chmod(file_mode)
    os.chown(folder, 0, folder_group)
    folder.chmod(folder_mode)
    return file


def grant_search(folder: Path, uid: int, mask: int = 1) -> None:
    """What ``setfacl -m u:UID:x FOLDER`` does (with the mask given), without setfacl."""
    os.setxattr(folder, ACL_XATTR, acl_xattr(
        (ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 1, uid), (ACL_GROUP_OBJ, 0, NO_ID),
        (ACL_MASK, mask, NO_ID), (ACL_OTHER, 0, NO_ID)))


def plain(base: Path) -> Path:
    return tree(base, 0o755, 0o644)


def private_folder(base: Path) -> Path:
    return tree(base, 0o700, 0o644)


def private_file(base: Path) -> Path:
    return tree(base, 0o711, 0o600)


def group_folder(base: Path) -> Path:
    return tree(base, 0o750, 0o644, folder_group=65534)


def group_without_x(base: Path) -> Path:
    return tree(base, 0o705, 0o644, folder_group=65534)


def owned_without_x(base: Path) -> Path:
    file = tree(base, 0o077, 0o644)
    os.chown(file.parent, NOBODY.uid, 0)
    return file


def acl_grant(base: Path) -> Path:
    file = tree(base, 0o700, 0o644)
    grant_search(file.parent, NOBODY.uid)
    return file


def acl_masked(base: Path) -> Path:
    file = tree(base, 0o700, 0o644)
    grant_search(file.parent, NOBODY.uid, mask=0)
    return file


def link_into_private(base: Path) -> Path:
    tree(base, 0o700, 0o644)
    (base / "link").symlink_to("folder/file")
    return base / "link"


def link_out_of_private(base: Path) -> Path:
    file = tree(base, 0o755, 0o644)
    hidden = base / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "link").symlink_to(file)
    return hidden / "link"


def link_through_parent(base: Path) -> Path:
    tree(base, 0o755, 0o644)
    (base / "open").mkdir()
    (base / "open" / "up").symlink_to("..")
    return base / "open" / "up" / "folder" / "file"


def folder_link_into_private(base: Path) -> Path:
    tree(base, 0o700, 0o644)
    (base / "open").mkdir()
    (base / "open" / "there").symlink_to(base / "folder")
    return base / "open" / "there" / "file"


LAYOUTS: list[tuple[Callable[[Path], Path], str | None]] = [
    (plain, None),
    (private_folder, "x folder"),
    (private_file, "r folder/file"),
    (group_folder, None),
    (group_without_x, "x folder"),
    (owned_without_x, "x folder"),
    (acl_grant, None),
    (acl_masked, "x folder"),
    (link_into_private, "x folder"),
    (link_out_of_private, "x hidden"),
    (link_through_parent, None),
    (folder_link_into_private, "x folder"),
]


@pytest.mark.parametrize(("layout", "expected"), LAYOUTS, ids=[layout.__name__ for layout, _ in LAYOUTS])
def test_the_verdict_is_the_kernels(base: Path, layout: Callable[[Path], Path], expected: str | None) -> None:
    path = layout(base)

    def open_it() -> str:
        try:
            path.read_bytes()
        except PermissionError:
            return "denied"
        return "read"

    found = obstacle(path, NOBODY)
    assert found == (None if expected is None else
                     Obstacle(base / expected.split()[1], expected.split()[0]))
    assert run_as("nobody", open_it) == ("read" if expected is None else "denied")


# ---- folders: listed and entered (a live share's HOSTDIR on libvirt) ----

def folder_tree(base: Path, mode: int) -> Path:
    folder = base / "share"
    folder.mkdir()
    (folder / "file").write_text("content")
    (folder / "file").chmod(0o644)
    folder.chmod(mode)
    return folder


FOLDERS: list[tuple[int, str | None]] = [
    (0o755, None),
    (0o711, "r"),   # entered, not listed
    (0o744, "x"),   # listed, not entered
    (0o700, "r"),   # neither: read is the first missing
]


@pytest.mark.parametrize(("mode", "expected"), FOLDERS, ids=[oct(mode) for mode, _ in FOLDERS])
def test_a_folder_is_listed_and_entered_as_the_kernel_says(base: Path, mode: int,
                                                           expected: str | None) -> None:
    folder = folder_tree(base, mode)

    def open_it() -> str:
        try:
            os.listdir(folder)
            (folder / "file").read_bytes()
        except PermissionError:
            return "denied"
        return "opened"

    found = obstacle(folder, NOBODY, READ | SEARCH)
    assert found == (None if expected is None else Obstacle(folder, expected))
    assert run_as("nobody", open_it) == ("opened" if expected is None else "denied")


def libvirt_part(base: Path, share: str) -> Part:
    config = base / "kvm.cfg"
    config.write_text(f"[buildout]\ndirectory = {base}\n\n[vm]\nfile = /srv/disk.img\nkvm_engine = libvirt\n"
                      f"ssh_port = 2222\nshare =\n  {share}\n")
    (part,) = load_file(config, base)
    return part


def test_a_live_share_libvirts_qemu_cannot_open_is_one_line(base: Path) -> None:
    """The folder of a live share on local libvirt, checked as QEMU's user (nobody here) would
    open it: the line names the file, the part, the share and the folder that stops it."""
    private = base / "private"
    private.mkdir(mode=0o700)
    folder = private / "src"
    folder.mkdir()
    part = libvirt_part(base, f"{folder} /srv/src")
    shares = [share for _index, share, _carrier in sharing.live(part)]
    assert [share.guest for share in shares] == ["/srv/src"]  # auto on a local libvirt: 9p

    with pytest.raises(VmError) as refused:
        qemufiles.check_share_folders(part, shares, NOBODY)
    assert str(refused.value) == (
        f"{base / 'kvm.cfg'}: [vm] share: line '{folder} /srv/src auto': libvirt's QEMU cannot "
        f"open the folder {folder}: it runs as nobody on qemu:///system and lacks x permission on "
        f"the folder {private}; grant it (say, setfacl -m u:nobody:x {private}) or share a folder "
        "nobody can open")

    grant_search(private, NOBODY.uid)  # the grant the line suggests
    qemufiles.check_share_folders(part, shares, NOBODY)
    folder.chmod(0o700)
    with pytest.raises(VmError, match=f"lacks r permission on the folder {folder};"):
        qemufiles.check_share_folders(part, shares, NOBODY)
    # A copied folder is no business of QEMU's: nothing to check.
    assert sharing.live(libvirt_part(base, f"{folder} /srv/src rsync")) == []
