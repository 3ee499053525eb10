"""Benchmark reading through a chain of layers: a file written in the bottom layer, read in the guest.

    python bench/layers.py

Makes a FAT data disk (--disk, default 96M) and a chain of 16 qcow2 layers over it, as
setup steps leave them (4 KiB clusters, as the builder makes them): the bottom layer writes a
file of --file-size (default 48M), each layer above writes a small file of its own (so each
holds the file system's tables again).
One boot of the tiny guest (TCG) sees five disks, each a part's overlay over the chain cut
at 1, 4, 8 and 16 layers, and over the 16 flattened as kvmtasks flattens a chain deeper than
flatten.FLATTEN_PAST (layers/flatten.py). Each round, through each disk in turn (the order
turns every round): the guest drops its page cache and reads the big file, then the bottom
layer's many small files, each timed by the guest kernel's clock; and `qemu-img bench` reads
the overlay on the host in 4 KiB requests (the chain's own cost, which TCG hides). The baseline
is the chain of 1 in the same run. Prints a table and a last line ``depth4/1=... flat16/1=...
cost16=... host16/1=...``; writes the table into docs/benchmarks.md (or --output).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
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
from kvmtasks.engines.qemu.argv import LAYER_CLUSTER
from kvmtasks.layers.flatten import FLATTEN_PAST, flatten_onto

sys.path.insert(0, str(REPO_ROOT))  # the test suite's helpers, shared rather than copied
from tests.vmfixtures import qemu_pids_under

PART = "layers"
GUEST_CACHE = REPO_ROOT / ".cache" / "guest"
DEPTHS = (1, 4, 8, 16)
FLAT = "16 flattened"
# The disks the guest reads through, by the label of their row.
COLUMNS = (*(str(depth) for depth in DEPTHS), FLAT)
# Over this, depth costs enough to say so (the threshold for flattening past a depth).
NOTABLE = 1.10
SMALL_FILE = 64 << 10
# The second workload: many small files of the bottom layer, read one after the other (lookups
# all over the disk, as a program's start reads its libraries and modules).
MANY_FILES, MANY_SIZE = 1000, 4 << 10
WORKLOADS = {
    "file": "dd if=/d{disk}/file1 of=/dev/null bs=1M 2>/dev/null",
    "small files": "cat /d{disk}/many/* > /dev/null",
}
# The third: the chain's own cost per request, without the guest (whose TCG-emulated I/O hides
# it; under KVM a request costs tens of microseconds): `qemu-img bench` reading the overlay in
# 4 KiB requests, one at a time, from its start (wrapping round at its end).
HOST = "4 KiB reads on the host"
HOST_REQUESTS = 50_000
_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")
# The guest's busybox has no sub-second clock of its own (no date +%N); the kernel's is here.
NOW = "sed -n 's/^now at \\([0-9]*\\) nsecs$/\\1/p' /proc/timer_list"
_ELAPSED = re.compile(r"^elapsed_ns=(\d+)$", re.MULTILINE)


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def keep_only_changes(layer: Path, changed: Path, parent: Path, parent_format: str) -> None:
    """layer: a qcow2 over parent (a relative backing file) holding only the clusters in which
    the raw file changed differs from parent, as a step's layer holds only what the step wrote,
    in the builder's cluster size. Made empty over changed, then rebased onto parent: qemu-img
    copies in what differs."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={LAYER_CLUSTER}", "-b",
         str(changed.absolute()), "-F", "raw", str(layer)])
    run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", os.path.relpath(parent, layer.parent), "-F",
         parent_format, str(layer)])


def make_chain(work: Path, disk_size: int, file_size: int, depth: int) -> list[Path]:
    """A raw FAT disk and `depth` layers over it (relative backing files, as the cache's);
    the layers, bottom first."""
    base = work / "base.raw"
    run(["mkfs.fat", "-C", "-n", "DATA", str(base), str(disk_size >> 10)])
    flat = work / "flat.raw"
    shutil.copyfile(base, flat)
    layers: list[Path] = []
    parent, parent_format = base, "raw"
    for number in range(1, depth + 1):
        payload = work / f"file{number}"
        with open(payload, "wb") as handle:
            handle.write(os.urandom(file_size if number == 1 else SMALL_FILE))
        run(["mcopy", "-i", str(flat), str(payload), f"::file{number}"])
        payload.unlink()
        if number == 1:
            many = work / "many"
            many.mkdir()
            for index in range(MANY_FILES):
                (many / f"f{index:04d}").write_bytes(os.urandom(MANY_SIZE))
            run(["mcopy", "-s", "-i", str(flat), str(many), "::many"])
            shutil.rmtree(many)
        folder = work / f"layer{number:02d}"
        folder.mkdir()
        layer = folder / "layer.qcow2"
        keep_only_changes(layer, flat, parent, parent_format)
        layer.chmod(0o444)
        layers.append(layer)
        parent, parent_format = layer, "qcow2"
    flat.unlink()
    return layers


def make_project(work: Path, image: Path, key: Path, overlays: list[Path]) -> Path:
    """A part booting a copy of the tiny guest, with one extra virtio disk per overlay."""
    disk = work / "guest.img"
    shutil.copyfile(image, disk)
    extra = "".join(f"    -drive\n    file={overlay},format=qcow2,if=virtio\n" for overlay in overlays)
    config = work / "layers.cfg"
    config.write_text(
        f"[buildout]\ndirectory = {work}\n\n[{PART}]\nfile = {disk}\nssh_port = {free_port()}\n"
        f"ssh_key_path = {key}\nkvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 300\n"
        f"kvm_shutdown_timeout = 5\nkvm_extra_args =\n{extra}"
    )
    return config


def in_guest(runscript: str, env: dict[str, str], command: str) -> str:
    done = subprocess.run([runscript, command], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"in the guest, {command!r} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout + done.stderr


def read_seconds(runscript: str, env: dict[str, str], disk: int, workload: str) -> float:
    """Drop the guest's page cache, then run the workload's reads through disk `disk`, timed in
    the guest."""
    reads = WORKLOADS[workload].format(disk=disk)
    said = in_guest(runscript, env, f"sync; echo 3 > /proc/sys/vm/drop_caches; a=$({NOW}); "
                                    f"{reads}; b=$({NOW}); echo elapsed_ns=$((b - a))")
    match = _ELAPSED.search(said)
    if match is None:
        raise SystemExit(f"no time from the guest: {said.strip()}")
    return int(match.group(1)) / 1e9


Times = dict[str, dict[str, list[float]]]  # workload -> row label -> seconds, a round each


def cost(runs: dict[str, list[float]], label: str) -> float:
    """Against 1 layer: by the median or by the best run, whichever is lower (on a loaded
    machine the median carries the load; the best run is the closest to the cost)."""
    return min(median(runs[label]) / median(runs["1"]), min(runs[label]) / min(runs["1"]))


def host_seconds(overlay: Path) -> float:
    done = subprocess.run(["qemu-img", "bench", "-U", "-f", "qcow2", "-c", str(HOST_REQUESTS), "-s", "4k",
                           "-d", "1", str(overlay)], capture_output=True, text=True, check=True)
    match = _COMPLETED.search(done.stdout)
    if match is None:
        raise SystemExit(f"no time from qemu-img bench: {done.stdout.strip()}")
    return float(match.group(1))


def report(file_size: int, times: Times, sizes: dict[str, int], quiet: Quiet) -> str:
    rows = [[label, *(cell for runs in times.values() for cell in (
                 f"{median(runs[label]):.3f} s", f"{median(runs[label]) / median(runs['1']):.2f}x",
                 f"{min(runs[label]) / min(runs['1']):.2f}x")),
             f"{sizes[label] / (1 << 20):.1f} MiB"]
            for label in COLUMNS]
    worst = max(cost(runs, str(depth)) for runs in times.values() for depth in DEPTHS)
    verdict = (f"Depth costs more than {NOTABLE - 1:.0%} ({worst:.2f}x at its worst, by the median and by "
               "the best run alike)." if worst > NOTABLE else
               f"Depth costs at most {max(worst - 1, 0):.0%} here (by the median or by the best run, "
               f"whichever is lower), within {NOTABLE - 1:.0%}.")
    verdict += (f" kvmtasks flattens a chain deeper than {FLATTEN_PAST} layers for a part's overlay: "
                "16 layers flattened read at " + ", ".join(
                    f"{cost(runs, FLAT):.2f}x ({workload})" for workload, runs in times.items()) + ".")
    return "\n".join([
        "## Reading through a chain of layers",
        "",
        f"`python bench/layers.py`: median of {len(times['file']['1'])} rounds, in one boot of the tiny "
        f"guest (TCG). Layers of {LAYER_CLUSTER >> 10} KiB clusters, as the builder makes them. A "
        f"{size_label(file_size)} file and {MANY_FILES} files of {MANY_SIZE >> 10} KiB written in "
        "the bottom layer, each layer above writing a small file of its own; read in the guest "
        "(the big file by `dd bs=1M`, the small ones by one `cat`; timed by the guest kernel's "
        "clock) after dropping the guest's page cache, through a part's overlay over the chain "
        "cut at each depth, and over the 16 flattened (the host's page cache holds the layers: "
        f"this is the chain's lookups, not the disk); and on the host, {HOST_REQUESTS} reads of "
        "4 KiB, one at a time, through each overlay by `qemu-img bench` (the chain's cost per "
        "request, which the guest's emulated I/O under TCG hides). Baseline: 1 layer, in the same "
        "boot. " + verdict + " " + load_note() + " " + quiet.note(),
        "",
        *machine_lines(["qemu-img", "--version"]),
        "",
        table(["layers", *(column for workload in times for column in (
                   f"{workload}: median", "against 1 layer", "best against 1 layer")), "layers' bytes"],
              rows),
        "",
        "```",
        summary_line(times),
        "```",
    ])


def summary_line(times: Times) -> str:
    """The big file's ratios by the median, the worst cost (lower of median and best) at 16
    layers and flattened over every workload, and the host's ratios by the median."""
    runs, host = times["file"], times[HOST]
    base = median(runs["1"])
    ratios = " ".join(f"depth{depth}/1={median(runs[str(depth)]) / base:.2f}" for depth in DEPTHS[1:])
    worst16 = max(cost(each, "16") for each in times.values())
    worst_flat = max(cost(each, FLAT) for each in times.values())
    return (f"{ratios} flat16/1={median(runs[FLAT]) / base:.2f} cost16={worst16:.2f} "
            f"costflat16={worst_flat:.2f} host16/1={median(host['16']) / median(host['1']):.2f} "
            f"hostflat16/1={median(host[FLAT]) / median(host['1']):.2f} depth1_s={base:.3f}")


def flattened(work: Path, top: Path) -> Path:
    """The chain under top flattened over the raw base, as layers/flatten.py makes a flat entry."""
    target = work / "flat16" / "layer.qcow2"
    target.parent.mkdir()
    flatten_onto(top, "../base.raw", "raw", target)
    target.chmod(0o444)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, repeat=5)
    parser.add_argument("--disk", default="96M", help="the data disk's size (default 96M)")
    parser.add_argument("--file-size", default="48M",
                        help="the file written in the bottom layer (default 48M)")
    options = parser.parse_args(argv)
    require(parser, "qemu-img", "qemu-system-x86_64", "mkfs.fat", "mcopy", "ssh-keygen")
    disk_size, file_size = parse_size(options.disk), parse_size(options.file_size)
    quiet = Quiet(patience=options.patience)
    times: Times = {workload: {label: [] for label in COLUMNS} for workload in [*WORKLOADS, HOST]}
    with tempfile.TemporaryDirectory(prefix="kvmtasks-layers-") as work_name:
        work = Path(work_name)
        key = work / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        image = build_guest_image(work / "tiny.img", key.with_suffix(".pub"), GUEST_CACHE).path
        layers = make_chain(work, disk_size, file_size, max(DEPTHS))
        flat = flattened(work, layers[-1])
        tops = [*(layers[depth - 1] for depth in DEPTHS), flat]
        sizes = {str(depth): sum(layer.stat().st_size for layer in layers[:depth]) for depth in DEPTHS}
        sizes[FLAT] = flat.stat().st_size
        overlays = []
        for label, top in zip(COLUMNS, tops, strict=True):
            overlay = work / f"over{label.replace(' ', '-')}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2", str(overlay)])
            overlays.append(overlay)
        config = make_project(work, image, key, overlays)
        env = environment(KVMTASKS_CONFIG=str(config), HOME=str(work / "home"))
        ctl, runscript = str(work / "bin" / f"{PART}-ctl"), str(work / "bin" / f"{PART}-runscript")
        try:
            measure(doit_argv(f"provision:{PART}"), env=env, cwd=work).check()
            measure([ctl, "start"], env=env, cwd=work).check()
            # virtio disks in argv order: vda boots, vdb... are the overlays, one per depth.
            mounts = "; ".join(f"mkdir -p /d{number} && mount -t vfat -o ro /dev/vd{chr(ord('b') + number)} "
                               f"/d{number}" for number in range(len(COLUMNS)))
            in_guest(runscript, env, mounts)
            for round_number in range(options.repeat):
                turn = round_number % len(COLUMNS)
                quiet.wait()
                for index in [*range(turn, len(COLUMNS)), *range(turn)]:
                    for workload, runs in times.items():
                        runs[COLUMNS[index]].append(
                            host_seconds(overlays[index]) if workload == HOST else
                            read_seconds(runscript, env, index, workload))
                print(f"  round {round_number + 1}/{options.repeat} done", file=sys.stderr)
            measure([ctl, "stop"], env=env, cwd=work)
        finally:
            for pid in qemu_pids_under(work):
                os.kill(pid, 9)
    text = report(file_size, times, sizes, quiet)
    write_section(options.output, "layers", text)
    print(text)
    print(summary_line(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
