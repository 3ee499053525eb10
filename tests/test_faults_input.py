"""Bad input: any config text parses or is one line naming file, [section] and option; path
options aimed at files the user owns never lose a byte, and `doit clean` removes only what
kvmtasks wrote.
"""

from __future__ import annotations

import gzip
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmtasks.config import partjson
from kvmtasks.config.loader import PART_NAME, load_file
from kvmtasks.config.options import OPTIONS, OPTIONS_BY_NAME, Option
from kvmtasks.engines.qemu.argv import qemu_argv
from kvmtasks.errors import ConfigError, KvmTasksError
from kvmtasks.guest import ssh
from kvmtasks.scripts import render
from tests.conftest import REPO_ROOT, Project
from tests.httpserver import FileServer
from tests.reliability import Recorder
from tests.test_config import ini_value
from tests.test_provision_pipeline import assert_ok, assert_one_line_error, md5, part, payload

IMAGE = "http://127.0.0.1:9/images/disk.img"
# Where an injected command would leave its mark; nothing may ever create it.
CANARY = Path(tempfile.gettempdir()) / "kvmtasks-injection-canary"
HOSTILE_VALUES = (
    f"$$(touch {CANARY})", f"`touch {CANARY}`", f"x; touch {CANARY}", f"x && touch {CANARY} #",
    f"-o ProxyCommand=touch {CANARY}", f"--help; touch {CANARY}", "a b", "'\"", "a,b,,c", "é ü 日本",
    "-", "--", "~root/x", "%h %%", "$$HOME", "\\", "${buildout:directory}/x", "/dev/null",
)
HOSTILE_CHARACTERS = " ;$()`'\"\\,=-\t#%~*?[]{}<>|&!é日\u202e\x7f"
hostile_text = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.text(alphabet=st.sampled_from(HOSTILE_CHARACTERS + "ab/:.0123"), max_size=30),
    st.text(max_size=30),
)


@pytest.fixture(autouse=True)
def no_canary() -> Iterator[None]:
    assert not CANARY.exists(), f"{CANARY} exists before the test: an earlier run executed input"
    yield
    assert not CANARY.exists(), f"{CANARY} was created: some input was executed"


def assert_config_error_line(message: str, config: Path, *options: str) -> None:
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{config}: ["), message
    assert any(option in message for option in options), message


# -- any value: a Part, or one line; and a Part's scripts and argv carry values as data -------------

OPTION_NAMES = [option.name for option in OPTIONS]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(st.sampled_from(OPTION_NAMES), hostile_text, min_size=1, max_size=6))
@example(values={"file": f"/tmp/x$$(touch {CANARY})", "ssh_port": "2222",
                 "kvm_run_directory": "/tmp/a b,c'd\"e%h", "ssh_key_path": "/k/$${HOME}"})
@example(values={"kvm_extra_args": f"-o\n  ProxyCommand=touch {CANARY}", "kvm_net": "user,x=`id`"})
def test_several_hostile_options_parse_or_fail_in_one_line_and_stay_data(
    tmp_path: Path, reliability: Recorder, values: dict[str, str]
) -> None:
    reliability.bad_input("config")
    source = "" if {"image", "file"} & set(values) else f"image = {IMAGE}\n"
    body = "".join(f"{name} = {ini_value(text)}\n" for name, text in values.items())
    path = tmp_path / "several.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\n{source}{body}")
    try:
        parts = load_file(path, tmp_path)
    except ConfigError as error:
        assert_config_error_line(str(error), path, *values, "image", "file")
        return
    if not parts:
        assert "recipe" in values  # another recipe: a section that is not a part
        return
    (part_,) = parts
    assert partjson.from_json(partjson.to_json(part_)) == part_
    for kind in render.SCRIPTS:
        compile(render.script_text(part_, kind, render.snapshot_path(part_)), kind, "exec")
    argv = qemu_argv(part_, accel="tcg", disk_format="raw", listen_address="127.0.0.1")
    assert all(isinstance(arg, str) and "\x00" not in arg for arg in argv)
    if part_.kvm_extra_args:
        assert argv[-len(part_.kvm_extra_args):] == list(part_.kvm_extra_args)
    try:
        command = ssh.ssh_argv(part_, ["true"])
    except KvmTasksError:
        return  # no ssh_port, or a path ssh cannot take: refused with a message
    assert command[command.index("--") + 1:] == [part_.name, "true"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(OPTIONS), text=hostile_text)
@example(option=OPTIONS_BY_NAME["ssh_hostname"], text=f"-oProxyCommand=touch {CANARY}")
@example(option=OPTIONS_BY_NAME["ssh_user"], text=f"-oProxyCommand=touch {CANARY}")
@example(option=OPTIONS_BY_NAME["kvm_memory"], text=f"512M; touch {CANARY}")
def test_any_value_through_a_real_doit_list(
    project: Project, reliability: Recorder, option: Option, text: str
) -> None:
    name = option.name
    reliability.bad_input("config-doit")
    source = "" if name in ("image", "file") else f"image = {IMAGE}\n"
    config = project.write(f"[vm]\n{source}{name} = {ini_value(text)}\n")

    run = project.run("list", "--all")

    assert "Traceback" not in run.output, run.describe()
    if run.returncode == 0:
        assert "provision:vm" in run.stdout or name == "recipe", run.describe()  # another recipe: no part
        return
    assert run.returncode == 3, run.describe()
    (line,) = run.stderr.splitlines()
    assert line.startswith("ERROR: "), line
    assert_config_error_line(line.removeprefix("ERROR: "), config, name, "image", "file")


# -- part names -------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(min_size=1, max_size=20),
                      st.text(alphabet=st.sampled_from(HOSTILE_CHARACTERS + "ab.+_-"), min_size=1,
                              max_size=20),
                      st.from_regex(PART_NAME, fullmatch=True)))
@example(name=f"x;touch {CANARY}")
@example(name="-o ProxyCommand=x")
@example(name="_x")
@example(name=".hidden")
@example(name="a,b")
@example(name="\x1e\x1b[2J")
def test_a_part_name_is_made_of_safe_characters_or_is_one_line(
    tmp_path: Path, reliability: Recorder, name: str
) -> None:
    reliability.bad_input("part-name")
    path = tmp_path / "names.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[{name}]\nimage = {IMAGE}\n")
    try:
        parts = load_file(path, tmp_path)
    except ConfigError as error:
        message = str(error)
        assert len(message.splitlines()) == 1, message
        assert message.startswith(f"{path}: "), message
        return
    if not parts:
        return  # [buildout] or [DEFAULT]: not a part
    assert PART_NAME.fullmatch(parts[0].name)
    assert "/" not in parts[0].name and not parts[0].name.startswith(("-", "."))


# zc.buildout's grammar already refuses a section name with white space or ; # : [ ] { }.
@pytest.mark.parametrize(("name", "needle"), [
    (f"x;touch {CANARY}", "]': not a [section] header"),
    (f"$(touch {CANARY})", "]': not a [section] header"),
    ("-o ProxyCommand=x", "]': not a [section] header"),
    ("a b", "]': not a [section] header"),
    ("-oProxyCommand=x", "] part name must be"),
    (f"$(touch$IFS{CANARY})", "] part name must be"),
    (f"`touch$IFS{CANARY}`", "] part name must be"),
])
def test_a_hostile_part_name_stops_doit_with_one_line(
    project: Project, reliability: Recorder, name: str, needle: str
) -> None:
    reliability.bad_input("part-name")
    config = project.write(f"[{name}]\nimage = {IMAGE}\n")  # section names are not interpolated

    run = project.run("list")

    line = assert_one_line_error(run, str(config), f"[{name}{needle}")
    assert line.startswith("ERROR: ")
    assert run.returncode == 3
    assert not (project.root / "bin").exists()


# -- path options aimed at what the user owns ---------------------------------------------------------

def user_files(folder: Path) -> list[Path]:
    files = [folder / "notes.txt", folder / "keep" / "deep.txt", folder / "disk.img.orig"]
    for index, path in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload(1000 + index, seed=index))
    return files


def test_clean_removes_only_what_kvmtasks_wrote(
    project: Project, http_server: FileServer, tmp_path: Path, reliability: Recorder
) -> None:
    location, bins, run = tmp_path / "my images", tmp_path / "my bin", tmp_path / "my var"
    disk = tmp_path / "my disks" / "local.img"
    disk.parent.mkdir()
    disk.write_bytes(payload(4096, seed=9))
    mine = [*user_files(location), *user_files(bins), *user_files(run), disk]
    reliability.keep(*mine)
    raw = payload(100_000)
    url = http_server.put("disk.img.gz", gzip.compress(raw))
    common = f"kvm_bin_directory = {bins}\nkvm_run_directory = {run}\n"
    project.write(f"{part(image=url, gzip='true', location=location)}\n{common}\n"
                  f"[local]\nfile = {disk}\nmd5_image = {md5(disk.read_bytes())}\n{common}")
    assert_ok(project.run("provision:vm", "provision:local"))
    written = [location / "disk.img.gz", location / "disk.img", bins / "vm-ctl", bins / "local-ctl",
               run / "vm" / "part.json", run / "local" / "part.json"]
    assert all(path.exists() for path in written)

    for argv in (["clean"], ["clean", "provision:vm", "provision:local"],
                 ["clean", "download:vm", "decompress:vm", "render:local"], ["clean", "-a"]):
        reliability.bad_input("paths")
        assert_ok(project.run(*argv))
        assert reliability.lost() == 0, argv
        reliability.keep(*mine)

    assert not any(path.exists() for path in written)
    assert location.is_dir() and bins.is_dir() and run.is_dir()
    assert_ok(project.run("provision:vm", "provision:local"))
    assert (location / "disk.img").read_bytes() == raw


def test_a_location_that_is_a_file_is_one_line_and_the_file_is_kept(
    project: Project, tmp_path: Path, reliability: Recorder
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"the user's own file\n")
    reliability.keep(precious)
    reliability.bad_input("paths")
    project.write(part(image=IMAGE, location=precious))

    run = project.provision()

    assert_one_line_error(run, "download:vm:", f"location = '{precious}' is not a folder")
    assert reliability.lost() == 0


@pytest.mark.parametrize("kind", ["folder", "missing"])
def test_a_file_that_is_a_folder_or_missing_is_one_line(
    project: Project, tmp_path: Path, reliability: Recorder, kind: str
) -> None:
    target = tmp_path / "a folder"
    if kind == "folder":
        target.mkdir()
        user_files(target)
    reliability.bad_input("paths")
    project.write(part(file=target, md5_image="0" * 32))

    run = project.provision()

    reason = "is not a file" if kind == "folder" else "not found"
    assert_one_line_error(run, "verify-image:vm:", f"file = '{target}' {reason}")


def test_the_committed_reliability_report_comes_from_a_clean_run() -> None:
    report = (REPO_ROOT / "docs" / "reliability.md").read_text()

    assert "written by `.venv/bin/python -m tests.reliability`" in report
    assert "- **Data lost: 0 bytes**" in report
    assert ", 0 failed," in report
    for title in ("Faults injected", "Bad inputs tried"):
        figures = re.search(rf"{title}: (\d+), \w+: (\d+)", report)
        assert figures is not None, title
        assert int(figures[1]) == int(figures[2]) > 0
