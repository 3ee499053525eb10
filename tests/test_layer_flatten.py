"""A deep chain of setup layers flattened for the part's overlay: real qemu-img files laid out
as the layer cache lays them out (tests/layerchain.py), no guest.

test_layers_guest.py boots a part over a flattened chain its builder made.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_parts
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import Status
from kvmtasks.layers import entries, flatten, partdisk, prune, store
from kvmtasks.provision import overlay
from tests.layerchain import add_base, add_layer, entry_file
from tests.test_config import write
from tests.vmfixtures import needs_qemu

pytestmark = needs_qemu
KiB = 1 << 10
DEEP = flatten.FLATTEN_PAST + 1


def stopped(part: Part) -> Status:
    return Status(running=False)


def image(tmp_path: Path) -> Path:
    """1 MiB: random bytes in the first half, zeros after."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(512 * KiB) + bytes(512 * KiB))
    return path


def writes(number: int) -> list[tuple[int, int, int]]:
    """What step `number` writes: its own 16 KiB of pattern `number`; step 3 zeroes the image's
    first 16 KiB (a step deleting what the image had: the flat entry must hold those zeros)."""
    own = [(number, (32 + number) * 16 * KiB, 16 * KiB)]
    return [*own, (0, 0, 16 * KiB)] if number == 3 else own


def same_disk(one: Path, other: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(one), str(other)], check=False).returncode == 0


def links_of(root: Path, names: list[str]) -> list[store.Link]:
    return [store.Link(f"step{number}", name, parent)
            for number, (parent, name) in enumerate(itertools.pairwise(names), 1)]


def test_a_chain_is_flattened_over_its_base_once_verified_and_made_again_when_damaged(tmp_path: Path) -> None:
    root = tmp_path / "layers"
    names = [add_base(root, image(tmp_path))]
    for number in range(1, DEEP + 1):
        names.append(add_layer(root, names[-1], f"step{number}", writes=writes(number)))
    links = links_of(root, names)
    said: list[str] = []

    flat = flatten.ensure(root, links, "/b::vm", said.append)

    flat_file = entry_file(root, flat)
    assert said == [f"the {DEEP} layers up to step{DEEP} flattened into {flat[:16]} "
                    f"({os.stat(flat_file).st_blocks * 512 / 1e6:.1f} MB), which overlays stand on"]
    assert flat == flatten.flat_link(links).key and flat not in names
    # One qcow2 over the base: the same disk as the top of the chain, without the image's bytes.
    assert store.backing_file(flat_file) == f"../{names[0]}/image"
    assert same_disk(flat_file, entry_file(root, names[-1]))
    assert os.stat(flat_file).st_blocks * 512 < 512 * KiB
    record = json.loads((root / flat / "record.json").read_text())
    assert (record["kind"], record["parent"], record["top"], record["depth"], record["step"]) == \
        ("flat", names[0], names[-1], DEEP, f"step{DEEP}")
    assert oct(flat_file.stat().st_mode & 0o777) == "0o444"
    with store.entry_lock(root, flat, "a test"):
        assert store.problem(root, flat, names[0]) is None
    assert [path.name for path in (root / flat).iterdir() if path.name.startswith(".")] == []

    # Made once: a second run finds it.
    said.clear()
    assert flatten.ensure(root, links, "/b::vm", said.append) == flat and said == []

    # Flipped bytes: one line, then made again.
    flat_file.chmod(0o644)
    with open(flat_file, "r+b") as handle:
        handle.seek(flat_file.stat().st_size - 100)
        handle.write(b"\xff")
    flatten.ensure(root, links, "/b::vm", said.append)
    assert len(said) == 2 and "are damaged (" in said[0] and "has sha256" in said[0], said
    assert same_disk(flat_file, entry_file(root, names[-1]))


def test_a_flat_entry_keeps_its_chain_in_use_and_prune_removes_it_with_the_chain(tmp_path: Path) -> None:
    root = tmp_path / "layers"
    project = tmp_path / "project"
    names = [add_base(root, image(tmp_path))]
    for number in range(1, DEEP + 1):
        names.append(add_layer(root, names[-1], f"step{number}", writes=writes(number),
                               used_by={f"{project}::web": "2026-01-01T00:00:00+00:00"}))
    flat = flatten.ensure(root, links_of(root, names), f"{project}::web", print)
    overlay_file = project / "parts" / "web" / "web.overlay.qcow2"
    overlay_file.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(entry_file(root, flat)), str(overlay_file)], check=True)

    found = entries.scan(root)
    by_name = {entry.name: entry for entry in found}
    assert (by_name[flat].kind, by_name[flat].top, by_name[flat].parent) == ("flat", names[-1], names[0])
    # The part's overlay stands on the flat entry; the chain's layers are in use all the same
    # (a changed step is built over them).
    using = entries.users(found, root)
    assert all(using[name] == {f"{project}::web"} for name in [*names, flat])
    assert prune.plan(found, root, datetime.now(UTC), unused=True).remove == []

    shutil.rmtree(project)  # the project is gone: nothing uses the chain
    planned = prune.plan(entries.scan(root), root, datetime.now(UTC), unused=True)
    assert {entry.name for entry in planned.remove} == {*names, flat}
    assert planned.remove[-1].name == names[0]  # the base last: the flat entry and layers back onto it


def part_with_steps(tmp_path: Path, disk: Path, count: int) -> Part:
    steps = "".join(f"    s{number}\n" for number in range(1, count + 1))
    sections = "".join(f"\n[s{number}]\nrun = echo {number}\n" for number in range(1, count + 1))
    path = write(tmp_path / "kvm.cfg",
                 f"[buildout]\ndirectory = {tmp_path}\ndownload-cache = {tmp_path}/cache\n\n"
                 f"[vm]\nfile = {disk}\noverlay = true\nsetup =\n{steps}{sections}")
    (part,) = load_parts([path], cwd=tmp_path)
    return part


def cache_chain(part: Part) -> list[store.Link]:
    """The part's chain as its builder would have left it: its keys, hand-made layers."""
    root, links = store.layers_root(part), store.chain(part)
    add_base(root, part.image_path)
    for number, link in enumerate(links, 1):
        if not (root / link.key).exists():
            add_layer(root, link.parent, link.step, writes=writes(number), key=link.key)
    return links


@pytest.mark.parametrize("count", [flatten.FLATTEN_PAST, DEEP])
def test_a_part_deeper_than_the_limit_boots_its_overlay_over_its_chain_flattened(tmp_path: Path,
                                                                                  count: int) -> None:
    part = part_with_steps(tmp_path, image(tmp_path), count)
    links = cache_chain(part)
    root = store.layers_root(part)
    top = entry_file(root, links[-1].key)

    partdisk.create_overlay(part, stopped)

    backing = overlay.image_info(part.overlay_path, "qcow2")["full-backing-filename"]
    flat = flatten.flat_link(links).key
    assert Path(backing) == (entry_file(root, flat) if count > flatten.FLATTEN_PAST else top)
    assert (root / flat).exists() == (count > flatten.FLATTEN_PAST)
    assert same_disk(part.overlay_path, top)
    assert partdisk.overlay_up_to_date(part)
    partdisk.mark_used(part)
    if count > flatten.FLATTEN_PAST:
        assert f"{tmp_path}::vm" in json.loads((root / flat / "record.json").read_text())["used_by"]


def test_an_overlay_made_over_the_top_of_a_deep_chain_is_kept(tmp_path: Path) -> None:
    """A guest's disk made before its chain was flattened keeps its changes: the overlay is
    current over either base. A reset makes the new one over the flat entry."""
    part = part_with_steps(tmp_path, image(tmp_path), DEEP)
    cache_chain(part)
    overlay.create(part, stopped, partdisk.top_base(part))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 4k", str(part.overlay_path)],
                   check=True, capture_output=True)

    assert partdisk.overlay_up_to_date(part)

    said: list[str] = []
    partdisk.reset(part, said.append, vm_status=stopped)
    backing = overlay.image_info(part.overlay_path, "qcow2")["full-backing-filename"]
    assert Path(backing).parent.name == flatten.flat_link(store.chain(part)).key
    assert any("flattened into" in line for line in said), said
    assert partdisk.overlay_up_to_date(part)
