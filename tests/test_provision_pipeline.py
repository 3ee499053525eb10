"""Provisioning end to end: a real HTTP server on 127.0.0.1 and real `python -m doit` runs.

Nothing is mocked: each test writes a config into tmp_path, runs doit as a user
does, and asserts on its exit code, its output and the files it left.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import pty
import random
import re
import shutil
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.vmfixtures import loop_device

if TYPE_CHECKING:
    from tests.conftest import DoitRun, Project
    from tests.httpserver import FileServer

ALL_STEPS = {"download", "verify-download", "decompress", "verify-image"}
SIZE = 1 << 20


def payload(size: int = SIZE, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part(**options: object) -> str:
    lines = ["[vm]", "recipe = erp5.recipe.kvm"]
    lines += [f"{name} = {value}" for name, value in options.items()]
    return "\n".join(lines)


def assert_ok(run: DoitRun) -> None:
    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.output, run.describe()


def assert_one_line_error(run: DoitRun, *needles: str) -> str:
    """The run failed with one line that holds every needle, and no traceback."""
    assert run.returncode != 0, run.describe()
    assert "Traceback" not in run.output, run.describe()
    lines = [line for line in run.output.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, f"no single line with {needles}:\n{run.describe()}"
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part*")) if folder.exists() else []


# -- a full download, then nothing -------------------------------------------------------------

def test_gzip_download_with_every_checksum_then_a_no_op_run(
    project: Project, http_server: FileServer
) -> None:
    raw = payload()
    packed = gzip.compress(raw)
    url = http_server.put("images/disk.img.gz", packed)
    project.write(part(image=url, gzip="true", md5_download=md5(packed),
                       sha256_download=sha256(packed), md5_image=md5(raw)))

    first = project.provision()

    assert_ok(first)
    # The download step inflated the image as the bytes arrived: decompress is up to date.
    assert first.ran() == ALL_STEPS - {"decompress"}
    assert first.skipped() == {"decompress"}
    folder = project.parts / "vm"
    assert (folder / "disk.img.gz").read_bytes() == packed
    assert (folder / "disk.img").read_bytes() == raw
    assert leftovers(folder) == []
    # The image's record names the download it was made from.
    record = json.loads((folder / ".kvmtasks" / "image.json").read_text())
    download = (folder / "disk.img.gz").stat()
    assert record["source"] == {"size": download.st_size, "mtime_ns": download.st_mtime_ns,
                                "sha256": hashlib.sha256(packed).hexdigest()}
    # And the content digest the overlay step keys on, whatever the checksums asked.
    assert record["digests"] == {"md5": md5(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    requests_before = len(http_server.requests)

    second = project.provision()

    assert_ok(second)
    assert second.ran() == set()
    assert second.skipped() == ALL_STEPS
    assert len(http_server.requests) == requests_before


def test_doit_state_is_a_sqlite_file_in_the_var_directory(project: Project, http_server: FileServer) -> None:
    url = http_server.put("disk.img", payload(4096))
    project.write(part(image=url))

    assert_ok(project.provision())

    state = project.doit_state()
    assert isinstance(state, dict)
    assert "download:vm" in state
    assert not (Path.cwd() / ".doit.db").exists()


def test_no_progress_bar_when_stderr_is_not_a_terminal(project: Project, http_server: FileServer) -> None:
    url = http_server.put("disk.img", payload())
    project.write(part(image=url))

    run = project.provision()

    assert_ok(run)
    assert "\r" not in run.stderr
    assert "B/s" not in run.output
    assert "%|" not in run.output


def test_the_progress_bar_shows_on_a_terminal(project: Project, http_server: FileServer) -> None:
    """The control for the test above: on a terminal (a pty of 100 columns) the bar is drawn."""
    url = http_server.put("disk.img", payload())
    project.write(part(image=url))
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    drawn: list[bytes] = []

    def read_terminal() -> None:
        with contextlib.suppress(OSError):  # EIO once the last writer has closed the pty
            while chunk := os.read(controller, 65536):
                drawn.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        completed = subprocess.run(project.argv("provision:vm"), env=project.environment(),
                                   stdout=subprocess.PIPE, stderr=terminal, timeout=60, check=False)
    finally:
        os.close(terminal)
        reader.join(timeout=10)
        os.close(controller)

    assert completed.returncode == 0
    assert re.search(rb"vm: +0%\|.*B/s", b"".join(drawn))


# -- what triggers work, and what does not ------------------------------------------------------

def test_changing_image_downloads_again(project: Project, http_server: FileServer) -> None:
    old, new = payload(seed=1), payload(seed=2)
    project.write(part(image=http_server.put("old.img", old), md5_image=md5(old)))
    assert_ok(project.provision())

    project.write(part(image=http_server.put("new.img", new), md5_image=md5(new)))
    run = project.provision()

    assert_ok(run)
    assert "download" in run.ran()
    assert (project.parts / "vm" / "new.img").read_bytes() == new


def test_changing_only_a_checksum_reruns_only_its_verification(
    project: Project, http_server: FileServer
) -> None:
    raw = payload()
    packed = gzip.compress(raw)
    url = http_server.put("disk.img.gz", packed)
    project.write(part(image=url, gzip="true", md5_download=md5(packed), md5_image=md5(raw)))
    assert_ok(project.provision())
    requests_before = len(http_server.requests)

    project.write(part(image=url, gzip="true", sha256_download=sha256(packed), md5_image=md5(raw)))
    download_changed = project.provision()
    project.write(part(image=url, gzip="true", sha256_download=sha256(packed),
                       sha256_image=sha256(raw)))
    image_changed = project.provision()

    assert_ok(download_changed)
    assert download_changed.ran() == {"verify-download"}
    assert_ok(image_changed)
    assert image_changed.ran() == {"verify-image"}
    assert len(http_server.requests) == requests_before


@pytest.mark.parametrize("packed", [False, True], ids=["raw", "gzip"])
def test_a_guest_writing_to_its_image_does_not_fail_or_download_again(
    project: Project, http_server: FileServer, packed: bool
) -> None:
    raw = payload()
    if packed:
        url = http_server.put("disk.img.gz", gzip.compress(raw, mtime=0))
        project.write(part(image=url, gzip="true", md5_image=md5(raw)))
    else:
        url = http_server.put("disk.img", raw)
        project.write(part(image=url, md5_download=md5(raw), md5_image=md5(raw)))
    assert_ok(project.provision())
    disk = project.parts / "vm" / "disk.img"
    with open(disk, "ab") as guest:
        guest.write(b"written by the guest")
    os.utime(disk, ns=(disk.stat().st_atime_ns, disk.stat().st_mtime_ns + 5_000_000_000))
    requests_before = len(http_server.requests)

    run = project.provision()

    assert_ok(run)
    assert run.ran() == set()
    assert len(http_server.requests) == requests_before
    assert disk.read_bytes() == raw + b"written by the guest"


# -- interrupted and unusual downloads ----------------------------------------------------------

def test_a_dropped_connection_resumes_where_it_stopped(project: Project, http_server: FileServer) -> None:
    # Without the download cache: this test is about the part's own partial file
    # (test_cache.py resumes into the cache).
    project.buildout["download-cache"] = ""
    data = payload(2 * SIZE)
    url = http_server.put("disk.img", data)
    project.write(part(image=url, md5_image=md5(data)))
    http_server.drop_after = [700_000]

    failed = project.provision()

    assert_one_line_error(failed, "download:vm", url, "run again to resume")
    folder = project.parts / "vm"
    assert not (folder / "disk.img").exists()
    assert (folder / "disk.img.part").stat().st_size == 700_000

    resumed = project.provision()

    assert_ok(resumed)
    assert (folder / "disk.img").read_bytes() == data
    assert leftovers(folder) == []
    assert http_server.requests[-1].status == 206
    assert http_server.requests[-1].headers["Range"] == "bytes=700000-"
    assert http_server.bytes_sent < len(data) * 1.1


@pytest.mark.parametrize("etag", [True, False], ids=["etag", "last-modified"])
def test_a_file_changed_on_the_server_is_fetched_again_from_zero(
    project: Project, http_server: FileServer, etag: bool
) -> None:
    old, new = payload(2 * SIZE, seed=1), payload(2 * SIZE, seed=2)
    url = http_server.put("disk.img", old, etag=etag)
    project.write(part(image=url, md5_image=md5(new)))
    http_server.drop_after = [900_000]
    assert project.provision().returncode != 0

    http_server.put("disk.img", new, etag=etag)
    run = project.provision()

    assert_ok(run)
    assert (project.parts / "vm" / "disk.img").read_bytes() == new
    assert "If-Range" in http_server.requests[-1].headers
    assert http_server.requests[-1].status == 200


def test_a_server_that_ignores_range_is_handled(project: Project, http_server: FileServer) -> None:
    data = payload(2 * SIZE)
    url = http_server.put("disk.img", data)
    project.write(part(image=url, md5_image=md5(data)))
    http_server.drop_after = [500_000]
    assert project.provision().returncode != 0
    http_server.ignore_range = True

    run = project.provision()

    assert_ok(run)
    assert http_server.requests[-1].headers.get("Range") == "bytes=500000-"
    assert http_server.requests[-1].status == 200
    assert (project.parts / "vm" / "disk.img").read_bytes() == data


def test_content_encoding_gzip_arrives_byte_exact(project: Project, http_server: FileServer) -> None:
    raw = payload()
    packed = gzip.compress(raw)
    url = http_server.put("disk.img.gz", packed, gzip_encoding=True)
    project.write(part(image=url, gzip="true", md5_download=md5(packed), md5_image=md5(raw)))

    run = project.provision()

    assert_ok(run)
    assert (project.parts / "vm" / "disk.img.gz").read_bytes() == packed
    assert (project.parts / "vm" / "disk.img").read_bytes() == raw


def test_a_multi_member_gzip_is_decompressed_whole(project: Project, http_server: FileServer) -> None:
    first, second = payload(300_000, seed=1), payload(200_000, seed=2)
    url = http_server.put("disk.img.gz", gzip.compress(first) + gzip.compress(second))
    project.write(part(image=url, gzip="true", md5_image=md5(first + second)))

    assert_ok(project.provision())

    assert (project.parts / "vm" / "disk.img").read_bytes() == first + second


def test_a_file_url_is_copied(project: Project, tmp_path: Path) -> None:
    raw = payload()
    source = tmp_path / "source dir" / "disk.img.gz"
    source.parent.mkdir()
    source.write_bytes(gzip.compress(raw, mtime=0))
    project.write(part(image=source.as_uri(), gzip="true", md5_image=md5(raw)))

    run = project.provision()

    assert_ok(run)
    assert (project.parts / "vm" / "disk.img").read_bytes() == raw
    assert source.read_bytes() == gzip.compress(raw, mtime=0)


# -- failures leave nothing unverified behind ---------------------------------------------------

@pytest.mark.parametrize("packed", [False, True], ids=["raw", "gzip"])
def test_a_wrong_md5_download_keeps_nothing_and_the_fixed_run_downloads_again(
    project: Project, http_server: FileServer, packed: bool
) -> None:
    raw = payload()
    served = gzip.compress(raw) if packed else raw
    url = http_server.put("disk.img.gz" if packed else "disk.img", served)
    options = {"image": url, "gzip": str(packed).lower()}
    project.write(part(**options, md5_download="0" * 32))

    failed = project.provision()

    assert_one_line_error(failed, "verify-download:vm", "md5_download", "0" * 32, md5(served))
    folder = project.parts / "vm"
    assert not (folder / "disk.img").exists()
    assert not (folder / "disk.img.gz").exists()

    project.write(part(**options, md5_download=md5(served)))
    fixed = project.provision()

    assert_ok(fixed)
    assert {"download", "verify-download"} <= fixed.ran()
    assert (folder / "disk.img").read_bytes() == raw


@pytest.mark.parametrize("packed", [False, True], ids=["raw", "gzip"])
def test_a_wrong_md5_image_keeps_no_image_and_the_fixed_run_redoes_its_step(
    project: Project, http_server: FileServer, packed: bool
) -> None:
    raw = payload()
    url = http_server.put("disk.img.gz" if packed else "disk.img", gzip.compress(raw) if packed else raw)
    options = {"image": url, "gzip": str(packed).lower()}
    project.write(part(**options, md5_image="f" * 32))

    failed = project.provision()

    assert_one_line_error(failed, "verify-image:vm", "md5_image", "f" * 32, md5(raw))
    disk = project.parts / "vm" / "disk.img"
    assert not disk.exists()

    project.write(part(**options, md5_image=md5(raw)))
    fixed = project.provision()

    assert_ok(fixed)
    producer = "decompress" if packed else "download"
    assert {producer, "verify-image"} <= fixed.ran()
    assert disk.read_bytes() == raw


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_bad_gzip_is_a_clear_error_and_leaves_no_image(
    project: Project, http_server: FileServer, damage: str
) -> None:
    packed = gzip.compress(payload())
    if damage == "corrupt":
        packed = packed[:10] + bytes(b ^ 0xFF for b in packed[10:5000]) + packed[5000:]
    else:
        packed = packed[: len(packed) // 2]
    project.write(part(image=http_server.put("disk.img.gz", packed), gzip="true"))

    for _ in range(2):  # the second run inflates the kept download again, and stops as soon
        run = project.provision()

        assert_one_line_error(run, "download:vm", "disk.img.gz", "not a valid gzip file")
        folder = project.parts / "vm"
        assert not (folder / "disk.img").exists() and not (folder / "disk.img.gz").exists()
        assert leftovers(folder) == []


def test_a_corrupt_gzip_stops_the_download_where_it_is_found(
    project: Project, http_server: FileServer
) -> None:
    packed = gzip.compress(random.Random(3).randbytes(48 * SIZE), compresslevel=1)
    packed = packed[:10] + bytes(b ^ 0xFF for b in packed[10:5000]) + packed[5000:]
    project.write(part(image=http_server.put("disk.img.gz", packed), gzip="true"))

    run = project.provision()

    assert_one_line_error(run, "download:vm", "disk.img.gz", "not a valid gzip file")
    # Found in the first MiB: the rest was never fetched (the socket buffers hold a few MB).
    assert http_server.bytes_sent < len(packed) // 2
    folder = project.parts / "vm"
    assert not (folder / "disk.img").exists()
    assert leftovers(folder) == []


@pytest.mark.parametrize("overlay", ["true", "false"])
def test_a_cached_download_gives_the_cached_image_or_the_decompress_step_makes_one(
    project: Project, http_server: FileServer, overlay: str
) -> None:
    raw = payload()
    packed = gzip.compress(raw)
    url = http_server.put("disk.img.gz", packed)
    project.write(part(image=url, gzip="true", md5_image=md5(raw), overlay=overlay))
    assert_ok(project.provision())
    folder = project.parts / "vm"
    shutil.rmtree(folder)  # the cache keeps the download (and, under an overlay, the image)

    again = project.provision()

    assert_ok(again)
    # A VM booting its image directly gets one of its own, decompressed from the cached file.
    assert again.ran() == (ALL_STEPS - {"decompress"} if overlay == "true" else ALL_STEPS)
    assert len(http_server.requests) == 1
    assert (folder / "disk.img").read_bytes() == raw
    assert leftovers(folder) == []


@pytest.mark.parametrize("status", [404, 500])
def test_an_http_error_names_the_url_and_status(
    project: Project, http_server: FileServer, status: int
) -> None:
    url = http_server.put("disk.img", payload(4096))
    if status != 404:
        http_server.status["/disk.img"] = status
    else:
        url = http_server.url("missing.img")
    project.write(part(image=url))

    run = project.provision()

    assert_one_line_error(run, "download:vm", url, f"HTTP {status}")
    assert list((project.parts / "vm").glob("*.img")) == []


def test_a_redirect_loop_is_a_clear_error(project: Project, http_server: FileServer) -> None:
    http_server.redirect_loop.add("/loop.img")
    url = http_server.url("loop.img")
    project.write(part(image=url))

    run = project.provision()

    assert_one_line_error(run, "download:vm", url, "too many redirects")


def test_a_server_that_never_answers_times_out(project: Project, http_server: FileServer) -> None:
    http_server.hang = True
    url = http_server.url("disk.img")
    project.write(part(image=url))
    project.env["KVMTASKS_HTTP_TIMEOUT"] = "0.5"

    run = project.provision()

    assert_one_line_error(run, "download:vm", url, "timed out")


# -- local files and block devices are used in place --------------------------------------------

def test_a_local_file_is_used_in_place_and_verified_once(project: Project, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    data = payload()
    disk.write_bytes(data)
    mtime = disk.stat().st_mtime_ns
    project.write(part(file=disk, md5_image=md5(data)))

    first = project.provision()
    second = project.provision()
    untouched = (disk.read_bytes(), disk.stat().st_mtime_ns)
    os.utime(disk, ns=(mtime + 5_000_000_000, mtime + 5_000_000_000))
    touched = project.provision()

    assert_ok(first)
    assert first.ran() == {"verify-image"}
    assert_ok(second)
    assert second.ran() == set()
    assert_ok(touched)
    assert touched.ran() == {"verify-image"}
    assert untouched == (data, mtime)
    assert disk.read_bytes() == data
    assert list(project.parts.glob("vm/*.img")) == []


def test_a_local_file_with_a_wrong_md5_image_fails_and_is_kept(project: Project, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    data = payload()
    disk.write_bytes(data)
    mtime = disk.stat().st_mtime_ns
    project.write(part(file=disk, md5_image="a" * 32))

    run = project.provision()
    again = project.provision()

    assert_one_line_error(run, "verify-image:vm", "md5_image", md5(data))
    assert_one_line_error(again, "verify-image:vm", "md5_image", md5(data))
    assert disk.read_bytes() == data
    assert disk.stat().st_mtime_ns == mtime


@pytest.fixture
def data_on_a_loop_device(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A real block device backed by a small file in tmp_path, and its bytes."""
    backing = tmp_path / "backing.img"
    data = payload(SIZE, seed=7)
    backing.write_bytes(data)
    with loop_device(backing) as device:
        yield device, data


def test_a_block_device_is_never_written(
    project: Project, data_on_a_loop_device: tuple[Path, bytes]
) -> None:
    device, data = data_on_a_loop_device
    project.write(part(file=device))

    run = project.provision()

    assert_ok(run)
    assert device.read_bytes() == data


def test_md5_image_with_a_block_device_is_a_config_error(
    project: Project, data_on_a_loop_device: tuple[Path, bytes]
) -> None:
    device, data = data_on_a_loop_device
    config = project.write(part(file=device, md5_image=md5(data)))

    run = project.provision()

    assert_one_line_error(run, str(config), "[vm]", "md5_image", md5(data), str(device))
    assert device.read_bytes() == data


# -- bad input: one line naming file, [section], option and value -------------------------------

BAD_CONFIGS = {
    "unknown option": (part(image="http://127.0.0.1:9/d.img", md5_imag="0" * 32),
                       ["'md5_imag'", "did you mean `md5_image`?"]),
    "image and file": (part(image="http://127.0.0.1:9/d.img", file="/tmp/d.img"),
                       ["image = 'http://127.0.0.1:9/d.img'", "file = '/tmp/d.img'"]),
    "neither image nor file": ("[vm]\nrecipe = kvmtasks\nkvm_memory = 1G", ["image", "file"]),
    "checksum not hex": (part(image="http://127.0.0.1:9/d.img", md5_download="z" * 32),
                         ["md5_download", "z" * 32, "32 hex digits"]),
    "checksum too short": (part(image="http://127.0.0.1:9/d.img", sha256_image="ab" * 16),
                           ["sha256_image", "ab" * 16, "64 hex digits"]),
    "bad boolean": (part(image="http://127.0.0.1:9/d.img", gzip="maybe"), ["gzip", "'maybe'", "boolean"]),
    "URL scheme": (part(image="ftp://127.0.0.1/d.img"), ["image", "ftp://127.0.0.1/d.img", "scheme"]),
    "missing reference": (part(image="${mirror:url}/d.img"), ["image", "${mirror:url}", "[mirror]"]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_input_is_one_line_naming_file_section_option_and_value(project: Project, case: str) -> None:
    body, needles = BAD_CONFIGS[case]
    config = project.write(body)

    run = project.provision()

    assert_one_line_error(run, str(config), "[vm]", *needles)
    assert not project.parts.exists()


def test_duplicate_part_names_across_files_name_both_files(project: Project) -> None:
    first = project.write(part(image="http://127.0.0.1:9/a.img"), "a.cfg")
    second = project.write(part(image="http://127.0.0.1:9/b.img"), "b.cfg")

    run = project.provision()

    assert_one_line_error(run, str(first), str(second), "[vm]")
