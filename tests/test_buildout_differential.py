"""kvmtasks reads every config of a corpus as zc.buildout 6.0.1 does: same options, or both refuse.

How the comparison is made (see tests/buildout_reference.py): each config is
written to a fresh folder as ``buildout.cfg`` (with the files it extends
beside it, or served by tests/httpserver.py on 127.0.0.1), then read

- by zc.buildout itself: ``Buildout(path, [], use_user_defaults=False)``, then
  ``buildout[part]`` for each part, with ``Options.initialize`` (which would
  install and load the part's recipe) replaced by a no-op for the read; each
  option is ``options[name]``, what a recipe is handed;
- by kvmtasks: ``read_config(path, folder)`` and ``Config.section(part)``, the
  strings kvmtasks' option parsers are handed.

Both give ``{part: {option: value}}``, compared whole (every option of every
part, helper options and ``recipe`` included), or a refusal: the test passes
when the two mappings are equal or both readers refuse. The only other
outcome allowed is a refusal by kvmtasks of what zc.buildout silently
misreads, listed in README's syntax table (``name+=`` without a space in a
section's first file, which buildout reads as an option ``nam``).

The corpus: hand-written corner cases (below), each value shape read in
four places (a section, through ``<=``, through ``extends``, in a conditional
section), and hypothesis-generated configs (extends chains, ``<=`` macros,
``+=``/``-=``, substitutions, ``$$``, white space, comment lines, conditional
sections) drawn from a fixed seed, so every run compares the same configs.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.buildout_reference import Refused, buildout_parts, kvmtasks_parts
from tests.httpserver import FileServer

SAME, BOTH_REFUSE, KVMTASKS_REFUSES = "same", "both refuse", "kvmtasks refuses"


@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, str]  # name -> text; "buildout.cfg" is the one read
    parts: tuple[str, ...] = ("vm",)
    expect: str = SAME


def compare(folder: Path, files: dict[str, str], parts: tuple[str, ...]) -> tuple[object, object]:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    config = folder / "buildout.cfg"
    return buildout_parts(config, list(parts)), kvmtasks_parts(config, list(parts))


def check(reference: object, ours: object, expect: str) -> None:
    """Whole-config outcomes: kvmtasks refusing what buildout misreads, both refusing, or the same."""
    if expect == KVMTASKS_REFUSES:
        assert not _refuses(reference) and _refuses(ours), (reference, ours)
    elif _refuses(reference) or _refuses(ours):
        assert _refuses(reference) and _refuses(ours), (reference, ours)
        assert expect == BOTH_REFUSE, (reference, ours)
    else:
        assert ours == reference
        assert expect == SAME


def _refuses(outcome: object) -> bool:
    """The config, or one of its parts, is refused."""
    return isinstance(outcome, Refused) or (
        isinstance(outcome, dict) and any(isinstance(part, Refused) for part in outcome.values()))


def agree(reference: object, ours: object) -> tuple[int, int]:
    """Part by part: (parts read the same, parts both refused); anything else fails."""
    if isinstance(reference, Refused) or isinstance(ours, Refused):
        assert isinstance(reference, Refused) and isinstance(ours, Refused), (reference, ours)
        return 0, 1
    assert isinstance(reference, dict) and isinstance(ours, dict)
    same = refused = 0
    for part, options in reference.items():
        if isinstance(options, Refused) or isinstance(ours[part], Refused):
            both = isinstance(options, Refused) and isinstance(ours[part], Refused)
            assert both, (part, options, ours[part])
            refused += 1
        else:
            assert ours[part] == options, part
            same += 1
    return same, refused


def one(text: str, parts: tuple[str, ...] = ("vm",), expect: str = SAME, id: str = "") -> Case:
    return Case(id or text[:40], {"buildout.cfg": text}, parts, expect)


IMAGE = "image = http://127.0.0.1:9/disk.img\n"

HAND_WRITTEN = [
    # -- lines, blanks and comments inside values
    one("[vm]\nkvm_extra_args =\n  -a\n\n  -b\n", id="blank line in a block value"),
    one("[vm]\nkvm_extra_args = -a\n\n  -b\n", id="blank line after a first-line value"),
    one("[vm]\nkvm_extra_args =\n  -a\n# comment\n  -b\n", id="comment line between lines"),
    one("[vm]\nkvm_extra_args =\n  -a\n; comment\n  -b\n", id="semicolon comment between lines"),
    one("[vm]\nkvm_extra_args =\n  -a\n  # indented is a line\n  -b\n", id="indented hash is a line"),
    one("[vm]\nkvm_extra_args =\n    -a\n      -b\n    -c\n", id="relative indentation kept"),
    one("[vm]\nkvm_extra_args = -a\n    -b\n      -c\n", id="first-line value strips lines"),
    one("[vm]\nkvm_extra_args =\n\n\n  -a\n", id="leading blank lines dropped"),
    one("[vm]\nkvm_extra_args =\n  -a\n\n\n", id="trailing blank lines dropped"),
    one("[vm]\nkvm_extra_args =   \n\t-a\n\t-b\n", id="tabs"),
    one("[vm]\nkvm_extra_args =\n  -a  \n  -b\t\n", id="trailing blanks"),
    one("[vm]\nkvm_memory=1G\nkvm_smp   =    2\n", id="spacing around ="),
    one("[vm]\nkvm_memory = 1G # not a comment\n", id="inline hash is value"),
    one("[vm]\nkvm_memory = 1G ; not a comment\n", id="inline semicolon is value"),
    one("# leading comment\n\n[vm]\nkvm_memory = 1G\n", id="comment before any section"),
    one("\n\n[vm]\n\n\nkvm_memory = 1G\n", id="blank lines around"),
    one("[vm] # comment\nkvm_memory = 1G\n", id="comment after header"),
    one("[vm] ; comment\nkvm_memory = 1G\n", id="semicolon comment after header"),
    one("[ vm ]\nkvm_memory = 1G\n", id="spaces inside header"),
    one("[vm]\nkvm_memory = 1G\n[vm]\nkvm_smp = 2\n", id="section twice in a file"),
    one("[vm]\nkvm_memory = 1G\nkvm_memory = 2G\n", id="option twice in a section"),
    one("[vm]\nkvm_memory = \n", id="empty value"),
    one("[vm]\nkvm_memory: 1G\n", expect=BOTH_REFUSE, id="colon separator"),
    one("kvm_memory = 1G\n[vm]\n", expect=BOTH_REFUSE, id="option before section"),
    one("[vm]\n  -a\n", expect=BOTH_REFUSE, id="continuation without option"),
    one("[my vm]\nkvm_memory = 1G\n", parts=("my",), expect=BOTH_REFUSE, id="space in section name"),
    one("[vm]\nnot an option\n", expect=BOTH_REFUSE, id="junk line"),
    one("[vm]\nkvm_memory = 1G\r\nkvm_smp = 2\r\n", id="CRLF line endings"),
    one("[vm]\nkvm_extra_args = a\x1eb\x0bc\n", id="other line separators are text"),
    one("[vm]\n=> other\n[other]\nx = 1\n", id="part dependencies"),
    one("[vm]\n=> ghost\n", expect=BOTH_REFUSE, id="part dependency missing"),
    # -- substitutions
    one("[vm]\nmem = 1G\nkvm_memory = ${:mem}\n", id="same-section reference"),
    one("[vm]\nkvm_memory = ${sizes:big}\n[sizes]\nbig = 4G\n", id="other-section reference"),
    one("[vm]\nkvm_memory = ${mem}\nmem = 1G\n", expect=BOTH_REFUSE, id="reference without colon"),
    one("[vm]\nkvm_memory = ${a:b:c}\n", expect=BOTH_REFUSE, id="too many colons"),
    one("[vm]\nkvm_memory = ${:}\n", expect=BOTH_REFUSE, id="empty reference"),
    one("[vm]\nkvm_memory = ${:a/b}\n", expect=BOTH_REFUSE, id="invalid option characters"),
    one("[vm]\nkvm_memory = ${a/b:c}\n", expect=BOTH_REFUSE, id="invalid section characters"),
    one("[vm]\nkvm_memory = ${:nothing}\n", expect=BOTH_REFUSE, id="missing option"),
    one("[vm]\nkvm_memory = ${ghost:x}\n", expect=BOTH_REFUSE, id="missing section"),
    one("[vm]\nkvm_memory = x${:kvm_smp\nkvm_smp = 1\n", id="unclosed reference is text"),
    one("[vm]\na = ${:b}\nb = ${:a}\n", expect=BOTH_REFUSE, id="circular reference"),
    one("[vm]\na = ${o:b}\n[o]\nb = ${vm:a}\n", expect=BOTH_REFUSE, id="circular across sections"),
    one("[vm]\na = ${:a}\n", expect=BOTH_REFUSE, id="self reference"),
    one("[vm]\nx = ${:_buildout_section_name_}\n", id="section name"),
    one("[vm]\nx = ${other:_buildout_section_name_}\n[other]\n", id="section name of another"),
    one("[tpl]\nx = ${:_buildout_section_name_}\n[vm]\n<= tpl\n", id="section name through a macro"),
    one("[vm]\nx = $$\ny = a$$b\nz = $${:x}\n", id="double dollar kept"),
    one("[vm]\nx = $$${:y}\ny = 1\n", id="dollars before a reference"),
    one("[vm]\nx = $${:y}$$\ny = 1\n", id="escaped reference"),
    one("[vm]\nx = $\ny = a$b$\nz = $$$\n", id="lone dollars"),
    one("[vm]\nx = ${:y}\ny = $${:z}\n", id="an escaped reference through a reference"),
    one("[vm]\nx = ${:y}{vm:z}\ny = $\nz = 1\n", id="a dollar joined to braces"),
    one("[vm]\nx = ${buildout:directory}/a\n", id="buildout directory"),
    one("[vm]\nx = ${buildout:parts-directory} ${buildout:bin-directory}\n", id="buildout folders"),
    one("[buildout]\nparts-directory = p\nbin-directory = ${:directory}/b\n[vm]\n"
        "x = ${buildout:parts-directory} ${buildout:bin-directory}\n", id="buildout folders moved"),
    one("[vm]\nx = ${ vm :y}\ny = 1\n", expect=BOTH_REFUSE, id="spaces in a reference"),
    one("[vm]\nx = ${:y\n  z}\n", expect=BOTH_REFUSE, id="reference across lines"),
    one("[vm]\nx =\n  ${:y}\n  ${:y}\ny = 1\n", id="references on several lines"),
    one("[vm]\nx = ${:bad}\n[other]\ny = 1\n", parts=("other",), id="unread section's bad reference"),
    # -- macros
    one("[tpl]\nkvm_memory = 1G\nkvm_smp = 2\n[vm]\n<= tpl\nkvm_smp = 3\n", id="macro"),
    one("[a]\nx = 1\n[b]\ny = 2\nx = 3\n[vm]\n<= a\n  b\n", id="two macros"),
    one("[a]\nx = 1\n[b]\n<= a\ny = 2\n[vm]\n<= b\n", id="macro chain"),
    one("[vm]\n<= ghost\n", expect=BOTH_REFUSE, id="missing macro"),
    one("[vm]\n<= vm\n", expect=BOTH_REFUSE, id="macro of itself"),
    one("[a]\n<= b\n[b]\n<= a\n[vm]\n<= a\n", expect=BOTH_REFUSE, id="macro loop"),
    one("[tpl]\nx = ${:y}\n[vm]\n<= tpl\ny = 1\n", id="macro reference read in the user"),
    one("[tpl]\nx =\n  a\n  b\n[vm]\n<= tpl\nx += c\nx -= a\n", id="macro with add and remove"),
    one("[tpl]\nx = a\n[vm]\nx += b\n<= tpl\n", id="add before the macro line"),
    one("[tpl]\nx = a\n[vm]\n<=\n  tpl\n\n", id="macro on its own line"),
    one("[buildout]\n<= vm\n[vm]\nx = 1\n", id="macro in buildout ignored"),
    # -- += and -=
    one("[vm]\nx = a\nx += b\n", id="add in the same section"),
    one("[vm]\nx = a\n  b\nx -= a\n", id="remove in the same section"),
    one("[vm]\nx += a\nx -= a\n", id="add and remove without a value"),
    one("[vm]\nx -= a\n", id="remove from nothing"),
    one("[vm]\nx += a\n", id="add to nothing"),
    one("[vm]\nx += a\nx += b\n", id="two adds"),
    one("[vm]\nx += a\nx = b\n", id="assignment after add"),
    one("[vm]\nx -= a\nx = a\n  b\nx += c\n", id="remove then assign then add"),
    one("[vm]\nx = a\nx +=\n  b\n\n  c\n", id="add a block"),
    one("[vm]\nx =\n  a\n   b\nx -= b\n", id="remove compares whole lines"),
    one("[vm]\nxy+= a\n", expect=KVMTASKS_REFUSES, id="add without a space"),
    one("[vm]\nx+= a\n", expect=BOTH_REFUSE, id="one-letter add without a space"),
    one("[vm]\nxy = 1\nxy+= a\n", expect=KVMTASKS_REFUSES, id="add without a space to a value"),
    one("[vm]\nx = 1\n[vm:windows]\ny = 2\n  3\n[vm:linux]\n  4\n", expect=BOTH_REFUSE,
        id="continuation right after a true header"),
    one("[vm]\nx-= a\n", expect=BOTH_REFUSE, id="one-letter remove without a space"),
    one("[vm]\n+= a\n", expect=BOTH_REFUSE, id="add without a name"),
    # -- conditional sections
    one("[vm]\nkvm_smp = 1\n[vm:linux]\nkvm_smp = 2\n", id="linux"),
    one("[vm]\nkvm_smp = 1\n[vm:windows]\nkvm_smp = 2\n", id="windows"),
    one("[vm:sys.platform.startswith('linux')]\nx = 1\n", id="sys.platform"),
    one("[vm:python3 and not python2]\nx = 1\n", id="python flags"),
    one("[vm:python311 or python312 or python313]\nx = 1\n", id="minor versions"),
    one("[vm:bits64 and little_endian and posix]\nx = 1\n", id="bits and endianness"),
    one("[vm:cpython and not pypy]\nx = 1\n", id="interpreter"),
    one("[vm:os.name == 'posix']\nx = 1\n", id="os.name"),
    one("[vm:platform.machine() in ('x86_64', 'aarch64')]\nx = 1\n", id="platform.machine"),
    one("[vm:re.match('lin', sys.platform)]\nx = 1\n", id="re.match"),
    one("[vm:sys.version_info >= (3, 8)]\nx = 1\n", id="version_info"),
    one("[vm:sys.version_info[0] == 2]\nx = 1\n", parts=("vm",), expect=BOTH_REFUSE,
        id="false section is no section"),
    one("[vm:python_version >= \"3.8\"]\nx = 1\n", id="marker"),
    one("[vm:python_version < \"3.8\" or sys_platform == \"linux\"]\nx = 1\n", id="marker or"),
    one("[vm:platform_system == \"Linux\" and os_name == \"posix\"]\nx = 1\n", id="marker and"),
    one("[vm:python_version == \"3.*\"]\nx = 1\n", id="marker wildcard"),
    one("[vm]\nx = 1\n[vm:linux] # comment\nx += 2\n", id="condition with comment"),
    one("[vm]\nx = 1\n[vm:linux]\nx += 2\n[vm:linux]\nx += 3\n", id="two adds in conditions"),
    one("[vm]\nx = 1\n[vm:windows]\nx += 2\n  3\n", id="false condition skips continuation"),
    one("[vm:linux]\nx = 1\n[vm:not linux]\nx = 2\n", id="either branch"),
    one("[vm:len('\\x23\\x3b') == 2]\nx = 1\n", id="escaped hash and semicolon"),
    one("[vm:'linux' in sys_platform]\nx = 1\n", id="marker string in variable"),
    one("[vm:'a' == 'a']\nx = 1\n", expect=BOTH_REFUSE, id="marker of two strings"),
    one("[vm:undefined_name]\nx = 1\n", expect=BOTH_REFUSE, id="unknown name"),
    one("[vm:linux and (]\nx = 1\n", expect=BOTH_REFUSE, id="syntax error"),
    # -- extends
    Case("extends", {"base.cfg": "[vm]\nx = 1\ny = 2\n",
                     "buildout.cfg": "[buildout]\nextends = base.cfg\n[vm]\ny = 3\n"}),
    Case("extends chain", {"a.cfg": "[vm]\nx = a\n", "b.cfg": "[buildout]\nextends = a.cfg\n[vm]\nx += b\n",
                           "buildout.cfg": "[buildout]\nextends = b.cfg\n[vm]\nx += c\n"}),
    Case("extends two", {"a.cfg": "[vm]\nx = a\ny = a\n", "b.cfg": "[vm]\nx = b\n",
                         "buildout.cfg": "[buildout]\nextends = a.cfg b.cfg\n[vm]\ny -= a\n"}),
    Case("extends subfolder", {"sub/a.cfg": "[buildout]\nextends = b.cfg\n[vm]\nx += a\n",
                               "sub/b.cfg": "[vm]\nx = b\n",
                               "buildout.cfg": "[buildout]\nextends = sub/a.cfg\n"}),
    Case("extends missing", {"buildout.cfg": "[buildout]\nextends = nothing.cfg\n[vm]\n"},
         expect=BOTH_REFUSE),
    Case("extends loop", {"a.cfg": "[buildout]\nextends = buildout.cfg\n",
                          "buildout.cfg": "[buildout]\nextends = a.cfg\n[vm]\n"}, expect=BOTH_REFUSE),
    Case("extends and macro", {"base.cfg": "[tpl]\nx = a\n[vm]\n<= tpl\n",
                               "buildout.cfg": "[buildout]\nextends = base.cfg\n[vm]\nx += b\n"}),
    Case("extends with remove first", {"base.cfg": "[vm]\nx = a\n  b\n",
                                       "buildout.cfg": "[buildout]\nextends = base.cfg\n"
                                                       "[vm]\nx -= a\nx += c\n"}),
    Case("extends a section added by the extending file",
         {"base.cfg": "[other]\nx = 1\n", "buildout.cfg": "[buildout]\nextends = base.cfg\n[vm]\nx += 2\n"}),
    Case("extended macro user", {"base.cfg": "[tpl]\nx = a\n",
                                 "buildout.cfg": "[buildout]\nextends = base.cfg\n[vm]\n<= tpl\nx += b\n"}),
    Case("extends conditional", {"base.cfg": "[vm:linux]\nx = a\n",
                                 "buildout.cfg": "[buildout]\nextends = base.cfg\n[vm:linux]\nx += b\n"}),
    Case("parts listed", {"buildout.cfg": "[buildout]\nparts = vm other\n[vm]\nx = ${other:y}\n"
                                          "[other]\ny = 1\n"}, parts=("vm", "other")),
]

# Each value shape, read in four places: a section, a macro's user, a file extending another,
# a conditional section.
SHAPES = {
    "plain": "x = a b  c",
    "block": "x =\n  a\n\n  b\n# c\n  d",
    "stripped": "x = a\n  b\n\n   c",
    "reference": "x = ${:y}-${:_buildout_section_name_}\ny = 1",
    "dollars": "x = $$a $${:y} $ ${:y}$$\ny = 2",
    "add": "x = a\nx += b\n  c",
    "remove": "x =\n  a\n  b\nx -= a",
    "add remove": "x += a\nx -= b",
    "unclosed": "x = ${:y",
    "bad reference": "x = ${:nothing}",
}


def _placed(shape: str, place: str) -> Case:
    body = SHAPES[shape]
    bad = shape == "bad reference"
    files = {
        "section": {"buildout.cfg": f"[vm]\n{body}\n"},
        "macro": {"buildout.cfg": f"[tpl]\n{body}\n[vm]\n<= tpl\n"},
        "extends": {"base.cfg": "[vm]\nx = base\ny = base\n",
                    "buildout.cfg": f"[buildout]\nextends = base.cfg\n[vm]\n{body}\n"},
        "conditional": {"buildout.cfg": f"[vm]\nx = first\n[vm:linux]\n{body}\n"},
    }[place]
    return Case(f"{shape} in {place}", files, expect=BOTH_REFUSE if bad else SAME)


PLACES = ("section", "macro", "extends", "conditional")
PLACED = [_placed(shape, place) for shape in SHAPES for place in PLACES]


@pytest.mark.parametrize("case", HAND_WRITTEN + PLACED, ids=lambda case: case.id)
def test_a_hand_written_config_reads_as_buildout_reads_it(case: Case, tmp_path: Path) -> None:
    check(*compare(tmp_path, case.files, case.parts), case.expect)


def test_the_hand_written_corpus_is_large() -> None:
    assert len(HAND_WRITTEN) + len(PLACED) >= 150


# -- generated configs --------------------------------------------------------------------------

SECTIONS = ("vm", "tpl", "other")
OPTIONS = ("x", "y", "kvm_extra_args")
LITERALS = st.sampled_from(["a", "b", "-S", "1G", "a b", "#", ";", "$", "$$", "$${:x}", "${:", " "])
REFERENCES = st.sampled_from(["${:y}", "${tpl:x}", "${other:y}", "${vm:kvm_extra_args}",
                              "${:_buildout_section_name_}", "${buildout:directory}", "${:nothing}", "${:x}"])
WORDS = st.one_of(LITERALS, LITERALS, LITERALS, REFERENCES)
HEADERS = {"plain": "[{}]", "spaced": "[ {} ]", "commented": "[{}] # note", "true": "[{}:linux]",
           "false": "[{}:windows]", "marker": '[{}:python_version >= "3.8"]',
           "python": "[{}:sys.platform.startswith('linux')] ; note"}


@st.composite
def values(draw: st.DrawFn) -> str:
    lines = draw(st.lists(st.lists(WORDS, min_size=1, max_size=3).map("".join), min_size=1, max_size=3))
    block = draw(st.booleans())
    indent = draw(st.sampled_from(["  ", "\t", "    "]))
    between = draw(st.sampled_from(["", "\n", f"\n{indent}\n", "\n# comment\n", f"\n{indent}# line\n"]))
    rest = "".join(f"{between.rstrip(chr(10)) + chord}{indent}{line}" for line in lines[1:]
                   for chord in ["\n"])
    trailing = draw(st.sampled_from(["", " ", "\t"]))
    if block:
        return "\n" + "".join(f"{indent}{line}{trailing}\n" for line in lines).rstrip("\n") + rest
    return f" {lines[0]}{trailing}{rest}"


@st.composite
def sections(draw: st.DrawFn, name: str, first: bool) -> str:
    # A file's first section is unconditional: a false one would leave its options without one.
    header = "[{}]" if first else HEADERS[draw(st.sampled_from(list(HEADERS)))]
    lines = [header.format(name)]
    if name != "tpl" and draw(st.booleans()):
        bases = draw(st.lists(st.sampled_from([s for s in SECTIONS if s != name]), min_size=1, max_size=2))
        lines.append("<= " + "\n   ".join(bases) if draw(st.booleans()) else "<=\n  " + "\n  ".join(bases))
    for _ in range(draw(st.integers(0, 4))):
        option = draw(st.sampled_from(OPTIONS))
        operator = draw(st.sampled_from(["=", "+=", "-=", " = ", "="]))
        lines.append(f"{option} {operator.strip()}{draw(values())}")
    return "\n".join(lines) + "\n"


# The deepest file sets what most references name, so that most parts are read, not refused.
BASE = "[tpl]\nx = t\ny = u\n[other]\ny = o\n[vm]\ny = v\n"


@st.composite
def configs(draw: st.DrawFn) -> dict[str, str]:
    count = draw(st.integers(1, 3))  # buildout.cfg extends base1.cfg, which extends base2.cfg ...
    files: dict[str, str] = {}
    for index in range(count):
        name = "buildout.cfg" if index == 0 else f"base{index}.cfg"
        text = f"[buildout]\nextends = base{index + 1}.cfg\n" if index < count - 1 else BASE
        chosen = draw(st.lists(st.sampled_from(SECTIONS), min_size=1, max_size=4))
        text += "".join(draw(sections(section, number == 0)) for number, section in enumerate(chosen))
        files[name] = text
    return files


def test_generated_configs_read_as_buildout_reads_them() -> None:
    counts = {"configs": 0, "parts read the same": 0, "parts both refused": 0}

    @settings(max_examples=400, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(configs())
    def compare_one(files: dict[str, str]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            named = [name for name in SECTIONS if any(f"[{name}" in text for text in files.values())]
            reference, ours = compare(Path(folder), files, tuple(named))
        same, refused = agree(reference, ours)
        counts["configs"] += 1
        counts["parts read the same"] += same
        counts["parts both refused"] += refused

    compare_one()
    print(f"generated: {counts}")
    assert counts["configs"] >= 300
    assert counts["parts read the same"] >= 300  # most parts are read, not refused
    assert counts["parts both refused"] >= 30


# -- extends over HTTP --------------------------------------------------------------------------

def test_extends_of_a_url_resolves_relative_extends_against_it(tmp_path: Path,
                                                               http_server: FileServer) -> None:
    http_server.put("/configs/base.cfg", b"[buildout]\nextends = common/first.cfg\n[vm]\nx += base\n")
    http_server.put("/configs/common/first.cfg", b"[vm]\nx = first\ny = ${:x}\n")
    root = f"[buildout]\nextends = {http_server.url('/configs/base.cfg')}\n[vm]\nx += root\n"

    reference, ours = compare(tmp_path, {"buildout.cfg": root}, ("vm",))

    assert ours == reference == {"vm": {"x": "first\nbase\nroot", "y": "first\nbase\nroot"}}


def test_an_extends_cache_filled_by_one_reader_serves_the_other_offline(tmp_path: Path,
                                                                        http_server: FileServer) -> None:
    http_server.put("/configs/base.cfg", b"[vm]\nx = cached\n")
    (tmp_path / "cache").mkdir()
    online = (f"[buildout]\nextends-cache = cache\nextends = {http_server.url('/configs/base.cfg')}\n"
              "[vm]\nx += here\n")
    assert compare(tmp_path, {"buildout.cfg": online}, ("vm",))[1] == {"vm": {"x": "cached\nhere"}}
    http_server.put("/configs/base.cfg", b"[vm]\nx = changed\n")

    offline = online.replace("[vm]", "offline = true\n[vm]")
    reference, ours = compare(tmp_path, {"buildout.cfg": offline}, ("vm",))

    assert ours == reference == {"vm": {"x": "cached\nhere"}}


ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {path.name: path.read_text() for path in sorted((ROOT / "configs" / "examples").glob("*.cfg"))}
SHIPPED.update({f"README block {number}": block for number, block in enumerate(
    re.findall(r"```ini\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL), start=1)})


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_examples_read_as_buildout_reads_them(name: str, tmp_path: Path) -> None:
    text = SHIPPED[name]
    listed = re.search(r"^parts = (.*)$", text, re.MULTILINE)
    parts = tuple(listed.group(1).split()) if listed else tuple(
        line[1:-1] for line in text.splitlines() if line.startswith("[") and line != "[buildout]")

    reference, ours = compare(tmp_path, {"buildout.cfg": text}, parts)

    assert not _refuses(ours) and ours == reference


def test_a_section_expression_gets_the_names_buildout_gives_it() -> None:
    import zc.buildout.buildout as zc_buildout

    from kvmtasks.config.conditions import default_globals

    assert default_globals() == zc_buildout._default_globals()


def test_a_marker_sees_the_environment_packaging_gives_buildout() -> None:
    from packaging.markers import default_environment

    from kvmtasks.config.conditions import _environment

    assert _environment() == default_environment()
