"""A deep chain's top flattened into one entry over its base, for parts' overlays to stand on.

A read the top layers do not hold walks down the chain, a lookup per layer. bench/layers.py
(docs/benchmarks.md) reads through 1, 4, 8 and 16 layers: in the guest under TCG, whose
emulated I/O costs far more than a lookup, depth is lost in the spread between runs; on the
host, 4 KiB requests one at a time (`qemu-img bench`: the chain's own cost, what a guest
under KVM meets) took 1.07x at 8 layers and 1.13x (best runs 1.19x) at 16, and 0.91x through
16 flattened. So a part whose chain is deeper than FLATTEN_PAST steps boots its overlay over
LAYERS/<flat key>/layer.qcow2: every cluster
in which the chain differs from its base, in one qcow2 backed by the base (the verified image,
shared with the chain: a flat entry holds what the steps wrote, not the image again). It is
made once per top layer and verified, locked, listed and pruned as a layer is. The layers
stay: a changed step is built over them, and the builder boots through the chain.

Made by `qemu-img rebase` rather than `convert -B`: an empty qcow2 over the top, rebased onto
the base; rebase compares the two and copies in every cluster that differs, zeros included
(a step that deleted what the image had), which is the flat entry's whole definition.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence, Sized
from pathlib import Path

from kvmtasks import command
from kvmtasks.config.diskformat import disk_format
from kvmtasks.engines.qemu.argv import LAYER_CLUSTER
from kvmtasks.errors import CommandError, ProvisionError
from kvmtasks.layers import key as keys
from kvmtasks.layers import store

Say = Callable[[str], None]
# Chains up to this depth cost under 10% a request (1.07x at 8); deeper ones are flattened.
FLATTEN_PAST = 8
# rebase reads the whole virtual disk twice (the chain and the base): minutes for a large image.
FLATTEN_TIMEOUT = 3600.0


def is_deep(chain: Sized) -> bool:
    """A chain (its links, or the steps that make it) deep enough to be flattened."""
    return len(chain) > FLATTEN_PAST


def flat_link(links: Sequence[store.Link]) -> store.Link:
    """The flat entry of a chain: named after its top step, backed by the chain's base."""
    return store.Link(links[-1].step, keys.flat_key(links[-1].key), links[0].parent)


def flatten_onto(top: Path, base_backing: str, base_format: str, target: Path) -> None:
    """target: a new qcow2 backed by base_backing (relative to target's folder) holding every
    cluster in which top's chain differs from that base."""
    command.checked(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={LAYER_CLUSTER}",
                     "-F", "qcow2", "-b", os.path.relpath(top, target.parent), str(target)],
                    timeout=FLATTEN_TIMEOUT, doing=f"creating {target}")
    command.checked(["qemu-img", "rebase", "-q", "-f", "qcow2", "-F", base_format, "-b", base_backing,
                     str(target)], timeout=FLATTEN_TIMEOUT, doing=f"flattening {top} into {target}")


def ensure(root: Path, links: Sequence[store.Link], user: str, say: Say) -> str:
    """The chain's flat entry, made (or made again, when damaged) unless it verifies; its name.
    The caller has checked that the chain's entries are there."""
    flat, top = flat_link(links), links[-1]
    with store.entry_lock(root, flat.key, f"flattening the layers up to {top.step}"):
        problem = store.problem(root, flat.key, flat.parent)
        if problem is None:
            return flat.key
        if problem != "missing":
            say(f"the flattened layers up to {top.step} ({root / flat.key}) are damaged ({problem}); "
                "they are discarded and made again")
            store.discard(root, flat.key)
        temporary = root / flat.key / f".{store.LAYER}.{os.getpid()}"
        try:
            with store.entry_lock(root, top.key, f"flattening the layers up to {top.step}"):
                if (why := store.problem(root, top.key, top.parent)) is not None:
                    raise ProvisionError(f"the layer of setup step {top.step} cannot be flattened ({why}); "
                                         "run doit provision again")
                base = store.layer_path(root, flat.parent)
                flatten_onto(store.layer_path(root, top.key), store.expected_backing(flat.parent),
                             disk_format(base), temporary)
            store.admit(root, flat, temporary, user, check_timeout=FLATTEN_TIMEOUT,
                        doing=f"checking {temporary}", kind="flat",
                        extra={"top": top.key, "depth": len(links)})
        except CommandError as error:
            raise ProvisionError(f"flattening the layers up to {top.step}: {error}") from None
        except OSError as error:
            raise ProvisionError(f"flattening the layers up to {top.step} into {temporary}: "
                                 f"{error.strerror or error}") from None
        finally:
            temporary.unlink(missing_ok=True)
    allocated = os.stat(store.layer_path(root, flat.key)).st_blocks * 512
    say(f"the {len(links)} layers up to {top.step} flattened into {flat.key[:16]} "
        f"({allocated / 1e6:.1f} MB), which overlays stand on")
    return flat.key
