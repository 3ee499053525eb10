"""Benchmark many parts on one image: `doit -n 4 provision` of four parts against one part alone.

    python bench/parts.py --size 1G

Serves the gzipped synthetic image of bench/provision.py (made once, kept in
.cache/bench) on 127.0.0.1, counting the bytes sent, and times, in fresh
folders (a fresh download cache each), alternating, repeated:

- one: ``doit provision:p0``, one part;
- four: ``doit -n 4 provision:p0 ... provision:p3``, four parts on the same URL.

Reports the bytes fetched against the file's size (the download cache should
fetch it once) and the wall time of four parts against one. The parts boot
overlays, so they share one decompressed image: the first part inflates it
while downloading, the others link it from the cache.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    MB,
    Measured,
    Quiet,
    Sent,
    doit_argv,
    environment,
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
from provision import Source, synthesize

PARTS = 4


@dataclass(frozen=True)
class Run:
    measured: Measured
    fetched: int


@dataclass
class Results:
    one: list[Run] = field(default_factory=list)
    four: list[Run] = field(default_factory=list)


def run_parts(folder: Path, url: str, source: Source, count: int, sent: Sent, quiet: Quiet) -> Run:
    """doit provision of count parts on url, in a fresh folder with its own download cache."""
    folder.mkdir(parents=True)
    config = folder / "bench.cfg"
    checksums = "".join(f"{name} = {value}\n" for name, value in source.digests.items())
    config.write_text(f"[buildout]\ndirectory = {folder}\n\n" + "".join(
        f"[p{i}]\nimage = {url}\ngzip = true\n{checksums}\n" for i in range(count)
    ))
    env = environment(KVMTASKS_CONFIG=str(config), HOME=str(folder / "home"))
    tasks = [f"provision:p{i}" for i in range(count)]
    argv = doit_argv("-n", str(count), *tasks) if count > 1 else doit_argv(*tasks)
    quiet.wait()
    before = sent.bytes
    measured = measure(argv, env=env, cwd=folder).check()
    for i in range(count):
        image = folder / "parts" / f"p{i}" / "image.raw"
        if image.stat().st_size != source.raw.stat().st_size:
            raise SystemExit(f"{' '.join(argv)} did not make {image}:\n{measured.output}")
    return Run(measured, sent.bytes - before)


def benchmark(source: Source, url: str, work: Path, repeat: int, sent: Sent, quiet: Quiet) -> Results:
    results = Results()
    kinds = ["one", "four"]
    for round_number in range(repeat):
        shift = round_number % len(kinds)  # take turns going first
        for kind in kinds[shift:] + kinds[:shift]:
            folder = work / f"{kind}-{round_number}"
            count = 1 if kind == "one" else PARTS
            getattr(results, kind).append(run_parts(folder, url, source, count, sent, quiet))
            shutil.rmtree(folder, ignore_errors=True)
            print(f"  round {round_number + 1}/{repeat}: {kind} done", file=sys.stderr)
    return results


def summary_line(results: Results, size: int) -> str:
    one = median([run.measured.seconds for run in results.one])
    four = median([run.measured.seconds for run in results.four])
    fetched = max(run.fetched for run in results.four) / size
    return f"fetched/size={fetched:.2f} four/one={four / one:.2f} one_s={one:.2f} four_s={four:.2f}"


def report(source: Source, results: Results, repeat: int, quiet: Quiet) -> str:
    size = source.packed.stat().st_size

    def seconds(runs: list[Run]) -> list[str]:
        values = [run.measured.seconds for run in runs]
        return [f"{median(values):.2f} s", ", ".join(f"{v:.2f}" for v in values)]

    def fetched(runs: list[Run]) -> list[str]:
        values = [run.fetched / size for run in runs]
        return [f"{max(values):.2f} x the file (highest)", ", ".join(f"{v:.2f}" for v in values)]

    rows = [
        ["one part: `doit provision:p0`", *seconds(results.one)],
        [f"{PARTS} parts: `doit -n {PARTS} provision:p0 ...`", *seconds(results.four)],
        ["one part: bytes fetched", *fetched(results.one)],
        [f"{PARTS} parts: bytes fetched", *fetched(results.four)],
        [f"{PARTS} parts: CPU time, user / system", "",
         ", ".join(f"{r.measured.user_s:.1f} / {r.measured.sys_s:.1f}" for r in results.four)],
    ]
    label = size_label(source.raw.stat().st_size)
    return "\n".join([
        f"## {PARTS} parts on one {label} image",
        "",
        f"`python bench/parts.py --size {label}`: median of {repeat} rounds, one part and "
        f"{PARTS} parts taking turns going first, every run in a fresh folder with a fresh "
        "download cache. " + quiet.note(),
        "",
        f"Image: bench/provision.py's {label} synthetic image, {size / MB:.0f} MB gzipped, served "
        "on 127.0.0.1 with sendfile; the server counts the body bytes it sent. Every part checks "
        "md5_download, md5_image and sha256_image; under their overlays the parts share one "
        "decompressed image through the download cache.",
        "",
        *machine_lines(),
        "",
        table(["measurement", "median", "runs"], rows),
        "",
        "```",
        summary_line(results, size),
        "```",
    ])


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on the way out
    parser = image_bench_parser(__doc__, "8M, 1G")
    options = parser.parse_args(argv)
    source = synthesize(parse_size(options.size), options.cache)
    quiet, sent = Quiet(patience=options.patience), Sent()
    with tempfile.TemporaryDirectory(prefix="kvmtasks-bench-", dir=options.workdir) as work, \
            serve_files({"/image.raw.gz": source.packed}, sent) as base:
        results = benchmark(source, f"{base}/image.raw.gz", Path(work), options.repeat, sent, quiet)
    text = report(source, results, options.repeat, quiet)
    write_section(options.output, f"parts {size_label(source.raw.stat().st_size)}", text)
    print(text)
    print(summary_line(results, source.packed.stat().st_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
