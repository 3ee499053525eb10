"""What the benchmarks share: measured child processes, a local file server, the report file.

The benchmark scripts import this as a sibling module (``python bench/NAME.py``
puts ``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

REPO_ROOT = Path(__file__).resolve().parent.parent
DODO = REPO_ROOT / "dodo.py"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
CACHE = REPO_ROOT / ".cache" / "bench"
MB = 1_000_000
MiB = 1 << 20
PLAIN_BLOCK = 64 << 10  # shutil.copyfileobj's, which http.server uses
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
# Variables that would send traffic elsewhere or change what provisioning does (XDG_CACHE_HOME:
# the download cache goes into each run's HOME, so every measured run starts cold).
_SCRUBBED = re.compile(r"(?i).*_proxy|KVMTASKS_(CONFIG|ACCEL|HTTP_TIMEOUT)|XDG_CACHE_HOME")


def bench_parser(doc: str, repeat: int = 3) -> argparse.ArgumentParser:
    """The options every benchmark takes: rounds, report file, patience for a quiet machine."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=repeat,
                        help=f"rounds; the median is reported (default {repeat})")
    parser.add_argument("--output", type=Path, default=DOCS, help=f"report file (default {DOCS})")
    parser.add_argument("--patience", type=float, default=120.0,
                        help="seconds to wait for a quiet machine before each run (default 120)")
    return parser


def image_bench_parser(doc: str, sizes: str) -> argparse.ArgumentParser:
    """The options every benchmark of a synthetic image takes (bench/provision.py, bench/parts.py)."""
    parser = bench_parser(doc)
    parser.add_argument("--size", default="1G", help=f"image size, e.g. {sizes} (default 1G)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where images are kept (default {CACHE})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the fresh folders go (default: a temporary folder)")
    return parser


def require(parser: argparse.ArgumentParser, *programs: str) -> None:
    """Stop with the parser's usage error when a program the benchmark runs is missing."""
    for program in programs:
        if shutil.which(program) is None:
            parser.error(f"{program} not found")


def parse_size(text: str) -> int:
    """'8M', '1G', '4G' (binary units) to bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip().upper())
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 8M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def size_label(size: int) -> str:
    for unit in ("G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def environment(**extra: str) -> dict[str, str]:
    """The environment of the measured runs: no proxy, no provisioning override, and
    Python's bytecode cache in use, as after a pip install (PYTHONDONTWRITEBYTECODE
    would make every run compile kvmtasks from source)."""
    env = {name: value for name, value in os.environ.items()
           if not _SCRUBBED.fullmatch(name) and name != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra)
    return env


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def busy_share(seconds: float = 0.5) -> float:
    """How busy the CPUs were over the next seconds (0 to 1)."""
    busy, total = _cpu_times()
    time.sleep(seconds)
    busy_after, total_after = _cpu_times()
    return (busy_after - busy) / max(1, total_after - total)


class Quiet:
    """Waits before each measured run until other work on the machine has calmed down."""

    def __init__(self, threshold: float = 0.2, patience: float = 120.0) -> None:
        self.threshold, self.patience = threshold, patience
        self.runs = self.busy_runs = 0

    def wait(self) -> None:
        os.sync()  # one run's writes are not to be flushed during the next
        deadline = time.monotonic() + self.patience
        self.runs += 1
        while busy_share() > self.threshold:
            if time.monotonic() > deadline:
                self.busy_runs += 1
                print(f"  the machine stays busy (> {self.threshold:.0%} CPU); measuring anyway",
                      file=sys.stderr)
                return

    def note(self) -> str:
        waited = (f"Each run first waited for the CPUs to be under {self.threshold:.0%} busy "
                  f"(up to {self.patience:.0f} s); load that starts during a run is not controlled "
                  "and shows as spread between the runs.")
        if not self.busy_runs:
            return waited
        return f"{waited} {self.busy_runs} of {self.runs} runs started on a busy machine."


def doit_argv(*tasks: str) -> list[str]:
    return [sys.executable, "-m", "doit", "-f", str(DODO), *tasks]


@dataclass(frozen=True)
class Measured:
    """One child process: wall time, peak RSS and what it read, from the kernel's accounting."""

    argv: tuple[str, ...]
    returncode: int
    seconds: float
    maxrss_kib: int
    user_s: float  # CPU time, of it and its reaped children
    sys_s: float
    rchar: int  # bytes through read()-like calls (page-cache hits included) of it and its reaped children
    output: str

    def check(self) -> Measured:
        if self.returncode != 0:
            raise SystemExit(f"{' '.join(self.argv)} failed (exit {self.returncode}):\n{self.output}")
        return self


def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as handle:
        for line in handle:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError(f"no rchar in /proc/{pid}/io")


def measure(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            stdout: Path | None = None) -> Measured:
    """Run argv and measure it; its stdout goes to the file stdout, else is kept with stderr."""
    with open(stdout or os.devnull, "wb") as out, tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out if stdout else log, stderr=log)
        # Wait without reaping, so the zombie's /proc/PID/io (which includes its reaped
        # children) can still be read; then reap it with wait4 for its rusage.
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        seconds = time.perf_counter() - started
        rchar = _rchar(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    return Measured(tuple(argv), process.returncode, seconds, usage.ru_maxrss, usage.ru_utime,
                    usage.ru_stime, rchar, output)


class OpenWatch:
    """Names of the files in a folder that any process opens or reads while watched (inotify).

    A file never opened was not read at all: an exact zero, where a byte count
    like rchar also counts Python's own modules.
    """

    _IN_ACCESS, _IN_OPEN = 0x001, 0x020
    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or self._libc.inotify_add_watch(
                self._fd, os.fsencode(folder), self._IN_ACCESS | self._IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {folder}")

    def __enter__(self) -> OpenWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def touched(self) -> set[str]:
        names: set[str] = set()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset < len(data):
                _, _, _, length = self._EVENT.unpack_from(data, offset)
                offset += self._EVENT.size
                names.add(data[offset:offset + length].rstrip(b"\0").decode())
                offset += length


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the benchmark prints its own table."""

    def do_GET(self) -> None:
        path = self.server.files.get(self.path)
        if path is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        info = path.stat()
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(info.st_size))
        self.send_header("Last-Modified", formatdate(info.st_mtime, usegmt=True))
        self.send_header("ETag", f'"{info.st_size:x}-{info.st_mtime_ns:x}"')
        self.end_headers()
        with open(path, "rb") as handle:
            # sendfile: the kernel copies the file to the socket, the server costs the cores almost nothing.
            sent = self._send_plain(handle) if self.server.plain else self.connection.sendfile(handle)
        if self.server.sent is not None:
            self.server.sent.add(sent)

    def _send_plain(self, handle: BinaryIO) -> int:
        """What `python -m http.server` does (read and write 64 KiB at a time, in Python),
        at most pace bytes a second when the server is paced."""
        pace, sent, started = self.server.pace, 0, time.perf_counter()
        while block := handle.read(PLAIN_BLOCK):
            self.wfile.write(block)
            sent += len(block)
            if pace:
                ahead = sent / pace - (time.perf_counter() - started)
                if ahead > 0:
                    time.sleep(ahead)
        return sent


@dataclass
class Sent:
    """What a file server sent: body bytes and GET requests answered."""

    bytes: int = 0
    requests: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.bytes += count
            self.requests += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, Path]
    sent: Sent | None
    plain: bool
    pace: float


@contextmanager
def serve_files(files: Mapping[str, Path], sent: Sent | None = None, *, plain: bool = False,
                pace: float = 0.0) -> Iterator[str]:
    """Serve files (URL path -> file) on 127.0.0.1, counting into sent; yield the base URL.

    By default the kernel sends the files (sendfile); plain sends them from Python as
    http.server does, and pace (bytes a second, plain only) stands for a link slower
    than the machine.
    """
    server = _Server(("127.0.0.1", 0), _Handler)
    server.files = dict(files)
    server.sent = sent
    server.plain = plain or pace > 0
    server.pace = pace
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _cpu() -> str:
    model = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    sha = "SHA-NI" if "sha_ni" in flags else "no SHA-NI"
    return f"{model}, {os.cpu_count()} cores ({sha})"


def _program_version(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (done.stdout or done.stderr).splitlines()
    return lines[0].strip() if lines else "unknown"


def machine_lines(*programs: Sequence[str]) -> list[str]:
    """What the numbers depend on, for the report; programs: more `NAME --version` argvs."""
    import ssl
    from importlib.metadata import PackageNotFoundError, version

    try:
        inflate = f"zlib-ng {version('zlib-ng')} (kvmtasks inflates with it)"
    except PackageNotFoundError:
        inflate = "zlib-ng not installed (kvmtasks inflates with the standard library's zlib)"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    versions = [_program_version(["sha256sum", "--version"]),
                " ".join(_program_version(["curl", "--version"]).split()[:2]),
                *(_program_version(argv) for argv in programs)]
    return [
        f"- CPU: {_cpu()}; memory {memory / (1 << 30):.0f} GiB; kernel {platform.release()}",
        f"- Python {platform.python_version()}, zlib {zlib.ZLIB_RUNTIME_VERSION}, {inflate}, "
        f"{ssl.OPENSSL_VERSION}",
        f"- {'; '.join(versions)}",
    ]


def hash_speeds(size: int = 256 * MiB) -> dict[str, float]:
    """MB/s of hashlib's md5 and sha256 here, one core each, in 1 MiB updates."""
    import hashlib

    data = os.urandom(MiB)
    speeds = {}
    for name in ("md5", "sha256"):
        hash_object = hashlib.new(name)
        started = time.perf_counter()
        for _ in range(size // MiB):
            hash_object.update(data)
        speeds[name] = size / (time.perf_counter() - started) / MB
    return speeds


HEADER = """# Benchmarks

Generated by the benchmark scripts; do not edit by hand. Regenerate with:

```
.venv/bin/python bench/provision.py --size 1G
.venv/bin/python bench/provision.py --size 4G
.venv/bin/python bench/provision.py --size 512M --variant sendfile,64K
.venv/bin/python bench/provision.py --case 512M:plain,1M --case 1G:plain,1M \\
    --case 512M:plain,1M,40 --case 512M:plain,1M,200 --rss 4G
.venv/bin/python bench/boot.py
.venv/bin/python bench/parts.py --size 1G
.venv/bin/python bench/starts.py
.venv/bin/python bench/overlay.py
.venv/bin/python bench/layers.py
.venv/bin/python bench/arches.py
.venv/bin/python bench/shares.py
.venv/bin/python bench/steps.py
```

Each command replaces only its own section below.
"""


def write_section(output: Path, name: str, body: str) -> None:
    """Put body between the markers of section name in output, keeping the other sections."""
    start, end = f"<!-- {name}: start -->", f"<!-- {name}: end -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    text = output.read_text() if output.exists() else HEADER
    # The header is always this script's: what comes before the first section is replaced.
    text = f"{HEADER}\n{text[text.index('<!-- '):]}" if "<!-- " in text else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    # A section not there yet goes last.
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def load_note() -> str:
    """The machine's load as `uptime` says it when a run ends, for a report's text."""
    one, five, fifteen = os.getloadavg()
    return f"Load when the run ended (`uptime`): {one:.2f}, {five:.2f}, {fifteen:.2f}."
