"""Buildout's config syntax: extends, ``<=`` macros, ``+=``/``-=``, ``${section:option}``.

The files are read raw (no interpolation) and merged the way zc.buildout does:

1. ``[buildout] extends`` files first, depth first, each file overriding the
   one it extends; ``option += lines`` and ``option -= lines`` in a file apply
   to the value the section had so far (the same section's own ``option =``
   in that file first, else the files it extends).
2. ``<= SECTION`` (one section per line) copies those sections' options
   (themselves resolved first), then the section's own options override them;
   a ``+=``/``-=`` with nothing to apply to in the files applies to the
   macro's value.
3. ``${section:option}``, ``${:option}`` (same section) and, as before,
   ``${option}`` (same section, then ``[DEFAULT]``) are substituted when a
   value is read; ``$$`` is a ``$``; a ``$`` not followed by ``{`` is itself.

``[DEFAULT]`` is kept from Python's configparser, which kvmtasks read before:
its options apply to every section that does not set them.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvmtasks.config import bounded
from kvmtasks.errors import ConfigError

DEFAULT = "DEFAULT"
MACRO = "<"
_SUBSTITUTION = re.compile(r"\$(?:(\$)|\{([^}]*)\}|(\{))")
_OPERATOR = re.compile(r"(.*?)\s*([+-])")


@dataclass
class Entry:
    """One option of one section: a value, or lines to add and remove, in order, from an inherited one."""

    value: str | None
    operations: list[tuple[str, list[str]]] = field(default_factory=list)  # ("+" or "-", lines)

    def applied_to(self, inherited: str | None) -> str:
        base = self.value if self.value is not None else (inherited or "")
        if not self.operations:
            return base
        lines = base.split("\n")
        for operator, changed in self.operations:
            if operator == "+":
                lines += changed
            else:
                gone = {line.strip() for line in changed}
                lines = [line for line in lines if line.strip() not in gone]
        return "\n".join(lines).strip("\n")

    def over(self, earlier: Entry | None) -> Entry:
        """This entry read after earlier (a file extending another)."""
        if self.value is not None or earlier is None:
            return self
        if earlier.value is not None:
            return Entry(self.applied_to(earlier.value))
        return Entry(None, [*earlier.operations, *self.operations])


Sections = dict[str, dict[str, Entry]]


def parse_file(path: Path) -> Sections:
    """One file's sections, raw; ``+=``/``-=`` within a section applied to its own value."""
    parser = configparser.ConfigParser(
        interpolation=None,
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        default_section="\0",  # [DEFAULT] is an ordinary section here, merged later
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(bounded.read_text(path, bounded.CONFIG_LIMIT), source=str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except bounded.NotReadable as error:
        raise ConfigError(f"{path}: config file {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file: {error}") from None
    except configparser.Error as error:
        raise ConfigError(f"{path}: {one_line(error)}") from None
    sections: Sections = {}
    for name in parser.sections():
        raw = dict(parser.items(name, raw=True))
        sections[name] = _section(path, name, raw)
    return sections


def _section(path: Path, name: str, raw: Mapping[str, str]) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    operations: list[tuple[str, str, str]] = []
    for key, value in raw.items():
        if key == MACRO:
            if name in ("buildout", DEFAULT):
                raise ConfigError(f"{path}: [{name}] <= {value!r}: [{name}] cannot extend a section")
            entries[key] = Entry(value)
            continue
        match = _OPERATOR.fullmatch(key)
        if match is None:
            entries[key] = Entry(value)
            continue
        option, operator = match.groups()
        if not option or option == MACRO:
            raise ConfigError(f"{path}: [{name}] {key}= {value!r}: {operator}= needs an option name")
        operations.append((option, operator, value))
    # buildout's order: an option's own value, then its +=, then its -=.
    for option, operator, value in sorted(operations, key=lambda op: (op[0], op[1] == "-")):
        entry = entries.setdefault(option, Entry(None))
        lines = [line for line in value.split("\n") if line.strip()]
        if entry.value is not None:
            entries[option] = Entry(Entry(None, [(operator, lines)]).applied_to(entry.value))
        else:
            entry.operations.append((operator, lines))
    return entries


def merge(earlier: Sections, later: Sections) -> Sections:
    """later read over earlier (a file over the files it extends)."""
    merged = {name: dict(options) for name, options in earlier.items()}
    for name, options in later.items():
        section = merged.setdefault(name, {})
        for option, entry in options.items():
            section[option] = entry.over(section.get(option))
    return merged


class Config:
    """Merged sections with macros resolved; values substituted when read."""

    def __init__(self, path: Path, sections: Sections) -> None:
        self.path = path
        self._defaults = {
            option: entry.applied_to(None) for option, entry in sections.pop(DEFAULT, {}).items()
        }
        self._raw: dict[str, dict[str, str]] = {}
        for name in sections:
            self._raw[name] = self._extended(name, sections, ())
        self._done: dict[tuple[str, str], str] = {}

    def _extended(self, name: str, sections: Sections, chain: tuple[str, ...]) -> dict[str, str]:
        if name in self._raw:
            return self._raw[name]
        own = sections[name]
        macros = own.get(MACRO)
        if macros is None:
            return {option: entry.applied_to(None) for option, entry in own.items()}
        shown = macros.applied_to(None)
        if name in chain:
            cycle = " <= ".join((*chain, name))
            raise ConfigError(f"{self.path}: [{chain[0]}] <= {self._macro(sections, chain[0])!r}: "
                              f"circular section extension: {cycle}")
        inherited: dict[str, str] = {}
        for base in shown.split():
            if base not in sections or base == DEFAULT:
                raise ConfigError(f"{self.path}: [{name}] <= {shown!r}: no section [{base}]")
            inherited.update(self._extended(base, sections, (*chain, name)))
        result = dict(inherited)
        for option, entry in own.items():
            if option != MACRO:
                result[option] = entry.applied_to(inherited.get(option))
        return result

    @staticmethod
    def _macro(sections: Sections, name: str) -> str:
        return sections[name][MACRO].applied_to(None)

    def sections(self) -> list[str]:
        return list(self._raw)

    def has_section(self, section: str) -> bool:
        return section in self._raw

    def options(self, section: str) -> list[str]:
        own = self._raw[section]
        return [*own, *(option for option in self._defaults if option not in own)]

    def is_default(self, section: str, option: str) -> bool:
        return option not in self._raw[section] and option in self._defaults

    def raw(self, section: str, option: str) -> str | None:
        own = self._raw.get(section, {})
        return own.get(option, self._defaults.get(option))

    def get(self, section: str, option: str, fallback: str | None = None) -> str | None:
        """The value with its references substituted; a bad one is one line naming it."""
        raw = self.raw(section, option)
        if raw is None:
            return fallback
        try:
            return self._value(section, option, ())
        except _Unresolved as error:
            raise ConfigError(f"{self.path}: [{section}] {option} = {raw!r}: {error}") from None

    def _value(self, section: str, option: str, chain: tuple[str, ...]) -> str:
        key = (section, option)
        if key in self._done:
            return self._done[key]
        raw = self.raw(section, option)
        assert raw is not None
        value = "".join(self._pieces(raw, section, (*chain, f"${{{section}:{option}}}")))
        self._done[key] = value
        return value

    def _pieces(self, raw: str, section: str, chain: tuple[str, ...]) -> Iterator[str]:
        position = 0
        for match in _SUBSTITUTION.finditer(raw):
            yield raw[position:match.start()]
            position = match.end()
            dollar, reference, unclosed = match.groups()
            if dollar:
                yield "$"
            elif unclosed:
                raise _Unresolved("'${' without a closing '}'")
            else:
                yield self._reference(reference, section, chain)
        yield raw[position:]

    def _reference(self, reference: str, section: str, chain: tuple[str, ...]) -> str:
        shown = f"${{{reference}}}"
        target, colon, option = reference.rpartition(":")
        if ":" in target or not option.strip() or "\n" in reference:
            raise _Unresolved(f"reference {shown} is not ${{section:option}}")
        target = target.strip() if colon and target.strip() else section
        option = option.strip()
        if self.raw(target, option) is None:
            raise _Unresolved(f"reference {shown} not found")
        if f"${{{target}:{option}}}" in chain:
            raise _Unresolved(f"circular reference: {' -> '.join((*chain, shown))}")
        return self._value(target, option, chain)


class _Unresolved(Exception):
    """Why a value's substitution failed (the caller names the option)."""


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())
