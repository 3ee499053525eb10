"""A path as the value of an ssh_config line (in a file, or ``-o`` on ssh's command line).

ssh splits a value into words, reads backslash escapes, and expands ``%`` tokens, ``~`` and
``${VAR}`` in the paths it takes (IdentityFile, UserKnownHostsFile, ControlPath). Quoted,
a space no longer makes two files of one, and ``%%`` is a literal ``%``. Two things have no
escape: ``${`` (always an environment variable) and a line break (the end of the line): a
path holding one is refused when the config is read.
"""

from __future__ import annotations

from pathlib import Path


def problem(path: Path | str) -> str | None:
    """Why ssh could not be given this path, or None when it can."""
    text = str(path)
    if "${" in text:
        return "ssh would read the ${...} in this path as an environment variable; choose a path without it"
    if any(c in text for c in "\n\r\0"):
        return "an ssh config line cannot hold a line break; choose a path without it"
    return None


def quote(path: Path | str) -> str:
    """The path quoted for ssh_config; ValueError for one it cannot carry (see problem)."""
    reason = problem(path)
    if reason is not None:
        raise ValueError(reason)
    escaped = str(path).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'
