"""ssh and scp into a part's guest: argv builders and the runs that use them."""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NoReturn

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.config.seedrules import pins_host_key
from kvmtasks.errors import CommandError, CommandFailed, CommandTimedOut, VmError
from kvmtasks.guest import sshconfig

CONNECT_TIMEOUT = sshconfig.CONNECT_TIMEOUT
# What scp says when the guest has no SFTP server: retry with the legacy protocol.
NO_SFTP_MARKERS = ("sftp-server", "subsystem request failed", "Connection closed")
GLOB_CHARACTERS = frozenset("*?[]{}\\")
# busybox and systemd guests have poweroff; shutdown is for the others. A systemd guest already
# shutting down (slow to act on the ACPI button) is left to it, and says so with ALREADY_STOPPING.
ALREADY_STOPPING = 100
POWEROFF = (f'[ "$(systemctl is-system-running 2>/dev/null)" = stopping ] && exit {ALREADY_STOPPING}; '
            "poweroff || shutdown -h now")
# What ssh says when it never got to run the command (exit status 255 either way).
LOGIN_FAILURES = ("Permission denied", "Host key verification failed", "Connection refused",
                  "timed out", "Could not resolve")


def common_options(part: Part) -> list[str]:
    """The part's ssh config file (guest/sshconfig.py), and what holds for kvmtasks's own runs.

    Never a password or passphrase prompt. The master's socket is looked up now: the file names
    the one of the environment it was written in.
    """
    if part.ssh_port is None:
        raise VmError(f"part {part.name} has no ssh_port: set it to reach the guest over ssh")
    sshconfig.check_jump_path(part)
    master = sshconfig.socket_path(part)
    control = sshconfig.quoted(master) if master is not None else "none"
    return ["-F", str(sshconfig.path(part)), "-o", "BatchMode=yes", "-o", f"ControlPath={control}"]


def ssh_argv(part: Part, remote_command: Sequence[str]) -> list[str]:
    """ssh into the guest; the command words go to the guest's shell, as with ssh itself."""
    return ["ssh", *common_options(part), "--", part.name, *remote_command]


def login_argv(part: Part, args: Sequence[str], *, tty: bool) -> list[str]:
    """``PART-ssh``: ssh with the options every script uses; args are the user's own.

    They follow the host name, where ssh still reads leading options (``-L 8080:localhost:80``)
    and takes the rest as the command. A terminal on our side gets one in the guest, for a
    command as for a login.
    """
    return ["ssh", *common_options(part), *(["-t"] if tty else []), part.name, *args]


def scp_argv(part: Part, source: str, target: str, *, legacy: bool) -> list[str]:
    """scp with ``remote:`` standing for the guest in source or target."""
    return ["scp", *common_options(part), *(["-O"] if legacy else []), "--", source, target]


def remote(part: Part, path: str, *, legacy: bool, source: bool) -> str:
    """``PART:path`` for scp, naming that one file, whatever its name (the part's Host entry
    names the user, host and port).

    A leading ``-`` would read as an option and ``~`` as a home folder: such a name gets ``./``.
    SFTP reads a source as a glob pattern: its glob characters are escaped. The legacy protocol
    hands the path to the guest's shell, then checks the name that comes back against it as a
    pattern: a backslash before every character but letters, digits and ``_./-`` means "this
    very character" to both.
    """
    if path.startswith(("-", "~")):
        path = "./" + path
    if legacy:
        if "\n" in path:
            raise VmError(f"{path!r}: the guest has no SFTP server, and without one scp cannot "
                          "name a file with a line break")
        path = "".join(c if c.isalnum() or c in "_./-" else "\\" + c for c in path)
    elif source:
        path = "".join("\\" + c if c in GLOB_CHARACTERS else c for c in path)
    return f"{part.name}:{path}"


def runscript(part: Part, remote_command: Sequence[str]) -> NoReturn:
    command.replace_process(ssh_argv(part, remote_command))


def login(part: Part, args: Sequence[str], *, tty: bool) -> int:
    return command.run_foreground(login_argv(part, args, tty=tty))


def request_poweroff(part: Part) -> bool:
    """Ask the guest over ssh to power off; True when it was asked (it may take a while to go).

    False when ssh does not answer or refuses us, when the guest is already shutting down, or
    when both commands fail in the guest.
    """
    if part.ssh_port is None or not banner(part.ssh_hostname, part.ssh_port):
        return False
    try:
        result = command.run(ssh_argv(part, [POWEROFF]), timeout=CONNECT_TIMEOUT + 10)
    except CommandTimedOut:
        return True  # still connected as the guest goes down
    if result.exit_code == 255:  # ssh's own failure, or the guest closed the connection going down
        return not any(failure in result.stderr for failure in LOGIN_FAILURES)
    return result.exit_code == 0


def copy_argv(part: Part, remote_file: str, local_file: Path, *, upload: bool, legacy: bool) -> list[str]:
    far = remote(part, remote_file, legacy=legacy, source=not upload)
    near = str(local_file.absolute())  # relative, a name with a colon would read as host:path
    source, target = (near, far) if upload else (far, near)
    return scp_argv(part, source, target, legacy=legacy)


def copy(part: Part, remote_file: str, local_file: Path, *, upload: bool, arriving: Path | None = None,
         shown: Path | None = None, shown_remote: str | None = None) -> None:
    """scp, falling back to the legacy protocol for guests without an SFTP server. arriving is
    where a download's bytes land: once some did, a closed connection is a cut transfer, not a
    guest without SFTP. shown and shown_remote are the files' names in messages."""
    first: CommandFailed | None = None
    try:
        try:
            command.checked(copy_argv(part, remote_file, local_file, upload=upload, legacy=False))
        except CommandFailed as error:
            first = error
            if not any(marker in error.stderr for marker in NO_SFTP_MARKERS) or _size(arriving):
                raise
            command.checked(copy_argv(part, remote_file, local_file, upload=upload, legacy=True))
    except CommandFailed as error:
        near, far = shown or local_file, shown_remote or remote_file
        source, target = (near, far) if upload else (far, near)
        # scp's last line ("lost connection") is no reason: ssh's, on the lines before, is.
        said = " ".join(error.stderr.split()) or f"exit status {error.exit_code}"
        got = _size(arriving)
        if got:
            raise VmError(f"scp {source}: the transfer was cut after {got} bytes ({said})") from None
        if first is not None and error is not first \
                and any(m in error.stderr for m in LOGIN_FAILURES) and "Connection closed" in first.stderr:
            raise VmError(f"scp {source}: the connection to the guest was cut during the transfer "
                          f"({' '.join(first.stderr.split())}), and the guest is no longer "
                          f"answering ({said}); is the VM still running?") from None
        raise VmError(f"scp {source} {target} failed: {said}") from None


def _size(path: Path | None) -> int:
    try:
        return 0 if path is None else path.stat().st_size
    except OSError:
        return 0


def sendfile(part: Part, remote_file: str, local_file: Path) -> None:
    """local_file into the guest through a temporary name beside the target: a transfer cut
    half-way (the VM stopped, Ctrl-C) leaves the guest's file as it was. The target is what scp
    would write: a file named like local_file inside a folder, the file a symlink points to."""
    if not local_file.is_file():
        raise VmError(f"{local_file}: no such file")
    target = _guest_target(part, remote_file, local_file.name)
    partial = str(PurePosixPath(target).with_name(f".{PurePosixPath(target).name}.sendfile-{os.getpid()}"))
    done = False
    try:
        copy(part, partial, local_file, upload=True, shown_remote=remote_file)
        _in_guest(part, f"{_KEEP_OWNER_AND_MODE} {shlex.quote(target)} {shlex.quote(partial)} "
                        f"&& mv -f -- {shlex.quote(partial)} {shlex.quote(target)}",
                  f"replacing {remote_file}")
        done = True
    except VmError as error:
        raise VmError(f"{error}; {remote_file} in the guest is unchanged") from None
    finally:
        if not done:
            with contextlib.suppress(VmError, CommandError):
                command.run(ssh_argv(part, [f"rm -f -- {shlex.quote(partial)}"]),
                            timeout=CONNECT_TIMEOUT + 10)


# Overwritten in place by scp, a file keeps its owner and mode; so does it when replaced ($1 by $2).
_KEEP_OWNER_AND_MODE = ('keep() { [ -e "$1" ] || return 0; chown "$(stat -c %u:%g -- "$1")" -- "$2" '
                        '2>/dev/null; chmod "$(stat -c %a -- "$1")" -- "$2"; }; keep')
# Where scp would write: into a folder under the file's own name, through a symlink to its end.
_TARGET = ('if [ -d "$1" ]; then printf "%s/%s" "${1%/}" "$2"; elif [ -L "$1" ] && '
           't=$(readlink -f -- "$1"); then printf "%s" "$t"; else printf "%s" "$1"; fi')


def _guest_target(part: Part, remote_file: str, name: str) -> str:
    script = f"set -- {shlex.quote(remote_file)} {shlex.quote(name)}; {_TARGET}"
    target = _in_guest(part, script, f"looking up {remote_file}")
    if not PurePosixPath(target).name:
        raise VmError(f"{remote_file!r}: names no file in the guest")
    return target


def _in_guest(part: Part, script: str, doing: str) -> str:
    try:
        return command.checked(ssh_argv(part, [script]), timeout=CONNECT_TIMEOUT + 60, doing=doing).stdout
    except CommandFailed as error:
        reason = error.reason or f"exit status {error.exit_code}"
        raise VmError(f"{doing} in the guest failed: {reason}") from None


def getfile(part: Part, remote_file: str, local_file: Path) -> None:
    """The guest's file at local_file, through a temporary name beside it: a transfer cut
    half-way (the VM stopped, Ctrl-C) leaves the local file as it was."""
    target = local_file
    if target.is_dir():
        target = target / PurePosixPath(remote_file).name  # as scp does into a folder
    if target.is_symlink():
        target = target.resolve()  # scp writes through a link; the link stays
    partial = target.with_name(f".{target.name}.getfile-{os.getpid()}")
    partial.unlink(missing_ok=True)
    try:
        copy(part, remote_file, partial, upload=False, arriving=partial, shown=local_file)
        with contextlib.suppress(FileNotFoundError):
            # Overwritten in place, a file keeps its mode; so does it here.
            os.chmod(partial, stat.S_IMODE(target.stat().st_mode))
        os.replace(partial, target)
    except VmError as error:
        raise VmError(f"{error}; {local_file} is unchanged") from None
    except OSError as error:
        raise VmError(f"cannot write {target}: {error.strerror or error}; {local_file} is "
                      "unchanged") from None
    finally:
        partial.unlink(missing_ok=True)


def banner(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when an SSH server answers on host:port with its banner."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            return connection.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def can_log_in(part: Part) -> bool:
    """A real login: the guest ran ``true`` for us."""
    result = command.run(ssh_argv(part, ["true"]), timeout=CONNECT_TIMEOUT + 20)
    check_host_key(part, result)
    return result.exit_code == 0


def check_host_key(part: Part, result: command.Result) -> None:
    """A login refused for the guest's host key is no "not up yet": say so, once."""
    if "Host key verification failed" in result.stderr:
        known_hosts = RunFiles.of(part).known_hosts
        if pins_host_key(part):
            raise VmError(f"the guest's ssh host key is not the one kvmtasks gave it (pinned in "
                          f"{known_hosts}): the guest did not apply the cloud-init seed; "
                          "see its console log")
        raise VmError(
            f"the guest's ssh host key is not the one in {known_hosts}; "
            "if the guest was reinstalled, delete that file and start again"
        )

