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

from kvmtasks.layers import entries as cache
from tests.conftest import PROVISION_STEPS
from tests.layerchain import add_base, add_layer, entry_file

if TYPE_CHECKING:
    from tests.conftest import DoitRun, Project
    from tests.httpserver import FileServer

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
    before, sent = mtimes(project.root), http_server.bytes_sent
    assert sent == len(PACKED)

    # The job's cache step: GNU tar in the POSIX format keeps mtimes to the nanosecond
    # (actions/cache runs exactly `tar --posix`); then a new runner starts without the folders.
    archive = tmp_path / "ci-cache.tar"
    subprocess.run(["tar", "--posix", "-cf", str(archive), "-C", str(project.root), *CACHED], check=True)
    for folder in CACHED:
        shutil.rmtree(project.root / folder)
    assert not (project.parts / "web").exists()
    subprocess.run(["tar", "-xpf", str(archive), "-C", str(project.root)], check=True)
    assert mtimes(project.root) == before

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
