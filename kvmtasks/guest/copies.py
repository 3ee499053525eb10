"""Copied folders: a share mirrored into the guest (push) or back (pull) over the VM's ssh master.

rsync when the guest has it; otherwise tar over the same ssh connection, built and unpacked by
Python on the host, so that the same rules hold either way:
- deletions: what is gone from the source goes from the copy, except excluded names;
- a symbolic link is copied as a link, never followed, and one that points outside the folder
  is left out (rsync's --safe-links), so a copy never reaches past HOSTDIR on the host;
- no device files, no owners: files belong to the user who writes them on each side.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.config.shares import Share
from kvmtasks.errors import CommandFailed, VmError
from kvmtasks.guest import ssh

TIMEOUT = 3600.0  # a large tree over a slow guest; Ctrl-C ends it sooner
# -rlpt: recursion, links as links, modes, times; never owners (-o -g) nor devices (-D).
RSYNC_OPTIONS = ("--recursive", "--links", "--perms", "--times", "--safe-links", "--delete")


def _ssh_command(part: Part) -> str:
    """rsync's -e: the ssh that every script uses. rsync splits it itself (quotes kept), no shell."""
    argv = ssh.ssh_argv(part, [])
    return shlex.join(argv[:argv.index("--")])


def rsync_argv(part: Part, share: Share, *, pull: bool) -> list[str]:
    far = f"{part.name}:{share.guest}/"
    near = f"{share.host}/"
    source, target = (far, near) if pull else (near, far)
    excludes = [f"--exclude={pattern}" for pattern in share.excludes]
    # A pull never deletes the host's links out of the folder: a push left them out, so the
    # guest lacks them, and --delete would take them for gone.
    kept = [f"--filter=protect /{_literal(name)}" for name in _unsafe_links(Path(share.host))] if pull else []
    return ["rsync", *RSYNC_OPTIONS, *excludes, *kept, "-e", _ssh_command(part), "--", source, target]


def _literal(name: str) -> str:
    """A name as an rsync pattern that matches only itself."""
    return "".join("\\" + c if c in "*?[\\" else c for c in name)


def _unsafe_links(top: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(top):
        base = Path(folder).relative_to(top)
        for name in (*dirs, *files):
            path = top / base / name
            if path.is_symlink() and not _link_stays_inside(base / name, os.readlink(path)):
                found.append((base / name).as_posix())
    return found


def _guest(part: Part, script: str, *, stdin: str | None = None, stdout: str | None = None,
           doing: str) -> command.Result:
    result = command.run_with_files(ssh.ssh_argv(part, [script]), stdin=stdin, stdout=stdout,
                                    timeout=TIMEOUT)
    if result.exit_code != 0:
        reason = command.last_error_line(result.stderr) or f"exit status {result.exit_code}"
        raise VmError(f"{doing}: {reason}")
    return result


def has_rsync(part: Part) -> bool:
    return command.run(ssh.ssh_argv(part, ["command -v rsync >/dev/null"]),
                       timeout=ssh.CONNECT_TIMEOUT + 20).exit_code == 0


def make_folder_script(part: Part, guest: str) -> str:
    """The guest shell's words that make GUESTDIR. Another ssh_user than root copies as itself
    (files belong to who writes them): a GUESTDIR it may not create (under /srv, /opt) is made
    through sudo and given to it, as Vagrant's rsync folders are."""
    folder = shlex.quote(guest)
    if part.ssh_user == "root":
        return f"mkdir -p -- {folder}"
    return (f"mkdir -p -- {folder} 2>/dev/null || {{ sudo -n mkdir -p -- {folder}"
            f" && sudo -n chown -- \"$(id -u):$(id -g)\" {folder}; }}")


def push(part: Part, share: Share) -> str:
    """The guest's GUESTDIR made a copy of HOSTDIR; how ("rsync" or "tar")."""
    folder = shlex.quote(share.guest)
    _guest(part, make_folder_script(part, share.guest), doing=f"creating {share.guest} in the guest")
    if has_rsync(part):
        _rsync(part, share, pull=False)
        return "rsync"
    names = set(_walk(Path(share.host), share.excludes))
    listing = _guest(part, f"cd -- {folder} && find . -mindepth 1",
                     doing=f"listing {share.guest} in the guest").stdout
    extra = sorted(_gone(listing.splitlines(), names, share.excludes))
    with tempfile.TemporaryDirectory(prefix="kvmtasks-copy-") as tmp:
        if extra:
            doomed = Path(tmp, "gone")
            doomed.write_bytes(b"".join(os.fsencode(name) + b"\0" for name in extra))
            _guest(part, f"cd -- {folder} && xargs -0 rm -rf --", stdin=str(doomed),
                   doing=f"removing from {share.guest} what is gone from {share.host}")
        archive = Path(tmp, "copy.tar")
        _archive(Path(share.host), share.excludes, archive)
        _guest(part, f"cd -- {folder} && tar -xf -", stdin=str(archive),
               doing=f"unpacking {share.host} into {share.guest} (tar)")
    return "tar"


def pull(part: Part, share: Share) -> str:
    """HOSTDIR made a copy of the guest's GUESTDIR; how ("rsync" or "tar")."""
    if has_rsync(part):
        _rsync(part, share, pull=True)
        return "rsync"
    host = Path(share.host)
    with tempfile.TemporaryDirectory(prefix="kvmtasks-copy-") as tmp:
        archive = Path(tmp, "copy.tar")
        _guest(part, f"cd -- {shlex.quote(share.guest)} && tar -cf - .", stdout=str(archive),
               doing=f"packing {share.guest} in the guest (tar)")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if _safe_member(m, host, share.excludes)]
            try:
                tar.extractall(host, members=members, filter="data")
            except tarfile.FilterError as error:  # a link made by an earlier member of the archive
                raise VmError(f"pulling {share.guest} into {share.host} (tar) stopped: {error}") from None
            names = {_relative(m.name) for m in members} - {""}
    for name in sorted(_gone(_walk(host, share.excludes), names, share.excludes), reverse=True):
        _remove(host / name)
    return "tar"


def _rsync(part: Part, share: Share, *, pull: bool) -> None:
    way = f"{share.guest} to {share.host}" if pull else f"{share.host} to {share.guest}"
    try:
        command.checked(rsync_argv(part, share, pull=pull), timeout=TIMEOUT)
    except CommandFailed as error:
        # rsync's last line only says that something failed: its first lines say what.
        said = [line.strip() for line in error.stderr.splitlines() if line.strip()]
        raise VmError(f"copying {way} (rsync) failed: {' / '.join(said[:3]) or error}") from None


def excluded(name: str, is_dir: bool, patterns: Iterable[str]) -> bool:
    """rsync's exclude rules, as far as copies need them: a pattern without / matches a name at
    any depth, one with / the path from the folder's top (a leading / anchors it there), a
    trailing / only folders; an excluded folder excludes what it holds."""
    path = PurePosixPath(name)
    for pattern in patterns:
        only_dirs = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        if not pattern:
            continue
        for depth in range(1, len(path.parts) + 1):
            head = PurePosixPath(*path.parts[:depth])
            head_is_dir = is_dir or depth < len(path.parts)
            if only_dirs and not head_is_dir:
                continue
            if "/" in pattern:
                if fnmatch.fnmatchcase(str(head), pattern.lstrip("/")):
                    return True
            elif fnmatch.fnmatchcase(head.name, pattern):
                return True
    return False


def _relative(name: str) -> str:
    return str(PurePosixPath(name)) if name not in (".", "./") else ""


def _gone(present: Iterable[str], wanted: set[str], patterns: Iterable[str]) -> Iterator[str]:
    """Names on the copy's side that the source no longer has, excluded ones spared."""
    patterns = tuple(patterns)
    for raw in present:
        name = _relative(raw)
        # A name whose folder goes too needs no removal of its own.
        parent_stays = "/" not in name or str(PurePosixPath(name).parent) in wanted
        if name and name not in wanted and parent_stays and not excluded(name, False, patterns):
            yield name


def _walk(top: Path, patterns: tuple[str, ...]) -> Iterator[str]:
    """The names under top a copy carries, links never followed."""
    for folder, dirs, files in os.walk(top):
        base = Path(folder).relative_to(top)
        for name in list(dirs):
            relative = (base / name).as_posix()
            if excluded(relative, True, patterns) or not _carried(top, base / name):
                dirs.remove(name)
            else:
                yield relative
        for name in files:
            relative = (base / name).as_posix()
            if not excluded(relative, False, patterns) and _carried(top, base / name):
                yield relative


def _carried(top: Path, relative: Path) -> bool:
    """Regular files, folders and links that stay inside top: what a copy carries."""
    path = top / relative
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return _link_stays_inside(relative, os.readlink(path))
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def _link_stays_inside(relative: Path | PurePosixPath, target: str) -> bool:
    """rsync's --safe-links: no absolute target, and no .. climbing above the folder's top."""
    if target.startswith("/"):
        return False
    depth = len(PurePosixPath(relative).parts) - 1
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return False
    return True


def _archive(top: Path, patterns: tuple[str, ...], archive: Path) -> None:
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in _walk(top, patterns):
            info = tar.gettarinfo(top / name, arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                with open(top / name, "rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)


def _safe_member(member: tarfile.TarInfo, host: Path, patterns: tuple[str, ...]) -> bool:
    """What a pull may write under HOSTDIR: files, folders and links that stay inside it."""
    name = _relative(member.name)
    if not name or excluded(name, member.isdir(), patterns):
        return False
    if member.issym():
        return _link_stays_inside(PurePosixPath(name), member.linkname)
    if not (member.isreg() or member.isdir()):
        return False
    try:
        tarfile.data_filter(member, str(host))
    except tarfile.FilterError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # never follows a link out of the folder
    else:
        path.unlink(missing_ok=True)
