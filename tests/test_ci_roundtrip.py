"""What the CI jobs of docs/ci.md do: provision, cache the folders, lose them, restore them, run again."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmtasks.layers import entries as cache
from tests.conftest import PROVISION_STEPS
from tests.layerchain import add_base, add_layer, entry_file
from tests.test_vm_e2e import script
from tests.vmfixtures import free_port, needs_qemu, qemu_pids_under

if TYPE_CHECKING:
    from tests.conftest import DoitRun, Project
    from tests.httpserver import FileServer
    from tests.vmfixtures import Guest

DATA = os.urandom(2 << 20)
PACKED = gzip.compress(DATA, compresslevel=1)
# What the jobs cache: the download cache, parts/ and var/ (doit's state and the digest records).
CACHED = ("download-cache", "parts", "var")


def assert_ok(run: DoitRun) -> None:
    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.output, run.describe()


def mtimes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.lstat().st_mtime_ns
            for folder in CACHED for path in (root / folder).rglob("*")}


def save_lose_restore(root: Path, archive: Path) -> None:
    """The job's cache step: GNU tar in the POSIX format keeps mtimes to the nanosecond
    (actions/cache runs exactly `tar --posix`); then a new runner starts without the folders."""
    before = mtimes(root)
    subprocess.run(["tar", "--posix", "-cf", str(archive), "-C", str(root), *CACHED], check=True)
    for folder in CACHED:
        shutil.rmtree(root / folder)
    subprocess.run(["tar", "-xpf", str(archive), "-C", str(root)], check=True)
    assert mtimes(root) == before


def test_a_restored_ci_cache_downloads_nothing_and_runs_no_provisioning_step(
    project: Project, http_server: FileServer, tmp_path: Path
) -> None:
    url = http_server.put("guest.img.gz", PACKED)
    project.buildout["download-cache"] = "${:directory}/download-cache"
    project.write(f"""
[web]
image = {url}
gzip = true
sha256_download = {hashlib.sha256(PACKED).hexdigest()}
sha256_image = {hashlib.sha256(DATA).hexdigest()}

[db]
image = {url}
gzip = true
""")
    assert_ok(project.run("provision:web", "provision:db"))
    sent = http_server.bytes_sent
    assert sent == len(PACKED)

    save_lose_restore(project.root, tmp_path / "ci-cache.tar")

    again = project.run("provision:web", "provision:db")

    assert_ok(again)
    assert http_server.bytes_sent == sent
    assert again.ran("web") == again.ran("db") == set(), again.describe()
    assert again.skipped("web") == PROVISION_STEPS
    assert (project.parts / "db" / "guest.img").read_bytes() == DATA
    # The restored part still shares the restored cache's file (tar keeps hard links).
    cached = next((project.root / "download-cache").glob("*/guest.img.gz"))
    assert (project.parts / "web" / "guest.img.gz").stat().st_ino == cached.stat().st_ino


def test_the_layer_cache_travels_in_the_ci_cache_and_its_chains_still_resolve(tmp_path: Path) -> None:
    """The layers' backing files are relative (../KEY/layer.qcow2): the download cache's folder
    archived, lost and restored, even elsewhere, still opens every chain whole, read-only."""
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    layers = tmp_path / "download-cache" / "layers"
    chain = [add_base(layers, base)]
    for number in range(1, 4):
        writes = [(0x30 + number, number << 20, 4096)]
        chain.append(add_layer(layers, chain[-1], f"step{number}", writes=writes))
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(entry_file(layers, chain[-1])), str(flat)],
                   check=True)
    before = {entry.name: (entry.kind, entry.parent, entry.made) for entry in cache.scan(layers)}

    archive = tmp_path / "ci-cache.tar"
    subprocess.run(["tar", "--posix", "-cf", str(archive), "-C", str(tmp_path), "download-cache"], check=True)
    shutil.rmtree(tmp_path / "download-cache")
    elsewhere = tmp_path / "another runner"
    elsewhere.mkdir()
    subprocess.run(["tar", "-xpf", str(archive), "-C", str(elsewhere)], check=True)
    restored = elsewhere / "download-cache" / "layers"
    top = entry_file(restored, chain[-1])

    listed = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(top)],
                            capture_output=True, text=True, check=False)
    assert listed.returncode == 0, listed.stderr
    images = json.loads(listed.stdout)
    assert [Path(image["filename"]).resolve() for image in images] == \
        [entry_file(restored, name).resolve() for name in reversed(chain)]
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(flat), str(top)],
                          capture_output=True, text=True, check=False)
    assert same.returncode == 0, same.stdout + same.stderr
    assert all(entry_file(restored, name).stat().st_mode & 0o777 == 0o444 for name in chain)
    # The records came along: the restored cache lists as the lost one did.
    assert {entry.name: (entry.kind, entry.parent, entry.made) for entry in cache.scan(restored)} == before


SETUP_STEPS = ("setup:vm:tools", "setup:vm:app")


@pytest.mark.vm
@needs_qemu
def test_a_restored_ci_cache_runs_no_setup_step_and_boots_its_top_layer(
    project: Project, guest: Guest, tmp_path: Path
) -> None:
    """docs/ci.md's job with setup steps (the tiny guest): one builder boot makes the layers;
    after the folders are archived, lost and restored, `doit provision start` runs no step and
    boots no builder, and the part's guest holds what the steps wrote."""
    (project.root / "app.txt").write_text("the app\n")
    project.buildout["download-cache"] = "${:directory}/download-cache"
    project.write(f"""
[vm]
file = {guest.image.path}
overlay = true
ssh_port = {free_port()}
ssh_key_path = {guest.key}
kvm_memory = 256M
kvm_accel = tcg
kvm_boot_timeout = 120
kvm_shutdown_timeout = 3
setup =
    tools
    app

[tools]
run =
    mkdir -p /mnt/ci
    echo tools > /mnt/ci/tools

[app]
copy = app.txt /tmp/app.txt
run = cp /tmp/app.txt /mnt/ci/app.txt
""")
    try:
        built = project.run("provision:vm", timeout=400)
        assert_ok(built)
        # The first step's task builds the whole chain in one builder boot.
        assert built.output.count("booting a builder VM") == 1, built.describe()
        assert [line.split(":")[2] for line in built.stdout.splitlines() if " cached (" in line] == \
            ["tools", "app"], built.describe()

        save_lose_restore(project.root, tmp_path / "ci-cache.tar")
        again = project.run("provision:vm", "start:vm", timeout=300)

        assert_ok(again)
        assert "booting a builder VM" not in again.output, again.describe()
        assert set(SETUP_STEPS) <= again.up_to_date, again.describe()
        # The part's own boot ran, and provision:vm's one action (marking the layers used, what a
        # prune spares); the overlay over the restored top layer was kept.
        assert again.executed == {"provision:vm", "start:vm"}, again.describe()
        shown = script(project, "vm-runscript", "cat /mnt/ci/tools /mnt/ci/app.txt")
        assert shown.stdout == "tools\nthe app\n", shown.stdout + shown.stderr
    finally:
        project.run("stop:vm", timeout=60)
        for pid in qemu_pids_under(project.root):
            os.kill(pid, 9)
