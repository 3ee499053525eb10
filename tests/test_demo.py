"""The README's first command, in a copy of the repository: builds, boots and uses the demo VM."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vmfixtures import PACKAGE_CACHE, REPO_ROOT, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm]

LEFT_OUT = shutil.ignore_patterns(".git", ".venv", ".cache", "bin", "parts", "var", "__pycache__",
                                  ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis")


def run_demo(repo: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(repo), "HOME": str(repo / "home")}
    env.pop("KVMTASKS_ACCEL", None)  # the demo's own kvm_accel = auto is what is tested
    return subprocess.run([sys.executable, "-m", "kvmtasks.demo"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_demo_boots_answers_and_is_fast_the_second_time(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=LEFT_OUT)
    (repo / ".cache").mkdir()
    PACKAGE_CACHE.mkdir(parents=True, exist_ok=True)
    (repo / ".cache" / "guest").symlink_to(PACKAGE_CACHE)  # share the downloaded packages
    try:
        first = run_demo(repo)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "the guest says: Linux" in first.stdout
        assert "the file came back unchanged" in first.stdout
        assert "The demo VM is running" in first.stdout
        assert ".  download:demo" in first.stdout

        second = run_demo(repo)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "demo image already built" in second.stdout
        assert "-- download:demo" in second.stdout and "-- decompress:demo" in second.stdout
        assert "demo is already running" in second.stdout
        assert "bin/demo-ssh" in second.stdout

        # The first thing a newcomer stops: the guest acts on the ACPI button, so stop returns
        # within the button's grace period (the time is measured in bench/boot.py, not here).
        stopped = subprocess.run([str(repo / "bin" / "demo-ctl"), "stop"], capture_output=True,
                                 text=True, timeout=120, check=False)
        assert stopped.stdout == "demo stopped (the guest powered off on the ACPI power button)\n"
    finally:
        ctl = repo / "bin" / "demo-ctl"
        if ctl.exists():
            subprocess.run([str(ctl), "stop"], capture_output=True, timeout=120, check=False)
    assert qemu_pids_under(repo) == []
