"""Faults while provisioning, injected for real: dropped connections, HTTP and TLS failures,
signals, a full disk, two runs at once.

Real servers on 127.0.0.1, real `python -m doit` processes, real signals, a real tmpfs. After
every fault: one line naming the step and the part, no traceback, nothing partial at a final
path, an earlier image intact, and the next run ends with the right bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from tests.conftest import DoitRun, Project
from tests.httpserver import FileServer, Request, _Handler, _Server, serve
from tests.reliability import Recorder
from tests.test_provision_pipeline import (
    SIZE,
    assert_ok,
    assert_one_line_error,
    leftovers,
    part,
    payload,
    sha256,
)

# -- servers that misbehave in ways tests/httpserver.py has no switch for -------------------------


@dataclass
class GatedServer(FileServer):
    """A FileServer whose next body stops after ``pause_at`` bytes until ``release`` is set."""

    pause_at: int | None = None
    paused: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class _GatedHandler(_Handler):
    def _write(self, request: Request, data: bytes) -> None:
        state = self.server.state
        assert isinstance(state, GatedServer)
        with state.lock:
            pause, state.pause_at = state.pause_at, None
        try:
            if pause is not None and pause < len(data):
                super()._write(request, data[:pause])
                state.paused.set()
                state.release.wait(timeout=120)
                data = data[pause:]
            super()._write(request, data)
        except OSError:
            self.close_connection = True  # the client was killed: nobody left to answer


@contextmanager
def running(server: _Server) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.state.stop.set()
        if isinstance(server.state, GatedServer):
            server.state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def gated_server() -> Iterator[GatedServer]:
    state = GatedServer()
    server = _Server((state.host, 0), _GatedHandler)
    server.state = state
    state.port = server.server_address[1]
    with running(server):
        yield state


@dataclass(frozen=True)
class TlsServer:
    files: FileServer
    certificate: Path

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.files.port}/{path.lstrip('/')}"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    """The test file server behind TLS, with a self-signed certificate made here."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to make")
    certificate, key = tmp_path / "tls-cert.pem", tmp_path / "tls-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(certificate), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    state = FileServer()
    server = _Server((state.host, 0), _Handler)
    server.state = state
    state.port = server.server_address[1]
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with running(server):
        yield TlsServer(state, certificate)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- doit as a background process -----------------------------------------------------------------


class Background:
    """`python -m doit TASKS` running while the test injects a fault."""

    def __init__(self, project: Project, *tasks: str, name: str = "doit") -> None:
        self.out = project.root / f"{name}.stdout"
        self.err = project.root / f"{name}.stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(project.argv(*tasks), env=project.environment(),
                                            stdout=out, stderr=err)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def finish(self, timeout: float = 120) -> DoitRun:
        returncode = self.process.wait(timeout=timeout)
        return DoitRun(returncode, self.out.read_text(errors="replace"), self.stderr())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def background(project: Project) -> Iterator[Callable[..., Background]]:
    started: list[Background] = []

    def start(*tasks: str, name: str = "doit") -> Background:
        started.append(Background(project, *tasks, name=name))
        return started[-1]

    yield start
    for run in started:
        run.kill()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


# -- dropped connections and a file that changes ----------------------------------------------------

def test_drops_at_several_points_then_a_changed_file_end_with_the_new_bytes_only(
    project: Project, http_server: FileServer, reliability: Recorder
) -> None:
    # Without the download cache: this test is about the part's own partial file
    # (test_cache.py resumes into the cache).
    project.buildout["download-cache"] = ""
    old_raw, new_raw = payload(3 * SIZE, seed=11), payload(3 * SIZE, seed=12)
    old, new = gzip.compress(old_raw, compresslevel=1), gzip.compress(new_raw, compresslevel=1)
    url = http_server.put("disk.img.gz", old)
    project.write(part(image=url, gzip="true", sha256_download=sha256(new), sha256_image=sha256(new_raw)))
    folder = project.parts / "vm"
    http_server.drop_after = [200_000, 1_100_000, 0]

    for attempt in range(3):
        failed = project.provision()
        reliability.fault("drop")
        assert_one_line_error(failed, "download:vm", url, "run again to resume")
        assert not (folder / "disk.img.gz").exists() and not (folder / "disk.img").exists()
        assert size_of(folder / "disk.img.gz.part") == [200_000, 1_300_000, 1_300_000][attempt]
    assert [r.status for r in http_server.requests] == [200, 206, 206]

    http_server.put("disk.img.gz", new)  # a new version: new ETag and Last-Modified
    reliability.fault("changed")
    sent_before = http_server.bytes_sent
    run = project.provision()

    assert_ok(run)
    assert (folder / "disk.img.gz").read_bytes() == new
    assert sha256((folder / "disk.img").read_bytes()) == sha256(new_raw)
    assert http_server.requests[-1].headers["Range"] == "bytes=1300000-"
    assert http_server.requests[-1].status == 200  # If-Range did not match: the whole new file
    assert http_server.bytes_sent - sent_before == len(new)
    assert sent_before == 1_300_000  # the drops cost no byte twice
    assert leftovers(folder) == []


# -- HTTP and TLS failures: fresh parts get nothing, an earlier image stays ---------------------------

def test_every_http_failure_is_one_line_and_keeps_the_earlier_image(
    project: Project, http_server: FileServer, tls_server: TlsServer, reliability: Recorder
) -> None:
    good = payload(SIZE, seed=21)
    good_url = http_server.put("good/disk.img", good)
    http_server.status["/broken/disk.img"] = 500
    http_server.redirect_loop.add("/loop/disk.img")
    tls_server.files.put("disk.img", payload(SIZE, seed=22))
    with serve() as silent:
        silent.hang = True
        failing = {
            "404": (http_server.url("missing/disk.img"), "HTTP 404 Not Found"),
            "500": (http_server.url("broken/disk.img"), "HTTP 500 Internal Server Error"),
            "loop": (http_server.url("loop/disk.img"), "too many redirects"),
            "silent": (silent.url("disk.img"), "timed out"),
            "refused": (f"http://127.0.0.1:{closed_port()}/disk.img", "connection failed"),
            "tls": (tls_server.url("disk.img"), "TLS certificate verification failed"),
        }
        names = [f"{state}-{kind}" for state in ("kept", "fresh") for kind in failing]
        project.write("\n\n".join(part(image=good_url).replace("[vm]", f"[kept-{kind}]")
                                  for kind in failing))
        assert_ok(project.run("--continue", *(f"provision:kept-{kind}" for kind in failing)))
        kept = [project.parts / f"kept-{kind}" / "disk.img" for kind in failing]
        reliability.keep(*kept)

        project.write("\n\n".join(
            part(image=failing[name.split("-", 1)[1]][0]).replace("[vm]", f"[{name}]") for name in names
        ))
        project.env["KVMTASKS_HTTP_TIMEOUT"] = "1"
        run = project.run("--continue", *(f"provision:{name}" for name in names))

    for name in names:
        url, reason = failing[name.split("-", 1)[1]]
        reliability.fault("http")
        line = assert_one_line_error(run, f"download:{name}:", url, reason)
        assert line.startswith(f"ERROR: download:{name}: ")
        assert leftovers(project.parts / name) == []
    assert not list(project.parts.glob("fresh-*/disk.img"))
    assert reliability.lost() == 0

    # The control: the TLS server works, only its certificate is not trusted.
    project.env["REQUESTS_CA_BUNDLE"] = str(tls_server.certificate)
    assert_ok(project.provision("fresh-tls"))
    assert (project.parts / "fresh-tls" / "disk.img").read_bytes() == payload(SIZE, seed=22)


# -- signals ------------------------------------------------------------------------------------------

SIGNALS = [signal.SIGINT, signal.SIGTERM]


def signalled_mid_image(background: Callable[..., Background], folder: Path, raw_size: int,
                        signum: signal.Signals, step: str) -> DoitRun:
    """A provision run sent signum once the image's .part is partly written, finished."""
    doit = background("provision:vm")
    wait_until(lambda: 0 < size_of(folder / "disk.img.part") < raw_size or doit.process.poll() is not None,
               f"{step} to write the image")
    assert doit.process.poll() is None, f"{step} ended before the signal"
    doit.process.send_signal(signum)
    return doit.finish()


def assert_interrupted(run: DoitRun, step: str, signum: signal.Signals) -> None:
    """One line, exit 128 + the signal, and doit kept the record of the steps that completed."""
    assert run.returncode == 128 + signum, run.describe()
    assert run.error_lines("interrupted") == [
        f"{step}:vm: interrupted ({signum.name}); run it again to carry on"
    ], run.describe()
    assert "Traceback" not in run.output


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_download_leaves_only_a_partial_file_and_the_next_run_resumes(
    project: Project, gated_server: GatedServer, background: Callable[..., Background],
    reliability: Recorder, signum: signal.Signals,
) -> None:
    # Without the download cache: this test is about the part's own partial file
    # (test_cache.py resumes into the cache).
    project.buildout["download-cache"] = ""
    data = payload(3 * SIZE, seed=31)
    url = gated_server.put("disk.img", data)
    project.write(part(image=url, sha256_image=sha256(data)))
    folder = project.parts / "vm"
    gated_server.pause_at = 2 * SIZE - 1000
    doit = background("provision:vm")
    wait_until(gated_server.paused.is_set, "the server to pause mid-file")
    wait_until(lambda: size_of(folder / "disk.img.part") > 0, "the first bytes on disk")

    doit.process.send_signal(signum)
    run = doit.finish()
    reliability.fault("signal")
    gated_server.release.set()

    assert_interrupted(run, "download", signum)
    assert leftovers(folder) == ["disk.img.part", "disk.img.part.json"]
    assert not (folder / "disk.img").exists()
    kept_bytes = size_of(folder / "disk.img.part")

    again = project.provision()

    assert_ok(again)
    assert (folder / "disk.img").read_bytes() == data
    assert gated_server.requests[-1].headers["Range"] == f"bytes={kept_bytes}-"
    assert gated_server.requests[-1].status == 206
    assert leftovers(folder) == []


# Compressible, and no zero block in it: decompression writes it all (zeros would become holes).
PATTERN = b"kvmtasks"


BIG_RAW = PATTERN * (16 * SIZE)


@pytest.fixture(scope="module")
def big_gzip() -> tuple[bytes, dict[str, str]]:
    """128 MiB gzipped to 0.7 MB: a quick download whose decompression takes a second or two."""
    digests = {f"{name}_image": hashlib.new(name, BIG_RAW).hexdigest()
               for name in ("md5", "sha256", "sha512")}
    return gzip.compress(BIG_RAW, compresslevel=1), digests


# bz2 is left out: its compressor takes some 25 s over these 128 MiB; it inflates through the
# same stream code as xz (provision/inflate.py).
BIG_FORMATS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "xz": (".xz", lambda data: lzma.compress(data, preset=0)),
    "zstd": (".zst", lambda data: zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)),
}


@pytest.mark.parametrize(("kind", "signum"), [
    *(("gzip", signum) for signum in SIGNALS),
    *((kind, signal.SIGTERM) for kind in BIG_FORMATS),
], ids=["gzip-SIGINT", "gzip-SIGTERM", *(f"{kind}-SIGTERM" for kind in BIG_FORMATS)])
def test_a_signal_while_the_download_inflates_leaves_no_image_and_the_next_run_reinflates_the_kept_bytes(
    project: Project, http_server: FileServer, background: Callable[..., Background],
    reliability: Recorder, big_gzip: tuple[bytes, dict[str, str]], kind: str, signum: signal.Signals,
) -> None:
    # Without the download cache: the kept download is the part's own .part file.
    project.buildout["download-cache"] = ""
    packed, image_digests = big_gzip
    suffix = ".gz"
    if kind != "gzip":
        suffix, compress = BIG_FORMATS[kind]
        packed = compress(BIG_RAW)
    raw_size = 128 * SIZE
    url = http_server.put(f"disk.img{suffix}", packed)
    # Three image checksums: hashing slows inflating, so the signal lands mid-way.
    project.write(part(image=url, compression=kind, sha256_download=sha256(packed), **image_digests))
    folder = project.parts / "vm"
    run = signalled_mid_image(background, folder, raw_size, signum, "the download")
    reliability.fault("signal")

    assert_interrupted(run, "download", signum)
    assert not (folder / "disk.img").exists() and not (folder / f"disk.img{suffix}").exists()
    # The whole download had arrived (the image lags behind it): it is kept, unfinished.
    assert (folder / f"disk.img{suffix}.part").read_bytes() == packed
    kept = f"disk.img{suffix}.part"
    assert set(leftovers(folder)) <= {kept, f"{kept}.json", "disk.img.part"}
    sent = http_server.bytes_sent

    again = project.provision()

    assert_ok(again)
    # The image is inflated again from the start of the kept download; no byte fetched again.
    assert again.ran() == {"download", "verify-download", "verify-image"}
    assert again.skipped() >= {"decompress"}
    assert http_server.requests[-1].status == 416
    assert http_server.bytes_sent == sent
    assert size_of(folder / "disk.img") == raw_size
    assert leftovers(folder) == []


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_decompression_leaves_no_image_and_the_next_run_decompresses_again(
    project: Project, http_server: FileServer, background: Callable[..., Background],
    reliability: Recorder, big_gzip: tuple[bytes, dict[str, str]], signum: signal.Signals,
) -> None:
    packed, image_digests = big_gzip
    raw_size = 128 * SIZE
    url = http_server.put("disk.img.gz", packed)
    # Three image checksums: hashing slows decompression, so the signal lands mid-way.
    project.buildout["download-cache"] = ""  # no cached image to take: decompress from the file
    project.write(part(image=url, gzip="true", sha256_download=sha256(packed), **image_digests))
    folder = project.parts / "vm"
    assert_ok(project.provision())
    # The image is gone, the download is not: decompress makes it again from the file.
    (folder / "disk.img").unlink()
    run = signalled_mid_image(background, folder, raw_size, signum, "decompression")
    reliability.fault("signal")

    assert_interrupted(run, "decompress", signum)
    assert not (folder / "disk.img").exists()
    assert (folder / "disk.img.gz").read_bytes() == packed
    assert set(leftovers(folder)) <= {"disk.img.part"}
    requests = len(http_server.requests)

    again = project.provision()

    assert_ok(again)
    assert again.ran() == {"decompress", "verify-image"}
    assert len(http_server.requests) == requests
    assert size_of(folder / "disk.img") == raw_size
    assert leftovers(folder) == []


# -- a full disk ----------------------------------------------------------------------------------------

def grow(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=32m", str(folder)], check=True)


def test_a_full_disk_while_downloading_names_the_file_and_keeps_the_earlier_image(
    project: Project, http_server: FileServer, small_disk: Path, reliability: Recorder
) -> None:
    # Without the download cache: this test is about the part's own partial file
    # (test_cache.py resumes into the cache).
    project.buildout["download-cache"] = ""
    first, second = payload(SIZE // 2, seed=41), payload(4 * SIZE, seed=42)
    project.write(part(image=http_server.put("v1/disk.img", first), location=small_disk))
    assert_ok(project.provision())
    image = small_disk / "disk.img"
    reliability.keep(image)

    url = http_server.put("v2/disk.img", second)
    project.write(part(image=url, location=small_disk, sha256_image=sha256(second)))
    for _ in range(2):  # the second time the disk is full from the start
        failed = project.provision()
        reliability.fault("disk-full")
        assert_one_line_error(failed, "download:vm:", f"{image}.part", "No space left on device")
    assert reliability.lost() == 0
    assert image.read_bytes() == first

    grow(small_disk)
    resumed = project.provision()

    assert_ok(resumed)
    assert image.read_bytes() == second
    assert http_server.requests[-1].status == 206
    assert leftovers(small_disk) == []


def test_a_full_disk_while_decompressing_names_the_file_and_keeps_the_earlier_image(
    project: Project, http_server: FileServer, small_disk: Path, reliability: Recorder
) -> None:
    first, second = payload(SIZE // 2, seed=43), PATTERN * SIZE
    project.write(part(image=http_server.put("v1/disk.img.gz", gzip.compress(first)), gzip="true",
                       location=small_disk))
    assert_ok(project.provision())
    image = small_disk / "disk.img"
    reliability.keep(image)

    url = http_server.put("v2/disk.img.gz", gzip.compress(second))
    project.write(part(image=url, gzip="true", location=small_disk, sha256_image=sha256(second)))
    failed = project.provision()
    reliability.fault("disk-full")

    # The image is inflated while the download arrives (into the cache, on another disk).
    assert_one_line_error(failed, "download:vm:", f"{image}.part", "No space left on device")
    assert reliability.lost() == 0
    assert leftovers(small_disk) == []

    grow(small_disk)
    again = project.provision()

    assert_ok(again)
    assert again.ran() == {"download", "verify-download", "verify-image"}
    assert sha256(image.read_bytes()) == sha256(second)


# -- two runs at once ---------------------------------------------------------------------------------

def test_a_second_run_waits_for_the_first_and_both_end_with_the_right_image(
    project: Project, gated_server: GatedServer, background: Callable[..., Background],
    reliability: Recorder,
) -> None:
    data = payload(3 * SIZE, seed=51)
    url = gated_server.put("disk.img", data)
    project.write(part(image=url, sha256_image=sha256(data)))
    gated_server.pause_at = SIZE + 1000
    first = background("provision:vm", name="first")
    wait_until(gated_server.paused.is_set, "the first run to be mid-download")

    second = background("provision:vm", name="second")
    wait_until(lambda: "waits for another operation" in second.stderr(), "the second run to wait")
    reliability.fault("concurrent")
    assert second.process.poll() is None
    assert len(gated_server.requests) == 1  # the second run has not touched the part's files
    gated_server.release.set()
    done = [first.finish(), second.finish()]

    for run in done:
        assert_ok(run)
    # The disk steps hold the part's VM lock: the second run waits there, and names the first.
    first_line = second.stderr().splitlines()[0]
    assert first_line.startswith(
        f"vm: download waits for another operation on vm (pid {first.pid} download, lock ")
    assert first_line.endswith("vm.lock)")
    assert (project.parts / "vm" / "disk.img").read_bytes() == data
    assert leftovers(project.parts / "vm") == []
