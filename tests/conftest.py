"""Shared fixtures: a local HTTP server, and a project that runs doit as a user does.

Every path a test touches is under tmp_path: the buildout directory, the
config files, HOME, and the doit state file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.httpserver import FileServer, serve

pytest_plugins = ["tests.vmfixtures", "tests.reliability", "tests.workunits"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DODO = REPO_ROOT / "dodo.py"
# The provisioning steps; other tasks (render, ...) may run too and are not asserted on here.
PROVISION_STEPS = frozenset({"download", "verify-download", "decompress", "verify-image"})
# Variables that would send test traffic elsewhere or change what provisioning does; others
# (KVMTASKS_GUEST_CACHE, ...) pass through.
# XDG_CACHE_HOME too: the download cache then defaults to HOME/.cache, in tmp_path.
_SCRUBBED = re.compile(r"(?i).*_proxy|KVMTASKS_(CONFIG|ACCEL|HTTP_TIMEOUT)|XDG_CACHE_HOME")


@pytest.fixture
def http_server() -> Iterator[FileServer]:
    with serve() as server:
        yield server


@pytest.fixture(autouse=True)
def _hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process tests see no proxy, no provisioning setting and a HOME in tmp_path."""
    for name in list(os.environ):
        if _SCRUBBED.fullmatch(name):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test: a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "small disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)



@dataclass(frozen=True)
class DoitRun:
    """The outcome of one `python -m doit` run."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def executed(self) -> set[str]:
        """Tasks doit ran (it prints ".  task")."""
        return set(re.findall(r"^\.  (\S+)$", self.stdout, re.MULTILINE))

    @property
    def up_to_date(self) -> set[str]:
        """Tasks doit skipped (it prints "-- task")."""
        return set(re.findall(r"^-- (\S+)$", self.stdout, re.MULTILINE))

    def ran(self, part: str = "vm") -> set[str]:
        """The provisioning steps of part that doit executed."""
        return {step for step in PROVISION_STEPS if f"{step}:{part}" in self.executed}

    def skipped(self, part: str = "vm") -> set[str]:
        """The provisioning steps of part that doit found up to date."""
        return {step for step in PROVISION_STEPS if f"{step}:{part}" in self.up_to_date}

    def error_lines(self, needle: str) -> list[str]:
        return [line for line in self.output.splitlines() if needle in line]

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


class Project:
    """A buildout directory in tmp_path with config files, driven by real doit runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.configs: list[Path] = []
        self.env: dict[str, str] = {}
        # More [buildout] options, e.g. {"download-cache": ""} to download into the part only.
        self.buildout: dict[str, str] = {}

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    @property
    def var(self) -> Path:
        return self.root / "var"

    def write(self, body: str, name: str = "kvm.cfg") -> Path:
        """Write (or rewrite) a config file: a [buildout] section, then body."""
        path = self.root / name
        extra = "".join(f"{name} = {value}\n" for name, value in self.buildout.items())
        path.write_text(f"[buildout]\ndirectory = {self.root}\n{extra}\n{body.strip()}\n")
        if path not in self.configs:
            self.configs.append(path)
        return path

    def environment(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if not _SCRUBBED.fullmatch(name)}
        env.update({
            "KVMTASKS_CONFIG": os.pathsep.join(str(path) for path in self.configs),
            "HOME": str(self.root / "home"),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        env.update(self.env)
        return env

    @staticmethod
    def argv(*tasks: str) -> list[str]:
        return [sys.executable, "-m", "doit", "-f", str(DODO), *tasks]

    def run(self, *tasks: str, timeout: float = 60) -> DoitRun:
        completed = subprocess.run(self.argv(*tasks), env=self.environment(), capture_output=True,
                                   text=True, timeout=timeout, check=False)
        return DoitRun(completed.returncode, completed.stdout, completed.stderr)

    def provision(self, part: str = "vm") -> DoitRun:
        return self.run(f"provision:{part}")

    def doit_state(self) -> dict[str, object]:
        """doit's state file: task name -> its saved data."""
        with contextlib.closing(sqlite3.connect(self.var / ".doit.sqlite3")) as db:
            rows = db.execute("select task_id, task_data from doit")
            return {task: json.loads(data) for task, data in rows}


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "buildout"
    root.mkdir()
    return Project(root)
