"""kvm_arch and firmware in a part's config: defaults, the program they choose, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmtasks.config.options import Arch, Firmware
from kvmtasks.config.partjson import from_json, to_json
from tests.test_config import IMAGE, config_error, load_one


def test_x86_64_boots_its_bios_by_default(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}")

    assert (part.kvm_arch, part.firmware, part.kvm_binary) == (Arch.X86_64, Firmware.BIOS,
                                                               "qemu-system-x86_64")


def test_aarch64_runs_its_own_qemu_through_uefi_by_default(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}\nkvm_arch = aarch64")

    assert (part.kvm_arch, part.firmware, part.kvm_binary) == (Arch.AARCH64, Firmware.UEFI,
                                                               "qemu-system-aarch64")
    assert part.varstore_path == tmp_path / "parts" / "vm" / "vm.efivars.qcow2"


def test_a_program_of_ones_own_wins_and_the_choices_survive_json(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}\nkvm_arch = aarch64\nfirmware = uefi-secure\n"
                              "kvm_binary = /opt/qemu/bin/qemu-system-aarch64")

    assert part.kvm_binary == "/opt/qemu/bin/qemu-system-aarch64"
    assert from_json(to_json(part)) == part
    assert from_json(to_json(part)).firmware is Firmware.UEFI_SECURE


@pytest.mark.parametrize(("body", "needles"), [
    ("kvm_arch = arm64", ["[vm] kvm_arch = 'arm64'", "x86_64, aarch64, riscv64"]),
    ("firmware = efi", ["[vm] firmware = 'efi'", "bios, uefi, uefi-secure"]),
    ("kvm_arch = riscv64", ["[vm] kvm_arch = riscv64", "Debian 12 packages no UEFI firmware"]),
    ("kvm_arch = aarch64\nfirmware = bios", ["[vm] firmware = bios", "only x86_64 has a BIOS"]),
    ("kvm_arch = aarch64\nimage_type = hda", ["[vm] image_type = hda", "no IDE bus"]),
])
def test_what_no_host_could_run_is_one_line(tmp_path: Path, body: str, needles: list[str]) -> None:
    message = config_error(tmp_path, f"[buildout]\ndirectory = {tmp_path}\n[vm]\nimage = {IMAGE}\n{body}\n")

    for needle in needles:
        assert needle in message
