"""Benchmark `PART-ctl start` against QEMU started by hand with the same argv.

    python bench/boot.py

Builds the tiny guest image of the demo (kvmtasks.demo.guestimage, packages cached
in .cache/guest) and times, alternating, repeated, each time in a fresh folder
with a fresh copy of the image:

- start: ``bin/PART-ctl start``, which returns once an ssh login works;
- raw: the same qemu argv (kvmtasks.engines.qemu.qemu_argv) run by hand, then
  ``ssh ... true`` in a tight loop until it succeeds;
- stop: ``bin/PART-ctl stop`` after each start (the guest acts on the ACPI power
  button), and after a start of the variant that ignores the button (stop asks
  it over ssh).

Guests run under TCG (KVM crashes guests on the nested machines this runs on).
Every VM is killed when its measurement ends, whatever happened. Prints a table
and a last line ``start/raw=...``; writes the table into docs/benchmarks.md
(or --output).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from benchlib import (
    DOCS,
    MB,
    REPO_ROOT,
    Quiet,
    doit_argv,
    environment,
    free_port,
    machine_lines,
    measure,
    median,
    table,
    write_section,
)

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.demo.guestimage import build_guest_image
from kvmtasks.engines.qemu import qemu_argv
from kvmtasks.guest.ssh import CONNECT_TIMEOUT, ssh_argv

sys.path.insert(0, str(REPO_ROOT))  # the test suite's helpers, shared rather than copied
from tests.vmfixtures import qemu_pids_under

PART = "boot"
GUEST_CACHE = REPO_ROOT / ".cache" / "guest"
BOOT_TIMEOUT = 300.0
# The hand-made loop gives up on a silent connection after this long and tries again at once:
# a tighter poll than PART-ctl's, so that "raw" is the best a script could do.
POLL_CONNECT_TIMEOUT = 1
POLL_PAUSE = 0.05
ACPI = "the guest acts on the ACPI power button"
OVER_SSH = "the guest ignores the button: `poweroff` over ssh after 3 s"


def make_project(folder: Path, image: Path, key: Path) -> Part:
    """A fresh folder holding a copy of the image and a config whose part boots it."""
    folder.mkdir(parents=True)
    disk = folder / "guest.img"
    shutil.copyfile(image, disk)
    config = folder / "boot.cfg"
    config.write_text(
        f"[buildout]\ndirectory = {folder}\n\n[{PART}]\nfile = {disk}\n"
        f"ssh_port = {free_port()}\nssh_key_path = {key}\n"
        f"kvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = {BOOT_TIMEOUT:g}\n"
    )
    (part,) = load_file(config, folder)
    return part


@contextmanager
def killed_afterwards(folder: Path) -> Iterator[None]:
    """Whatever happens inside, no qemu started on a file under folder outlives the block."""
    try:
        yield
    finally:
        for pid in qemu_pids_under(folder):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while qemu_pids_under(folder) and time.monotonic() < deadline:
            time.sleep(0.05)


def run_ctl(folder: Path, image: Path, key: Path, quiet: Quiet) -> tuple[float, float]:
    """doit provision (not timed), then `bin/PART-ctl start` and `stop` (each timed)."""
    part = make_project(folder, image, key)
    env = environment(KVMTASKS_CONFIG=str(folder / "boot.cfg"), HOME=str(folder / "home"))
    measure(doit_argv(f"provision:{PART}"), env=env, cwd=folder).check()
    ctl = str(part.kvm_bin_directory / f"{PART}-ctl")
    with killed_afterwards(folder):
        quiet.wait()
        started = measure([ctl, "start"], env=env, cwd=folder).check()
        stopped = measure([ctl, "stop"], env=env, cwd=folder).check()
        return started.seconds, stopped.seconds


def run_raw(folder: Path, image: Path, key: Path, quiet: Quiet) -> float:
    """The same qemu argv by hand, then `ssh ... true` until it works."""
    part = make_project(folder, image, key)
    part.state_directory.mkdir(parents=True)
    argv = qemu_argv(part, accel="tcg", disk_format="raw", listen_address="127.0.0.1")
    poll = ssh_argv(part, ["true"])
    poll[poll.index(f"ConnectTimeout={CONNECT_TIMEOUT}")] = f"ConnectTimeout={POLL_CONNECT_TIMEOUT}"
    with killed_afterwards(folder):
        quiet.wait()
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        while subprocess.run(poll, check=False, capture_output=True, stdin=subprocess.DEVNULL).returncode:
            if time.perf_counter() - started > BOOT_TIMEOUT:
                raise SystemExit(f"the guest never answered on ssh; see {RunFiles.of(part).console_log}")
            time.sleep(POLL_PAUSE)
        return time.perf_counter() - started


def guest_images(work: Path) -> tuple[Path, Path, Path]:
    """The tiny guest, the variant that ignores the ACPI button, and their key."""
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    image = build_guest_image(work / "guest.img", key.with_suffix(".pub"), GUEST_CACHE)
    no_acpi = build_guest_image(work / "no-acpi.img", key.with_suffix(".pub"), GUEST_CACHE,
                                with_acpi=False)
    return image.path, no_acpi.path, key


def report(image: Path, ctl: list[float], raw: list[float], stops: dict[str, list[float]],
           quiet: Quiet) -> str:
    def runs(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    rows = [
        ["start: `bin/boot-ctl start` (until an ssh login works)", f"{median(ctl):.2f} s", runs(ctl)],
        ["raw: the same qemu argv by hand, `ssh ... true` in a loop", f"{median(raw):.2f} s", runs(raw)],
        *([f"stop: `bin/boot-ctl stop`, {label}", f"{median(values):.2f} s", runs(values)]
          for label, values in stops.items()),
    ]
    return "\n".join([
        "## Booting the tiny guest",
        "",
        f"`python bench/boot.py`: median of {len(ctl)} rounds, start and raw taking turns going "
        "first, each in a fresh folder with a fresh copy of the image. " + quiet.note(),
        "",
        f"Guest: the demo's tiny image ({image.stat().st_size / MB:.0f} MB raw: Debian kernel, "
        "busybox, dropbear), 256 MB of memory, 1 CPU, TCG. The raw loop runs `ssh` with "
        f"ConnectTimeout={POLL_CONNECT_TIMEOUT} every {POLL_PAUSE:g} s until it succeeds.",
        "",
        *machine_lines(["qemu-system-x86_64", "--version"]),
        "",
        table(["measurement", "median", "runs"], rows),
        "",
        "```",
        summary_line(ctl, raw),
        "```",
    ])


def summary_line(ctl: list[float], raw: list[float]) -> str:
    return f"start/raw={median(ctl) / median(raw):.2f} start_s={median(ctl):.2f} raw_s={median(raw):.2f}"


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the VMs are killed on the way out
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported (default 3)")
    parser.add_argument("--output", type=Path, default=DOCS, help=f"report file (default {DOCS})")
    parser.add_argument("--patience", type=float, default=120.0,
                        help="seconds to wait for a quiet machine before each run (default 120)")
    options = parser.parse_args(argv)
    for program in ("qemu-system-x86_64", "ssh", "ssh-keygen"):
        if shutil.which(program) is None:
            parser.error(f"{program} not found")
    quiet = Quiet(patience=options.patience)
    ctl: list[float] = []
    raw: list[float] = []
    stops: dict[str, list[float]] = {ACPI: [], OVER_SSH: []}
    with tempfile.TemporaryDirectory(prefix="kvmtasks-boot-") as work_name:
        work = Path(work_name)
        image, no_acpi, key = guest_images(work)
        for round_number in range(options.repeat):
            kinds = ["start", "raw"] if round_number % 2 == 0 else ["raw", "start"]
            for kind in [*kinds, "no-acpi"]:
                folder = work / f"{kind}-{round_number}"
                if kind == "start":
                    started, stopped = run_ctl(folder, image, key, quiet)
                    ctl.append(started)
                    stops[ACPI].append(stopped)
                elif kind == "no-acpi":
                    stops[OVER_SSH].append(run_ctl(folder, no_acpi, key, quiet)[1])
                else:
                    raw.append(run_raw(folder, image, key, quiet))
                shutil.rmtree(folder, ignore_errors=True)
                print(f"  round {round_number + 1}/{options.repeat}: {kind} done", file=sys.stderr)
        text = report(image, ctl, raw, stops, quiet)
    write_section(options.output, "boot", text)
    print(text)
    print(summary_line(ctl, raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
