"""Benchmark guest setup steps: a start over cached steps, the capture per step, a step's layer size.

    python bench/steps.py

One project of the tiny guest (TCG), three measures, each against its baseline in the same run:

- start: `doit start:cached` (a part over three cached steps) against `doit start:plain` (the
  same guest without `setup`), each to ssh ready, then stopped (not timed); the order turns
  every round. Target: at most 1.10x.
- capture: a chain of --steps trivial steps, never cached (each build's step texts carry a
  fresh nonce), built by the builder VM in a child process (``--build WAY``) in each of five
  ways: ``boot`` (the builder boots and ends, running nothing: one boot), ``run`` (the steps
  run, nothing captured: one boot and the steps' own commands), ``freeze`` (what kvmtasks
  does: each step captured by sync, fstrim, fsfreeze or a read-only remount, QMP
  blockdev-snapshot, thaw, qemu-img check, sha256, into the cache), ``stop`` (QMP ``stop``
  right after sync and fstrim instead of the freeze, ``cont`` after the snapshot) and
  ``reboot`` (a builder boot per step). The capture's cost per step: a build's time less its
  builder's first boot (as the builder times it), divided by the steps, less the same for
  ``run``. Target for ``freeze``: at most 3 s.
- layer size: one step writes --written bytes to the guest's disk, syncs and deletes them;
  its layer's allocated bytes against the bytes written. Target: at most 5%.

Prints the tables and a last line ``cached/plain=... capture_s=... stop_s=... reboot_s=...
layer/written=...``; writes them into docs/benchmarks.md (or --output).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    REPO_ROOT,
    Quiet,
    bench_parser,
    doit_argv,
    environment,
    free_port,
    load_note,
    machine_lines,
    measure,
    median,
    parse_size,
    require,
    size_label,
    table,
    write_section,
)

from kvmtasks.demo.guestimage import build_guest_image

sys.path.insert(0, str(REPO_ROOT))  # the test suite's helpers, shared rather than copied
from tests.vmfixtures import qemu_pids_under

GUEST_CACHE = REPO_ROOT / ".cache" / "guest"
WAYS = ("boot", "run", "freeze", "stop", "reboot")
WAY_LABELS = {
    "boot": "boot: the builder boots and ends, no step (one boot)",
    "run": "run: the steps run, nothing captured (one boot and the steps' commands)",
    "freeze": "freeze (kvmtasks): sync, fstrim, fsfreeze or read-only remount, snapshot, thaw",
    "stop": "stop: sync, fstrim, QMP `stop`, snapshot, `cont` (no freeze)",
    "reboot": "reboot: a builder boot per step, each captured as kvmtasks does",
}
START_TARGET, CAPTURE_TARGET, SIZE_TARGET = 1.10, 3.0, 0.05
PART_OPTIONS = ("overlay = true\nkvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 300\n"
                "kvm_shutdown_timeout = 3\n")


def project_config(work: Path, image: Path, key: Path, steps: int, written: int) -> Path:
    """Four parts of one image: plain (no setup), cached (three steps), chain (the capture's
    trivial steps) and big (the write-then-delete step)."""
    def part(name: str, setup: list[str]) -> str:
        lines = "".join(f"    {step}\n" for step in setup)
        return (f"[{name}]\nfile = {image}\nssh_port = {free_port()}\nssh_key_path = {key}\n{PART_OPTIONS}"
                + (f"setup =\n{lines}" if setup else "") + "\n")

    cached = ["tools", "config", "service"]
    chain = [f"step{number}" for number in range(1, steps + 1)]
    text = [f"[buildout]\ndirectory = {work}\ndownload-cache = {work}/cache\n\n",
            part("plain", []), part("cached", cached), part("chain", chain), part("big", ["writedelete"]),
            "[tools]\nrun =\n    mkdir -p /mnt/app\n    echo tools > /mnt/app/tools\n\n",
            "[config]\nrun = echo config > /mnt/app/config\n\n",
            "[service]\nrun = echo service > /mnt/app/service\n\n",
            f"[writedelete]\nrun =\n    dd if=/dev/zero of=/mnt/big bs=1M count={written >> 20} 2>/dev/null\n"
            "    sync\n    rm /mnt/big\n\n"]
    text += [f"[{step}]\nrun = echo {step} > /mnt/{step}\n\n" for step in chain]
    config = work / "steps.cfg"
    config.write_text("".join(text))
    return config


# --- the child: one build of the chain part, in one of the ways -------------------------------

def _patch(way: str) -> None:
    """Turn the builder into the way measured (this child process only)."""
    from kvmtasks.engines.qemu.qmp import QmpClient
    from kvmtasks.layers import builder, capture

    def nothing(*args: object, **kwargs: object) -> None:
        return None

    if way in ("boot", "run"):
        builder._capture = nothing
    if way == "boot":
        builder._run_step = nothing
    if way == "stop":
        def synced() -> str:
            return "\n".join(["sync", capture.MOUNTS,
                              'for m in $mounts; do fstrim "$m" >/dev/null 2>&1 || true; done'])

        snapshot = capture.snapshot

        def paused(qmp_socket: Path, next_file: Path, backing_name: str, node_name: str) -> None:
            with QmpClient(qmp_socket, timeout=capture.QMP_TIMEOUT) as client:
                client.execute("stop")
            try:
                snapshot(qmp_socket, next_file, backing_name, node_name)
            finally:
                with QmpClient(qmp_socket, timeout=capture.QMP_TIMEOUT) as client:
                    client.execute("cont")

        capture.freeze_script = synced
        capture.thaw_script = lambda: "true"
        capture.snapshot = paused


def build_child(way: str, config: Path, nonce: str) -> int:
    from kvmtasks.config.loader import load_parts
    from kvmtasks.layers import builder

    _patch(way)
    part = next(part for part in load_parts([config], config.parent) if part.name == "chain")
    steps = tuple(dataclasses.replace(step, run=f"{step.run}\n: {nonce}") for step in part.setup)
    # reboot: the chain grown by one step per build, so each build boots for one step.
    for count in range(1, len(steps) + 1) if way == "reboot" else [len(steps)]:
        builder.build(dataclasses.replace(part, setup=steps[:count]))
    return 0


# --- the parent ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Built:
    """One build of the chain: its wall time and the builder's own figures."""

    seconds: float
    first_boot: float  # the builder's first boot, to ssh ready (as it says: "answered in")
    captures: tuple[float, ...]  # each capture, freeze to the layer in the cache ("captured in")


def built(done_seconds: float, output: str) -> Built:
    lines = output.splitlines()
    answered = [float(line.rsplit(" ", 2)[-2]) for line in lines if "the builder VM answered in" in line]
    captured = [float(line.rsplit("captured in ", 1)[1].split()[0]) for line in lines
                if " cached (" in line and "captured in " in line]
    if not answered:
        raise SystemExit(f"no builder boot in:\n{output}")
    return Built(done_seconds, answered[0], tuple(captured))


def entry_of(cache: Path, step: str) -> Path:
    for record in (cache / "layers").glob("*/record.json"):
        if json.loads(record.read_text()).get("step") == step:
            return record.parent / "layer.qcow2"
    raise SystemExit(f"no layer of step {step} in {cache / 'layers'}")


def run_ways(config: Path, env: dict[str, str], work: Path, quiet: Quiet, round_number: int,
             builds: dict[str, list[Built]]) -> None:
    turn = round_number % len(WAYS)
    for way in [*WAYS[turn:], *WAYS[:turn]]:
        quiet.wait()
        done = measure([sys.executable, __file__, "--build", way, "--config", str(config), "--nonce",
                        secrets.token_hex(8)], env=env, cwd=work).check()
        builds[way].append(built(done.seconds, done.output))


def run_starts(env: dict[str, str], work: Path, quiet: Quiet, round_number: int,
               starts: dict[str, list[float]]) -> None:
    for part in ("plain", "cached") if round_number % 2 == 0 else ("cached", "plain"):
        quiet.wait()
        starts[part].append(measure(doit_argv(f"start:{part}"), env=env, cwd=work).check().seconds)
        measure(doit_argv(f"stop:{part}"), env=env, cwd=work).check()


def runs(values: list[float]) -> str:
    return ", ".join(f"{value:.1f}" for value in values)


def start_ratio(starts: dict[str, list[float]]) -> float:
    """Median of each round's cached/plain: a round's two starts share that round's load."""
    return median([cached / plain for cached, plain in zip(starts["cached"], starts["plain"], strict=True)])


def beyond_boot(builds: list[Built], steps: int) -> float:
    """Median over the rounds of what a build cost beyond its builder's first boot, per step."""
    return median([(build.seconds - build.first_boot) / steps for build in builds])


def capture_cost(builds: dict[str, list[Built]], way: str, steps: int) -> float:
    """A way's cost per step beyond one boot and the steps' own commands (the `run` way's)."""
    return beyond_boot(builds[way], steps) - beyond_boot(builds["run"], steps)


def report(steps: int, written: int, starts: dict[str, list[float]], builds: dict[str, list[Built]],
           layer_bytes: int, big_s: float, quiet: Quiet) -> str:
    rounds = len(starts["plain"])
    ratios = [cached / plain for cached, plain in zip(starts["cached"], starts["plain"], strict=True)]
    start_rows = [["plain: `doit start:plain` (no setup)", f"{median(starts['plain']):.2f} s", "",
                   runs(starts["plain"])],
                  ["cached: `doit start:cached` (three cached steps)", f"{median(starts['cached']):.2f} s",
                   ", ".join(f"{value:.2f}x" for value in ratios), runs(starts["cached"])]]
    way_rows = []
    for way in WAYS:
        captured = [seconds for build in builds[way] for seconds in build.captures]
        way_rows.append([
            WAY_LABELS[way], f"{median([build.seconds for build in builds[way]]):.2f} s",
            f"{median([build.first_boot for build in builds[way]]):.1f} s",
            f"{beyond_boot(builds[way], steps):.2f} s",
            "" if way in ("boot", "run") else f"{capture_cost(builds, way, steps):.2f} s",
            f"{median(captured):.2f} s" if captured else "",
            runs([build.seconds for build in builds[way]])])
    share = layer_bytes / written
    cost = capture_cost(builds, "freeze", steps)
    return "\n".join([
        "## Setup steps: a cached start, the capture per step, a step's layer",
        "",
        f"`python bench/steps.py`: {rounds} rounds, the tiny guest under TCG, every figure against its "
        "baseline in the same run. " + load_note() + " " + quiet.note(),
        "",
        *machine_lines(["qemu-img", "--version"]),
        "",
        "### Starting a part over three cached steps",
        "",
        "Each to ssh ready, then stopped (not timed); the order turns every round, and each round's "
        "ratio compares two starts under that round's load. Target: at most "
        f"{START_TARGET:.2f}x the part without `setup`: "
        f"{'met' if start_ratio(starts) <= START_TARGET else 'missed'} ({start_ratio(starts):.2f}x, the "
        "median of the rounds' ratios).",
        "",
        table(["start", "median", "cached/plain by round", "runs (s)"], start_rows),
        "",
        "### Capturing each step as a layer",
        "",
        f"A chain of {steps} trivial steps (`echo stepN > /mnt/stepN`), never cached, built in one "
        "child process per way (`python bench/steps.py --build WAY`: the config loaded, the builder "
        "run). A build's boot is taken out as the builder times it (its first boot, to ssh ready), "
        "so the boots' spread on a loaded machine stays out of the per-step figures; what is left, "
        f"divided by {steps}, less the same for `run` (the steps' own commands), is the capture's "
        f"cost per step. Target for kvmtasks' way: at most {CAPTURE_TARGET:.0f} s: "
        f"{'met' if cost <= CAPTURE_TARGET else 'missed'} ({cost:.2f} s). `stop` pauses the guest with "
        "its file systems as they are (FAT's dirty bit, ext4's journal), which every boot over the "
        "layer would replay; `reboot` is what a power-off per step costs at least (a capture by "
        "power-off adds the guest's shutdown).",
        "",
        table(["way", "median", "first boot", "beyond it, per step", "capture per step",
               "capture, as the builder times it", "runs (s)"], way_rows),
        "",
        "### A step that writes and deletes",
        "",
        f"One step writes {size_label(written)} of zeros to the guest's disk (`dd`), runs `sync` and "
        f"deletes the file; built in {big_s:.1f} s. Its layer holds {layer_bytes / (1 << 20):.2f} MiB "
        f"allocated: {share:.2%} of the bytes written (target: at most {SIZE_TARGET:.0%}: "
        f"{'met' if share <= SIZE_TARGET else 'missed'}).",
        "",
        "```",
        summary_line(starts, builds, steps, share),
        "```",
    ])


def summary_line(starts: dict[str, list[float]], builds: dict[str, list[Built]], steps: int,
                 share: float) -> str:
    return (f"cached/plain={start_ratio(starts):.2f} capture_s={capture_cost(builds, 'freeze', steps):.2f} "
            f"stop_s={capture_cost(builds, 'stop', steps):.2f} "
            f"reboot_s={capture_cost(builds, 'reboot', steps):.2f} layer/written={share:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, repeat=3)
    parser.add_argument("--steps", type=int, default=3, help="the capture's chain of steps (default 3)")
    parser.add_argument("--written", default="256M", help="what the write-then-delete step writes "
                        "(default 256M)")
    parser.add_argument("--build", choices=WAYS, help="(internal) build the chain part one way")
    parser.add_argument("--config", type=Path, help="(internal) the project of --build")
    parser.add_argument("--nonce", default="", help="(internal) makes --build's steps new")
    options = parser.parse_args(argv)
    if options.build:
        return build_child(options.build, options.config, options.nonce)
    require(parser, "qemu-img", "qemu-system-x86_64", "ssh-keygen")
    written = parse_size(options.written)
    quiet = Quiet(patience=options.patience)
    starts: dict[str, list[float]] = {"plain": [], "cached": []}
    builds: dict[str, list[Built]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="kvmtasks-steps-") as work_name:
        work = Path(work_name)
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        image = build_guest_image(work / "g" / "tiny.img", key.with_suffix(".pub"), GUEST_CACHE,
                                  spare_kb=(written >> 10) + 32 * 1024).path
        config = project_config(work, image, key, options.steps, written)
        env = environment(KVMTASKS_CONFIG=str(config), HOME=str(work / "home"))
        try:
            measure(doit_argv("provision:plain", "provision:cached"), env=env, cwd=work).check()
            began = time.perf_counter()
            measure(doit_argv("provision:big"), env=env, cwd=work).check()
            big_s = time.perf_counter() - began
            layer_bytes = entry_of(work / "cache", "writedelete").stat().st_blocks * 512
            for round_number in range(options.repeat):
                run_starts(env, work, quiet, round_number, starts)
                run_ways(config, env, work, quiet, round_number, builds)
                print(f"  round {round_number + 1}/{options.repeat} done", file=sys.stderr)
        finally:
            for pid in qemu_pids_under(work):
                os.kill(pid, 9)
    text = report(options.steps, written, starts, builds, layer_bytes, big_s, quiet)
    write_section(options.output, "steps", text)
    print(text)
    print(summary_line(starts, builds, options.steps, layer_bytes / written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
