"""The benchmark scripts keep working: a small, fast run of each, and their helpers.

The numbers of these runs mean nothing (tiny sizes, one round, a busy machine):
only that the scripts run to the end and report what they should.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vmfixtures import needs_qemu

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "bench"
sys.path.insert(0, str(BENCH))
benchlib = importlib.import_module("benchlib")

PROVISION_LINE = re.compile(
    r"provision/naive=\d+\.\d\d provision/bound=\d+\.\d\d noop_s=\d+\.\d\d noop_read_mb=(\d+) "
    r"touch_s=\d+\.\d\d rss_mb=\d+ provision/curl=\d+\.\d\d"
)


def run_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=REPO_ROOT)


def test_provision_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    # Cases of the one invocation, at a tiny size; --rss as it checks 4G.
    done = run_script("provision.py", "--repeat", "1", "--output", str(output),
                      "--cache", str(tmp_path / "cache"), "--patience", "0",
                      "--case", "8M:sendfile,64K", "--case", "8M:plain,1M,200", "--rss", "8M", timeout=300)

    assert done.returncode == 0, done.stderr
    *summaries, rss = done.stdout.strip().splitlines()[-3:]
    for line in summaries:
        match = PROVISION_LINE.fullmatch(line)
        assert match, line
        assert match.group(1) == "0", "a no-op run must not open the image"
    match = re.fullmatch(r"rss_mb=(\d+) provision_s=\d+\.\d\d noop_s=\d+\.\d\d noop_read_mb=(\d+)", rss)
    assert match, rss
    assert int(match.group(1)) > 10, "a Python process's peak RSS, in MB"
    assert match.group(2) == "0", "a no-op run must not open the image"
    text = output.read_text()
    assert text.startswith(benchlib.HEADER)
    assert "## Provisioning a 8M image\n" in text
    assert "## Provisioning a 8M image (plain server, 1M blocks, paced at 200 MiB/s)" in text
    assert "## Peak RSS provisioning a 8M image" in text
    assert "--variant plain,1M,200" in text
    assert text.count("| no-op: image files opened; steps run | none; none |") == 3
    assert all(line in text for line in [*summaries, rss])


def test_a_paced_server_keeps_to_its_pace(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(bytes(4 << 20))
    pace = 20 << 20
    with benchlib.serve_files({"/data": data}, pace=pace) as base:
        measured = benchlib.measure(
            ["curl", "--fail", "--silent", "-o", str(tmp_path / "copy"), f"{base}/data"])

    assert measured.returncode == 0
    assert (tmp_path / "copy").read_bytes() == data.read_bytes()
    assert measured.seconds >= (4 << 20) / pace  # never faster than the pace (slower on a busy machine)


def test_parts_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("parts.py", "--size", "8M", "--repeat", "1", "--output", str(output),
                      "--cache", str(tmp_path / "cache"), "--patience", "0", timeout=300)

    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"fetched/size=(\d+\.\d\d) four/one=\d+\.\d\d one_s=\d+\.\d\d four_s=\d+\.\d\d",
                         last)
    assert match, last
    assert match.group(1) == "1.00", "four parts on one URL fetch it once"
    assert "## 4 parts on one 8M image" in output.read_text()


@pytest.mark.vm
@needs_qemu
def test_boot_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("boot.py", "--repeat", "1", "--output", str(output), "--patience", "0", timeout=600)

    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"start/raw=\d+\.\d\d start_s=\d+\.\d\d raw_s=\d+\.\d\d restore/start=\d+\.\d\d "
        r"resume/start=\d+\.\d\d runscript/ssh=\d+\.\d\d runscript_ms=\d+ ssh_ms=\d+ script_rss_mb=\d+",
        last), last
    text = output.read_text()
    assert "## Booting the tiny guest" in text
    for how in ("the guest acts on the ACPI power button",
                "the guest ignores the button: `poweroff` over ssh after 3 s"):
        assert f"| stop: `bin/boot-ctl stop`, {how} |" in text


@pytest.mark.vm
@needs_qemu
def test_boot_benchmark_of_commands_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("boot.py", "--commands", "--repeat", "1", "--output", str(output), "--patience", "0",
                      timeout=600)

    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"runscript/ssh=\d+\.\d\d runscript_ms=\d+ ssh_ms=\d+", last), last
    text = output.read_text()
    assert "## A command in the running guest" in text and "runs each of `boot-runscript true`" in text


@pytest.mark.vm
@needs_qemu
def test_starts_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("starts.py", "--repeat", "1", "--output", str(output), "--patience", "0",
                      timeout=600)

    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"two/one=\d+\.\d\d one_s=\d+\.\d\d two_s=\d+\.\d\d "
                        r"stop_two/stop_one=\d+\.\d\d", last), last
    text = output.read_text()
    assert "## Two VMs started by one doit run" in text
    assert "| two: `doit -n 2 start:a start:b` |" in text


def test_overlay_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("overlay.py", "--size", "64M", "--written", "1M", "--repeat", "1",
                      "--output", str(output), "--patience", "0", timeout=300)

    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"reset_s=\d+\.\d\d doit_reset_s=\d+\.\d\d target=(ok|over)", last), last
    assert "## Resetting a disk" in output.read_text()


@pytest.mark.vm
@needs_qemu
def test_layers_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("layers.py", "--disk", "16M", "--file-size", "2M", "--repeat", "1",
                      "--output", str(output), "--patience", "0", timeout=600)

    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"depth4/1=\d+\.\d\d depth8/1=\d+\.\d\d depth16/1=\d+\.\d\d flat16/1=\d+\.\d\d "
                        r"cost16=\d+\.\d\d costflat16=\d+\.\d\d host16/1=\d+\.\d\d hostflat16/1=\d+\.\d\d "
                        r"depth1_s=\d+\.\d{3}",
                        last), last
    text = output.read_text()
    assert "## Reading through a chain of layers" in text
    assert all(f"\n| {depth} | " in text for depth in (1, 4, 8, 16, "16 flattened"))


@needs_qemu
def test_the_layers_benchmark_chain_holds_the_file_in_its_bottom_layer_only(tmp_path: Path) -> None:
    layers = importlib.import_module("layers")
    chain = layers.make_chain(tmp_path, 16 << 20, 2 << 20, 4)

    infos = [json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(layer)],
                                       capture_output=True, text=True, check=True).stdout) for layer in chain]
    sizes = [int(info["actual-size"]) for info in infos]
    assert [info["cluster-size"] for info in infos] == [4096] * 4, "the builder's layers' clusters"
    assert sizes[0] > 2 << 20 and all(size < 1 << 20 for size in sizes[1:]), sizes
    assert [layer.stat().st_mode & 0o777 for layer in chain] == [0o444] * 4
    listed = subprocess.run(["qemu-img", "info", "--backing-chain", str(chain[-1])], capture_output=True,
                            text=True, check=True).stdout
    assert listed.count("backing file: ../layer0") == 3 and "backing file: ../base.raw" in listed


def test_a_section_is_replaced_and_the_others_are_kept(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    benchlib.write_section(output, "one", "first\n")
    benchlib.write_section(output, "two", "second\n")
    benchlib.write_section(output, "one", "first, again\n")

    text = output.read_text()
    assert text.startswith(benchlib.HEADER)
    assert "first, again" in text and "second" in text and "first\n" not in text
    assert text.index("first, again") < text.index("second")


def test_measure_reports_what_a_child_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * 3_000_000)

    measured = benchlib.measure(["cat", str(data)], stdout=tmp_path / "copy")

    assert measured.returncode == 0
    assert measured.rchar >= 3_000_000
    assert measured.maxrss_kib > 0
    assert (tmp_path / "copy").read_bytes() == data.read_bytes()


def test_open_watch_sees_a_file_opened_and_not_one_only_looked_at(tmp_path: Path) -> None:
    (tmp_path / "image").write_bytes(b"disk")
    (tmp_path / "other").write_bytes(b"x")
    with benchlib.OpenWatch(tmp_path) as watch:
        (tmp_path / "other").stat()
        subprocess.run(["cat", str(tmp_path / "image")], check=True, capture_output=True)
        assert watch.touched() == {"image"}
        assert watch.touched() == set()


@pytest.mark.parametrize(("text", "size"), [("8M", 8 << 20), ("1G", 1 << 30), ("512k", 512 << 10)])
def test_sizes_are_binary(text: str, size: int) -> None:
    assert benchlib.parse_size(text) == size
    assert benchlib.parse_size(benchlib.size_label(size)) == size


@needs_qemu
def test_shares_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("shares.py", "--repeat", "1", "--files", "40", "--big", "2M", "--memory", "256M",
                      "--output", str(output), "--patience", "0", timeout=600)

    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"tree_9p_s=\d+\.\d\d tree_virtiofs_s=\d+\.\d\d tree_copy_s=\d+\.\d\d "
                        r"big_9p_s=\d+\.\d\d big_virtiofs_s=\d+\.\d\d big_copy_s=\d+\.\d\d sync_s=\d+\.\d\d",
                        summary), summary
    text = output.read_text()
    assert "## Shares: a 40-file tree and a 2M file in the guest" in text
    assert "| large file read: virtiofs |" in text and summary in text


@pytest.mark.vm
@needs_qemu
def test_arches_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("arches.py", "--repeat", "1", "--output", str(output), "--patience", "0", timeout=900)

    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"bios_s=\d+\.\d\d uefi_s=\d+\.\d\d aarch64_s=\d+\.\d\d "
                        r"uefi/bios=\d+\.\d\d aarch64/bios=\d+\.\d\d", summary), summary
    text = output.read_text()
    assert "## Cold start by architecture and firmware" in text and summary in text
    # What status --json said ran: each guest's architecture, accelerator and firmware.
    for row in ("| x86_64 BIOS | x86_64 | tcg | bios |", "| x86_64 UEFI | x86_64 | tcg | uefi |",
                "| aarch64 UEFI | aarch64 | tcg | uefi |"):
        assert row in text
    assert re.search(r"Load when the run ended: `.*load average: [\d.]+, [\d.]+, [\d.]+`\.", text)


@pytest.mark.vm
@needs_qemu
def test_steps_benchmark_runs_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    done = run_script("steps.py", "--repeat", "1", "--steps", "1", "--written", "16M",
                      "--output", str(output), "--patience", "0", timeout=900)

    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"cached/plain=\d+\.\d\d capture_s=-?\d+\.\d\d stop_s=-?\d+\.\d\d "
                         r"reboot_s=-?\d+\.\d\d layer/written=(\d\.\d{4})", last)
    assert match, last
    assert float(match.group(1)) <= 0.05, "the written and deleted 16M leave (almost) nothing in the layer"
    text = output.read_text()
    assert "## Setup steps: a cached start, the capture per step, a step's layer" in text
    for way in ("boot", "run", "freeze (kvmtasks)", "stop", "reboot"):
        assert f"\n| {way}: " in text or f"\n| {way} " in text, way
    assert "| cached: `doit start:cached` (three cached steps) |" in text and last in text
