"""What ``status`` reports: the facts about a part's VM, gathered once, for people or as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvmtasks.config import seedrules, shares
from kvmtasks.config.networks import NetworkLink
from kvmtasks.config.part import Part, forwards
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.engines.running import current
from kvmtasks.guest import ssh, sshconfig


class State(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    SUSPENDED = "suspended"  # not running, with a saved state that start resumes
    # QEMU runs, the guest is frozen: a suspend or resume was interrupted (start or stop ends it)
    SUSPENDING = "suspending"
    RESUMING = "resuming"


@dataclass(frozen=True)
class Forward:
    protocol: str
    host_address: str
    host_port: int
    guest_address: str  # empty: the guest's own address
    guest_port: int


@dataclass(frozen=True)
class ShareFact:
    host: str
    guest: str
    read_only: bool
    carrier: str  # as configured: auto, 9p, virtiofs, rsync
    carried_by: str | None  # how it is carried now (9p, virtiofs, rsync, tar); None: not running


@dataclass(frozen=True)
class Facts:
    """Everything status says; describe() and as_json() only format it."""

    part: str
    state: State
    engine: str  # kvm_engine
    libvirt_uri: str | None  # the libvirt host of a libvirt part
    pid: int | None  # of QEMU started directly (a libvirt domain's is libvirt's business)
    accelerator: str | None
    forwards: tuple[Forward, ...]
    vnc: str | None
    ssh_command: tuple[str, ...] | None  # the argv of an interactive login, as PART-ssh runs it
    console_log: Path | None  # None: it is on a remote libvirt host
    disks: Mapping[str, Path]  # role ("image", "overlay" over it) -> path: what the VM boots from
    ssh_key: Path | None = None  # the identity file ssh logs in with
    ssh_key_made: bool = False  # made by kvmtasks for a cloud_init part
    pinned_known_hosts: Path | None = None  # known_hosts kvmtasks writes from the host key it made
    problem: str | None = None  # why a state left on disk cannot be resumed
    ssh_config: Path | None = None  # the part's ssh config file, for any ssh tool
    shares: tuple[ShareFact, ...] = ()  # option share, in its order
    networks: tuple[NetworkLink, ...] = ()  # the private networks it joins
    arch: str = "x86_64"  # kvm_arch
    firmware: str = "bios"

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING


def gather(part: Part, *, address: str, console_log: Path | None,
           libvirt_uri: str | None = None, suspended: bool = False, between: State | None = None,
           problem: str | None = None) -> Facts:
    """The facts of a part; an engine says where its forwards listen, where its console is,
    whether a stopped VM has a saved state, whether a running one is frozen between running
    and suspended, and why a state on disk cannot be resumed."""
    status = current(part)
    stopped = State.SUSPENDED if suspended else State.STOPPED
    return Facts(
        part=part.name,
        state=(between or State.RUNNING) if status.running else stopped,
        engine=part.kvm_engine.value,
        libvirt_uri=libvirt_uri,
        pid=status.pid,
        accelerator=status.accel,
        forwards=tuple(
            Forward(r.protocol, address, r.host_port, r.guest_address, r.guest_port)
            for r in forwards(part)
        ),
        vnc=part.kvm_vnc,
        ssh_command=tuple(ssh.login_argv(part, [], tty=False)) if part.ssh_port is not None else None,
        console_log=console_log,
        disks={"image": part.image_path, **({"overlay": part.overlay_path} if part.overlay else {}),
               **({"varstore": part.varstore_path} if part.firmware.value != "bios" else {})},
        ssh_key=seedrules.identity_file(part),
        ssh_key_made=part.ssh_key_path is None and part.cloud_init,
        pinned_known_hosts=RunFiles.of(part).known_hosts if seedrules.pins_host_key(part) else None,
        problem=problem,
        ssh_config=sshconfig.path(part) if part.ssh_port is not None else None,
        shares=_share_facts(part, running=status.running),
        networks=part.links,
        arch=part.kvm_arch.value,
        firmware=part.firmware.value,
    )


def _share_facts(part: Part, *, running: bool) -> tuple[ShareFact, ...]:
    now = shares.carried(part.state_directory) if running else {}
    return tuple(ShareFact(s.host, s.guest, s.read_only, s.carrier.value, now.get(s.guest))
                 for s in part.shares)


def share_lines(facts: Facts) -> list[str]:
    lines = []
    for share in facts.shares:
        how = share.carried_by or ("not carried" if facts.running else "when started")
        mode = "read-only" if share.read_only else "read-write"
        lines.append(f"  share {share.host} -> {share.guest} ({mode}, {share.carrier}: {how})")
    return lines


def describe(facts: Facts) -> list[str]:
    """The lines ``status`` prints."""
    if facts.state is State.SUSPENDED:
        return [f"{facts.part} is suspended; start resumes it"]
    if facts.state in (State.SUSPENDING, State.RESUMING):
        verb = "suspend" if facts.state is State.SUSPENDING else "resume"
        return [f"{facts.part} is {facts.state} (pid {facts.pid}): its guest is frozen by an interrupted "
                f"{verb}; start or stop ends it"]
    if not facts.running:
        if facts.problem is not None:
            return [f"{facts.part} is stopped; its suspended state cannot be resumed, {facts.problem}"]
        return [f"{facts.part} is {facts.state}"]
    accel = f"accel {facts.accelerator or 'unknown'}"
    if facts.libvirt_uri is not None:
        lines = [f"{facts.part} is running (libvirt domain {facts.part} on {facts.libvirt_uri}, {accel})"]
    else:
        lines = [f"{facts.part} is running (pid {facts.pid}, {accel})"]
    for forward in facts.forwards:
        guest = f"{forward.guest_address or 'guest'}:{forward.guest_port}"
        lines.append(f"  forward {forward.protocol} {forward.host_address}:{forward.host_port} -> {guest}")
    if facts.vnc is not None:
        lines.append(f"  vnc {facts.vnc}")
    if facts.console_log is not None:
        lines.append(f"  console log {facts.console_log}")
    if facts.ssh_config is not None:
        lines.append(f"  ssh config {facts.ssh_config} (ssh -F {facts.ssh_config} {facts.part})")
    if facts.ssh_key is not None:
        lines.append(f"  ssh key {facts.ssh_key}" + (" (made by kvmtasks)" if facts.ssh_key_made else ""))
    if facts.pinned_known_hosts is not None:
        lines.append(f"  host key pinned in {facts.pinned_known_hosts}")
    lines += share_lines(facts)
    for link in facts.networks:
        peers = ", ".join(f"{peer.part} {peer.address.split('/')[0]}" for peer in link.peers)
        lines.append(f"  network {link.network} {link.address} mac {link.mac}"
                     f" (with {peers or 'no other part'})")
    if (facts.arch, facts.firmware) != ("x86_64", "bios"):  # said when it is not the PC's default
        lines.append(f"  arch {facts.arch}, firmware {facts.firmware}")
    return lines


def as_json(facts: Facts) -> str:
    data: dict[str, Any] = {
        "part": facts.part,
        "state": facts.state.value,
        "engine": facts.engine,
        "libvirt_uri": facts.libvirt_uri,
        "pid": facts.pid,
        "accelerator": facts.accelerator,
        "arch": facts.arch,
        "firmware": facts.firmware,
        "forwards": [asdict(forward) for forward in facts.forwards],
        "vnc": facts.vnc,
        "ssh_command": list(facts.ssh_command) if facts.ssh_command is not None else None,
        "console_log": str(facts.console_log) if facts.console_log is not None else None,
        "disks": {role: str(path) for role, path in facts.disks.items()},
        "ssh_config": str(facts.ssh_config) if facts.ssh_config is not None else None,
        "shares": [asdict(share) for share in facts.shares],
        "networks": [{"network": link.network, "subnet": link.subnet, "address": link.address,
                      "mac": link.mac, "peers": [asdict(peer) for peer in link.peers]}
                     for link in facts.networks],
    }
    return json.dumps(data, indent=1)
