"""Listing and pruning the layer cache: hand-made entries (tests/layerchain.py), ages from their
records, parts' overlays on disk, a lock held by another process, the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kvmtasks.layers import cachelist, prune
from kvmtasks.layers import entries as cache
from tests.layerchain import add_base, add_layer, days_ago, entry_file
from tests.vmfixtures import needs_qemu

pytestmark = needs_qemu
KiB = 1 << 10


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmtasks.layers.cachelist", *args], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, **(env or {})}, cwd=cwd)


def overlay_for(project: Path, part: str, top: Path) -> Path:
    """A part's overlay where kvmtasks puts it, backed by the top layer (absolute path, as a part's is)."""
    overlay = project / "parts" / part / f"{part}.overlay.qcow2"
    overlay.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2", str(overlay)],
                   check=True)
    return overlay


class Cache:
    """Two chains over one base: `web` (packages, app) that a live part boots, and `old`
    (one layer, last used 40 days ago, named by a project that is gone); a tmp-* left by a
    dead build, a fresh tmp-* of a build under way, and an entry whose record is damaged."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "cache" / "layers"
        self.project = tmp_path / "project"
        self.project.mkdir()
        image = tmp_path / "base.img"
        image.write_bytes(os.urandom(256 * KiB) + bytes(768 * KiB))
        web_user = f"{self.project}::web"
        self.base = add_base(self.root, image, made=days_ago(60), last_used=days_ago(0))
        self.packages = add_layer(self.root, self.base, "packages", writes=[(0x11, 0, 64 * KiB)],
                                  made=days_ago(50), last_used=days_ago(45))
        self.app = add_layer(self.root, self.packages, "app", writes=[(0x12, 64 * KiB, 64 * KiB)],
                             used_by={web_user: days_ago(1)}, last_used=days_ago(1))
        self.old = add_layer(self.root, self.base, "app", writes=[(0x13, 0, 64 * KiB)], made=days_ago(40),
                             last_used=days_ago(40), used_by={f"{tmp_path}/gone::web": days_ago(40)})
        self.overlay = overlay_for(self.project, "web", entry_file(self.root, self.app))
        dead = self.root / "tmp-dead"
        dead.mkdir()
        (dead / "layer.qcow2").write_bytes(b"x" * 4096)
        hours_ago = time.time() - 3 * 3600
        for path in (dead / "layer.qcow2", dead):
            os.utime(path, (hours_ago, hours_ago))
        (self.root / "tmp-building").mkdir()
        damaged = self.root / ("d" * 64)
        damaged.mkdir()
        (damaged / "record.json").write_text("{not json")
        self.damaged = damaged.name
        foreign = self.root / ("f" * 64)  # a later layout's: kept whatever is asked
        foreign.mkdir()
        (foreign / "record.json").write_text('{"version": 2, "kind": "layer"}')
        self.foreign = foreign.name

    def names(self) -> set[str]:
        return {path.name for path in self.root.iterdir()} - {self.foreign}


@pytest.fixture
def hand_made(tmp_path: Path) -> Cache:
    return Cache(tmp_path)


def test_the_listing_says_kind_step_size_ages_parent_and_the_parts_using_each(hand_made: Cache) -> None:
    found = {entry.name: entry for entry in cache.scan(hand_made.root)}
    using = cache.users(found.values(), hand_made.root)
    web = f"{hand_made.project}::web"

    assert using[hand_made.app] == using[hand_made.packages] == using[hand_made.base] == {web}
    assert using[hand_made.old] == set()  # its project is gone
    assert found[hand_made.packages].parent == hand_made.base and found[hand_made.app].step == "app"
    assert found["tmp-dead"].kind == "tmp" and found[hand_made.damaged].kind == "damaged"
    assert (found[hand_made.foreign].kind, found[hand_made.foreign].problem) == \
        ("foreign", "record.json: version 2, not 1")
    files = [entry_file(hand_made.root, hand_made.app), hand_made.root / hand_made.app / "record.json"]
    assert found[hand_made.app].allocated == sum(os.stat(path).st_blocks * 512 for path in files)

    listed = cli("list", "--cache", str(hand_made.root))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == f"layer cache {hand_made.root}"
    assert lines[1].split() == ["ENTRY", "KIND", "STEP", "ON", "DISK", "MADE", "LAST", "USE", "PARENT",
                                "USED", "BY"]
    app_line = next(line for line in lines if line.startswith(hand_made.app[:12]))
    assert app_line.split()[1:3] == ["layer", "app"] and app_line.endswith(web)
    assert hand_made.packages[:12] in app_line.split()  # its parent
    assert lines[-1].startswith("8 entries, ") and "; 5 used by no part (" in lines[-1]

    shown = json.loads(cli("list", "--json", "--cache", str(hand_made.root)).stdout)
    (listing,) = shown
    by_entry = {item["entry"]: item for item in listing["entries"]}
    assert by_entry[hand_made.app]["parts_using"] == [web]
    assert list(by_entry[hand_made.old]["used_by"]) == [f"{hand_made.project.parent}/gone::web"]
    assert by_entry[hand_made.old]["parts_using"] == []
    assert by_entry[hand_made.damaged]["problem"].startswith("record.json: ")
    assert datetime.fromisoformat(by_entry[hand_made.old]["last_used"]) < datetime.now(UTC)


def test_prune_unused_takes_what_no_part_uses_and_leftovers_never_what_a_part_boots(hand_made: Cache) -> None:
    before = hand_made.names()
    dry = cli("prune", "--unused", "--dry-run", "--cache", str(hand_made.root))
    assert dry.returncode == 0, dry.stderr
    assert hand_made.names() == before
    assert f"would remove {hand_made.old[:12]} (layer, " in dry.stdout

    done = cli("prune", "--unused", "--cache", str(hand_made.root))

    assert done.returncode == 0, done.stderr
    assert hand_made.names() == {hand_made.base, hand_made.packages, hand_made.app, "tmp-building"}
    assert f"removed {hand_made.old[:12]} (layer, " in done.stdout and ": no part uses it" in done.stdout
    assert "removed tmp-dead (tmp, 4096 bytes): left by a build that did not finish" in done.stdout
    assert f"removed {hand_made.damaged[:12]} (damaged, " in done.stdout
    assert done.stdout.splitlines()[-1].startswith(f"layer cache {hand_made.root}: 3 entries, freed ")
    # The part's chain still opens whole.
    chain = subprocess.run(["qemu-img", "info", "--backing-chain", str(hand_made.overlay)],
                           capture_output=True, text=True, check=False)
    assert chain.returncode == 0, chain.stderr


def test_prune_older_than_keeps_an_old_layer_a_newer_one_or_an_overlay_backs_onto(hand_made: Cache) -> None:
    found = cache.scan(hand_made.root)
    # packages was last used 45 days ago, but the part's overlay backs onto it (through app).
    chosen = prune.plan(found, hand_made.root, datetime.now(UTC), older_than=30)
    assert sorted(entry.name for entry in chosen.remove) == sorted([hand_made.damaged, hand_made.old,
                                                                    "tmp-dead"])
    assert chosen.kept[hand_made.packages] == f"the overlay of {hand_made.project}::web backs onto it"
    assert hand_made.base not in chosen.reasons  # used today

    # The part's overlay goes: its chain is only as old as its records say.
    hand_made.overlay.unlink()
    (hand_made.project / "parts" / "web").rmdir()
    everything = prune.plan(found, hand_made.root, datetime.now(UTC), older_than=30)
    assert everything.kept[hand_made.packages] == f"{hand_made.app[:12]} backs onto it"
    old_everywhere = prune.plan(found, hand_made.root, datetime.now(UTC), older_than=0)
    order = [entry.name for entry in old_everywhere.remove]
    # Children go before their parents: a crash half way leaves no layer without its parent.
    assert order.index(hand_made.app) < order.index(hand_made.packages) < order.index(hand_made.base)
    assert order.index(hand_made.old) < order.index(hand_made.base)


def test_an_entry_whose_lock_is_held_is_skipped_and_said_and_so_is_its_parent(hand_made: Cache) -> None:
    hand_made.overlay.unlink()  # no part boots these any more: everything is old enough to go
    lock = hand_made.root / hand_made.old / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom kvmtasks.provision.locking import held\n"
         f"with open({str(lock)!r}, 'a+') as handle, held(handle, 'waiting', 'building'):\n"
         "    print('held', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        done = cli("prune", "--older-than", "0", "--cache", str(hand_made.root))
    finally:
        holder.kill()
        holder.wait()

    assert done.returncode == 0, done.stderr
    assert f"kept {hand_made.old[:12]}: its lock is held (pid {holder.pid}, lock {lock})" in done.stdout
    assert f"kept base-{hand_made.base[5:17]}: {hand_made.old[:12]} backs onto it and was kept" in done.stdout
    assert hand_made.names() == {hand_made.old, hand_made.base, "tmp-building"}
    assert (hand_made.root / hand_made.foreign).is_dir()  # another layout's entry: never pruned


def test_bare_prune_takes_only_leftovers_and_the_command_line_errors_are_one_line(
        hand_made: Cache, tmp_path: Path) -> None:
    done = cli("prune", "--cache", str(hand_made.root))
    assert done.returncode == 0, done.stderr
    assert hand_made.names() == {hand_made.base, hand_made.packages, hand_made.app, hand_made.old,
                                 "tmp-building"}
    assert done.stdout.splitlines()[-1].endswith("(only leftovers and damaged entries: add --unused and/or "
                                                 "--older-than DAYS)")

    for args in (["prune", "--older-than", "soon"], ["prune", "--older-than", "-1"], ["list", "--cache",
                 str(tmp_path / "base.img")], ["remove"]):
        failed = cli(*args)
        assert failed.returncode != 0 and failed.stdout == ""
        assert len(failed.stderr.splitlines()) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert cli("list", "--cache", str(tmp_path / "base.img")).stderr == \
        f"error: layer cache {tmp_path / 'base.img'}: Not a directory\n"


def test_without_cache_the_layer_caches_of_the_configs_are_listed(tmp_path: Path) -> None:
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[buildout]\ndirectory = {tmp_path}\ndownload-cache = {tmp_path}/dl\n\n"
                      "[vm]\nimage = http://127.0.0.1:9/guest.img\n")
    env = {"KVMTASKS_CONFIG": str(config), "HOME": str(tmp_path / "home")}

    assert cachelist.roots_of_configs(tmp_path) == [cache.default_root()]  # no configs/ here
    listed = cli("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == f"layer cache {tmp_path}/dl/layers"
    assert listed.stdout.splitlines()[-1] == "0 entries, 0 B on disk; 0 used by no part (0 B)"

    # No KVMTASKS_CONFIG and no configs/ in the folder: the default download cache's.
    plain = cli("list", "--json", env={"KVMTASKS_CONFIG": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")},
                cwd=tmp_path)
    assert json.loads(plain.stdout) == [{"cache": f"{tmp_path}/xdg/kvmtasks/layers", "entries": []}]
