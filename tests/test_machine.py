"""The pinned machine type: QEMU's own ``-machine help``, read and cached; the argv it makes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.engines.qemu import machine
from kvmtasks.engines.qemu.argv import qemu_argv
from kvmtasks.engines.qemu.savestate import started_from

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")


def load(tmp_path: Path, body: str = "") -> Part:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\nfile = {tmp_path}/disk.img\n{body}")
    (part,) = load_file(path, tmp_path)
    return part


@needs_qemu
def test_pc_resolves_to_the_versioned_name_qemu_itself_reports(tmp_path: Path) -> None:
    listing = subprocess.run(["qemu-system-x86_64", "-machine", "help"], capture_output=True,
                             text=True, check=True).stdout
    default = next(line.split()[0] for line in listing.splitlines() if line.endswith("(default)"))
    part = load(tmp_path)
    assert machine.resolve(part) == default
    cache = part.state_directory / machine.CACHE_NAME
    assert json.loads(cache.read_text())["machine"] == default
    # Cached: a different answer in the cache for the same binary is what resolve returns.
    record = json.loads(cache.read_text())
    cache.write_text(json.dumps({**record, "machine": "pc-from-cache"}))
    assert machine.resolve(part) == "pc-from-cache"
    # Another binary (an upgrade) is asked again.
    cache.write_text(json.dumps({**record, "binary": ["/elsewhere", 1, 2], "machine": "old"}))
    assert machine.resolve(part) == default


def test_a_machine_chosen_in_kvm_extra_args_is_left_alone(tmp_path: Path) -> None:
    part = load(tmp_path, "kvm_extra_args =\n  -machine\n  q35\n")
    assert machine.resolve(part) is None
    assert machine.chooses_own_machine(["-M", "q35"])
    assert not machine.chooses_own_machine(["-m", "1G"])


def test_parse_help() -> None:
    text = ("Supported machines are:\nmicrovm   microvm (i386)\n"
            "pc        Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
            "pc-i440fx-7.2  Standard PC (i440FX + PIIX, 1996) (default)\n")
    assert machine.parse_help(text) == "pc-i440fx-7.2"
    assert machine.parse_help("Supported machines are:\nvirt  QEMU ARM Virtual Machine\n") is None


def test_the_argv_pins_the_machine_right_after_the_name(tmp_path: Path) -> None:
    part = load(tmp_path)
    argv = qemu_argv(part, accel="tcg", disk_format="raw", listen_address="127.0.0.1",
                     machine="pc-i440fx-7.2")
    assert argv[1:5] == ["-name", "vm", "-machine", "pc-i440fx-7.2"]
    assert "-machine" not in qemu_argv(part, accel="tcg", disk_format="raw", listen_address="127.0.0.1")


def test_a_saved_state_belongs_to_the_argv_without_how_it_was_started() -> None:
    argv = ["qemu", "-name", "vm", "-daemonize"]
    assert started_from([*argv, "-incoming", "defer"]) == argv
    assert started_from([*argv, "-loadvm", "clean"]) == argv
    assert started_from(argv) == argv
