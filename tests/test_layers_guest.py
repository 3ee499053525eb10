"""Guest setup as cached layers, with the tiny busybox guest: one scenario, one image.

The guest keeps its disk as a FAT file system at /mnt (no modes, no freeze: the capture
remounts it read-only instead); copied modes are read in the guest's own root file system by
the step itself and written to the disk, so they reach a later boot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmtasks.demo.guestimage import build_guest_image
from kvmtasks.layers import flatten
from tests.test_vm_e2e import script
from tests.vmfixtures import PACKAGE_CACHE, free_port, needs_qemu, qemu_pids_under

if TYPE_CHECKING:
    from tests.conftest import DoitRun, Project
    from tests.reliability import Recorder

pytestmark = [pytest.mark.vm, needs_qemu]
MIB = 1 << 20

STEPS = """
[files]
copy =
    tree /tmp/tree
    tool.sh /tmp/one/tool.sh
run =
    mkdir -p /mnt/s1
    cd /tmp/tree && stat -c '%a %n' secret bin bin/run > /mnt/s1/modes
    stat -c '%a' /tmp/one/tool.sh >> /mnt/s1/modes
    echo files ran

[lines]
run =
    echo {two} > /mnt/s2
    echo lines ran

[last]
script = step3.sh
timeout = {timeout}
"""
STEP3 = "#!/bin/sh\necho last ran\n{body}\ncat /mnt/s2 > /mnt/s3\n"


def config(guest_image: Path, key: Path, port: int, steps: str = "files lines last", **values: object) -> str:
    fields = {"two": "two", "timeout": 600, **values}
    setup = "".join(f"    {step}\n" for step in steps.split())
    return (f"download-cache = {guest_image.parent}/cache\n\n"
            f"[vm]\nfile = {guest_image}\noverlay = true\nssh_port = {port}\nssh_key_path = {key}\n"
            "kvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 120\nkvm_shutdown_timeout = 3\n"
            f"setup =\n{setup}" + STEPS.format(**fields))


def write(project: Project, text: str) -> None:
    # [buildout] options first: project.write puts its own [buildout] header before text.
    project.buildout = {}
    path = project.root / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {project.root}\n{text}")
    if path not in project.configs:
        project.configs.append(path)


def built(run: DoitRun) -> list[str]:
    """The steps a builder VM ran in this doit run (from the lines each capture prints)."""
    return [line.split(":")[2] for line in run.output.splitlines()
            if line.startswith("setup:vm:") and " cached (" in line]


def layers(root: Path) -> Path:
    return root / "cache" / "layers"


def entry(guest_dir: Path, step: str) -> Path:
    """The newest cache entry of a step."""
    records = [p for p in layers(guest_dir).glob("*/record.json") if f'"step": "{step}"' in p.read_text()]
    return max(records, key=lambda p: p.stat().st_mtime).parent


def assert_clean(project: Project, guest_dir: Path) -> None:
    assert qemu_pids_under(project.root) == []
    assert qemu_pids_under(guest_dir) == []
    assert list(layers(guest_dir).glob("tmp-*")) == []


def test_setup_steps_are_cached_layers(project: Project, tmp_path: Path, guest_key: Path,
                                       reliability: Recorder) -> None:
    image = build_guest_image(tmp_path / "g" / "guest.img", guest_key.with_suffix(".pub"), PACKAGE_CACHE,
                              spare_kb=300 * 1024).path
    guest_dir = image.parent
    tree = project.root / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "secret").write_text("s\n")
    (tree / "secret").chmod(0o600)
    (tree / "bin" / "run").write_text("#!/bin/sh\n")
    (tree / "bin" / "run").chmod(0o751)
    (tree / "bin").chmod(0o710)
    (project.root / "tool.sh").write_text("#!/bin/sh\n")
    (project.root / "tool.sh").chmod(0o700)
    step3 = project.root / "step3.sh"
    step3.write_text(STEP3.format(body=""))
    port = free_port()
    write(project, config(image, guest_key, port))
    try:
        # Three steps in one builder boot; their output reaches the terminal and the logs.
        first = project.run("provision:vm", timeout=400)
        assert first.returncode == 0, first.describe()
        assert built(first) == ["files", "lines", "last"], first.describe()
        assert first.output.count("booting a builder VM") == 1
        assert "lines ran" in first.stdout
        assert "last ran" in (project.var / "vm" / "setup" / "last.log").read_text()
        assert_clean(project, guest_dir)
        listed = project.run("list", "--all")
        assert {"setup:vm:files", "setup:vm:lines", "setup:vm:last"} <= set(
            line.split()[0] for line in listed.stdout.splitlines() if line.strip())

        # Nothing changed: no step runs.
        again = project.run("provision:vm", timeout=120)
        assert again.returncode == 0, again.describe()
        assert built(again) == [] and "booting a builder VM" not in again.output
        assert {"setup:vm:files", "setup:vm:lines", "setup:vm:last"} <= again.up_to_date

        # The part boots its own overlay over the top layer: every step's result is there.
        started = project.run("start:vm", timeout=200)
        assert started.returncode == 0, started.describe()
        shown = script(project, "vm-runscript", "cat /mnt/s1/modes /mnt/s2 /mnt/s3")
        assert shown.stdout.split("\n") == ["600 secret", "710 bin", "751 bin/run", "700", "two", "two", ""]
        assert project.run("stop:vm", timeout=60).returncode == 0
        top = layers(guest_dir).glob("*/record.json")
        assert len(list(top)) == 4  # the base and three layers

        # Step 2 changed: steps 2 and 3 run again, over step 1's layer; step 1 does not.
        write(project, config(image, guest_key, port, two="deux"))
        changed = project.run("provision:vm", timeout=400)
        assert changed.returncode == 0, changed.describe()
        assert built(changed) == ["lines", "last"], changed.describe()
        assert "setup:vm:files" in changed.up_to_date

        # A failing step: one line naming part, step and status, then its last lines; the layers
        # below stay, and the next run goes on from the last good one.
        step3.write_text(STEP3.format(body="echo it broke; exit 3"))
        reliability.fault("setup-step")
        failed = project.run("provision:vm", timeout=400)
        assert failed.returncode != 0
        assert failed.error_lines("setup step last of vm failed with exit status 3"), failed.describe()
        assert "it broke" in failed.stderr
        assert built(failed) == []
        assert_clean(project, guest_dir)
        step3.write_text(STEP3.format(body="echo fixed"))
        fixed = project.run("provision:vm", timeout=400)
        assert fixed.returncode == 0, fixed.describe()
        assert built(fixed) == ["last"], fixed.describe()

        # Its time limit, then SIGTERM: the same, no VM and no temporary file left.
        step3.write_text(STEP3.format(body="echo sleeping; sleep 600"))
        write(project, config(image, guest_key, port, two="deux", timeout=3))
        reliability.fault("setup-step")
        late = project.run("provision:vm", timeout=400)
        assert late.error_lines("setup step last of vm did not finish within timeout = 3 s"), late.describe()
        assert_clean(project, guest_dir)
        write(project, config(image, guest_key, port, two="deux"))
        log = project.var / "vm" / "setup" / "last.log"
        log.unlink()  # the timed-out run's; this run's says "sleeping" once the step runs
        doit = subprocess.Popen(project.argv("provision:vm"), env=project.environment(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "sleeping" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.5)
        reliability.fault("setup-step")
        doit.send_signal(signal.SIGTERM)
        out, err = doit.communicate(timeout=60)
        assert doit.returncode == 128 + signal.SIGTERM, out + err
        assert "interrupted (SIGTERM)" in err
        assert_clean(project, guest_dir)

        # Flipped bytes in a cached layer: noticed in one line, made again with those above it.
        step3.write_text(STEP3.format(body="echo fixed"))
        layer = entry(guest_dir, "files") / "layer.qcow2"
        reliability.fault("setup-step")
        layer.chmod(0o644)
        with open(layer, "r+b") as handle:
            handle.seek(layer.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0xFF]))
        damaged = project.run("provision:vm", timeout=400)
        assert damaged.returncode == 0, damaged.describe()
        assert len(damaged.error_lines("is damaged")) == 1, damaged.describe()
        assert built(damaged) == ["files", "lines", "last"], damaged.describe()

        # A step that writes then deletes 256 MiB: its layer stays small (fstrim, discard).
        big_step = ("\n[big]\nrun =\n    dd if=/dev/zero of=/mnt/big bs=1M count=256\n"
                    "    sync\n    rm /mnt/big\n")
        write(project, config(image, guest_key, port, steps="files lines last big", two="deux") + big_step)
        big = project.run("provision:vm", timeout=400)
        assert big.returncode == 0, big.describe()
        assert built(big) == ["big"], big.describe()
        allocated = (entry(guest_dir, "big") / "layer.qcow2").stat().st_blocks * 512
        assert allocated <= 0.05 * 256 * MIB, allocated
        assert_clean(project, guest_dir)

        # Deeper than flatten.FLATTEN_PAST: the part's new overlay stands on the chain flattened
        # over the image (made once), and the guest sees every step's result through it.
        deep_steps = [f"d{number}" for number in range(5, flatten.FLATTEN_PAST + 2)]
        deep_sections = "".join(f"\n[{step}]\nrun = echo {step} > /mnt/{step}\n" for step in deep_steps)
        write(project, config(image, guest_key, port, steps=" ".join(["files lines last big", *deep_steps]),
                              two="deux") + big_step + deep_sections)
        deep = project.run("provision:vm", timeout=400)
        assert deep.returncode == 0, deep.describe()
        assert built(deep) == deep_steps, deep.describe()
        assert deep.output.count(f"layers up to {deep_steps[-1]} flattened into") == 1, deep.describe()
        chain = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                                str(project.root / "parts" / "vm" / "vm.overlay.qcow2")],
                               capture_output=True, text=True, check=True)
        files = [disk["filename"] for disk in json.loads(chain.stdout)]
        assert len(files) == 3 and json.loads(Path(files[1]).with_name("record.json").read_text())[
            "kind"] == "flat", files
        assert project.run("start:vm", timeout=200).returncode == 0
        shown = script(project, "vm-runscript", f"cat /mnt/s1/modes /mnt/s2 /mnt/s3 /mnt/{deep_steps[-1]}")
        assert shown.stdout.split("\n") == ["600 secret", "710 bin", "751 bin/run", "700", "deux", "deux",
                                            deep_steps[-1], ""], shown.stderr
        assert project.run("stop:vm", timeout=60).returncode == 0
        again = project.run("provision:vm", timeout=120)
        assert again.returncode == 0 and "flattened into" not in again.output, again.describe()
        assert_clean(project, guest_dir)
    finally:
        project.run("stop:vm", timeout=60)
        for pid in qemu_pids_under(project.root) + qemu_pids_under(guest_dir):
            os.kill(pid, signal.SIGKILL)
