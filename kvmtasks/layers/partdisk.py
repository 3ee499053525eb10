"""A part's own disk over its setup layers: its overlay made over the top layer (or, for a chain
deeper than flatten.FLATTEN_PAST, over the chain flattened), and whether each step's entry is in
the cache and verifies (what the doit tasks ask)."""

from __future__ import annotations

from collections.abc import Callable

from kvmtasks.config.part import Part
from kvmtasks.errors import KvmTasksError, ProvisionError
from kvmtasks.layers import flatten, store
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


def _checked_base(part: Part, link: store.Link, what: str) -> overlay.Base:
    root = store.layers_root(part)
    with store.entry_lock(root, link.key, f"using {what} for {part.name}"):
        problem = store.problem(root, link.key, link.parent)
        record = store.read_record(root, link.key)
    if problem is not None or record is None:
        raise ProvisionError(f"{what} is not in the cache ({problem}); run: doit provision:{part.name}")
    return overlay.Base(store.layer_path(root, link.key), "qcow2", str(record["sha256"]))


def top_base(part: Part) -> overlay.Base:
    """The part's top layer, checked, as the base of its overlay."""
    top = store.chain(part)[-1]
    return _checked_base(part, top, f"the layer of setup step {top.step}")


def _flat_base(part: Part) -> overlay.Base:
    links = store.chain(part)
    return _checked_base(part, flatten.flat_link(links), f"the flattened layers up to {links[-1].step}")


def new_base(part: Part, say: Callable[[str], None] = print) -> overlay.Base:
    """What a new overlay of the part is made over: its top layer, or its chain flattened (made
    now if need be) when deeper than flatten.FLATTEN_PAST."""
    links = store.chain(part)
    if not flatten.is_deep(links):
        return top_base(part)
    flatten.ensure(store.layers_root(part), links, store.user_of(part), say)
    return _flat_base(part)


def create_overlay(part: Part, vm_status: VmStatus) -> None:
    overlay.create(part, vm_status, new_base(part))


def reset(part: Part, say: Callable[[str], None] = print, *, vm_status: VmStatus) -> None:
    overlay.reset(part, say, vm_status=vm_status, base=new_base(part, say))


def overlay_up_to_date(part: Part) -> bool:
    """The overlay stands on the part's chain as it is: over its top layer, or over the chain
    flattened. Either holds the same disk, so an overlay made over the top layer of a deep chain
    (by a kvmtasks that did not flatten) keeps the guest's changes."""
    bases: list[Callable[[Part], overlay.Base]] = [top_base]
    if part.setup and flatten.is_deep(part.setup):
        bases.append(_flat_base)
    for base in bases:
        try:
            if overlay.up_to_date(part, base(part)):
                return True
        except (KvmTasksError, OSError):
            pass
    return False


def mark_used(part: Part) -> None:
    """The part's chain, from its base to its top, and its flat entry: used by the part, now."""
    store.mark_chain_used(part)
    links = store.chain(part)
    if flatten.is_deep(links):
        root, flat = store.layers_root(part), flatten.flat_link(links)
        if store.read_record(root, flat.key) is not None:
            store.mark_used(root, flat.key, store.user_of(part))
