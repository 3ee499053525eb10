"""What the CI jobs of docs/ci.md do: provision, cache the folders, lose them, restore them, run again."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import PROVISION_STEPS

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
