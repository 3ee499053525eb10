"""Reliability figures from a real test run: faults injected and survived, bad inputs tried, data lost.

Tests that inject a fault or try bad input say so through the ``reliability`` fixture, and
name the files that must come through intact. Tests written before this plugin are listed
in ``EARLIER`` with the fault they inject: each that passes counts as one fault survived.

With ``KVMTASKS_RELIABILITY_REPORT=PATH`` the session writes PATH at its end;
``python -m tests.reliability`` runs the whole set and writes docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

REPORT_ENV = "KVMTASKS_RELIABILITY_REPORT"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = REPO_ROOT / "docs" / "reliability.md"
COMMAND = ".venv/bin/python -m tests.reliability"
# The new tests; the generator runs them with the EARLIER ones.
FILES = ("tests/test_faults_download.py", "tests/test_faults_input.py",
         "tests/test_injection.py", "tests/test_faults_vm.py", "tests/test_overlay.py",
         "tests/test_compression.py", "tests/test_checksum_lists.py", "tests/test_faults_data.py",
         "tests/test_faults_lifecycle.py", "tests/test_layers_guest.py")

# Categories, in the order the report lists them.
FAULTS = {
    "drop": "HTTP connection dropped mid-file",
    "changed": "file changed on the server between two attempts",
    "http": "HTTP 404/500, redirect loop, silent server, refused connection, bad TLS certificate",
    "signal": "SIGINT/SIGTERM during download or decompression",
    "disk-full": "disk full while downloading or decompressing",
    "concurrent": "two provision runs of one part at the same time",
    "running": "re-provision while the VM runs",
    "qemu": "qemu dies at start, guest never answers, VM killed from outside",
    "stale-pid": "stale pid file naming an unrelated process",
    "cache": "download cache entry corrupted, truncated or disagreeing with the checksum",
    "port-clash": "two parallel starts of parts forwarding one host port",
    "reset-running": "reset while the VM runs (doit reset and PART-ctl reset)",
    "list-unreachable": "checksum list unreachable (refused connection, HTTP 404)",
    "list-changed": "checksum list changed on the server",
    "reprovision": "download touched, fetched again or damaged under an overlay with snapshots",
    "cache-image": "decompressed image in the download cache damaged, its record stale",
    "cut-transfer": "a PART-getfile or PART-sendfile transfer cut mid-file",
    "vm-concurrent": "two operations on one part's VM at the same time (start and start, start and reset)",
    "vm-killed": "kill -9 or Ctrl-C during a start, a suspend or a resume",
    "state-damaged": "a suspended VM's state file truncated, or its record garbled",
    "setup-step": "setup steps failing, over their time limit, signalled (SIGTERM), a cached layer damaged",
}
BAD_INPUTS = {
    "config": "config values (hypothesis, every option)",
    "config-doit": "config values through a real `doit list` (hypothesis)",
    "part-name": "hostile part names",
    "qemu-argv": "QEMU argv from arbitrary values (hypothesis)",
    "ssh-path": "paths as ssh option values, checked by `ssh -G` (hypothesis)",
    "names": "hostile paths, host names, users and remote file names in scripts, ssh and scp",
    "paths": "path options pointing at existing files, folders and block devices",
    "disk-size": "disk_size smaller than the image, or without an overlay",
    "backing": "an image with a backing file of its own under an overlay",
    "compressed": "corrupt and truncated gzip, xz, zstd and bz2 streams",
    "checksum-list": "checksum lists without the file's entry, or with a wrong digest",
    "endless": "input files without an end or a bound: a device, a FIFO, a file of 200 MB",
    "misleading": "inputs that got a misleading message: garbage part.json, file:// redirect, "
                  "relative KVMTASKS_CONFIG, a host port twice",
    "suspended-snapshot": "a snapshot deleted under a suspended VM",
}

# Earlier tests (module::function, every parametrization) and the fault each injects.
EARLIER = {
    "tests/test_provision_pipeline.py::test_a_dropped_connection_resumes_where_it_stopped": "drop",
    "tests/test_fetch.py::test_an_interrupted_download_resumes_with_range_and_if_range": "drop",
    "tests/test_fetch.py::test_several_interruptions_add_up_to_one_file": "drop",
    "tests/test_provision_pipeline.py::test_a_file_changed_on_the_server_is_fetched_again_from_zero":
        "changed",
    "tests/test_fetch.py::test_a_file_changed_between_attempts_is_fetched_from_zero": "changed",
    "tests/test_provision_pipeline.py::test_an_http_error_names_the_url_and_status": "http",
    "tests/test_provision_pipeline.py::test_a_redirect_loop_is_a_clear_error": "http",
    "tests/test_provision_pipeline.py::test_a_server_that_never_answers_times_out": "http",
    "tests/test_fetch.py::test_a_refused_connection_is_reported": "http",
    "tests/test_vm_e2e.py::test_qemu_failing_at_start_shows_its_stderr": "qemu",
    "tests/test_vm_e2e.py::test_boot_timeout_leaves_nothing_running": "qemu",
    "tests/test_vm_e2e.py::test_stale_pid_file_of_an_unrelated_process": "stale-pid",
    "tests/test_cache.py::test_concurrent_runs_on_one_url_fetch_it_once_and_the_others_wait":
        "concurrent",
    "tests/test_cache.py::test_a_damaged_entry_is_discarded_with_one_line_and_fetched_again": "cache",
    "tests/test_cache.py::test_an_entry_that_disagrees_with_the_checksum_is_fetched_again": "cache",
    "tests/test_cache.py::test_an_interrupted_download_resumes_into_the_cache": "drop",
    "tests/test_parallel.py::"
    "test_two_parallel_starts_on_one_host_port_fail_in_one_line_naming_the_port_and_part": "port-clash",
    "tests/test_cloudinit_guest.py::test_a_stop_during_the_first_boot_lets_cloud_init_finish": "vm-killed",
    "tests/test_warm.py::test_suspend_resume_and_a_state_that_no_longer_fits": "state-damaged",
}


@dataclass
class Recorder:
    """What one test injected and tried, and the files it promised to keep."""

    faults: Counter[str] = field(default_factory=Counter)
    bad_inputs: Counter[str] = field(default_factory=Counter)
    watched_bytes: int = 0
    lost_bytes: int = 0
    _kept: dict[Path, tuple[int, str]] = field(default_factory=dict)

    def fault(self, category: str, count: int = 1) -> None:
        assert category in FAULTS, category
        self.faults[category] += count

    def bad_input(self, category: str, count: int = 1) -> None:
        assert category in BAD_INPUTS, category
        self.bad_inputs[category] += count

    def keep(self, *paths: Path) -> None:
        """These files (or block devices) must come through the test byte for byte."""
        for path in paths:
            self._kept[path] = _fingerprint(path)

    def lost(self) -> int:
        """Bytes of the kept files that changed or vanished since keep(); counted once per file."""
        lost = 0
        for path, (size, digest) in self._kept.items():
            try:
                intact = _fingerprint(path) == (size, digest)
            except OSError:
                intact = False
            lost += 0 if intact else size
            self.watched_bytes += size
        self.lost_bytes += lost
        self._kept.clear()
        return lost


def _fingerprint(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@dataclass
class _Session:
    """This run's recorders and outcomes, by test node id."""

    started: float = field(default_factory=time.monotonic)
    recorders: dict[str, Recorder] = field(default_factory=dict)
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)


_SESSION = _Session()


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    recorder = _SESSION.recorders.setdefault(request.node.nodeid, Recorder())
    yield recorder
    recorder.lost()  # files kept but never checked by the test still count


def pytest_sessionstart(session: pytest.Session) -> None:
    global _SESSION
    _SESSION = _Session()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcome, _ = _SESSION.outcomes.get(report.nodeid, ("passed", ""))
    if report.failed:
        _SESSION.outcomes[report.nodeid] = ("failed", "")
    elif report.skipped and outcome != "failed":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SESSION.outcomes[report.nodeid] = ("skipped", reason.removeprefix("Skipped: "))
    elif report.when == "call" and outcome == "passed":
        _SESSION.outcomes[report.nodeid] = ("passed", "")


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(REPORT_ENV)
    if not target or not _SESSION.outcomes:
        return
    text = render(_SESSION.outcomes, _SESSION.recorders, time.monotonic() - _SESSION.started)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(text, encoding="utf-8")


@dataclass
class Row:
    injected: int = 0
    survived: int = 0
    tests: set[str] = field(default_factory=set)


def _function(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def render(outcomes: dict[str, tuple[str, str]], recorders: dict[str, Recorder], seconds: float) -> str:
    faults = {key: Row() for key in FAULTS}
    inputs = {key: Row() for key in BAD_INPUTS}
    watched = lost = 0
    for nodeid, (outcome, _) in outcomes.items():
        passed = outcome == "passed"
        recorder = recorders.get(nodeid)
        earlier = EARLIER.get(_function(nodeid))
        counts: list[tuple[dict[str, Row], Counter[str]]] = []
        if outcome == "skipped":
            continue
        if recorder is not None:
            counts = [(faults, recorder.faults), (inputs, recorder.bad_inputs)]
            watched += recorder.watched_bytes
            lost += recorder.lost_bytes
        elif earlier is not None:
            counts = [(faults, Counter({earlier: 1}))]
        for table, counter in counts:
            for key, count in counter.items():
                row = table[key]
                row.injected += count
                row.survived += count if passed else 0
                row.tests.add(_function(nodeid))
    total = Row(sum(r.injected for r in faults.values()), sum(r.survived for r in faults.values()))
    tried = Row(sum(r.injected for r in inputs.values()), sum(r.survived for r in inputs.values()))
    counted = Counter(outcome for outcome, _ in outcomes.values())
    lines = [
        "# Reliability: faults and bad input",
        "",
        f"<!-- written by `{COMMAND}` from a test run; do not edit by hand -->",
        "",
        f"Reproduce: `{COMMAND}` (as root for the tmpfs and loop-device tests; "
        "the VM tests need qemu-system-x86_64).",
        "",
        f"- **Faults injected: {total.injected}, survived: {total.survived}.**",
        f"- **Bad inputs tried: {tried.injected}, handled: {tried.survived}.**",
        f"- **Data lost: {lost} bytes** (of {watched} bytes of images, user files and devices "
        "checked byte for byte after the fault).",
        f"- Tests: {counted['passed']} passed, {counted['failed']} failed, "
        f"{counted['skipped']} skipped, in {seconds:.0f} s ({_qemu_version()}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        f"{', as root' if os.geteuid() == 0 else ', not root'}).",
        "",
        "A fault counts as survived, a bad input as handled, when its test passed: the run failed",
        "with one line `STEP:PART: message` (a config error: file, `[section]`, option and value)",
        "and a non-zero exit, or waited its turn; no Python traceback; no partial file at a final",
        "path; every file the test kept (earlier images, user files, block devices) identical byte",
        "for byte; no input run as a command; nothing left running; and the next run ended with",
        "the right bytes. Earlier tests that inject one of these faults count once each.",
        "",
        "## Faults",
        "",
        "| fault | injected | survived | tests |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [_row(FAULTS[key], row) for key, row in faults.items()]
    lines += [
        "",
        "## Bad input",
        "",
        "| input | tried | handled | tests |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [_row(BAD_INPUTS[key], row) for key, row in inputs.items()]
    skipped = sorted((nodeid, reason) for nodeid, (outcome, reason) in outcomes.items()
                     if outcome == "skipped")
    failed = sorted(nodeid for nodeid, (outcome, _) in outcomes.items() if outcome == "failed")
    if failed:
        lines += ["", "## Failed", "", *(f"- `{nodeid}`" for nodeid in failed)]
    if skipped:
        lines += ["", "## Skipped", "", *(f"- `{nodeid}`: {reason}" for nodeid, reason in skipped)]
    return "\n".join(lines) + "\n"


def _row(title: str, row: Row) -> str:
    tests = "<br>".join(f"`{name.removeprefix('tests/')}`" for name in sorted(row.tests))
    return f"| {title} | {row.injected} | {row.survived} | {tests} |"


def _qemu_version() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return "no qemu"
    first = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout
    return first.splitlines()[0] if first else "qemu"


def main() -> int:
    os.chdir(REPO_ROOT)
    os.environ.setdefault(REPORT_ENV, str(DEFAULT_REPORT))
    return int(pytest.main(["-q", "-p", "no:cacheprovider", *FILES, *EARLIER, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
