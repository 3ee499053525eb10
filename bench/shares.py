"""Benchmark shares: a tree and a large file read in the guest over 9p, virtiofs and its own copy.

    python bench/shares.py

Boots the tiny guest (built with rsync and the 9p and virtio-fs modules) once, with one host
folder shared three ways: ``9p`` (live, mapped-xattr), ``virtiofs`` (live, virtiofsd with
cache=auto) and ``rsync`` (copied into the guest at start: its root file system, which is
the initramfs in RAM for this guest). In it: a tree of --files small files (1 KiB each, in
folders of 100) and a --big file. In the guest, each round, with the guest's page cache
dropped before each read:

- tree: ``find TREE -type f | xargs cat > /dev/null`` (a walk, then every file read);
- big: ``cat BIG > /dev/null``;
- sync: one file of the tree changed on the host, then ``PART-sync`` (rsync over the VM's
  ssh master; target 1 s or less).

Times are taken on the host around ``PART-runscript`` (its own cost, a ``true`` over the
master, is measured too and shown). Guests run under TCG. Prints a table and a last line
``tree_9p_s=...``; writes the table into docs/benchmarks.md (or --output).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from contextlib import suppress
from pathlib import Path

from benchlib import (
    REPO_ROOT,
    Quiet,
    bench_parser,
    doit_argv,
    environment,
    free_port,
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

sys.path.insert(0, str(REPO_ROOT))
from tests.vmfixtures import qemu_pids_under

PART = "shares"
GUEST_CACHE = REPO_ROOT / ".cache" / "guest"
BOOT_TIMEOUT = 600.0
SYNC_TARGET = 1.0
WAYS = {"9p": "/srv/9p", "virtiofs": "/srv/vfs", "own copy (rsync)": "/srv/copy"}
DROP_CACHES = "sync; echo 3 > /proc/sys/vm/drop_caches"


def make_tree(data: Path, files: int, big: int) -> None:
    tree = data / "tree"
    for index in range(files):
        folder = tree / f"d{index // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:05d}.txt").write_bytes(os.urandom(512).hex().encode())
    with open(data / "big.bin", "wb") as out:
        block = os.urandom(1 << 20)
        for _ in range(big >> 20):
            out.write(block)
        out.write(block[: big % (1 << 20)])


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--files", type=int, default=5000, help="files in the tree (default 5000)")
    parser.add_argument("--big", default="256M", help="size of the large file (default 256M)")
    parser.add_argument("--memory", default="1G", help="guest memory: it holds the copy (default 1G)")
    args = parser.parse_args()
    require(parser, "qemu-system-x86_64", "ssh", "rsync", "/usr/lib/qemu/virtiofsd")
    if os.geteuid() != 0:
        parser.error("virtiofsd of QEMU 7.2 needs root (its namespace sandbox)")
    big = parse_size(args.big)
    quiet = Quiet(patience=args.patience)
    with tempfile.TemporaryDirectory(prefix="kvmtasks-bench-shares-") as tmp_name:
        folder = Path(tmp_name)
        key = folder / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        image = build_guest_image(folder / "guest.img", key.with_suffix(".pub"), GUEST_CACHE,
                                  with_rsync=True, with_shares=True).path
        data = folder / "data"
        make_tree(data, args.files, big)
        config = folder / "shares.cfg"
        config.write_text(
            f"[buildout]\ndirectory = {folder}\n\n[{PART}]\nimage = {image.as_uri()}\n"
            f"ssh_port = {free_port()}\nssh_key_path = {key}\nkvm_memory = {args.memory}\n"
            f"kvm_accel = tcg\nkvm_boot_timeout = {BOOT_TIMEOUT:g}\nkvm_shutdown_timeout = 5\n"
            f"share =\n  data /srv/9p 9p\n  data /srv/vfs virtiofs\n  data /srv/copy rsync\n")
        env = environment(KVMTASKS_CONFIG=str(config), HOME=str(folder / "home"))
        bin_dir = folder / "bin"
        try:
            measure(doit_argv(f"provision:{PART}"), env=env, cwd=folder).check()
            quiet.wait()
            start = measure([str(bin_dir / f"{PART}-ctl"), "start"], env=env, cwd=folder).check().seconds
            rows, results = run_rounds(bin_dir, env, folder, quiet, args.repeat, data)
        finally:
            subprocess.run([str(bin_dir / f"{PART}-ctl"), "stop"], env=env, cwd=folder,
                           capture_output=True, check=False)
            for pid in qemu_pids_under(folder):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows.insert(0, ["start: boot, mounts and the first rsync copy of the folder", f"{start:.2f} s", ""])
    summary = " ".join(f"{key}={value:.2f}" for key, value in results.items())
    body = "\n".join([
        f"## Shares: a {args.files}-file tree and a {size_label(big)} file in the guest",
        "",
        f"`python bench/shares.py`: median of {args.repeat} round(s), one boot. The tiny guest "
        f"({args.memory} of memory, 1 CPU, TCG) with one host folder shared three ways: 9p "
        "(mapped-xattr, msize 512000), virtiofs (virtiofsd, cache=auto) and a copy by rsync "
        "(into its root file system, the initramfs in RAM). The guest's page cache is dropped "
        "before each read. Times are taken on the host around `PART-runscript`; a `true` "
        f"through it is shown for its own cost. {quiet.note()} Load average when it ended: "
        f"{load}.",
        "",
        *machine_lines(["qemu-system-x86_64", "--version"], ["rsync", "--version"]),
        "",
        table(["measurement", "median", "runs"], rows),
        "",
        f"`PART-sync` after one file of {args.files} changed: {results['sync_s']:.2f} s "
        f"(target: {SYNC_TARGET:g} s or less). virtiofs walks and reads the tree "
        f"{results['tree_9p_s'] / results['tree_virtiofs_s']:.1f}x as fast as 9p; the guest's own "
        f"copy {results['tree_9p_s'] / results['tree_copy_s']:.0f}x. `share`'s `auto` stays 9p all "
        "the same: virtiofs (QEMU 7.2) needs root on the host, cannot export read-only, and its "
        "device cannot be saved, so a VM with it cannot be suspended or snapshotted; name "
        "`virtiofs` for a large tree where none of that matters, or `rsync` for a build.",
        "",
        f"```\n{summary}\n```",
    ])
    write_section(args.output, "shares", body)
    print(body)
    print(summary)
    return 0


def run_rounds(bin_dir: Path, env: dict[str, str], folder: Path, quiet: Quiet, repeat: int,
               data: Path) -> tuple[list[list[str]], dict[str, float]]:
    runscript = str(bin_dir / f"{PART}-runscript")
    sync = str(bin_dir / f"{PART}-sync")

    def in_guest(shell: str) -> float:
        measure([runscript, DROP_CACHES], env=env, cwd=folder).check()
        return measure([runscript, shell], env=env, cwd=folder).check().seconds

    times: dict[str, list[float]] = {}
    changed = next((data / "tree").rglob("*.txt"))
    for round_index in range(repeat):
        quiet.wait()
        times.setdefault("true", []).append(measure([runscript, "true"], env=env, cwd=folder).check().seconds)
        for way, mount in WAYS.items():
            tree = f"find {mount}/tree -type f | xargs cat > /dev/null"
            times.setdefault(f"tree {way}", []).append(in_guest(tree))
            times.setdefault(f"big {way}", []).append(in_guest(f"cat {mount}/big.bin > /dev/null"))
        changed.write_text(f"changed in round {round_index}\n")
        times.setdefault("sync", []).append(measure([sync, "/srv/copy"], env=env, cwd=folder).check().seconds)
    check = subprocess.run([runscript, f"cat /srv/copy/{changed.relative_to(data)}"], env=env, cwd=folder,
                           capture_output=True, text=True, check=False)
    if check.stdout != changed.read_text():
        raise SystemExit(f"PART-sync did not carry the change: {check.stdout!r} {check.stderr}")

    def row(label: str, key: str) -> list[str]:
        runs = times[key]
        return [label, f"{median(runs):.2f} s", ", ".join(f"{t:.2f}" for t in runs)]

    rows = [row("`PART-runscript true` (its own cost)", "true")]
    for way in WAYS:
        rows.append(row(f"tree, walked and read: {way}", f"tree {way}"))
    for way in WAYS:
        rows.append(row(f"large file read: {way}", f"big {way}"))
    rows.append(row("`PART-sync` after one file changed (rsync over the ssh master)", "sync"))
    results = {
        "tree_9p_s": median(times["tree 9p"]), "tree_virtiofs_s": median(times["tree virtiofs"]),
        "tree_copy_s": median(times["tree own copy (rsync)"]),
        "big_9p_s": median(times["big 9p"]), "big_virtiofs_s": median(times["big virtiofs"]),
        "big_copy_s": median(times["big own copy (rsync)"]), "sync_s": median(times["sync"]),
    }
    return rows, results


if __name__ == "__main__":
    sys.exit(main())
