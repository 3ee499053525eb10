"""The shipped configs and README stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.config.options import OPTIONS, with_reference
from kvmtasks.engines.qemu.argv import qemu_argv

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "configs" / "examples").glob("*.cfg"))


def test_there_are_the_four_examples_of_the_original_readme() -> None:
    assert [p.name for p in EXAMPLES] == [
        "linux-partition.cfg", "local-image.cfg", "remote-gzip-image.cfg", "remote-raw-image.cfg",
    ]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_renders_a_qemu_command_line(example: Path, tmp_path: Path) -> None:
    (part,) = load_file(example, tmp_path)
    argv = qemu_argv(part, accel="tcg", disk_format="raw", listen_address="127.0.0.1")
    assert argv[0] == "qemu-system-x86_64"
    assert any(arg.startswith(f"file={part.boot_disk},") for arg in argv)
    assert f"hostfwd=tcp:127.0.0.1:{part.ssh_port}-:22" in " ".join(argv)
    assert "EDIT" in example.read_text(), "placeholders must be marked"
    assert f"doit start:{part.name}" in example.read_text(), "the header says how to run it"


def test_readme_option_table_is_generated_from_the_option_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert with_reference(readme) == readme, "run: python -m kvmtasks.config.options README.md"
    for option in OPTIONS:
        assert f"| `{option.name}` |" in readme


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    block = re.search(r"```\n(.*?)```", quick_start, re.DOTALL)
    assert block is not None
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines[1] in ci


def test_demo_config_uses_every_common_option() -> None:
    text = (ROOT / "configs" / "demo.cfg").read_text()
    for name in ("image", "gzip", "md5_download", "sha256_image", "kvm_memory", "kvm_accel",
                 "kvm_net", "kvm_redir", "ssh_port", "ssh_key_path", "kvm_snapshot", "image_type"):
        assert re.search(rf"^{name} =", text, re.MULTILINE), name


def test_readme_cloud_image_examples_parse_as_described(tmp_path: Path) -> None:
    section = (ROOT / "README.md").read_text().split("## Cloud images", 1)[1]
    block = re.search(r"```ini\n(.*?)```", section, re.DOTALL)
    assert block is not None
    config = tmp_path / "cloud.cfg"
    config.write_text(block.group(1))
    # cloud_init puts the key's public half in the seed: the config needs it to exist.
    public_key = tmp_path / "home" / ".ssh" / "id_ed25519.pub"
    public_key.parent.mkdir(parents=True)
    public_key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample me@host\n")
    debian, fedora = load_file(config, tmp_path)
    assert debian.image_path.name == "debian-12-genericcloud-amd64.qcow2"
    assert debian.download_digests["sha512"].endswith("/SHA512SUMS")
    assert fedora.image_path.name == "Fedora-Cloud-Base-Generic-41-1.4.x86_64.raw"
    assert fedora.download_digests["sha256"].endswith("-CHECKSUM")
    for part in (debian, fedora):
        assert (part.overlay, part.disk_size, part.cloud_init) == (True, "20G", True)
        assert part.boot_disk.name == f"{part.name}.overlay.qcow2"


def test_readme_config_example_reads_as_its_comments_say(tmp_path: Path) -> None:
    section = (ROOT / "README.md").read_text().split("### Config files", 1)[1]
    block = re.search(r"```ini\n(.*?)```", section, re.DOTALL)
    assert block is not None
    config = tmp_path / "parts.cfg"
    config.write_text(block.group(1))

    web, db = load_file(config, tmp_path)

    assert (web.name, db.name) == ("web", "db")
    assert web.kvm_extra_args == ("-name www",) and db.kvm_extra_args == ("-name postgres",)
    assert [r.host_port for r in web.kvm_redir] == [8080] and db.kvm_redir == ()
    assert db.kvm_memory == "2G"


def test_readme_syntax_table_names_what_is_refused() -> None:
    readme = (ROOT / "README.md").read_text()
    for needle in ("[section:EXPRESSION]", "extends-cache", "offline", "${:_buildout_section_name_}",
                   "`$$`", "Refused, in one line", "did you mean", "doit annotate:PART"):
        assert needle in readme, needle
