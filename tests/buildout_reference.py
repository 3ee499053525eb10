"""Reading a config with zc.buildout itself and with kvmtasks, part by part, for comparison.

zc.buildout is the reference: ``Buildout(config, [], use_user_defaults=False)``
reads the file as ``bin/buildout`` does (its parser, ``extends`` and their
downloads, the merge of ``+=``/``-=``, the ``[buildout]`` defaults), and
``buildout[part]`` reads a section (``<=`` macros, then every ``${}``
substituted). Only recipes are left out: ``Options.initialize``, which would
install and load the section's recipe, is replaced for the time of a read by
a method that does nothing. Each option of a part is then ``options[name]``,
the string a recipe would be given.

kvmtasks reads the same file with `read_config` and `Config.section`, the
strings its option parsers are given. Either reader's refusal is recorded as
``Refused`` (buildout raises UserError, its parser's errors, or a plain Python
error where it has no message of its own; kvmtasks a one-line ConfigError).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvmtasks.config.loader import read_config
from kvmtasks.errors import ConfigError

Options = dict[str, str]


@dataclass(frozen=True)
class Refused:
    """A reader refused the config (the message is kept for the report, not compared)."""

    message: str


@contextlib.contextmanager
def _no_recipes() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import zc.buildout.buildout as zc_buildout
    original = zc_buildout.Options.initialize
    zc_buildout.Options.initialize = lambda self: None  # type: ignore[method-assign]
    cwd = os.getcwd()  # Buildout() changes into its directory
    logging.getLogger("zc.buildout").setLevel(logging.ERROR)
    try:
        yield
    finally:
        zc_buildout.Options.initialize = original  # type: ignore[method-assign]
        os.chdir(cwd)


def buildout_parts(config: Path, parts: list[str]) -> dict[str, Options | Refused] | Refused:
    """The parts' options as zc.buildout gives them to a recipe, read in the order given."""
    import zc.buildout.buildout as zc_buildout

    with _no_recipes():
        try:
            reader = zc_buildout.Buildout(str(config), [], use_user_defaults=False)
        except Exception as error:  # buildout's own errors and its unguarded ones alike
            return _refused(error)
        result: dict[str, Options | Refused] = {}
        for part in parts:
            try:
                options = reader[part]
                result[part] = {name: options[name] for name in options}  # Options iterates its keys()
            except Exception as error:
                result[part] = _refused(error)
        return result


def _refused(error: Exception) -> Refused:
    return Refused(f"{type(error).__name__}: {' '.join(str(error).split())}")


def kvmtasks_parts(config: Path, parts: list[str]) -> dict[str, Options | Refused] | Refused:
    """The parts' options as kvmtasks' option parsers get them (directory: the config's folder)."""
    try:
        reader = read_config(config, config.parent)
    except ConfigError as error:
        return _one_line(error)
    result: dict[str, Options | Refused] = {}
    for part in parts:
        try:
            result[part] = reader.section(part)
        except ConfigError as error:
            result[part] = _one_line(error)
    return result


def _one_line(error: ConfigError) -> Refused:
    message = str(error)
    assert len(message.splitlines()) == 1, message
    return Refused(message)
