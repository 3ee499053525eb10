"""Benchmark the tiny guest's cold start to ssh by architecture and firmware, under TCG.

    python bench/arches.py [--repeat N]

Three guests, each the tiny busybox+dropbear guest of the tests: x86_64 through the BIOS
(kvmtasks.demo.guestimage, syslinux), x86_64 through UEFI (OVMF, systemd-boot on a GPT disk,
kvmtasks.demo.uefiguest) and aarch64 through UEFI (AAVMF, the same from Debian's arm64
packages, emulated). Each round starts every one of them (``bin/boot-ctl start``, which returns
once an ssh login works) in a fresh folder with a fresh copy of its image, in turns, in reverse
order every other round; every ratio is against x86_64 BIOS of the same run. ``status --json``
says which architecture, accelerator and firmware ran. Prints a table and a last line
``uefi/bios=... aarch64/bios=...``; writes the table into docs/benchmarks.md (or --output).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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
from boot import BOOT_TIMEOUT, killed_afterwards

from kvmtasks.demo.guestimage import build_guest_image
from kvmtasks.demo.uefiguest import build_uefi_guest_image

PART = "boot"
CACHE = REPO_ROOT / ".cache"


@dataclass(frozen=True)
class Kind:
    label: str
    image: Path
    options: str  # the config lines that choose architecture and firmware


@dataclass
class Ran:
    seconds: list[float]
    said: set[tuple[str, str, str]]  # (arch, accelerator, firmware) as status --json gave them


def images(work: Path, key: Path) -> list[Kind]:
    public = key.with_suffix(".pub")
    bios = build_guest_image(work / "bios.img", public, CACHE / "guest").path
    uefi = build_uefi_guest_image(work / "uefi.img", public, CACHE / "guest-uefi-amd64", arch="amd64").path
    arm = build_uefi_guest_image(work / "arm64.img", public, CACHE / "guest-arm64").path
    return [Kind("x86_64 BIOS", bios, ""), Kind("x86_64 UEFI", uefi, "firmware = uefi\n"),
            Kind("aarch64 UEFI", arm, "kvm_arch = aarch64\n")]


def cold_start(folder: Path, kind: Kind, key: Path, quiet: Quiet) -> tuple[float, tuple[str, str, str]]:
    """doit provision (not timed), `bin/boot-ctl start` (timed), status --json, stop."""
    folder.mkdir(parents=True)
    disk = folder / "guest.img"
    shutil.copyfile(kind.image, disk)
    config = folder / "boot.cfg"
    config.write_text(
        f"[buildout]\ndirectory = {folder}\n\n[{PART}]\nfile = {disk}\n"
        f"ssh_port = {free_port()}\nssh_key_path = {key}\n"
        f"kvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = {BOOT_TIMEOUT:g}\n"
        f"kvm_shutdown_timeout = 5\n{kind.options}"
    )
    env = environment(KVMTASKS_CONFIG=str(config), HOME=str(folder / "home"))
    measure(doit_argv(f"render:{PART}"), env=env, cwd=folder).check()
    ctl = str(folder / "bin" / f"{PART}-ctl")
    with killed_afterwards(folder):
        quiet.wait()
        started = measure([ctl, "start"], env=env, cwd=folder).check()
        status = json.loads(subprocess.run([ctl, "status", "--json"], env=env, cwd=folder,
                                           capture_output=True, text=True, check=True).stdout)
        measure([ctl, "stop"], env=env, cwd=folder).check()
    return started.seconds, (status["arch"], status["accelerator"], status["firmware"])


def report(kinds: list[Kind], ran: dict[str, Ran], quiet: Quiet, rounds: int, uptime: str) -> str:
    bios = median(ran[kinds[0].label].seconds)
    rows = []
    for kind in kinds:
        values = ran[kind.label].seconds
        (arch, accel, firmware), = ran[kind.label].said
        rows.append([kind.label, arch, accel, firmware, f"{kind.image.stat().st_size / MB:.0f} MB",
                     f"{median(values):.2f} s", ", ".join(f"{v:.2f}" for v in values),
                     f"{median(values) / bios:.2f}x"])
    return "\n".join([
        "## Cold start by architecture and firmware",
        "",
        f"`python bench/arches.py`: median of {rounds} rounds; in each, `bin/boot-ctl start` (until "
        "an ssh login works) of the tiny guest through each firmware, in turns (reverse order every "
        "other round), each in a fresh folder with a fresh copy of its image; every ratio is against "
        "x86_64 BIOS of the same run. Architecture, accelerator and firmware are what `boot-ctl "
        "status --json` said. " + quiet.note(),
        "",
        f"Load when the run ended: `{uptime}`.",
        "",
        "Guests: the tiny busybox+dropbear guest, 256 MB of memory, 1 CPU: x86_64 BIOS boots "
        "syslinux from a whole-disk FAT; x86_64 UEFI (OVMF) and aarch64 UEFI (AAVMF, emulated) boot "
        "systemd-boot from a GPT disk's EFI system partition.",
        "",
        *machine_lines(["qemu-system-x86_64", "--version"], ["qemu-system-aarch64", "--version"]),
        "",
        table(["guest", "arch", "accelerator", "firmware", "image", "median", "runs", "against x86_64 BIOS"],
              rows),
        "",
        "```",
        summary_line(kinds, ran),
        "```",
    ])


def summary_line(kinds: list[Kind], ran: dict[str, Ran]) -> str:
    bios = median(ran[kinds[0].label].seconds)
    return (f"bios_s={bios:.2f} uefi_s={median(ran[kinds[1].label].seconds):.2f} "
            f"aarch64_s={median(ran[kinds[2].label].seconds):.2f} "
            f"uefi/bios={median(ran[kinds[1].label].seconds) / bios:.2f} "
            f"aarch64/bios={median(ran[kinds[2].label].seconds) / bios:.2f}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the VMs are killed on the way out
    parser = bench_parser(__doc__)
    options = parser.parse_args(argv)
    require(parser, "qemu-system-x86_64", "qemu-system-aarch64", "qemu-img", "ssh", "ssh-keygen")
    quiet = Quiet(patience=options.patience)
    with tempfile.TemporaryDirectory(prefix="kvmtasks-arches-") as work_name:
        work = Path(work_name)
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        kinds = images(work, key)
        ran = {kind.label: Ran([], set()) for kind in kinds}
        for round_number in range(options.repeat):
            order = kinds if round_number % 2 == 0 else list(reversed(kinds))
            for index, kind in enumerate(order):
                folder = work / f"{round_number}-{index}"
                seconds, said = cold_start(folder, kind, key, quiet)
                ran[kind.label].seconds.append(seconds)
                ran[kind.label].said.add(said)
                shutil.rmtree(folder, ignore_errors=True)
                print(f"  round {round_number + 1}/{options.repeat}: {kind.label} {seconds:.2f} s",
                      file=sys.stderr)
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        text = report(kinds, ran, quiet, options.repeat, uptime)
    write_section(options.output, "arches", text)
    print(text)
    print(summary_line(kinds, ran))
    return 0


if __name__ == "__main__":
    sys.exit(main())
