"""Buildout's merge and substitution rules, as zc.buildout 6 applies them.

Each option is a `Key`: its value and the history of how it got there (set,
overridden by a file that extends another, ``+=``, ``-=``), with the file and
section of each step, which `annotate` prints as ``buildout annotate`` does.

1. Files merge in `update` / `update_section` (zc.buildout's ``_update`` and
   ``_update_section``, quirks included): ``option +=``/``-=`` apply to the
   value the section had so far, else to an empty one.
2. ``<= SECTION`` (one section per line) copies those sections' options,
   themselves extended first, then the section's own options are merged over
   them, ``+=``/``-=`` still unresolved applying to the macro's value.
3. ``${section:option}`` and ``${:option}`` are substituted when a section is
   first read, all its options at once; ``$$`` is left as it is (so ``$${x:y}``
   reaches the part unchanged, as buildout hands it to a recipe), a ``${``
   without ``}`` is text, and ``${:_buildout_section_name_}`` is the name of
   the section holding the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from kvmtasks.config.cfgfile import DEPENDENCIES
from kvmtasks.errors import ConfigError

MACRO = "<"
SECTION_NAME = "_buildout_section_name_"
_TEMPLATE_SPLIT = re.compile(r"([$]{[^}]*})")
_SIMPLE = re.compile(r"[-a-zA-Z0-9 ._]+$")
_VALID = re.compile(r"\${[-a-zA-Z0-9 ._]*:[-a-zA-Z0-9 ._]+}$")
REFERENCE = re.compile(r"\$\{([-a-zA-Z0-9 ._]*):([-a-zA-Z0-9 ._]+)\}")


@dataclass(frozen=True)
class Step:
    """One change of an option: SET, OVERRIDE, ADD or REMOVE, where it was written."""

    operation: str
    value: str
    source: str
    section: str


@dataclass(frozen=True)
class Key:
    value: str
    history: tuple[Step, ...]

    @classmethod
    def set(cls, value: str, source: str, section: str) -> Key:
        return cls(value, (Step("SET", value, source, section),))

    @property
    def source(self) -> str:
        return self.history[-1].source

    def overridden_by(self, other: Key) -> Key:
        if other.history[-1].operation in ("ADD", "REMOVE"):
            return other
        last = other.history[-1]
        return Key(other.value, (*self.history, Step("OVERRIDE", other.value, last.source, last.section)))

    def added(self, other: Key) -> Key:
        value = "\n".join(self.value.split("\n") + other.value.split("\n"))
        last = other.history[-1]
        return Key(value, (*self.history, Step("ADD", other.value, last.source, last.section)))

    def removed(self, other: Key, source: str | None = None) -> Key:
        gone = other.value.split("\n")
        value = "\n".join(line for line in self.value.split("\n") if line not in gone)
        last = other.history[-1]
        step = Step("REMOVE", other.value, source or last.source, last.section)
        return Key(value, (*self.history, step))


# Sources that are no file: buildout's labels for values it makes up.
NOT_FILES = frozenset({"DEFAULT_VALUE", "COMPUTED_VALUE", "IMPLICIT_VALUE", ""})
Section = dict[str, Key]
Sections = dict[str, Section]
_IMPLICIT = Key("", (Step("SET", "", "IMPLICIT_VALUE", ""),))


def annotated(raw: dict[str, dict[str, str]], source: str) -> Sections:
    return {name: {option: Key.set(value, source, name) for option, value in options.items()}
            for name, options in raw.items()}


def update_section(earlier: Section, later: Section) -> Section:
    """later over earlier, its ``option +``/``option -`` applied (zc.buildout's _update_section)."""
    result, later = dict(earlier), dict(later)
    for key, value in sorted(later.items(), key=lambda item: (item[0].rstrip(" +"), item[0][-1])):
        if key.endswith("+"):
            name = key.rstrip(" +")
            later[name] = later.get(name, result.get(name, _IMPLICIT)).added(value)
            del later[key]
        elif key.endswith("-"):
            name = key.rstrip(" -")
            later[name] = later.get(name, result.get(name, _IMPLICIT)).removed(value)
            del later[key]
    for name, value in later.items():
        result[name] = result[name].overridden_by(value) if name in result else value
    return result


def update(earlier: Sections, later: Sections) -> Sections:
    """A file read over the files it extends (zc.buildout's _update, slicing of names included)."""
    result = dict(earlier)
    for name, section in later.items():
        if name in result:
            result[name] = update_section(result[name], section)
        elif MACRO not in section:
            first = dict(section)
            for key in sorted(first):
                if key[-1] in "+-" and key[-2:-1] != " " and key[:-2] not in first:
                    _misread(name, key, first[key])
                # buildout drops the last two characters, the operator and the space before it.
                if key[-1] == "+" and key[:-2] not in first:
                    first[key[:-2]] = first.pop(key)
                elif key[-1] == "-" and key[:-2] not in first:
                    value = first.pop(key)
                    first[key[:-2]] = value.removed(value, "IMPLICIT_VALUE")
            result[name] = update_section({}, first)
        else:
            result[name] = dict(section)
    return result


def _misread(section: str, key: str, value: Key) -> None:
    """zc.buildout reads "name+=" in a section's first file as the option "nam": refused instead."""
    name, operator = key[:-1], key[-1]
    raise ConfigError(f"{value.source}: [{section}] {key}= {value.value!r}: zc.buildout would read this "
                      f"as an option {key[:-2]!r}; write '{name} {operator}=' with a space")


class Unresolved(Exception):
    """A substitution or macro that fails: the section and option it was read for, and why."""

    def __init__(self, section: str, option: str | None, problem: str) -> None:
        super().__init__(problem)
        self.section, self.option, self.problem = section, option, problem


class Config:
    """The merged sections; a section's macros and substitutions are resolved when it is first read."""

    def __init__(self, path: str, sections: Sections) -> None:
        self.path = path
        self.annotated = sections
        self._options: dict[str, _Options] = {}

    def sections(self) -> list[str]:
        return list(self.annotated)

    def has_section(self, name: str) -> bool:
        return name in self.annotated

    def raw(self, section: str, option: str) -> str | None:
        """The option as written (before macros and substitution)."""
        key = self.annotated.get(section, {}).get(option)
        return None if key is None else key.value

    def section(self, name: str) -> dict[str, str]:
        """Every option of a section, resolved; a bad one is one line naming where it is."""
        if name not in self.annotated:
            raise ConfigError(f"{self.path}: no section [{name}]")
        try:
            options = self._section(name)
            return {option: options.item(option) for option in options.option_names()}
        except Unresolved as error:
            raise ConfigError(self._where(error)) from None

    def extended(self, name: str) -> Section:
        """A section's options after its macros, unsubstituted, with their history."""
        options = self._options.get(name)
        if options is not None:
            return options.keys_annotated
        try:
            return _Options(self, name, self.annotated[name]).extended()
        except Unresolved as error:
            raise ConfigError(self._where(error)) from None

    def override(self, section: str, option: str, value: str) -> None:
        """What buildout sets in a section once read (its absolute folders)."""
        self._section(section).data[option] = value

    def _where(self, error: Unresolved) -> str:
        read = self._options.get(error.section)  # after its macros: options a <= copied too
        section = read.keys_annotated if read is not None else self.annotated.get(error.section, {})
        key = section.get(error.option or MACRO)
        if key is None and error.option in (None, MACRO):  # a <= already resolved away
            key = self.annotated.get(error.section, {}).get(MACRO)
        source = key.source if key is not None and key.source not in NOT_FILES else self.path
        if key is None:
            return f"{source}: [{error.section}] {error.problem}"
        written = "<=" if error.option in (None, MACRO) else f"{error.option} ="
        return f"{source}: [{error.section}] {written} {key.value!r}: {error.problem}"

    def _section(self, name: str) -> _Options:
        options = self._options.get(name)
        if options is not None:
            return options
        raw = self.annotated.get(name)
        if raw is None:
            raise KeyError(name)
        options = self._options[name] = _Options(self, name, raw)
        options.initialize()
        return options


class _Options:
    """One section being read (zc.buildout's Options without the recipe)."""

    def __init__(self, config: Config, name: str, raw: Section) -> None:
        self.config, self.name = config, name
        self.keys_annotated = raw
        self.raw = {option: key.value for option, key in raw.items()}
        self.cooked: dict[str, str] = {}
        self.data: dict[str, str] = {}

    def extended(self) -> Section:
        return self._extended(self.name, self.keys_annotated, [])

    def initialize(self) -> None:
        if MACRO in self.raw:
            self.keys_annotated = self.extended()
            self.raw = {option: key.value for option, key in self.keys_annotated.items()}
        for option, value in sorted(self.raw.items()):
            if "${" in value:
                seen = [(self.name, option)]
                self.cooked[option] = "$$".join(self._substituted(piece, seen, option)
                                                for piece in value.split("$$"))
        if self.name == "buildout":
            return
        for dependency in (self.get(DEPENDENCIES) or "").split():
            self._other(dependency, DEPENDENCIES)

    def _extended(self, name: str, data: Section, doing: list[str]) -> Section:
        if name == "buildout" or MACRO not in data:
            return data
        if name in doing:
            raise Unresolved(self.name, MACRO, f"circular section extension: {' <= '.join((*doing, name))}")
        result: Section = {}
        for base in data[MACRO].value.split("\n"):
            base = base.strip()
            if not base:
                continue
            raw = self.config.annotated.get(base)
            if raw is None:
                raise Unresolved(self.name, MACRO, f"no section [{base}]")
            result.update(self._extended(base, raw, [*doing, name]))
        result = update_section(result, data)
        result.pop(MACRO, None)
        return result

    def option_names(self) -> list[str]:
        return [*self.raw, *(option for option in self.data if option not in self.raw)]

    def item(self, option: str) -> str:
        if option in self.data:
            return self.data[option]
        value = self.get(option)
        assert value is not None
        return value

    def get(self, option: str, seen: list[tuple[str, str]] | None = None) -> str | None:
        if option in self.data:
            return self.data[option]
        value = self.cooked.get(option)
        if value is None:
            value = self.raw.get(option)
            if value is None:
                return None
        if "${" in value:
            key = (self.name, option)
            if seen is None:
                seen = [key]
            elif key in seen:
                chain = " -> ".join(f"${{{s}:{o}}}" for s, o in (*seen, key))
                raise Unresolved(seen[0][0], seen[0][1], f"circular reference: {chain}")
            else:
                seen.append(key)
            value = "$$".join(self._substituted(piece, seen, option) for piece in value.split("$$"))
            seen.pop()
        self.data[option] = value
        return value

    def _substituted(self, template: str, seen: list[tuple[str, str]], option: str) -> str:
        pieces = _TEMPLATE_SPLIT.split(template)
        return "".join(self._pieces(pieces, seen, option))

    def _pieces(self, pieces: list[str], seen: list[tuple[str, str]], option: str) -> Iterator[str]:
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                yield piece
                continue
            yield self._reference(piece, seen, option)

    def _reference(self, written: str, seen: list[tuple[str, str]], option: str) -> str:
        names = written[2:-1].split(":")
        reference = written.replace("\n", "\\n")  # shown on one line
        if not _VALID.match(written):
            if len(names) != 2:
                problem = "has no colon" if len(names) < 2 else "has too many colons"
                hint = f"; write ${{:{names[0]}}} for this section's option" if len(names) < 2 else ""
                raise Unresolved(self.name, option, f"substitution {reference} {problem}{hint}")
            which = "section" if not _SIMPLE.match(names[0]) else "option"
            raise Unresolved(self.name, option, f"the {which} name in substitution {reference} "
                                                "has invalid characters")
        section, name = names
        target = self._other(section or self.name, option)
        value = target.get(name, seen)
        if value is None:
            if name == SECTION_NAME:
                return self.name
            raise Unresolved(self.name, option, f"substitution {reference}: no option {name!r} "
                                                f"in [{section or self.name}]")
        return value

    def _other(self, section: str, option: str) -> _Options:
        try:
            return self.config._section(section)
        except KeyError:
            raise Unresolved(self.name, option, f"no section [{section}]") from None


def references(value: str) -> Iterator[tuple[str, str]]:
    """The (section, option) pairs a value substitutes (section '' for its own)."""
    for piece in value.split("$$"):
        for match in REFERENCE.finditer(piece):
            yield match.group(1), match.group(2)
