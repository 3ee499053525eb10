"""Benchmark two VMs started by one `doit -n 2` run against one VM started alone.

    python bench/starts.py

Builds the tiny guest image of the demo (as bench/boot.py does) and times,
alternating, repeated, each time in a fresh folder holding two parts, each
booting a copy of the image:

- one: ``doit start:a`` (returns once an ssh login works), then ``doit stop:a``;
- two: ``doit -n 2 start:a start:b``, then ``doit -n 2 stop:a stop:b``.

Guests run under TCG, which keeps a core busy while a guest boots: on a
machine with two cores, two boots at once show what parallel starts cost when
the cores are shared. Every VM is killed when its measurement ends, whatever
happened. Writes a table into docs/benchmarks.md (or --output).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    MB,
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
from boot import BOOT_TIMEOUT, GUEST_CACHE, killed_afterwards

from kvmtasks.demo.guestimage import build_guest_image

PARTS = ("a", "b")


@dataclass
class Results:
    one_start: list[float] = field(default_factory=list)
    one_stop: list[float] = field(default_factory=list)
    two_start: list[float] = field(default_factory=list)
    two_stop: list[float] = field(default_factory=list)


def make_project(folder: Path, image: Path, key: Path) -> dict[str, str]:
    """Two parts, each on a copy of the image; the environment that runs doit on them."""
    folder.mkdir(parents=True)
    sections = []
    for name in PARTS:
        disk = folder / f"{name}.img"
        shutil.copyfile(image, disk)
        sections.append(
            f"[{name}]\nfile = {disk}\nssh_port = {free_port()}\nssh_key_path = {key}\n"
            f"kvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = {BOOT_TIMEOUT:g}\n"
            "kvm_shutdown_timeout = 5\n"
        )
    config = folder / "starts.cfg"
    config.write_text(f"[buildout]\ndirectory = {folder}\n\n" + "\n".join(sections))
    return environment(KVMTASKS_CONFIG=str(config), HOME=str(folder / "home"))


def run(folder: Path, image: Path, key: Path, count: int, quiet: Quiet) -> tuple[float, float]:
    """Provision (not timed), then start and stop count VMs with one doit run each (timed)."""
    env = make_project(folder, image, key)
    names = PARTS[:count]
    parallel = ["-n", str(count)] if count > 1 else []
    measure(doit_argv(*parallel, *(f"provision:{name}" for name in names)), env=env, cwd=folder).check()
    with killed_afterwards(folder):
        quiet.wait()
        started = measure(doit_argv(*parallel, *(f"start:{name}" for name in names)),
                          env=env, cwd=folder).check()
        stopped = measure(doit_argv(*parallel, *(f"stop:{name}" for name in names)),
                          env=env, cwd=folder).check()
        return started.seconds, stopped.seconds


def report(image: Path, results: Results, repeat: int, quiet: Quiet) -> str:
    def row(label: str, values: list[float]) -> list[str]:
        return [label, f"{median(values):.2f} s", ", ".join(f"{value:.2f}" for value in values)]

    return "\n".join([
        "## Two VMs started by one doit run",
        "",
        f"`python bench/starts.py`: median of {repeat} rounds, one and two taking turns going "
        "first, each in a fresh folder with fresh copies of the image. " + quiet.note(),
        "",
        f"Guest: the demo's tiny image ({image.stat().st_size / MB:.0f} MB raw), 256 MB of memory, "
        "1 CPU each, TCG. `start` returns once an ssh login works.",
        "",
        *machine_lines(["qemu-system-x86_64", "--version"]),
        "",
        table(["measurement", "median", "runs"], [
            row("one: `doit start:a`", results.one_start),
            row("two: `doit -n 2 start:a start:b`", results.two_start),
            row("one: `doit stop:a`", results.one_stop),
            row("two: `doit -n 2 stop:a stop:b`", results.two_stop),
        ]),
        "",
        "```",
        summary_line(results),
        "```",
    ])


def summary_line(results: Results) -> str:
    one, two = median(results.one_start), median(results.two_start)
    stop_one, stop_two = median(results.one_stop), median(results.two_stop)
    return (f"two/one={two / one:.2f} one_s={one:.2f} two_s={two:.2f} "
            f"stop_two/stop_one={stop_two / stop_one:.2f}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the VMs are killed on the way out
    parser = bench_parser(__doc__)
    options = parser.parse_args(argv)
    require(parser, "qemu-system-x86_64", "ssh", "ssh-keygen")
    quiet, results = Quiet(patience=options.patience), Results()
    with tempfile.TemporaryDirectory(prefix="kvmtasks-starts-") as work_name:
        work = Path(work_name)
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        image = build_guest_image(work / "guest.img", key.with_suffix(".pub"), GUEST_CACHE).path
        for round_number in range(options.repeat):
            counts = [1, 2] if round_number % 2 == 0 else [2, 1]
            for count in counts:
                folder = work / f"{count}-{round_number}"
                started, stopped = run(folder, image, key, count, quiet)
                if count == 1:
                    results.one_start.append(started)
                    results.one_stop.append(stopped)
                else:
                    results.two_start.append(started)
                    results.two_stop.append(stopped)
                shutil.rmtree(folder, ignore_errors=True)
                print(f"  round {round_number + 1}/{options.repeat}: {count} done", file=sys.stderr)
        text = report(image, results, options.repeat, quiet)
    write_section(options.output, "starts", text)
    print(text)
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
