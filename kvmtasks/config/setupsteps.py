"""A part's guest setup: the step sections its `setup` option names, parsed and checked.

A step section is not a part (it names no image): it copies files into the guest, then runs
shell lines or a script there. Its options are declared in config/options.STEP_OPTIONS.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kvmtasks.config.buildout import Config
from kvmtasks.config.options import STEP_OPTIONS, STEP_OPTIONS_BY_NAME
from kvmtasks.errors import ConfigError

# A step's name is part of task names (setup:PART:STEP) and of its log file's name.
STEP_NAME = re.compile(r"[^\W_][\w.+-]*")


@dataclass(frozen=True)
class Copy:
    """One `copy` line: a local file or folder, and where it goes in the guest."""

    source: Path  # absolute
    target: str  # an absolute guest path


@dataclass(frozen=True)
class SetupStep:
    """One step of a part's guest setup."""

    name: str
    copies: tuple[Copy, ...]
    run: str | None  # shell lines, run with set -e
    script: Path | None  # a local script file, sent and run
    timeout: float


def parse(config: Config, path: Path, part: str, names: tuple[str, ...],
          directory: Path) -> tuple[SetupStep, ...]:
    """The steps a part's `setup` names, in order; a bad one is one ConfigError line."""
    steps = []
    for name in names:
        if name == "buildout" or not config.has_section(name):
            raise ConfigError(f"{path}: [{part}] setup = {name!r}: no section [{name}]")
        if not STEP_NAME.fullmatch(name):
            raise ConfigError(f"{path}: [{part}] setup = {name!r}: a step name must be letters, digits, "
                              "'.', '_', '+' or '-', starting with a letter or digit")
        if names.count(name) > 1:
            raise ConfigError(f"{path}: [{part}] setup = {name!r}: a step is named once")
        steps.append(_step(config, path, name, directory))
    return tuple(steps)


def _step(config: Config, path: Path, name: str, directory: Path) -> SetupStep:
    where = f"{path}: [{name}]"
    values: dict[str, Any] = {}
    for option, raw in config.section(name).items():
        known = STEP_OPTIONS_BY_NAME.get(option)
        if known is None:
            allowed = ", ".join(o.name for o in STEP_OPTIONS)
            raise ConfigError(f"{where} unknown option {option!r} in a setup step (its options: {allowed})")
        try:
            values[option] = known.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{where} {option} = {raw!r}: {error}") from None
    timeout = values.get("timeout", STEP_OPTIONS_BY_NAME["timeout"].parse("3600"))
    run, script = values.get("run"), values.get("script")
    if run is not None and script is not None:
        raise ConfigError(f"{where} set run or script, not both (script = {script!r})")
    if not run and script is None:
        raise ConfigError(f"{where} a setup step needs run (shell lines) or script (a file)")
    script_path = None
    if script is not None:
        script_path = _local(directory, script)
        if not script_path.is_file():
            raise ConfigError(f"{where} script = {script!r}: {script_path} is not a file")
    copies = tuple(_copy(where, line, directory) for line in values.get("copy", ()))
    return SetupStep(name=name, copies=copies, run="\n".join(run) if run else None,
                     script=script_path, timeout=timeout)


def _local(directory: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else directory / path


def _copy(where: str, line: str, directory: Path) -> Copy:
    words = line.split()
    if len(words) != 2:
        raise ConfigError(f"{where} copy = {line!r}: one `LOCAL GUESTPATH` per line")
    local, target = words
    if not PurePosixPath(target).is_absolute():
        raise ConfigError(f"{where} copy = {line!r}: the guest path {target!r} must be absolute")
    source = _local(directory, local)
    if not source.exists():
        raise ConfigError(f"{where} copy = {line!r}: {source} not found")
    if not (source.is_file() or source.is_dir()):
        raise ConfigError(f"{where} copy = {line!r}: {source} is neither a file nor a folder")
    return Copy(source=source, target=target)
