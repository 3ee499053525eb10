"""The shared download cache, with a real HTTP server counting the bytes it sent and real doit runs."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmtasks.config.loader import load_parts
from kvmtasks.provision.cache import Entry
from tests.conftest import DoitRun, Project

if TYPE_CHECKING:
    from tests.httpserver import FileServer

DATA = os.urandom(3 << 20)
PACKED = gzip.compress(DATA, compresslevel=1)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gz_part(name: str, url: str, **options: str) -> str:
    lines = [f"[{name}]", f"image = {url}", "gzip = true", f"sha256_image = {sha256(DATA)}"]
    return "\n".join(lines + [f"{key} = {value}" for key, value in options.items()]) + "\n"


def assert_ok(run: DoitRun) -> None:
    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.output, run.describe()


@pytest.fixture
def shared_cache(tmp_path: Path) -> Path:
    return tmp_path / "shared-cache"


def make_project(tmp_path: Path, name: str, cache: Path | None) -> Project:
    root = tmp_path / name
    root.mkdir()
    project = Project(root)
    if cache is not None:
        project.buildout["download-cache"] = str(cache)
    return project


def entry(cache: Path, url: str) -> Entry:
    return Entry(cache, url)


class Running:
    """A doit run in the background whose stderr is read as it comes."""

    def __init__(self, project: Project, *tasks: str) -> None:
        self.process = subprocess.Popen(project.argv(*tasks), env=project.environment(), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.err.append(line)

    def said(self, needle: str) -> bool:
        return any(needle in line for line in self.err)

    def finish(self) -> DoitRun:
        stdout, _ = self.process.communicate(timeout=120)
        self._reader.join(timeout=10)
        return DoitRun(self.process.returncode, stdout, "".join(self.err))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def background() -> Iterator[list[Running]]:
    """Background doit runs, killed at the end whatever happened."""
    runs: list[Running] = []
    yield runs
    for run in runs:
        run.kill()


def provisioned_and_another(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> tuple[str, Project, Project]:
    """A project that provisioned a gzip part through the cache, and a second one on its URL."""
    url = http_server.put("disk.img.gz", PACKED)
    first, second = (make_project(tmp_path, name, shared_cache) for name in ("first", "second"))
    first.write(gz_part("vm", url))
    second.write(gz_part("vm", url))
    assert_ok(first.run("provision:vm"))
    return url, first, second


def wait_until(condition: object, timeout: float = 60) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- one URL, fetched once ------------------------------------------------------------------------

def test_concurrent_runs_on_one_url_fetch_it_once_and_the_others_wait(
    tmp_path: Path, http_server: FileServer, shared_cache: Path, background: list[Running]
) -> None:
    url = http_server.put("disk.img.gz", PACKED)
    http_server.hold = threading.Event()
    projects = [make_project(tmp_path, f"p{i}", shared_cache) for i in range(3)]
    for project in projects:
        project.write(gz_part("vm", url))

    background += [Running(project, "provision:vm") for project in projects]
    # The first run is fetching (held by the server); the two others wait for it and say so.
    wait_until(lambda: sum(run.said("waiting for another run downloading") for run in background) == 2)
    http_server.hold.set()
    runs = [run.finish() for run in background]

    for run in runs:
        assert_ok(run)
    assert http_server.bytes_sent == len(PACKED)
    assert [r.status for r in http_server.requests] == [200]
    cached = entry(shared_cache, url).data
    assert cached.read_bytes() == PACKED
    for project in projects:
        assert (project.parts / "vm" / "disk.img").read_bytes() == DATA
        # The download is the cached file itself (a hard link), not a second copy.
        assert (project.parts / "vm" / "disk.img.gz").stat().st_ino == cached.stat().st_ino


def test_parts_of_one_run_on_one_url_fetch_it_once(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    url = http_server.put("disk.img.gz", PACKED)
    project = make_project(tmp_path, "p", shared_cache)
    project.write("".join(gz_part(f"vm{i}", url) for i in range(4)))

    run = project.run("-n", "4", *(f"provision:vm{i}" for i in range(4)), timeout=120)

    assert_ok(run)
    assert http_server.bytes_sent == len(PACKED)
    assert all((project.parts / f"vm{i}" / "disk.img").read_bytes() == DATA for i in range(4))
    assert entry(shared_cache, url).data.stat().st_nlink == 5  # the entry and four links
    # Under their overlays the four parts share one image, decompressed once.
    shared = entry(shared_cache, url).image
    assert shared.stat().st_nlink == 5
    assert all((project.parts / f"vm{i}" / "disk.img").samefile(shared) for i in range(4))
    assert len(run.error_lines(f"the image of {url} is in the download cache")) == 3


def test_a_second_project_on_the_same_cache_downloads_nothing(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    url = http_server.put("disk.img.gz", PACKED)
    first, second = (make_project(tmp_path, name, shared_cache) for name in ("first", "second"))
    first.write(gz_part("vm", url, sha256_download=sha256(PACKED)))
    second.write(gz_part("db", url, sha256_download=sha256(PACKED)))
    assert_ok(first.run("provision:vm"))
    sent, requests = http_server.bytes_sent, len(http_server.requests)

    run = second.run("provision:db")

    assert_ok(run)
    assert (http_server.bytes_sent, len(http_server.requests)) == (sent, requests)
    assert run.error_lines(f"download:db: {url} is in the download cache")
    assert run.error_lines(f"download:db: the image of {url} is in the download cache")
    assert (second.parts / "db" / "disk.img").read_bytes() == DATA
    # The image the first project made is taken too: nothing is decompressed again.
    assert {"download", "verify-download", "verify-image"} == run.ran("db")
    assert "decompress" in run.skipped("db")


def test_a_booted_download_is_a_copy_of_its_own_and_the_cache_stays_read_only(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    url = http_server.put("disk.img", DATA)
    project = make_project(tmp_path, "p", shared_cache)
    project.write(f"[vm]\nimage = {url}\nsha256_image = {sha256(DATA)}\noverlay = false\n")

    assert_ok(project.run("provision:vm"))

    cached, disk = entry(shared_cache, url).data, project.parts / "vm" / "disk.img"
    assert disk.stat().st_ino != cached.stat().st_ino
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444
    with open(disk, "r+b") as guest_writes:  # what a VM does to its disk
        guest_writes.write(b"written by the guest")
    assert cached.read_bytes() == DATA


def test_an_image_under_an_overlay_is_a_link_until_the_overlay_is_turned_off(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    url = http_server.put("disk.img", DATA)
    project = make_project(tmp_path, "p", shared_cache)
    config = f"[vm]\nimage = {url}\nsha256_image = {sha256(DATA)}\n"
    project.write(config)

    assert_ok(project.run("provision:vm"))

    cached, disk = entry(shared_cache, url).data, project.parts / "vm" / "disk.img"
    assert disk.samefile(cached)  # the VM boots an overlay over it: no copy of 3 MiB
    project.write(config + "overlay = false\n")
    run = project.run("provision:vm")
    assert_ok(run)
    assert "download" in run.ran()
    assert not disk.samefile(cached)
    assert stat.S_IMODE(disk.stat().st_mode) & 0o200
    assert disk.read_bytes() == DATA and cached.read_bytes() == DATA


def test_a_part_that_boots_its_image_gets_its_own_while_the_others_share_theirs(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    url = http_server.put("disk.img.gz", PACKED)
    project = make_project(tmp_path, "p", shared_cache)
    project.write(gz_part("a", url) + gz_part("b", url))
    assert_ok(project.run("provision:a", "provision:b"))
    shared = entry(shared_cache, url).image
    assert (project.parts / "b" / "disk.img").samefile(shared)

    project.write(gz_part("a", url) + gz_part("b", url, overlay="false"))
    run = project.run("provision:b")

    assert_ok(run)
    assert "decompress" in run.ran("b")
    disk = project.parts / "b" / "disk.img"
    assert not disk.samefile(shared) and stat.S_IMODE(disk.stat().st_mode) & 0o200
    with open(disk, "r+b") as guest_writes:
        guest_writes.write(b"written by the guest")
    assert shared.read_bytes() == DATA and stat.S_IMODE(shared.stat().st_mode) == 0o444
    assert (project.parts / "a" / "disk.img").samefile(shared)


def test_a_changed_cached_image_is_discarded_with_one_line_and_made_again(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    url, _, second = provisioned_and_another(tmp_path, http_server, shared_cache)
    shared = entry(shared_cache, url).image
    os.chmod(shared, 0o644)
    with open(shared, "r+b") as handle:  # root, or anyone who made it writable, wrote to it
        handle.write(b"damage")

    run = second.run("provision:vm")

    assert_ok(run)
    (line,) = run.error_lines("discarding the cached image")
    assert line.startswith(f"download:vm: discarding the cached image of {url}: ")
    assert "decompress" in run.ran()
    assert (second.parts / "vm" / "disk.img").read_bytes() == DATA
    assert entry(shared_cache, url).image.read_bytes() == DATA
    assert http_server.bytes_sent == len(PACKED)


def test_parts_decompressing_from_the_cache_do_it_once(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    url = http_server.put("disk.img.xz", lzma.compress(DATA, preset=0))
    project = make_project(tmp_path, "p", shared_cache)
    parts = "".join(f"[vm{i}]\nimage = {url}\nsha256_image = {sha256(DATA)}\n" for i in range(3))
    project.write(parts)

    run = project.run("-n", "3", *(f"provision:vm{i}" for i in range(3)), timeout=120)

    assert_ok(run)
    shared = entry(shared_cache, url).image
    assert shared.stat().st_nlink == 4
    assert len(run.error_lines(f"the image of {url} is in the download cache")) == 2
    assert all((project.parts / f"vm{i}" / "disk.img").samefile(shared) for i in range(3))


# -- an entry is trusted only while its record holds ----------------------------------------------

@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_a_damaged_entry_is_discarded_with_one_line_and_fetched_again(
    tmp_path: Path, http_server: FileServer, shared_cache: Path, damage: str
) -> None:
    url, first, second = provisioned_and_another(tmp_path, http_server, shared_cache)
    cached = entry(shared_cache, url).data
    os.chmod(cached, 0o644)
    if damage == "truncated":
        os.truncate(cached, len(PACKED) // 2)
    else:
        with open(cached, "r+b") as handle:
            handle.seek(1000)
            handle.write(b"\0" * 16)

    run = second.run("provision:vm")

    assert_ok(run)
    (line,) = run.error_lines("discarding the cache entry")
    assert f"download:vm: discarding the cache entry for {url}: " in line
    assert ("truncated" if damage == "truncated" else "changed") in line
    assert line.endswith("; fetching it again")
    assert http_server.bytes_sent == 2 * len(PACKED)
    assert cached.read_bytes() == PACKED
    assert (second.parts / "vm" / "disk.img").read_bytes() == DATA
    # The first project's link is the damaged inode no more: it was unlinked from the cache, not
    # rewritten, and the first project's image was decompressed before the damage.
    assert (first.parts / "vm" / "disk.img").read_bytes() == DATA


def test_an_entry_that_disagrees_with_the_checksum_is_fetched_again(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    old = gzip.compress(b"old version")
    url = http_server.put("disk.img.gz", old)
    first, second = (make_project(tmp_path, name, shared_cache) for name in ("first", "second"))
    first.write(f"[vm]\nimage = {url}\ngzip = true\n")
    assert_ok(first.run("provision:vm"))
    http_server.put("disk.img.gz", PACKED)  # the server's file changed since

    second.write(gz_part("vm", url, sha256_download=sha256(PACKED)))
    run = second.run("provision:vm")

    assert_ok(run)
    assert run.error_lines(f"its sha256 is {sha256(old)}, not sha256_download {sha256(PACKED)}")
    assert (second.parts / "vm" / "disk.img").read_bytes() == DATA


def test_an_interrupted_download_resumes_into_the_cache(
    tmp_path: Path, http_server: FileServer, shared_cache: Path
) -> None:
    url = http_server.put("disk.img.gz", PACKED)
    project = make_project(tmp_path, "p", shared_cache)
    project.write(gz_part("vm", url))
    http_server.drop_after = [1_000_000]

    failed = project.run("provision:vm")

    assert failed.returncode != 0 and failed.error_lines("run again to resume"), failed.describe()
    partial = entry(shared_cache, url).data.with_name("disk.img.gz.part")
    assert partial.stat().st_size == 1_000_000
    assert_ok(project.run("provision:vm"))
    assert http_server.requests[-1].headers["Range"] == "bytes=1000000-"
    assert http_server.bytes_sent == len(PACKED)
    assert not partial.exists()


def test_doit_clean_keeps_the_cache(tmp_path: Path, http_server: FileServer, shared_cache: Path) -> None:
    url = http_server.put("disk.img.gz", PACKED)
    project = make_project(tmp_path, "p", shared_cache)
    project.write(gz_part("vm", url))
    assert_ok(project.run("provision:vm"))

    assert_ok(project.run("clean", "provision:vm", "download:vm", "decompress:vm"))

    assert not (project.parts / "vm" / "disk.img.gz").exists()
    assert entry(shared_cache, url).data.read_bytes() == PACKED
    assert_ok(project.run("provision:vm"))
    assert http_server.bytes_sent == len(PACKED)


# -- where the cache is --------------------------------------------------------------------------

def test_a_cache_on_another_file_system_gives_a_copy(
    tmp_path: Path, http_server: FileServer
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the cache needs root")
    other = tmp_path / "other-fs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(other)], check=True)
    try:
        url = http_server.put("disk.img.gz", PACKED)
        project = make_project(tmp_path, "p", other / "cache")
        project.write(gz_part("vm", url))

        assert_ok(project.run("provision:vm"))

        cached, download = entry(other / "cache", url).data, project.parts / "vm" / "disk.img.gz"
        assert cached.stat().st_dev != download.stat().st_dev
        assert download.stat().st_nlink == 1
        assert download.read_bytes() == PACKED
        assert (project.parts / "vm" / "disk.img").read_bytes() == DATA
    finally:
        subprocess.run(["umount", "--lazy", str(other)], check=False)


def test_an_empty_download_cache_turns_it_off(tmp_path: Path, http_server: FileServer) -> None:
    url = http_server.put("disk.img.gz", PACKED)
    projects = [make_project(tmp_path, name, None) for name in ("a", "b")]
    for project in projects:
        project.buildout["download-cache"] = ""
        project.write(gz_part("vm", url))

        assert_ok(project.run("provision:vm"))

        assert not (project.root / "home" / ".cache").exists()
    assert http_server.bytes_sent == 2 * len(PACKED)


def test_the_default_cache_follows_xdg_cache_home_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[buildout]\ndirectory = {tmp_path}\n[vm]\nimage = http://127.0.0.1:9/d.img\n")

    def cache() -> Path | None:
        return load_parts([config], cwd=tmp_path)[0].buildout.download_cache

    assert cache() == tmp_path / "home" / ".cache" / "kvmtasks"  # conftest's HOME, never the real one
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache() == tmp_path / "xdg" / "kvmtasks"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache() == tmp_path / "home" / ".cache" / "kvmtasks"
    config.write_text(config.read_text().replace("[vm]", "download-cache = shared\n[vm]"))
    assert cache() == tmp_path / "shared"


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path: Path, http_server: FileServer) -> None:
    url = http_server.put("disk.img.gz", PACKED)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should go")
    project = make_project(tmp_path, "p", blocker / "cache")
    project.write(gz_part("vm", url))

    run = project.run("provision:vm")

    assert run.returncode == 1 and "Traceback" not in run.output, run.describe()
    (line,) = run.error_lines("download:vm: download cache: cannot create")
    assert line.endswith("or empty to turn it off")
    assert http_server.bytes_sent == 0
