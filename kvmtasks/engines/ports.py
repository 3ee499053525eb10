"""Host ports shared by several parts: found when the tasks are made, claimed under a lock at start.

Two parts may forward the same host port as long as they never run at the
same time. Which parts share which port is known from the config alone, so
it is computed once, before doit runs anything (``clashes``); ``start`` then
holds one lock file per shared port, decided with it, while it checks that
the other parts are stopped and boots its VM, so two parallel starts cannot
both pass the check.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kvmtasks.config.part import Part, forwards
from kvmtasks.config.remote import remote_of
from kvmtasks.engines.running import current
from kvmtasks.errors import VmError
from kvmtasks.provision.locking import held


@dataclass(frozen=True)
class Clash:
    """A host port this part forwards that other parts forward too."""

    protocol: str
    port: int
    others: tuple[Part, ...]
    lock: Path
    host: str | None = None  # the remote libvirt host the port is on; None: this machine


def clashes(parts: Sequence[Part]) -> dict[str, tuple[Clash, ...]]:
    """Part name -> the host ports it shares with other parts (pure)."""
    users: dict[tuple[str, str, int], list[Part]] = defaultdict(list)
    for part in parts:
        remote = remote_of(part)
        host = remote.host if remote else ""  # ports of VMs on other hosts never clash with ours
        for key in dict.fromkeys((host, f.protocol, f.host_port) for f in forwards(part)):
            users[key].append(part)
    found: dict[str, list[Clash]] = defaultdict(list)
    for (host, protocol, port), sharing in sorted(users.items()):
        if len(sharing) < 2:
            continue
        # One lock for everyone sharing the port: in the first such part's var directory.
        name = f"{host}-{protocol}-{port}.lock" if host else f"{protocol}-{port}.lock"
        lock = sharing[0].buildout.var_directory / ".ports" / name
        for part in sharing:
            others = tuple(other for other in sharing if other is not part)
            found[part.name].append(Clash(protocol, port, others, lock, host or None))
    return {name: tuple(items) for name, items in found.items()}


def _open_lock(path: Path) -> TextIO:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")
    except OSError as error:
        raise VmError(f"cannot open the shared port's lock {path}: {error.strerror or error}") from None


@contextmanager
def claimed(part: Part, shared: Sequence[Clash]) -> Iterator[None]:
    """Hold the locks of part's shared ports; fail in one line if another part holding one runs."""
    with ExitStack() as stack:
        for clash in shared:  # sorted by (host, protocol, port): every start takes them in one order
            handle = stack.enter_context(_open_lock(clash.lock))
            stack.enter_context(held(handle, f"start:{part.name}: waiting for another start "
                                             f"forwarding {clash.protocol} port {clash.port}"))
            for other in clash.others:
                if current(other).running:
                    where = f"{clash.protocol} on {clash.host}" if clash.host else clash.protocol
                    raise VmError(
                        f"host port {clash.port} ({where}) is also forwarded by part "
                        f"{other.name}, which is running; stop it first: doit stop:{other.name}"
                    )
        yield
