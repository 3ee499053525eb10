"""Whether a part's VM runs, whatever its engine: what start, stop, status, ``doit clean``,
the shared ports and provisioning's refusals all ask.

The answer is a config.runfiles.Status (a fact, kept on the floor); asking may run virsh,
so the question lives here, beside the engines. Provisioning sits below and is handed
``current`` by its callers.
"""

from __future__ import annotations

from kvmtasks.config.options import Engine
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import (
    RunFiles,
    Status,
    clean_network_sockets,
    clean_run_files,
    is_our_qemu,
    read_pid,
)


def current(part: Part) -> Status:
    """The VM's state; a stale pid file is removed on the way."""
    if part.kvm_engine is Engine.LIBVIRT:
        return _domain_state(part)
    files = RunFiles.of(part)
    pid = read_pid(files)
    if pid is not None and is_our_qemu(pid, files):
        accel = files.accel.read_text().strip() if files.accel.exists() else None
        return Status(True, pid, accel)
    if files.pidfile.exists():
        clean_run_files(files)
        clean_network_sockets(part)
    return Status(False)


def _domain_state(part: Part) -> Status:
    """A libvirt part runs when kvmtasks started its domain and libvirt says it lives.

    Only a part kvmtasks started is asked about, so a no-op doit run never calls virsh.
    """
    # Here, not at the top: a direct-QEMU part's scripts never load the libvirt engine.
    from kvmtasks.engines.libvirt.virsh import LIVE_DOMAIN_STATES, VirshError, virsh

    files = RunFiles.of(part)
    if not files.domain.exists():
        return Status(False)
    try:
        state = virsh(part, "domstate", part.name, timeout=60).strip()
    except VirshError as error:
        if not error.not_found:
            raise
        state = "undefined"
    if state in LIVE_DOMAIN_STATES:
        accel = files.accel.read_text().strip() if files.accel.exists() else None
        return Status(True, None, accel)
    files.domain.unlink(missing_ok=True)
    clean_network_sockets(part)
    return Status(False)
