"""Benchmark provisioning a gzipped image over HTTP against the naive shell recipe.

    python bench/provision.py --size 1G

Makes a synthetic disk-like image (random, text and zero blocks), gzips it
(both cached in .cache/bench), serves the .gz on 127.0.0.1 and times, in fresh
folders, alternating, repeated:

- provision: ``doit provision:bench`` with md5_download, md5_image, sha256_image;
- naive: curl, md5sum of the .gz, gunzip, md5sum and sha256sum of the image;
- bound: ``sha256sum`` of the image alone;
- curl: ``curl`` alone, from the same server (the wire's speed);
- no-op: ``doit provision:bench`` again, nothing changed;
- touch: ``touch`` the image, then ``doit provision:bench`` again.

Each ``--variant SERVER,BLOCK[,PACE]`` (repeatable; default ``sendfile,64K``)
is one table: SERVER is ``sendfile`` (the kernel sends the file) or ``plain``
(Python sends it, as ``python -m http.server`` does), BLOCK the size of the
image's random, text and zero blocks, PACE a rate in MiB/s the plain server
keeps to (a link slower than the machine).

Each ``--case SIZE:SERVER,BLOCK[,PACE]`` (repeatable) is one table of that size
and variant; with cases, --size and --variant are not used. Each ``--rss SIZE``
(repeatable) provisions once at that size (plain server, 1M blocks) for its peak
RSS and the no-op run after it, without the other kinds. So one invocation runs
what the provisioning targets ask:

    python bench/provision.py --case 512M:plain,1M --case 1G:plain,1M \
        --case 512M:plain,1M,40 --case 512M:plain,1M,200 --rss 4G

Prints a table and a last line of ratios per table, and writes the tables
into docs/benchmarks.md (or --output).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    MB,
    Measured,
    OpenWatch,
    Quiet,
    doit_argv,
    environment,
    hash_speeds,
    image_bench_parser,
    machine_lines,
    measure,
    median,
    parse_size,
    serve_files,
    size_label,
    table,
    write_section,
)

PART = "bench"
BLOCK = 64 << 10  # the default layout's block; --variant picks others
# The share of blocks of each kind, roughly what a used root filesystem image holds.
MIX = {"random": 0.35, "text": 0.20, "zero": 0.45}
SEED = 5
GENERATOR = 2  # bump when _blocks changes, so that no image made the old way is reused
GZIP_LEVEL = 6  # gzip's default, what images are usually published with
WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "it", "this", "be", "are", "or", "an", "not", "kernel", "module", "systemd", "service",
    "package", "install", "config", "error", "warning", "debug", "info", "usr", "lib", "bin", "etc",
    "var", "log", "python", "share", "doc", "README", "LICENSE", "copyright", "version", "build",
    "libc6", "openssl", "0", "1", "2", "7", "10", "42", "255", "1024", "=", ":", "/", "-", "#",
    "{", "}", "(", ")", ";", ".", ",", " ", " ", " ", " ", " ", " ", " ", " ", "\n", "\n\t",
)
PROVISION_STEPS = ("download", "verify-download", "decompress", "verify-image", "render")


@dataclass(frozen=True)
class Variant:
    """How the image is laid out and served."""

    server: str = "sendfile"
    block: int = BLOCK
    pace_mib: float = 0.0  # MiB/s; 0: as fast as the server goes

    @classmethod
    def parse(cls, text: str) -> Variant:
        fields = text.split(",")
        if not 2 <= len(fields) <= 3 or fields[0] not in ("sendfile", "plain"):
            raise ValueError(f"not a variant: {text!r} (e.g. sendfile,64K or plain,1M,40)")
        pace = float(fields[2]) if len(fields) == 3 else 0.0
        if pace and fields[0] != "plain":
            raise ValueError(f"{text!r}: only the plain server can be paced")
        return cls(fields[0], parse_size(fields[1]), pace)

    @property
    def default(self) -> bool:
        return self == Variant()

    @property
    def name(self) -> str:
        """Its part of the section name and heading: empty for today's default."""
        if self.default:
            return ""
        pace = f", paced at {self.pace_mib:g} MiB/s" if self.pace_mib else ""
        return f"{self.server} server, {size_label(self.block)} blocks{pace}"

    def describe(self) -> str:
        server = ("with sendfile" if self.server == "sendfile"
                  else "by Python, 64 KiB reads and writes as `python -m http.server` does")
        pace = f", paced at {self.pace_mib:g} MiB/s" if self.pace_mib else ""
        return f"served on 127.0.0.1 {server}{pace}"


@dataclass(frozen=True)
class Case:
    """One table: an image size served one way."""

    size: int
    variant: Variant

    @classmethod
    def parse(cls, text: str) -> Case:
        size, _, variant = text.partition(":")
        if not variant:
            raise ValueError(f"not a case: {text!r} (e.g. 512M:plain,1M or 512M:plain,1M,40)")
        return cls(parse_size(size), Variant.parse(variant))


RSS_VARIANT = Variant("plain", 1 << 20)


@dataclass(frozen=True)
class Source:
    raw: Path
    packed: Path
    digests: dict[str, str]  # md5_download, md5_image, sha256_image


def _blocks(size: int, rng: random.Random, block: int) -> Iterator[bytes]:
    count = size // block
    kinds = [kind for kind, share in MIX.items() for _ in range(round(count * share))]
    kinds = (kinds + ["zero"] * count)[:count]
    rng.shuffle(kinds)
    text = "".join(rng.choices(WORDS, k=(4 * block) // 3)).encode()
    zero = bytes(block)
    for kind in kinds:
        if kind == "random":
            yield rng.randbytes(block)
        elif kind == "text":
            start = rng.randrange(len(text) - block)
            yield text[start:start + block]
        else:
            yield zero
    if size % block:
        yield rng.randbytes(size % block)


def synthesize(size: int, cache: Path, block: int = BLOCK) -> Source:
    """The image of that size and its .gz, made once and kept in cache."""
    layout = "" if block == BLOCK else f"-blocks{size_label(block)}"
    folder = cache / f"image-{size_label(size)}-seed{SEED}-v{GENERATOR}{layout}"
    raw, packed, record = folder / "image.raw", folder / "image.raw.gz", folder / "digests.json"
    if record.exists() and raw.exists() and packed.exists():
        return Source(raw, packed, json.loads(record.read_text()))
    print(f"making a {size_label(size)} image and its .gz (once; kept in {folder})", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(raw, "wb") as image, gzip.open(packed, "wb", compresslevel=GZIP_LEVEL) as compressed:
        for data in _blocks(size, random.Random(SEED), block):
            md5.update(data)
            sha256.update(data)
            image.write(data)
            compressed.write(data)
    download_md5 = hashlib.md5()
    with open(packed, "rb") as handle:
        while chunk := handle.read(1 << 20):
            download_md5.update(chunk)
    digests = {
        "md5_download": download_md5.hexdigest(),
        "md5_image": md5.hexdigest(),
        "sha256_image": sha256.hexdigest(),
    }
    record.write_text(json.dumps(digests))
    return Source(raw, packed, digests)


@dataclass(frozen=True)
class Rerun:
    """A doit run after provisioning: what it cost, what it ran, which image files it opened."""

    run: Measured
    steps: list[str]
    opened: set[str]

    @property
    def image_read(self) -> int:
        """Bytes of the image and download read: none when neither was opened, else at most rchar."""
        return self.run.rchar if self.opened else 0


@dataclass(frozen=True)
class ProvisionRuns:
    provision: Measured
    noop: Rerun
    touch: Rerun
    allocated: int  # bytes of disk the image takes


def _rerun(argv: list[str], env: dict[str, str], folder: Path, images: Path, quiet: Quiet) -> Rerun:
    stdout = folder / "doit.out"
    quiet.wait()
    with OpenWatch(images) as watch:
        run = measure(argv, env=env, cwd=folder, stdout=stdout).check()
        opened = watch.touched()
    # doit prints ".  STEP:PART" for each task it runs, "-- STEP:PART" for one up to date.
    ran = re.findall(r"^\.  (\S+):" + PART + "$", stdout.read_text(), re.MULTILINE)
    return Rerun(run, [step for step in ran if step in PROVISION_STEPS], opened)


def run_provision(folder: Path, url: str, source: Source, quiet: Quiet) -> ProvisionRuns:
    """doit provision in a fresh folder, then again with nothing changed, then after a touch."""
    folder.mkdir(parents=True)
    config = folder / "bench.cfg"
    checksums = "\n".join(f"{name} = {value}" for name, value in source.digests.items())
    config.write_text(
        f"[buildout]\ndirectory = {folder}\n\n[{PART}]\nimage = {url}\ngzip = true\n{checksums}\n"
        "kvm_accel = tcg\n"
    )
    env = environment(KVMTASKS_CONFIG=str(config), HOME=str(folder / "home"))
    argv = doit_argv(f"provision:{PART}")
    stdout = folder / "doit.out"
    quiet.wait()
    provision = measure(argv, env=env, cwd=folder, stdout=stdout).check()
    image = folder / "parts" / PART / "image.raw"
    if not image.is_file():
        raise SystemExit(f"doit provision did not make {image}:\n{stdout.read_text()}")
    noop = _rerun(argv, env, folder, image.parent, quiet)
    subprocess.run(["touch", str(image)], check=True)
    touch = _rerun(argv, env, folder, image.parent, quiet)
    return ProvisionRuns(provision, noop, touch, image.stat().st_blocks * 512)


@dataclass(frozen=True)
class Naive:
    seconds: float
    user_s: float
    sys_s: float


def run_naive(folder: Path, url: str, source: Source, quiet: Quiet) -> Naive:
    """What the original recipe did: download, md5 the .gz, gunzip, md5 and sha256 the image."""
    folder.mkdir(parents=True)
    packed, image = folder / "img.gz", folder / "img"
    quiet.wait()
    started = time.perf_counter()
    runs = [
        measure(["curl", "--fail", "--silent", "--show-error", "-o", str(packed), url]).check(),
        measure(["md5sum", str(packed)]).check(),
        measure(["gunzip", "-c", str(packed)], stdout=image).check(),
        measure(["md5sum", str(image)]).check(),
        measure(["sha256sum", str(image)]).check(),
    ]
    seconds = time.perf_counter() - started
    if image.stat().st_size != source.raw.stat().st_size:
        raise SystemExit("naive: gunzip made an image of the wrong size")
    return Naive(seconds, sum(run.user_s for run in runs), sum(run.sys_s for run in runs))


def run_curl(folder: Path, url: str, source: Source, quiet: Quiet) -> float:
    """curl alone, from the same server: how fast the bytes can arrive at all."""
    folder.mkdir(parents=True)
    packed = folder / "img.gz"
    quiet.wait()
    seconds = measure(["curl", "--fail", "--silent", "--show-error", "-o", str(packed), url]).check().seconds
    if packed.stat().st_size != source.packed.stat().st_size:
        raise SystemExit("curl: the download has the wrong size")
    return seconds


def run_bound(source: Source, quiet: Quiet) -> float:
    """sha256sum alone on the (cached) image: the least any verified provisioning must cost."""
    quiet.wait()
    return measure(["sha256sum", str(source.raw)]).check().seconds


@dataclass
class Results:
    provisions: list[ProvisionRuns] = field(default_factory=list)
    naives: list[Naive] = field(default_factory=list)
    bound: list[float] = field(default_factory=list)
    curl: list[float] = field(default_factory=list)

    @property
    def provision(self) -> list[float]:
        return [runs.provision.seconds for runs in self.provisions]

    @property
    def naive(self) -> list[float]:
        return [naive.seconds for naive in self.naives]

    def reruns(self, kind: str) -> list[Rerun]:
        return [getattr(runs, kind) for runs in self.provisions]

    @property
    def rss(self) -> list[int]:
        return [runs.provision.maxrss_kib * 1024 for runs in self.provisions]


def benchmark(source: Source, url: str, work: Path, repeat: int, quiet: Quiet) -> Results:
    results = Results()
    kinds = ["provision", "naive", "bound", "curl"]
    for round_number in range(repeat):
        # Rotate the order so that no kind always goes first, or always after the same one.
        shift = round_number % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            folder = work / f"{kind}-{round_number}"
            if kind == "provision":
                results.provisions.append(run_provision(folder, url, source, quiet))
            elif kind == "naive":
                results.naives.append(run_naive(folder, url, source, quiet))
            elif kind == "curl":
                results.curl.append(run_curl(folder, url, source, quiet))
            else:
                results.bound.append(run_bound(source, quiet))
            shutil.rmtree(folder, ignore_errors=True)
            print(f"  round {round_number + 1}/{repeat}: {kind} done", file=sys.stderr)
    return results


def summary_line(results: Results) -> str:
    provision = median(results.provision)
    noop, touch = results.reruns("noop"), results.reruns("touch")
    return (
        f"provision/naive={provision / median(results.naive):.2f} "
        f"provision/bound={provision / median(results.bound):.2f} "
        f"noop_s={median([rerun.run.seconds for rerun in noop]):.2f} "
        f"noop_read_mb={max(rerun.image_read for rerun in noop) / MB:.0f} "
        f"touch_s={median([rerun.run.seconds for rerun in touch]):.2f} "
        f"rss_mb={max(results.rss) / MB:.0f} "
        f"provision/curl={provision / median(results.curl):.2f}"
    )


def _row(what: str, values: list[float], unit: str, digits: int = 2, pick: str = "median") -> list[str]:
    chosen = median(values) if pick == "median" else max(values)
    return [what, f"{chosen:.{digits}f} {unit}", ", ".join(f"{value:.{digits}f}" for value in values)]


def _cpu_row(what: str, times: list[tuple[float, float]]) -> list[str]:
    user, system = median([t[0] for t in times]), median([t[1] for t in times])
    return [what, f"{user:.2f} / {system:.2f} s", ", ".join(f"{u:.2f} / {s:.2f}" for u, s in times)]


def _rerun_rows(kind: str, what: str, reruns: list[Rerun]) -> list[list[str]]:
    opened = sorted(set().union(*(rerun.opened for rerun in reruns))) or ["none"]
    steps = sorted({step for rerun in reruns for step in rerun.steps}) or ["none"]
    return [
        _row(f"{kind}: {what}", [rerun.run.seconds for rerun in reruns], "s"),
        _row(f"{kind}: MB the doit process read (rchar, all files)",
             [rerun.run.rchar / MB for rerun in reruns], "MB", 1),
        [f"{kind}: image files opened; steps run", f"{', '.join(opened)}; {', '.join(steps)}", ""],
    ]


def report(source: Source, variant: Variant, results: Results, repeat: int, quiet: Quiet) -> str:
    size, packed = source.raw.stat().st_size, source.packed.stat().st_size
    speeds = hash_speeds()
    rows = [
        _row("provision: `doit provision:bench`", results.provision, "s"),
        _row("naive: curl; md5sum .gz; gunzip; md5sum; sha256sum", results.naive, "s"),
        _row("bound: `sha256sum` of the image", results.bound, "s"),
        _row("curl: `curl -o` of the .gz alone, same server", results.curl, "s"),
        _cpu_row("provision: CPU time, user / system",
                 [(runs.provision.user_s, runs.provision.sys_s) for runs in results.provisions]),
        _cpu_row("naive: CPU time, user / system", [(naive.user_s, naive.sys_s) for naive in results.naives]),
        *_rerun_rows("no-op", "`doit provision:bench` again", results.reruns("noop")),
        *_rerun_rows("touch", "`touch` the image, `doit provision:bench`", results.reruns("touch")),
        _row("provision: peak RSS (highest)", [value / MB for value in results.rss], "MB", 0, "max"),
        _row("provision: disk the image takes (sparse; highest)",
             [runs.allocated / MB for runs in results.provisions], "MB", 0, "max"),
    ]
    label = size_label(size)
    mix = ", ".join(f"{share:.0%} {kind}" for kind, share in MIX.items())
    heading = f"## Provisioning a {label} image" + (f" ({variant.name})" if variant.name else "")
    command = f"--size {label}" + ("" if variant.default else f" --variant {_variant_argument(variant)}")
    return "\n".join([
        heading,
        "",
        f"`python bench/provision.py {command}`: median of {repeat} rounds; the four kinds "
        "take turns going first, every run in a fresh folder, page cache warm, `sync` before each "
        "run. " + quiet.note(),
        "",
        f"Image: {size / MB:.0f} MB raw ({mix}, in blocks of {size_label(variant.block)}iB), "
        f"{packed / MB:.0f} MB gzipped (level {GZIP_LEVEL}), {variant.describe()}. The part checks "
        "md5_download, md5_image and sha256_image.",
        "",
        *machine_lines(),
        "",
        table(["measurement", "median", "runs"], rows),
        "",
        f"For scale: `sha256sum` (the bound) hashed {size / MB / median(results.bound):.0f} MB/s; "
        f"Python's hashlib does sha256 at {speeds['sha256']:.0f} MB/s and md5 at {speeds['md5']:.0f} "
        "MB/s on one core. md5 is the slowest of the work kvmtasks does, and it cannot be split: "
        "the download's md5 and the image's md5 are the floor of the two steps.",
        "",
        "What is measured: wall time of each process from start to exit; peak RSS is the "
        "`ru_maxrss` that `wait4` returns for the doit process; rchar is from `/proc/PID/io` of "
        "the doit process, read after it exited and before it was reaped: every byte it read "
        "through read()-like calls, page-cache hits included, mostly Python's own modules. "
        "Image files opened are those in the image's folder that inotify saw opened or read "
        "during the run: none means not one byte of the image or the download was read, and "
        "`noop_read_mb` below counts the no-op run's rchar only if one was.",
        "",
        "```",
        summary_line(results),
        "```",
    ])


def _variant_argument(variant: Variant) -> str:
    pace = f",{variant.pace_mib:g}" if variant.pace_mib else ""
    return f"{variant.server},{size_label(variant.block)}{pace}"


def run_variant(variant: Variant, size: int, options: argparse.Namespace, quiet: Quiet) -> str:
    """One variant's rounds; returns its summary line, its table written into the report file."""
    source = synthesize(size, options.cache, variant.block)
    with tempfile.TemporaryDirectory(prefix="kvmtasks-bench-", dir=options.workdir) as work, \
            serve_files({"/image.raw.gz": source.packed}, plain=variant.server == "plain",
                        pace=variant.pace_mib * (1 << 20)) as base:
        results = benchmark(source, f"{base}/image.raw.gz", Path(work), options.repeat, quiet)
    text = report(source, variant, results, options.repeat, quiet)
    section = f"provision {size_label(size)}" + (f" {variant.name}" if variant.name else "")
    write_section(options.output, section, text)
    print(text)
    return summary_line(results)


def run_rss(size: int, options: argparse.Namespace, quiet: Quiet) -> str:
    """Provisioning alone at size (and the no-op run after it): its peak RSS, without the
    other kinds; returns its summary line, its table written into the report file."""
    source = synthesize(size, options.cache, RSS_VARIANT.block)
    runs: list[ProvisionRuns] = []
    with tempfile.TemporaryDirectory(prefix="kvmtasks-bench-", dir=options.workdir) as work, \
            serve_files({"/image.raw.gz": source.packed}, plain=True) as base:
        for round_number in range(options.rss_repeat):
            folder = Path(work) / f"rss-{round_number}"
            runs.append(run_provision(folder, f"{base}/image.raw.gz", source, quiet))
            shutil.rmtree(folder, ignore_errors=True)
            print(f"  rss {size_label(size)}: run {round_number + 1}/{options.rss_repeat} done",
                  file=sys.stderr)
    label = size_label(size)
    rss = [run.provision.maxrss_kib * 1024 / MB for run in runs]
    noop = [run.noop for run in runs]
    rows = [
        _row("provision: `doit provision:bench`", [run.provision.seconds for run in runs], "s"),
        _cpu_row("provision: CPU time, user / system",
                 [(run.provision.user_s, run.provision.sys_s) for run in runs]),
        _row("provision: peak RSS (highest)", rss, "MB", 0, "max"),
        *_rerun_rows("no-op", "`doit provision:bench` again", noop),
    ]
    summary = (f"rss_mb={max(rss):.0f} provision_s={median([run.provision.seconds for run in runs]):.2f} "
               f"noop_s={median([rerun.run.seconds for rerun in noop]):.2f} "
               f"noop_read_mb={max(rerun.image_read for rerun in noop) / MB:.0f}")
    text = "\n".join([
        f"## Peak RSS provisioning a {label} image",
        "",
        f"`python bench/provision.py --rss {label}`: `doit provision:bench` alone, "
        f"{options.rss_repeat} run(s), then the no-op run after each. " + quiet.note(),
        "",
        f"Image: {source.raw.stat().st_size / MB:.0f} MB raw, {source.packed.stat().st_size / MB:.0f} MB "
        f"gzipped, {RSS_VARIANT.describe()}. Peak RSS is the `ru_maxrss` that `wait4` returns for "
        "the doit process.",
        "",
        *machine_lines(),
        "",
        table(["measurement", "median", "runs"], rows),
        "",
        "```",
        summary,
        "```",
    ])
    write_section(options.output, f"provision {label} peak RSS", text)
    print(text)
    return summary


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on the way out
    parser = image_bench_parser(__doc__, "8M, 1G, 4G")
    parser.add_argument("--variant", type=Variant.parse, action="append", default=None,
                        help="SERVER,BLOCK[,PACE]: sendfile or plain server, the image's block size, "
                             "a pace in MiB/s (plain only); repeatable (default sendfile,64K)")
    parser.add_argument("--case", type=Case.parse, action="append", default=None,
                        help="SIZE:SERVER,BLOCK[,PACE]: one table of that size and variant; repeatable; "
                             "replaces --size and --variant")
    parser.add_argument("--rss", type=parse_size, action="append", default=[],
                        help="SIZE: provisioning alone at that size, for its peak RSS; repeatable")
    parser.add_argument("--rss-repeat", type=int, default=1,
                        help="runs of each --rss size (default 1)")
    options = parser.parse_args(argv)
    for program in ("curl", "md5sum", "gunzip", "sha256sum", "touch"):
        if shutil.which(program) is None:
            parser.error(f"{program} not found")
    quiet = Quiet(patience=options.patience)
    # --rss alone runs only the RSS check.
    only_rss = options.rss and options.case is None and options.variant is None
    cases = options.case or ([] if only_rss else [Case(parse_size(options.size), variant)
                                                  for variant in options.variant or [Variant()]])
    summaries = [run_variant(case.variant, case.size, options, quiet) for case in cases]
    summaries += [run_rss(size, options, quiet) for size in options.rss]
    print("\n".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
