"""Building a part's missing setup layers: one throwaway builder VM runs every missing step.

The builder is a part derived from the part (engines/qemu, the same lifecycle): its own run
folder, port, ssh key and, for a cloud-init image, its own seed (host name, host key,
instance-id), booted over a temporary qcow2 over the last good layer. Each step copies its
files in, runs as root with its output streamed and logged, and is captured as a layer
(layers/capture.py) that enters the cache under its key (layers/store.py). Whatever happens
(a failing step, its time limit, Ctrl-C, SIGTERM) the builder VM is ended and its temporary
files removed; the layers made before stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shlex
import shutil
import socket
import tarfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from kvmtasks import command
from kvmtasks.config import seedrules
from kvmtasks.config.diskformat import disk_format
from kvmtasks.config.options import Accel, Engine, size_bytes
from kvmtasks.config.part import Part, listen_address
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.config.setupsteps import SetupStep
from kvmtasks.engines import lifecycle
from kvmtasks.engines.qemu.argv import LAYER_CLUSTER, qemu_argv
from kvmtasks.engines.qemu.vm import QemuMachine
from kvmtasks.errors import CommandFailed, CommandTimedOut, ProvisionError
from kvmtasks.guest import connection, ssh
from kvmtasks.layers import capture, store
from kvmtasks.provision import keys, seedstep

Say = Callable[[str], None]
BUILDER_HOSTNAME = "kvmtasks-builder"


class BuilderMachine(QemuMachine):
    """The direct QEMU engine, with the guest's trims passed to the disk's file."""

    def _argv(self, accel: Accel) -> list[str]:
        return qemu_argv(self.part, accel=accel.value, disk_format="qcow2", listen_address=self.address,
                         machine=self.machine_type, discard=True)


def log_path(part: Part, step: str) -> Path:
    """Where a step's output is kept: var/PART/setup/STEP.log."""
    return part.state_directory / "setup" / f"{step}.log"


def builder_part(part: Part, folder: Path, below: Path, port: int) -> Part:
    """The builder: the part's image and steps, its own identity and files; its disk in folder."""
    return dataclasses.replace(
        part, name=f"{part.name}-builder", image=None, file=below, location=folder, overlay=True,
        disk_size=None, kvm_engine=Engine.QEMU, kvm_snapshot=False, kvm_redir=(), kvm_vnc=None,
        kvm_run_directory=part.state_directory, ssh_port=port,
        ssh_key_path=None if part.cloud_init else part.ssh_key_path,
        cloud_init_hostname=BUILDER_HOSTNAME, cloud_init_user_data=None, setup=())


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


def build(part: Part, say: Say = print) -> None:
    """Make the part's missing layers (a damaged one is discarded and made again, with those
    above it); nothing to do when every entry is there and verifies."""
    root = store.layers_root(part)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ProvisionError(f"cannot create the layer cache {root}: {error.strerror or error}") from None
    store.ensure_base(part, root)
    links = store.chain(part)
    todo = _missing(part, root, links, say)
    if not todo:
        return
    with contextlib.ExitStack() as locks:
        for link in todo:
            locks.enter_context(store.entry_lock(root, link.key, f"building {link.step} for {part.name}"))
        todo = _missing(part, root, links, say)  # another run may have made them while we waited
        if todo:
            _build(part, root, links, todo, say)


def _missing(part: Part, root: Path, links: list[store.Link], say: Say) -> list[store.Link]:
    """The links from the first one whose entry is missing or damaged, up to the top."""
    for index, link in enumerate(links):
        with store.entry_lock(root, link.key, f"checking {link.step} for {part.name}"):
            problem = store.problem(root, link.key, link.parent)
            if problem is None:
                continue
            if problem != "missing":
                say(f"setup:{part.name}:{link.step}: the cached layer {root / link.key} is damaged "
                    f"({problem}); it is discarded and made again")
                store.discard(root, link.key)
        return links[index:]
    return []


def _build(part: Part, root: Path, links: list[store.Link], todo: list[store.Link], say: Say) -> None:
    below = todo[0].parent
    steps = {step.name: step for step in part.setup}
    folder = root / f"tmp-{part.name}-{secrets.token_hex(6)}"
    folder.mkdir()
    builder = builder_part(part, folder, store.layer_path(root, below),
                           _free_port(listen_address(part.ssh_hostname)))
    machine = BuilderMachine(builder)
    try:
        _first_disk(part, builder, below, first=todo[0] is links[0])
        if builder.cloud_init:
            seedstep.write_seed(builder)
        say(f"setup:{part.name}: booting a builder VM over {root / below} for "
            f"{', '.join(link.step for link in todo)}")
        began = time.monotonic()
        lifecycle.start(machine, say)
        say(f"setup:{part.name}: the builder VM answered in {time.monotonic() - began:.1f} s")
        for index, link in enumerate(todo):
            _run_step(part, builder, steps[link.step], folder)
            _capture(part, builder, root, link, folder, index)
    finally:
        with contextlib.suppress(Exception):
            connection.close(builder)
        machine.force_off()
        shutil.rmtree(folder, ignore_errors=True)


def _first_disk(part: Part, builder: Part, below: str, *, first: bool) -> None:
    fmt = "raw" if below.startswith("base-") and _is_raw(builder.file) else "qcow2"
    size = [str(size_bytes(part.disk_size))] if first and part.disk_size else []
    command.checked(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={LAYER_CLUSTER}",
                     "-F", fmt, "-b", store.expected_backing(below), str(builder.boot_disk), *size],
                    timeout=capture.QEMU_IMG_TIMEOUT,
                    doing=f"creating the builder's disk {builder.boot_disk}")


def _is_raw(path: Path | None) -> bool:
    return path is not None and disk_format(path) == "raw"


def _as_root(part: Part, words: list[str]) -> list[str]:
    remote = shlex.join(words)
    return [remote if part.ssh_user == "root" else f"sudo -n sh -c {shlex.quote(remote)}"]


def _run_step(part: Part, builder: Part, step: SetupStep, folder: Path) -> None:
    """Copy the step's files in and run it, as root; its output to the terminal and its log."""
    deadline = time.monotonic() + step.timeout
    log = log_path(part, step.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    scratch = capture.SCRATCH
    with open(log, "wb") as output:
        runs: list[list[str]] = [[f"rm -rf {scratch} && mkdir -p {scratch}"]]
        uploads: list[tuple[Path, str]] = []
        if step.copies:
            archive = folder / "copy.tar"
            _archive(step, archive)
            uploads.append((archive, f"{scratch}/copy.tar"))
            runs.append(_as_root(part, ["tar", "-x", "-f", f"{scratch}/copy.tar", "-C", "/"]))
        if step.run is not None:
            script = folder / "step.sh"
            script.write_text(f"set -e\n{step.run}\n")
            uploads.append((script, f"{scratch}/step.sh"))
            runs.append(_as_root(part, ["sh", f"{scratch}/step.sh"]))
        else:
            assert step.script is not None
            uploads.append((step.script, f"{scratch}/script"))
            runs.append([f"chmod 755 {scratch}/script"])
            runs.append(_as_root(part, [f"{scratch}/script"]))
        _run(part, builder, step, runs[0], output, deadline, log)
        for local, remote in uploads:
            try:
                ssh.copy(builder, remote, local, upload=True)
            except Exception as error:
                raise ProvisionError(f"setup step {step.name} of {part.name}: copying {local} into "
                                     f"the builder failed: {error}") from None
        for words in runs[1:]:
            _run(part, builder, step, words, output, deadline, log)


def _run(part: Part, builder: Part, step: SetupStep, words: list[str], output: object,
         deadline: float, log: Path) -> None:
    remaining = deadline - time.monotonic()
    result = None
    if remaining > 0:
        result = command.run_logged(ssh.ssh_argv(builder, words), output, timeout=remaining)
    if result is None or result.exit_code is None:
        raise ProvisionError(f"setup step {step.name} of {part.name} did not finish within timeout = "
                             f"{step.timeout:g} s; no layer was cached for it",
                             _tail(log, result.tail if result else ""))
    if result.exit_code != 0:
        raise ProvisionError(f"setup step {step.name} of {part.name} failed with exit status "
                             f"{result.exit_code}; no layer was cached for it", _tail(log, result.tail))


def _tail(log: Path, tail: str) -> str:
    return f"--- last lines of {log} ---\n{tail}" if tail else f"--- {log} is empty ---"


def _archive(step: SetupStep, archive: Path) -> None:
    """The step's copies as one tar, each entry at its guest path, modes kept, owned by root."""
    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(archive, "w") as tar:
        for copy in step.copies:
            target = PurePosixPath(copy.target)
            if copy.source.is_dir():
                for path in sorted(copy.source.rglob("*")):
                    name = str(target / path.relative_to(copy.source).as_posix()).lstrip("/")
                    tar.add(path, arcname=name, recursive=False, filter=owned_by_root)
            else:
                name = str(target / copy.source.name if copy.target.endswith("/") else target)
                tar.add(copy.source, arcname=name.lstrip("/"), filter=owned_by_root)


def _capture(part: Part, builder: Part, root: Path, link: store.Link, folder: Path, index: int) -> None:
    """The step's result as its layer: identity forgotten, frozen, snapshot, thawed; checked,
    then into the cache."""
    started = time.monotonic()
    builder_key = None
    if builder.cloud_init:
        builder_key = keys.read_public(seedrules.generated_key_path(builder))
    prepare = capture.forget_identity(part, builder_key) + "\n" + capture.freeze_script()
    result = command.run(ssh.ssh_argv(builder, _as_root(part, ["sh", "-c", prepare])), timeout=300)
    layer = builder.boot_disk if index == 0 else folder / f"disk-{index}.qcow2"
    try:
        if result.exit_code != 0:
            raise ProvisionError(f"setup step {link.step} of {part.name}: the guest's file systems could "
                                 f"not be frozen for the capture (exit status {result.exit_code})",
                                 result.stdout + result.stderr)
        capture.snapshot(RunFiles.of(builder).qmp_socket, folder / f"disk-{index + 1}.qcow2",
                         store.expected_backing(link.key), f"setup{index + 1}")
    finally:
        thawed = command.run(ssh.ssh_argv(builder, _as_root(part, ["sh", "-c", capture.thaw_script()])),
                             timeout=300)
    if thawed.exit_code != 0:
        raise ProvisionError(f"setup step {link.step} of {part.name}: the guest's file systems did not "
                             f"thaw after the capture (exit status {thawed.exit_code})", thawed.stderr)
    try:
        store.admit(root, link, layer, store.user_of(part), check_timeout=capture.QEMU_IMG_TIMEOUT,
                    doing=f"checking the layer of {link.step}")
    except CommandFailed as error:
        raise ProvisionError(f"setup step {link.step} of {part.name}: its layer failed qemu-img check: "
                             f"{error}") from None
    except CommandTimedOut as error:
        raise ProvisionError(f"setup step {link.step} of {part.name}: {error}") from None
    allocated = os.stat(root / link.key / store.LAYER).st_blocks * 512
    print(f"setup:{part.name}:{link.step}: layer {link.key[:16]} cached ({allocated / 1e6:.1f} MB; "
          f"captured in {time.monotonic() - started:.1f} s)", flush=True)


