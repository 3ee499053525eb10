"""One buildout config file's lines into raw sections, as zc.buildout's own parser reads them.

zc.buildout does not use Python's configparser; its rules, kept here line for line:

- a line starting with ``#`` or ``;`` (in column 0) is a comment, wherever it is;
- a line starting with white space continues the current option's value; a blank
  line never ends a value. When the option's first line is empty (the value
  starts on the next line) the continuation lines keep their indentation (the
  block is dedented at the end) and blank lines inside it stay; otherwise each
  line is stripped and blank ones are dropped;
- ``name = value`` only (``:`` is no separator); ``name +=`` / ``name -=`` are
  kept as the options ``name +`` / ``name -`` for the merge to apply; an ``=``
  after them in the same section replaces them;
- ``=> a b`` is the option ``<part-dependencies>``;
- ``[name]`` or ``[name:EXPRESSION]`` (the section is read only when the
  expression is true); a section named twice in a file is one section.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator

from kvmtasks.errors import ConfigError

RawSections = dict[str, dict[str, str]]

_SECTION_HEADER = re.compile(
    r"(?P<head>\[)\s*(?P<name>[^\s#[\]:;{}]+)\s*(:(?P<expression>[^#;]*))?\s*(?P<tail>]\s*([#;].*)?$)"
)
_OPTION_START = re.compile(r"(?P<name>[^\s{}[\]=:]+\s*[-+]?)=(?P<value>.*)$")
_LEADING_BLANK_LINES = re.compile(r"^(\s*\n)+")
DEPENDENCIES = "<part-dependencies>"


def parse(text: str, source: str) -> RawSections:
    """The sections of one file; source names it in errors (a path or a URL)."""
    sections: RawSections = {}
    current: dict[str, str] | None = None
    option: str | None = None
    block = False
    included = True  # the current section's expression held
    for number, line in enumerate(_lines(text), start=1):
        if line[0] in "#;":
            continue
        if line[0].isspace() and current is not None and option:
            if not included:
                continue
            if block:
                line = line.rstrip()
            else:
                line = line.strip()
                if not line:
                    continue
            current[option] = f"{current[option]}\n{line}"
            continue
        header = _SECTION_HEADER.match(line)
        if header:
            name, expression = header.group("name"), header.group("expression")
            # A false section is skipped whole, its lines too; buildout keeps the option before
            # it as the current one meanwhile.
            included = not expression or _holds(expression, name, source)
            if included:
                current, option = sections.setdefault(name, {}), None
            continue
        if line.startswith("["):
            raise ConfigError(f"{source}: line {number}: {line.rstrip()!r}: not a [section] header (a "
                              "section name has no white space nor any of # ; : [ ] { })")
        if current is None:
            if not line.strip():
                continue
            raise ConfigError(f"{source}: line {number}: {line.rstrip()!r}: an option before any [section]")
        if line[:2] == "=>":
            line = f"{DEPENDENCIES} = {line[2:]}"
        start = _OPTION_START.match(line)
        if start:
            if not included:
                continue
            name, value = start.group("name").rstrip(), start.group("value").strip()
            if name in ("+", "-"):
                raise ConfigError(f"{source}: [{_name(current, sections)}] {name}= {value!r}: "
                                  f"{name}= needs an option name")
            operator = name[-1] if name[-1] in "+-" else "="
            if name in current and operator in "+-":
                current[name] = current[name].rstrip()
                if value:
                    current[name] = f"{current[name]}\n{value}"
            else:
                if operator == "=":
                    for suffix in "+-":
                        current.pop(f"{name} {suffix}", None)
                current[name] = value
            option, block = name, not value
        elif option or line.strip():
            raise ConfigError(f"{source}: line {number}: {line.rstrip()!r}: not 'option = value', "
                              "a [section] header, a comment or an indented continuation")
    for options in sections.values():
        for name, value in options.items():
            if value[:1].isspace():
                options[name] = _LEADING_BLANK_LINES.sub("", textwrap.dedent(value.rstrip()))
    return sections


def _lines(text: str) -> Iterator[str]:
    """The lines as a file's readline gives them: split at newlines only."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _name(current: dict[str, str], sections: RawSections) -> str:
    return next(name for name, options in sections.items() if options is current)


def _holds(expression: str, section: str, source: str) -> bool:
    # Imported here: most configs have no conditional section, and the no-op run stays fast.
    from kvmtasks.config import conditions

    # buildout's escapes for the two characters that would end the header.
    expression = expression.replace(r"\x23", "#").replace(r"\x3b", ";")
    try:
        return conditions.evaluate(expression)
    except conditions.Refused as error:
        raise ConfigError(f"{source}: [{section}:{expression.strip()}]: {error}") from None
