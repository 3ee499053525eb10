"""The part's ssh config file, ``var/PART/ssh_config``: a ``Host PART`` entry with every option
kvmtasks's own ssh and scp use, so that any ssh tool reaches the guest as the scripts do.

``ssh -F FILE PART``, ``scp -F FILE``, ``rsync -e 'ssh -F FILE'``, or ``Include FILE`` from
``~/.ssh/config``. It names the part's key, user, host and port, its known_hosts with the same
strictness as the scripts, the VM's ssh master socket (``ControlMaster auto``: the first tool
opens it when ``start`` left none), and, for a remote libvirt part, the jump to its host.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from kvmtasks.config import sshvalue
from kvmtasks.config.part import Part
from kvmtasks.config.remote import RemoteHost, remote_of
from kvmtasks.config.runfiles import RunFiles, control_socket, is_private_folder
from kvmtasks.config.seedrules import identity_file, pins_host_key
from kvmtasks.errors import VmError

CONNECT_TIMEOUT = 10
# ssh hands the -F path to a shell when it starts the jump connection (ProxyJump).
SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


def path(part: Part) -> Path:
    return part.state_directory / "ssh_config"


def jump_host(part: Part) -> str:
    """The remote libvirt host's name in the file: one per part, so that several files
    included in one ``~/.ssh/config`` never take each other's."""
    return f"{part.name}-libvirt-host"


def quoted(value: Path) -> str:
    try:
        return sshvalue.quote(value)
    except ValueError as error:
        raise VmError(f"{value}: {error}") from None


def check_jump_path(part: Part) -> None:
    if remote_of(part) is not None and not SHELL_SAFE_PATH.fullmatch(str(path(part))):
        raise VmError(f"kvm_run_directory = {str(part.kvm_run_directory)!r}: with a remote libvirt host "
                      "it may hold only letters, digits and '_./+-' (ssh passes it through a shell)")


def socket_path(part: Part) -> Path | None:
    """The VM's ssh master socket, when its folder is ours alone (guest/connection.py)."""
    socket = control_socket(part)
    return socket if is_private_folder(socket.parent) else None


def host_entry(part: Part) -> list[str]:
    if part.ssh_port is None:
        raise VmError(f"part {part.name} has no ssh_port: set it to reach the guest over ssh")
    # A host key kvmtasks gave the guest is known before the first connection: strict from the
    # start. Otherwise the guest's own key is trusted on first use, then held to.
    strict = "yes" if pins_host_key(part) else "accept-new"
    lines = [f"Host {part.name}",
             f"  HostName {part.ssh_hostname}",
             f"  Port {part.ssh_port}",
             f"  User {part.ssh_user}",
             f"  UserKnownHostsFile {quoted(RunFiles.of(part).known_hosts)}",
             f"  StrictHostKeyChecking {strict}",
             f"  ConnectTimeout {CONNECT_TIMEOUT}",
             "  LogLevel ERROR"]
    identity = identity_file(part)
    if identity is not None:
        lines += [f"  IdentityFile {quoted(identity)}", "  IdentitiesOnly yes"]
    socket = socket_path(part)
    if socket is not None:
        lines += ["  ControlMaster auto", f"  ControlPath {quoted(socket)}"]
    if remote_of(part) is not None:
        lines.append(f"  ProxyJump {jump_host(part)}")
    return lines


def jump_entry(name: str, remote: RemoteHost, known_hosts: Path) -> list[str]:
    """The remote libvirt host, as its URI describes it."""
    lines = [f"Host {name}", f"  HostName {remote.host}", "  BatchMode yes",
             f"  ConnectTimeout {CONNECT_TIMEOUT}",
             f"  UserKnownHostsFile {quoted(known_hosts)}",
             f"  StrictHostKeyChecking {'accept-new' if remote.verify_host_key else 'no'}"]
    if remote.user:
        lines.append(f"  User {remote.user}")
    if remote.port:
        lines.append(f"  Port {remote.port}")
    if remote.keyfile:
        lines += [f"  IdentityFile {quoted(remote.keyfile)}", "  IdentitiesOnly yes"]
    return lines


def text(part: Part) -> str:
    """The file: the guest's entry (when the part has an ssh_port), then the jump's."""
    lines = [f"# {part.name}: written by kvmtasks (doit render:{part.name}); edits are overwritten.",
             f"# ssh -F {path(part)} {part.name}"]
    if part.ssh_port is not None:
        lines += ["", *host_entry(part)]
    remote = remote_of(part)
    if remote is not None:
        known_hosts = part.state_directory / "known_hosts.libvirt-host"
        lines += ["", *jump_entry(jump_host(part), remote, known_hosts)]
    return "\n".join(lines) + "\n"


def _make_socket_folder(part: Part) -> None:
    # Made now, so that the file can name the socket before start opens the master.
    with contextlib.suppress(OSError):  # then no ControlPath: ssh connects directly
        control_socket(part).parent.mkdir(mode=0o700, exist_ok=True)


def needed(part: Part) -> bool:
    return part.ssh_port is not None or remote_of(part) is not None


def write(part: Part) -> None:
    """Write the file (or remove a stale one: a part without ssh_port nor remote host has none)."""
    target = path(part)
    if not needed(part):
        target.unlink(missing_ok=True)
        return
    check_jump_path(part)
    _make_socket_folder(part)
    content = text(part)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(content, encoding="utf-8")
        # ssh refuses an included file others may write to.
        temporary.chmod(0o644)
        os.replace(temporary, target)
    except OSError as error:  # a full disk: one line, and the old file as it was
        raise VmError(f"writing {target}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
