"""Benchmark `PART-ctl start` against QEMU started by hand with the same argv, stop, and warm starts.

    python bench/boot.py

Builds the tiny guest image of the demo (kvmtasks.demo.guestimage, packages cached
in .cache/guest) and times, alternating, repeated, each time in a fresh folder
with a fresh copy of the image:

- start: ``bin/PART-ctl start``, which returns once an ssh login works;
- raw: the same qemu argv (kvmtasks.engines.qemu.argv.qemu_argv) run by hand, then
  ``ssh ... true`` in a tight loop until it succeeds;
- stop: ``bin/PART-ctl stop`` after each start (the guest acts on the ACPI power
  button), and after a start of the variant that ignores the button (stop asks
  it over ssh);
- warm, on a qcow2 copy: a cold start, ``snapshot save``, stop, then
  ``snapshot restore`` of the stopped VM (until an ssh login works);
  ``PART-runscript true`` over the VM's ssh master against a plain ``ssh ... true``,
  taking turns; ``suspend``, then ``start`` (resume, until an ssh login works); the
  peak RSS of the generated scripts.

``--commands`` boots once and measures only ``PART-runscript true`` against ``ssh ... true``.

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
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    MB,
    REPO_ROOT,
    Quiet,
    bench_parser,
    doit_argv,
    environment,
    free_port,
    machine_lines,
    measure,
    median,
    require,
    table,
    write_section,
)

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.demo.guestimage import build_guest_image
from kvmtasks.engines.poweroff import STOPPED_HOW
from kvmtasks.engines.qemu.argv import qemu_argv
from kvmtasks.guest import sshconfig
from kvmtasks.guest.ssh import ssh_argv

sys.path.insert(0, str(REPO_ROOT))  # the test suite's helpers, shared rather than copied
from tests.vmfixtures import qemu_pids_under

PART = "boot"
GUEST_CACHE = REPO_ROOT / ".cache" / "guest"
BOOT_TIMEOUT = 300.0
# The hand-made loop gives up on a silent connection after this long and tries again at once:
# a tighter poll than PART-ctl's, so that "raw" is the best a script could do.
POLL_CONNECT_TIMEOUT = 1
POLL_PAUSE = 0.05
COMMAND_RUNS = 15
# PART-runscript over the open master, against a plain ssh login: at most this share, and this long.
RUNSCRIPT_TARGET = 0.3
RUNSCRIPT_TARGET_MS = 40
GNU_TIME = "/usr/bin/time"
# The report's label for each way `stop` powers a guest off (keys of poweroff.STOPPED_HOW).
STOP_LABELS = {
    "acpi": "the guest acts on the ACPI power button",
    "ssh": "the guest ignores the button: `poweroff` over ssh after 3 s",
}


@dataclass
class Warm:
    """What the warm round measured, in seconds (RSS in KiB)."""

    cold: list[float] = field(default_factory=list)
    save: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)
    suspend: list[float] = field(default_factory=list)
    resume: list[float] = field(default_factory=list)
    runscript: list[float] = field(default_factory=list)
    plain_ssh: list[float] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)

    def peak(self, name: str, kib: int) -> None:
        self.rss[name] = max(self.rss.get(name, 0), kib)


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
        "kvm_shutdown_timeout = 5\n"
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


def run_ctl(folder: Path, image: Path, key: Path, quiet: Quiet, stop_how: str) -> tuple[float, float]:
    """doit provision (not timed), then `bin/PART-ctl start` and `stop` (each timed).

    stop_how is how the guest of this image powers off; a stop that says otherwise ends the
    benchmark, as its time would be filed under the wrong row.
    """
    part = make_project(folder, image, key)
    env = environment(KVMTASKS_CONFIG=str(folder / "boot.cfg"), HOME=str(folder / "home"))
    measure(doit_argv(f"provision:{PART}"), env=env, cwd=folder).check()
    ctl = str(part.kvm_bin_directory / f"{PART}-ctl")
    with killed_afterwards(folder):
        quiet.wait()
        started = measure([ctl, "start"], env=env, cwd=folder).check()
        stopped = measure([ctl, "stop"], env=env, cwd=folder).check()
        if STOPPED_HOW[stop_how] not in stopped.output:
            raise SystemExit(f"stop did not say {STOPPED_HOW[stop_how]!r}: {stopped.output.strip()}")
        return started.seconds, stopped.seconds


def run_raw(folder: Path, image: Path, key: Path, quiet: Quiet) -> float:
    """The same qemu argv by hand, then `ssh ... true` until it works."""
    part = make_project(folder, image, key)
    part.state_directory.mkdir(parents=True)
    argv = qemu_argv(part, accel="tcg", disk_format="raw", listen_address="127.0.0.1")
    sshconfig.write(part)  # what ssh -F reads; kvmtasks writes it at render and start
    # A command-line option wins over the config file's: a short timeout for each try.
    poll = ["ssh", "-o", f"ConnectTimeout={POLL_CONNECT_TIMEOUT}", *plain(ssh_argv(part, ["true"]))[1:]]
    with killed_afterwards(folder):
        quiet.wait()
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        while subprocess.run(poll, check=False, capture_output=True, stdin=subprocess.DEVNULL).returncode:
            if time.perf_counter() - started > BOOT_TIMEOUT:
                raise SystemExit(f"the guest never answered on ssh; see {RunFiles.of(part).console_log}")
            time.sleep(POLL_PAUSE)
        return time.perf_counter() - started


def plain(argv: list[str]) -> list[str]:
    """The ssh argv with no master (ControlPath=none): a connection and login of its own."""
    for index, arg in enumerate(argv):
        if arg.startswith("ControlPath="):
            return [*argv[:index], "ControlPath=none", *argv[index + 1:]]
    raise AssertionError("ssh_argv names no ControlPath")


def compare_commands(runscript: str, ssh: list[str], env: dict[str, str], folder: Path, quiet: Quiet,
                     warm: Warm, runs: int = COMMAND_RUNS) -> None:
    """``PART-runscript true`` over the open master and a plain ``ssh ... true``, taking turns."""
    quiet.wait()
    for _ in range(runs):
        warm.runscript.append(measure([runscript, "true"], env=env, cwd=folder).check().seconds)
        warm.plain_ssh.append(measure(ssh, env=env, cwd=folder).check().seconds)


def with_peak_rss(argv: list[str], env: dict[str, str], folder: Path) -> tuple[float, int]:
    """Seconds, and peak RSS in KiB, of argv run under GNU time: a process forked from this
    benchmark would count the benchmark's own memory as its peak (Linux copies the high-water
    mark at fork), one forked from the small ``time`` does not."""
    with tempfile.NamedTemporaryFile("r") as rss:
        done = measure([GNU_TIME, "-f", "%M", "-o", rss.name, *argv], env=env, cwd=folder).check()
        return done.seconds, int(rss.read().split()[-1])


def run_warm(folder: Path, image: Path, key: Path, quiet: Quiet, warm: Warm) -> None:
    """Cold start, snapshot restore, runscript against ssh, suspend and resume, on a qcow2 disk."""
    folder.mkdir(parents=True)
    qcow2 = folder / "guest.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(qcow2)], check=True)
    part = make_project(folder / "project", qcow2, key)
    env = environment(KVMTASKS_CONFIG=str(folder / "project" / "boot.cfg"), HOME=str(folder / "home"))
    measure(doit_argv(f"provision:{PART}"), env=env, cwd=folder).check()
    ctl = str(part.kvm_bin_directory / f"{PART}-ctl")
    runscript = str(part.kvm_bin_directory / f"{PART}-runscript")

    def timed(*args: str, name: str = "") -> float:
        seconds, kib = with_peak_rss([ctl, *args], env, folder)
        warm.peak(name or f"{PART}-ctl {args[0]}", kib)
        return seconds

    with killed_afterwards(folder):
        quiet.wait()
        warm.cold.append(timed("start"))
        warm.save.append(timed("snapshot", "save", "bench", name=f"{PART}-ctl snapshot"))
        timed("stop")
        quiet.wait()
        warm.restore.append(timed("snapshot", "restore", "bench", name=f"{PART}-ctl snapshot"))
        timed("status")
        compare_commands(runscript, plain(ssh_argv(part, ["true"])), env, folder, quiet, warm)
        _, kib = with_peak_rss([runscript, "true"], env, folder)
        warm.peak(f"{PART}-runscript true (Python -IS, then ssh in its place)", kib)
        warm.suspend.append(timed("suspend"))
        quiet.wait()
        warm.resume.append(timed("start", name=f"{PART}-ctl start (resume)"))
        timed("stop")


def guest_images(work: Path) -> tuple[Path, Path, Path]:
    """The tiny guest, the variant that ignores the ACPI button, and their key."""
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    image = build_guest_image(work / "guest.img", key.with_suffix(".pub"), GUEST_CACHE)
    no_acpi = build_guest_image(work / "no-acpi.img", key.with_suffix(".pub"), GUEST_CACHE,
                                with_acpi=False)
    return image.path, no_acpi.path, key


def report(image: Path, ctl: list[float], raw: list[float], stops: dict[str, list[float]], warm: Warm,
           quiet: Quiet) -> str:
    def runs(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    def row(label: str, values: list[float]) -> list[str]:
        return [label, f"{median(values):.2f} s", runs(values)]

    def ms(values: list[float]) -> str:
        return f"{median(values) * 1000:.0f} ms"

    cold = median(ctl)
    warm_rows = [
        row("warm: cold `boot-ctl start` of the qcow2 copy", warm.cold),
        row("warm: `boot-ctl snapshot save bench` (running VM)", warm.save),
        row("restore: `boot-ctl snapshot restore bench` of the stopped VM (until an ssh login works)",
            warm.restore),
        row("warm: `boot-ctl suspend`", warm.suspend),
        row("resume: `boot-ctl start` of the suspended VM (until an ssh login works)", warm.resume),
        [f"runscript: `boot-runscript true`, median of {len(warm.runscript)}", ms(warm.runscript),
         f"min {min(warm.runscript) * 1000:.0f} ms, max {max(warm.runscript) * 1000:.0f} ms"],
        [f"ssh: a plain `ssh ... true`, median of {len(warm.plain_ssh)}", ms(warm.plain_ssh),
         f"min {min(warm.plain_ssh) * 1000:.0f} ms, max {max(warm.plain_ssh) * 1000:.0f} ms"],
        *([f"peak RSS: `{name}`", f"{kib / 1024:.0f} MB", ""] for name, kib in sorted(warm.rss.items())),
    ]

    rows = [
        row("start: `bin/boot-ctl start` (until an ssh login works)", ctl),
        row("raw: the same qemu argv by hand, `ssh ... true` in a loop", raw),
        *(row(f"stop: `bin/boot-ctl stop`, {STOP_LABELS[how]}", values) for how, values in stops.items()),
    ]
    return "\n".join([
        "## Booting the tiny guest",
        "",
        f"`python bench/boot.py`: median of {len(ctl)} rounds; in each, start (then stop), raw, warm, "
        "and a start then stop of the guest that ignores the ACPI button, in reverse order every "
        "other round, each in a fresh folder with a fresh copy of the image. " + quiet.note(),
        "",
        f"Guest: the demo's tiny image ({image.stat().st_size / MB:.0f} MB raw: Debian kernel, "
        "busybox, dropbear), 256 MB of memory, 1 CPU; x86_64 through the BIOS (SeaBIOS), TCG. "
        "The raw loop runs `ssh` with "
        f"ConnectTimeout={POLL_CONNECT_TIMEOUT} every {POLL_PAUSE:g} s until it succeeds.",
        "",
        *machine_lines(["qemu-system-x86_64", "--version"]),
        "",
        table(["measurement", "median", "runs"], rows + warm_rows),
        "",
        f"Warm starts, against the cold start above ({cold:.2f} s): snapshot restore "
        f"{median(warm.restore) / cold:.2f}x, resume {median(warm.resume) / cold:.2f}x (target: 0.15x "
        f"or less). `boot-runscript true` through the VM's ssh master takes "
        f"{median(warm.runscript) / median(warm.plain_ssh):.2f}x the time of a plain `ssh ... true` "
        f"(target: {RUNSCRIPT_TARGET:g}x or less, and {RUNSCRIPT_TARGET_MS} ms or less). "
        "Restore and resume include what `start` does after the boot: "
        "an ssh login, opening the ssh master and setting the guest's clock. Peak RSS is the "
        "maximum resident set size GNU time reports: the largest of the script's process (for "
        "runscript: Python, then ssh, which replaces it) and the children it waited for (ssh, "
        "qemu-img, the QEMU launcher that daemonizes), never the running QEMU.",
        "",
        "```",
        summary_line(ctl, raw, warm),
        "```",
    ])


def summary_line(ctl: list[float], raw: list[float], warm: Warm) -> str:
    cold = median(ctl)
    return (f"start/raw={cold / median(raw):.2f} start_s={cold:.2f} raw_s={median(raw):.2f} "
            f"restore/start={median(warm.restore) / cold:.2f} resume/start={median(warm.resume) / cold:.2f} "
            f"runscript/ssh={median(warm.runscript) / median(warm.plain_ssh):.2f} "
            f"runscript_ms={median(warm.runscript) * 1000:.0f} ssh_ms={median(warm.plain_ssh) * 1000:.0f} "
            f"script_rss_mb={max(warm.rss.values()) / 1024:.0f}")


def commands_report(warm: Warm, quiet: Quiet) -> str:
    ratio = median(warm.runscript) / median(warm.plain_ssh)
    met = ratio <= RUNSCRIPT_TARGET and median(warm.runscript) * 1000 <= RUNSCRIPT_TARGET_MS

    def spread(values: list[float]) -> str:
        low, high = min(values) * 1000, max(values) * 1000
        return f"median {median(values) * 1000:.0f} ms (min {low:.0f}, max {high:.0f})"

    return "\n".join([
        "## A command in the running guest",
        "",
        f"`python bench/boot.py --commands`: one cold start of the tiny guest, then {len(warm.runscript)} "
        "runs each of `boot-runscript true` (over the ssh master `start` opened) and a plain "
        "`ssh ... true` (ControlPath=none: a connection and login of its own), taking turns. "
        + quiet.note(),
        "",
        table(["measurement", "time"], [
            ["`boot-runscript true` (Python -IS execs ssh -F, over the master)", spread(warm.runscript)],
            ["plain `ssh ... true` (a login of its own)", spread(warm.plain_ssh)],
        ]),
        "",
        f"runscript/ssh = {ratio:.2f}x (target: {RUNSCRIPT_TARGET:g}x or less, and "
        f"{RUNSCRIPT_TARGET_MS} ms or less): {'met' if met else 'NOT met'}.",
    ])


def run_commands(options: argparse.Namespace, quiet: Quiet) -> int:
    """--commands: one boot, then only the command comparison."""
    warm = Warm()
    with tempfile.TemporaryDirectory(prefix="kvmtasks-boot-") as work_name:
        work = Path(work_name)
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        image = build_guest_image(work / "guest.img", key.with_suffix(".pub"), GUEST_CACHE).path
        folder = work / "commands"
        part = make_project(folder, image, key)
        env = environment(KVMTASKS_CONFIG=str(folder / "boot.cfg"), HOME=str(folder / "home"))
        measure(doit_argv(f"provision:{PART}"), env=env, cwd=folder).check()
        ctl = str(part.kvm_bin_directory / f"{PART}-ctl")
        runscript = str(part.kvm_bin_directory / f"{PART}-runscript")
        with killed_afterwards(folder):
            measure([ctl, "start"], env=env, cwd=folder).check()
            compare_commands(runscript, plain(ssh_argv(part, ["true"])), env, folder, quiet, warm,
                             runs=COMMAND_RUNS * options.repeat)
            measure([ctl, "stop"], env=env, cwd=folder).check()
    text = commands_report(warm, quiet)
    write_section(options.output, "boot-commands", text)
    print(text)
    print(f"runscript/ssh={median(warm.runscript) / median(warm.plain_ssh):.2f} "
          f"runscript_ms={median(warm.runscript) * 1000:.0f} ssh_ms={median(warm.plain_ssh) * 1000:.0f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the VMs are killed on the way out
    parser = bench_parser(__doc__)
    parser.add_argument("--commands", action="store_true",
                        help="only PART-runscript true against a plain ssh true, after one boot")
    options = parser.parse_args(argv)
    require(parser, "qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen", GNU_TIME)
    quiet = Quiet(patience=options.patience)
    if options.commands:
        return run_commands(options, quiet)
    ctl: list[float] = []
    raw: list[float] = []
    stops: dict[str, list[float]] = {how: [] for how in STOP_LABELS}
    warm = Warm()
    with tempfile.TemporaryDirectory(prefix="kvmtasks-boot-") as work_name:
        work = Path(work_name)
        image, no_acpi, key = guest_images(work)
        for round_number in range(options.repeat):
            kinds = ["start", "raw", "warm", "no-acpi"]
            for kind in kinds if round_number % 2 == 0 else reversed(kinds):
                folder = work / f"{kind}-{round_number}"
                if kind == "start":
                    started, stopped = run_ctl(folder, image, key, quiet, "acpi")
                    ctl.append(started)
                    stops["acpi"].append(stopped)
                elif kind == "no-acpi":
                    stops["ssh"].append(run_ctl(folder, no_acpi, key, quiet, "ssh")[1])
                elif kind == "raw":
                    raw.append(run_raw(folder, image, key, quiet))
                else:
                    run_warm(folder, image, key, quiet, warm)
                shutil.rmtree(folder, ignore_errors=True)
                print(f"  round {round_number + 1}/{options.repeat}: {kind} done", file=sys.stderr)
        text = report(image, ctl, raw, stops, warm, quiet)
    write_section(options.output, "boot", text)
    print(text)
    print(summary_line(ctl, raw, warm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
