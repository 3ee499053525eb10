"""Where each of a part's values came from, as ``buildout annotate`` shows it.

Each option with its value as the part reads it (substituted), then where it
was set: the file and section of the value that stands, and below it every
``+=`` and ``-=`` applied since, as buildout prints them. An option the config
does not set shows the default kvmtasks gives it.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvmtasks.config.buildout import NOT_FILES, Key
from kvmtasks.config.loader import read_config
from kvmtasks.config.options import OPTIONS


def annotate(config_file: Path, cwd: Path, part: str) -> list[str]:
    """The lines to print for part of config_file."""
    config = read_config(config_file, cwd)
    values = config.section(part)
    keys = config.extended(part)
    base = str(config.section("buildout")["directory"])
    lines = [f"[{part}]"]
    for option, value in values.items():
        lines += _value_lines(option, value)
        lines += _history_lines(keys[option], base) if option in keys else []
    for declared in OPTIONS:
        if declared.name not in values and declared.default is not None:
            lines += [f"{declared.name} = {declared.default}", "    (kvmtasks default)"]
    return lines


def _value_lines(option: str, value: str) -> list[str]:
    first, *rest = value.split("\n") or [""]
    return [f"{option} = {first}".rstrip(), *(f"    {line}" for line in rest)]


def _history_lines(key: Key, base: str) -> list[str]:
    """buildout's terse form: the last SET or OVERRIDE, then the += and -= after it."""
    shown: list[str] = []
    for step in reversed(key.history):
        where = _where(step.source, step.section, base)
        if step.operation == "ADD":
            shown.append(f"+=  {where}")
        elif step.operation == "REMOVE":
            shown.append(f"-=  {where}")
        else:
            shown.append(f"    {where}")
            break
    return list(reversed(shown))


def _where(source: str, section: str, base: str) -> str:
    if source in NOT_FILES:
        return "(kvmtasks default)" if source == "DEFAULT_VALUE" else f"({source.lower().replace('_', ' ')})"
    if not source.startswith(("http://", "https://", "file://")) and source.startswith(base + os.sep):
        source = os.path.relpath(source, base)
    return f"{source} [{section}]"


def print_annotation(config_file: Path, part: str) -> None:
    print("\n".join(annotate(config_file, Path.cwd(), part)))
