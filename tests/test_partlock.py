"""The part's VM lock (no VM): a second process waits for the first and names it; one process
takes it again inside an operation made of others (restart, a restore that starts)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.engines import partlock

HOLD = """
import sys, time
from pathlib import Path
from kvmtasks.config.loader import load_file
from kvmtasks.engines import partlock
(part,) = load_file(Path(sys.argv[1]), Path(sys.argv[2]))
with partlock.operation(part, sys.argv[3]):
    print("held", flush=True)
    time.sleep(float(sys.argv[4]))
print("released", flush=True)
"""


def load(tmp_path: Path) -> tuple[Path, Part]:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\nfile = {tmp_path / 'disk.img'}\n")
    (part,) = load_file(path, tmp_path)
    return path, part


def hold(config: Path, root: Path, doing: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(config), str(root), doing, str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_operation_waits_for_the_first_and_names_it(tmp_path: Path) -> None:
    config, part = load(tmp_path)
    first = hold(config, tmp_path, "suspend", 2)
    assert first.stdout is not None and first.stdout.readline() == "held\n"
    began = time.monotonic()
    second = hold(config, tmp_path, "start", 0)
    out, err = second.communicate(timeout=30)
    assert time.monotonic() - began >= 1.5  # it waited for the first
    assert first.wait(timeout=30) == 0
    lock = partlock.lock_path(part).absolute()
    assert err == f"vm: start waits for another operation on vm (pid {first.pid} suspend, lock {lock})\n"
    assert out == "held\nreleased\n"
    assert lock.read_text() == f"{second.pid} start\n"


def test_an_operation_made_of_others_takes_the_lock_once(tmp_path: Path) -> None:
    _, part = load(tmp_path)
    with partlock.operation(part, "restart"), partlock.operation(part, "stop"):
        assert partlock.lock_path(part).read_text().endswith(" restart\n")
    # Released: another process gets it at once.
    config = tmp_path / "kvm.cfg"
    done = hold(config, tmp_path, "start", 0).communicate(timeout=30)
    assert done == ("held\nreleased\n", "")
