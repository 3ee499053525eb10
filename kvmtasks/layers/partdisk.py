"""A part's own disk over its setup layers: its overlay made over the top layer, and whether
each step's entry is in the cache and verifies (what the doit tasks ask)."""

from __future__ import annotations

from collections.abc import Callable

from kvmtasks.config.part import Part
from kvmtasks.errors import KvmTasksError, ProvisionError
from kvmtasks.layers import store
from kvmtasks.provision import overlay
from kvmtasks.provision.steps import VmStatus


def step_ready(part: Part, index: int) -> bool:
    """The entries of the part's steps up to index are in the cache, whole and unchanged."""
    try:
        root, links = store.layers_root(part), store.chain(part)
        for link in links[: index + 1]:
            with store.entry_lock(root, link.key, f"checking {link.step} for {part.name}"):
                if store.problem(root, link.key, link.parent) is not None:
                    return False
    except (KvmTasksError, OSError):
        return False
    return True


def top_base(part: Part) -> overlay.Base:
    """The part's top layer, checked, as the base of its overlay."""
    root, top = store.layers_root(part), store.chain(part)[-1]
    with store.entry_lock(root, top.key, f"using {top.step} for {part.name}"):
        problem = store.problem(root, top.key, top.parent)
        record = store.read_record(root, top.key)
    if problem is not None or record is None:
        raise ProvisionError(f"the layer of setup step {top.step} is not in the cache ({problem}); "
                             f"run: doit provision:{part.name}")
    return overlay.Base(store.layer_path(root, top.key), "qcow2", str(record["sha256"]))


def create_overlay(part: Part, vm_status: VmStatus) -> None:
    overlay.create(part, vm_status, top_base(part))


def reset(part: Part, say: Callable[[str], None] = print, *, vm_status: VmStatus) -> None:
    overlay.reset(part, say, vm_status=vm_status, base=top_base(part))


def overlay_up_to_date(part: Part) -> bool:
    try:
        return overlay.up_to_date(part, top_base(part))
    except (KvmTasksError, OSError):
        return False


def mark_used(part: Part) -> None:
    """The part's chain, from its base to its top: used by the part, now."""
    store.mark_chain_used(part)
