"""Benchmark `reset`: a clean disk again, whatever the image's size and the guest's writes.

    python bench/overlay.py

Makes a sparse raw image (--size, default 20G) as a part's `file` with
`overlay = true`, provisions it, then, repeatedly: writes --written (default
256M) into the overlay with qemu-io (what a guest's writes leave there, not
timed) and times `bin/PART-ctl reset` and `doit reset:PART`. Target: a reset
well under a second (at most 1 s), whatever the sizes. Prints a table and a
last line ``reset_s=...``; writes the table into docs/benchmarks.md (or
--output).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import (
    Quiet,
    bench_parser,
    doit_argv,
    environment,
    machine_lines,
    measure,
    median,
    parse_size,
    require,
    size_label,
    table,
    write_section,
)

PART = "clean"
TARGET_S = 1.0


def make_project(folder: Path, size: int) -> Path:
    image = folder / "base.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
    config = folder / "overlay.cfg"
    config.write_text(f"[buildout]\ndirectory = {folder}\n\n[{PART}]\nfile = {image}\noverlay = true\n")
    return config


def write_into(overlay: Path, written: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {written}", str(overlay)],
                   check=True, capture_output=True)


def report(size: int, written: int, ctl: list[float], doit: list[float], quiet: Quiet) -> str:
    def runs(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    rows = [
        [f"`bin/{PART}-ctl reset`", f"{median(ctl):.2f} s", runs(ctl)],
        [f"`doit reset:{PART}` (with doit's own start-up)", f"{median(doit):.2f} s", runs(doit)],
    ]
    return "\n".join([
        "## Resetting a disk",
        "",
        f"`python bench/overlay.py`: median of {len(ctl)} rounds. A {size_label(size)} sparse raw "
        f"image under an overlay; before each reset, {size_label(written)} written into the overlay "
        f"(qemu-io, not timed). Target: at most {TARGET_S:g} s. " + quiet.note(),
        "",
        *machine_lines(["qemu-img", "--version"]),
        "",
        table(["measurement", "median", "runs"], rows),
        "",
        "```",
        summary_line(ctl, doit),
        "```",
    ])


def summary_line(ctl: list[float], doit: list[float]) -> str:
    verdict = "ok" if median(ctl) <= TARGET_S else "over"
    return f"reset_s={median(ctl):.2f} doit_reset_s={median(doit):.2f} target={verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, repeat=5)
    parser.add_argument("--size", default="20G", help="virtual size of the image (default 20G)")
    parser.add_argument("--written", default="256M", help="written into the overlay before each reset")
    options = parser.parse_args(argv)
    require(parser, "qemu-img", "qemu-io")
    size, written = parse_size(options.size), parse_size(options.written)
    quiet = Quiet(patience=options.patience)
    ctl: list[float] = []
    doit: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kvmtasks-overlay-") as work_name:
        work = Path(work_name)
        config = make_project(work, size)
        env = environment(KVMTASKS_CONFIG=str(config), HOME=str(work / "home"))
        measure(doit_argv(f"provision:{PART}"), env=env, cwd=work).check()
        overlay = work / "parts" / PART / f"{PART}.overlay.qcow2"
        script = str(work / "bin" / f"{PART}-ctl")
        for round_number in range(options.repeat):
            write_into(overlay, written)
            quiet.wait()
            ctl.append(measure([script, "reset"], env=env, cwd=work).check().seconds)
            write_into(overlay, written)
            quiet.wait()
            doit.append(measure(doit_argv(f"reset:{PART}"), env=env, cwd=work).check().seconds)
            print(f"  round {round_number + 1}/{options.repeat} done", file=sys.stderr)
    text = report(size, written, ctl, doit, quiet)
    write_section(options.output, "overlay", text)
    print(text)
    print(summary_line(ctl, doit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
