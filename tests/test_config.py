"""Reading config files into Parts: buildout defaults, paths, discovery and errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmtasks.config import loader as config
from kvmtasks.config import part as config_part
from kvmtasks.config.loader import config_paths, load_file, load_parts
from kvmtasks.config.options import OPTIONS, OPTIONS_BY_NAME, Accel, Compression, ImageType, Option
from kvmtasks.config.part import Part
from kvmtasks.errors import ConfigError

IMAGE = "http://127.0.0.1:9/images/disk.img"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_one(tmp_path: Path, body: str, buildout: str | None = None) -> Part:
    head = f"[buildout]\ndirectory = {tmp_path}\n" if buildout is None else buildout
    (part,) = load_file(write(tmp_path / "kvm.cfg", f"{head}\n[vm]\n{body}"), Path("/nonexistent-cwd"))
    return part


def config_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path / "bad.cfg", text)
    with pytest.raises(ConfigError) as error:
        load_parts([path], cwd=tmp_path)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert str(path) in message
    return message


# -- buildout defaults and paths ---------------------------------------------------------------

def test_the_buildout_directory_defaults_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "etc" / "kvm.cfg", f"[vm]\nimage = {IMAGE}\n")
    monkeypatch.chdir(tmp_path)

    (part,) = load_parts([path])

    expected = config_part.Buildout(tmp_path, tmp_path / "bin", tmp_path / "parts", tmp_path / "var",
                                    tmp_path / "home" / ".cache" / "kvmtasks")
    assert part.buildout == expected
    assert load_file(path, tmp_path / "other")[0].buildout.directory == tmp_path / "other"


def test_the_defaults_of_a_part(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}")

    assert part.name == "vm"
    assert part.config_file == tmp_path / "kvm.cfg"
    assert part.location == tmp_path / "parts" / "vm"
    assert part.download_path == tmp_path / "parts" / "vm" / "disk.img"
    assert part.image_path == part.download_path
    assert part.image_type is ImageType.DRIVE
    assert part.compression is Compression.AUTO
    assert (part.overlay, part.disk_size) == (True, None)
    assert part.boot_disk == part.overlay_path == tmp_path / "parts" / "vm" / "vm.overlay.qcow2"
    assert part.download_digests == {}
    assert part.image_digests == {}
    assert (part.kvm_binary, part.kvm_memory, part.kvm_smp) == ("qemu-system-x86_64", "512M", 1)
    assert part.kvm_accel is Accel.AUTO
    assert part.kvm_bin_directory == tmp_path / "bin"
    assert part.kvm_run_directory == tmp_path / "var"
    assert part.state_directory == tmp_path / "var" / "vm"
    assert (part.ssh_port, part.ssh_hostname, part.ssh_user, part.ssh_key_path) == (
        None, "localhost", "root", None)


def test_buildout_folders_can_be_moved(tmp_path: Path) -> None:
    buildout = (f"[buildout]\ndirectory = {tmp_path}/b\nbin-directory = scripts\n"
                f"parts-directory = {tmp_path}/elsewhere\nvar-directory = ${{:directory}}/state\n")

    part = load_one(tmp_path, f"image = {IMAGE}", buildout)

    assert part.buildout.bin_directory == tmp_path / "b" / "scripts"
    assert part.buildout.parts_directory == tmp_path / "elsewhere"
    assert part.buildout.var_directory == tmp_path / "b" / "state"
    assert part.location == tmp_path / "elsewhere" / "vm"


def test_relative_paths_are_resolved_against_the_buildout_directory(tmp_path: Path) -> None:
    part = load_one(tmp_path, "file = images/disk.img\nlocation = store\nkvm_bin_directory = b\n"
                              "kvm_run_directory = run\nssh_key_path = keys/id")

    assert part.file == part.image_path == tmp_path / "images" / "disk.img"
    assert part.location == tmp_path / "store"
    assert part.kvm_bin_directory == tmp_path / "b"
    assert part.kvm_run_directory == tmp_path / "run"
    assert part.ssh_key_path == tmp_path / "keys" / "id"


def test_absolute_home_and_interpolated_paths(tmp_path: Path) -> None:
    part = load_one(tmp_path, "file = ~/disk.img\nlocation = ${buildout:parts-directory}/shared\n"
                              "ssh_key_path = /etc/key")

    assert part.file == Path(os.environ["HOME"]) / "disk.img"
    assert part.location == tmp_path / "parts" / "shared"
    assert part.ssh_key_path == Path("/etc/key")


@pytest.mark.parametrize(("text", "needle"), [
    ("[vm]\nfile = ~no-such-user-here/disk.img\n", "[vm] file = '~no-such-user-here/disk.img'"),
    ("[buildout]\ndirectory = ~no-such-user-here\n", "[buildout] directory = '~no-such-user-here'"),
    # A control character that str.splitlines() reads as a line break stays escaped.
    ("[vm]\nfile = /d.img\nkvm_bin_directory = ~\x1e0\n", "[vm] kvm_bin_directory = '~\\x1e0'"),
])
def test_the_home_of_an_unknown_user_is_a_config_error(tmp_path: Path, text: str, needle: str) -> None:
    message = config_error(tmp_path, text)

    assert needle in message
    assert "no such user" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(("url", "gzip", "download", "image"), [
    ("http://h/a/disk.img.gz", True, "disk.img.gz", "disk.img"),
    ("http://h/disk.qcow2", False, "disk.qcow2", "disk.qcow2"),
    ("http://h/fetch?id=3", True, "fetch", "fetch.img"),
    ("http://h/", False, "image", "image"),
    ("http://h/", True, "image.gz", "image"),
    ("http://h/a%20b.img", False, "image", "image"),
    ("http://h/%2e%2e", False, "image", "image"),
    ("file:///srv/base.raw.gz", True, "base.raw.gz", "base.raw"),
])
def test_download_and_image_names_come_from_the_url(
    tmp_path: Path, url: str, gzip: bool, download: str, image: str
) -> None:
    part = load_one(tmp_path, f"image = {url}\ngzip = {gzip}")

    assert part.download_path == part.location / download
    assert part.image_path == part.location / image


def test_checksums_are_grouped_by_what_they_check(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}\ngzip = yes\nmd5_download = {'A' * 32}\n"
                              f"sha256_download = {'b' * 64}\nsha512_image = {'c' * 128}")

    assert part.download_digests == {"md5": "a" * 32, "sha256": "b" * 64}
    assert part.image_digests == {"sha512": "c" * 128}


@pytest.mark.parametrize(("override", "expected"), [
    (None, Accel.KVM), ("TCG", Accel.TCG), ("auto", Accel.AUTO), ("bogus", Accel.KVM),
])
def test_kvmtasks_accel_overrides_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str | None, expected: Accel
) -> None:
    if override is not None:
        monkeypatch.setenv(config_part.ACCEL_ENV, override)

    assert load_one(tmp_path, f"image = {IMAGE}\nkvm_accel = kvm").effective_accel is expected


def test_localhost_listens_on_the_loopback_address() -> None:
    assert config_part.listen_address("localhost") == "127.0.0.1"
    assert config_part.listen_address("127.0.0.2") == "127.0.0.2"


def test_default_is_an_ordinary_section_as_in_buildout(tmp_path: Path) -> None:
    path = write(tmp_path / "kvm.cfg", f"""
[DEFAULT]
mirror = http://127.0.0.1:9/images
kvm_memory = 1G

[buildout]
directory = {tmp_path}

[small]
image = ${{DEFAULT:mirror}}/small.img
""")

    (small,) = load_parts([path])

    assert (small.image, small.kvm_memory) == ("http://127.0.0.1:9/images/small.img", "512M")


def test_extends_reads_a_tilde_as_a_folder_name_as_buildout_does(tmp_path: Path) -> None:
    write(tmp_path / "~" / "base.cfg", f"[vm]\nimage = {IMAGE}\n")
    path = write(tmp_path / "kvm.cfg", f"[buildout]\ndirectory = {tmp_path}\nextends = ~/base.cfg\n")

    assert [part.image for part in load_parts([path])] == [IMAGE]


# -- which files and sections ------------------------------------------------------------------

def test_kvmtasks_config_lists_files_separated_by_pathsep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "configs" / "ignored.cfg", "")
    monkeypatch.setenv(config.CONFIG_ENV, os.pathsep.join(["/a/one.cfg", "", "two.cfg"]))

    # A relative path is from the folder doit was run in (doit then moves to dodo.py's).
    assert config_paths(tmp_path, Path("/started/here")) == [Path("/a/one.cfg"),
                                                             Path("/started/here/two.cfg")]


def test_without_kvmtasks_config_every_cfg_in_configs_is_read(tmp_path: Path) -> None:
    for name in ("b.cfg", "a.cfg", "notes.txt", "c.cfg.orig"):
        write(tmp_path / "configs" / name, "")

    assert config_paths(tmp_path) == [tmp_path / "configs" / "a.cfg", tmp_path / "configs" / "b.cfg"]
    assert config_paths(tmp_path / "empty") == []


def test_only_kvm_sections_are_parts(tmp_path: Path) -> None:
    path = write(tmp_path / "kvm.cfg", f"""
[buildout]
directory = {tmp_path}

[by-recipe]
recipe = erp5.recipe.kvm
image = {IMAGE}

[by-our-name]
recipe = kvmtasks
file = /dev/null

[by-image]
image = {IMAGE}

[other-recipe]
recipe = zc.recipe.egg
image = not checked here
eggs = anything

[settings]
mirror = http://127.0.0.1:9
""")

    names = [part.name for part in load_parts([path])]

    assert names == ["by-recipe", "by-our-name", "by-image"]


def test_parts_from_several_files_are_read_in_order(tmp_path: Path) -> None:
    first = write(tmp_path / "1.cfg", f"[a]\nimage = {IMAGE}\n")
    second = write(tmp_path / "2.cfg", f"[b]\nimage = {IMAGE}\n[c]\nfile = /dev/null\n")

    assert [p.name for p in load_parts([first, second], cwd=tmp_path)] == ["a", "b", "c"]


# -- errors name file, [section], option and value ---------------------------------------------

@pytest.mark.parametrize(("body", "needles"), [
    (f"image = {IMAGE}\nkvm_memroy = 1G", ["[vm] unknown option 'kvm_memroy'; did you mean `kvm_memory`?"]),
    (f"image = {IMAGE}\ncolour = blue", ["[vm] unknown option 'colour'"]),
    (f"image = {IMAGE}\nfile = /dev/sda", ["[vm]", "image = ", "file = '/dev/sda'"]),
    ("recipe = kvmtasks", ["[vm]", "image", "file"]),
    (f"image = {IMAGE}\nmd5_image = xyz", ["[vm] md5_image = 'xyz'", "32 hex digits"]),
    (f"image = {IMAGE}\ngzip = sometimes", ["[vm] gzip = 'sometimes'", "boolean"]),
    ("image = ftp://127.0.0.1/disk.img", ["[vm] image = 'ftp://127.0.0.1/disk.img'", "scheme"]),
    ("image = ${mirror:url}/disk.img", ["[vm] image = '${mirror:url}/disk.img'", "no section [mirror]"]),
    ("image = ${buildout:nothing}/disk.img", ["[vm] image", "no option 'nothing' in [buildout]"]),
    ("image = $oops", ["[vm] image = '$oops'"]),
    ("file = /dev/null\nmd5_download = " + "0" * 32, ["[vm] md5_download", "needs an image URL"]),
    ("file = /dev/null\ngzip = true", ["[vm] gzip", "needs an image URL"]),
    (f"image = {IMAGE}\nssh_port = 2222\nkvm_redir = 2222::22", ["[vm] ssh_port = 2222", "kvm_redir"]),
    (f"image = {IMAGE}\nkvm_redir =\n  tcp:80::80\n  nonsense", ["[vm] kvm_redir", "'nonsense'"]),
])
def test_a_bad_option_is_one_line_naming_file_section_option_and_value(
    tmp_path: Path, body: str, needles: list[str]
) -> None:
    message = config_error(tmp_path, f"[buildout]\ndirectory = {tmp_path}\n[vm]\n{body}\n")

    for needle in needles:
        assert needle in message


def test_a_bad_part_name_is_reported(tmp_path: Path) -> None:
    message = config_error(tmp_path, f"[my vm]\nimage = {IMAGE}\n")

    assert "'[my vm]': not a [section] header" in message
    assert "[vm!] part name must be" in config_error(tmp_path, f"[vm!]\nimage = {IMAGE}\n")


@pytest.mark.parametrize(("text", "needle"), [
    ("[vm]\nimage: a\n", "'image: a': not 'option = value'"),
    ("[vm]\nimage = a\nnot an option\n", "line 3"),
    ("image = outside any section\n", "section"),
    ("[vm\nimage = a\n", "[vm"),
])
def test_a_file_that_is_not_ini_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in config_error(tmp_path, text)


def test_a_missing_or_unreadable_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_parts([tmp_path / "missing.cfg"], cwd=tmp_path)
    (tmp_path / "binary.cfg").write_bytes(b"[vm]\nimage = \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_parts([tmp_path / "binary.cfg"], cwd=tmp_path)


def test_a_part_name_in_two_files_names_both(tmp_path: Path) -> None:
    first = write(tmp_path / "a.cfg", f"[vm]\nimage = {IMAGE}\n")
    second = write(tmp_path / "b.cfg", "[vm]\nfile = /dev/null\n")

    with pytest.raises(ConfigError) as error:
        load_parts([first, second], cwd=tmp_path)

    assert str(error.value) == f"{second}: [vm] part name already defined in {first}"


# -- any value of any option: a part, or one line naming file, section and option --------------

def ini_value(text: str) -> str:
    """text as configparser can hold it: lines after the first indented, blank and comment lines dropped.

    A blank or comment line would end the value, and the rest would be read as new options: an
    error about the file's syntax, not about this option's value.
    """
    first, *rest = re.split(r"\r\n|\r|\n", text)
    kept = [line for line in rest if line.strip() and not line.strip().startswith(("#", ";"))]
    return "\n".join([first, *("  " + line for line in kept)])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(OPTIONS), text=st.text())
@example(option=OPTIONS_BY_NAME["file"], text="~no-such-user-here/disk.img")
@example(option=OPTIONS_BY_NAME["location"], text="${nothing:here}")
@example(option=OPTIONS_BY_NAME["kvm_net"], text="user\n$")
@example(option=OPTIONS_BY_NAME["ssh_port"], text="\x00")
def test_any_value_of_any_option_parses_or_is_a_one_line_config_error(
    tmp_path: Path, option: Option, text: str
) -> None:
    source = "" if option.name in ("image", "file") else f"image = {IMAGE}\n"
    path = write(tmp_path / "prop.cfg", f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\n"
                                        f"{source}{option.name} = {ini_value(text)}\n")
    try:
        load_file(path, tmp_path)
    except ConfigError as error:
        message = str(error)
        assert len(message.splitlines()) == 1, message
        assert message.startswith(f"{path}: [vm] ")
        assert option.name in message
