"""Firmware found through QEMU's descriptors: the files Debian's ovmf and qemu-efi-aarch64 install
(./dev installs both), and folders of descriptors written here for the rules around them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvmtasks.config.options import Arch, Firmware
from kvmtasks.engines.qemu import firmware
from kvmtasks.engines.qemu.firmware import choose, descriptor_files, machine_alias, parse, read_all

PACKAGED = Path("/usr/share/qemu/firmware")


def pick(arch: Arch, machine: str | None, choice: Firmware) -> firmware.Descriptor | None:
    return choose(read_all((PACKAGED,)), arch, machine, choice)


def test_uefi_on_x86_64_is_ovmf_without_secure_boot_on_the_pc() -> None:
    found = pick(Arch.X86_64, "pc-i440fx-7.2", Firmware.UEFI)

    assert found is not None
    assert found.path.name == "60-edk2-x86_64.json"
    assert (found.code, found.template) == (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                                            Path("/usr/share/OVMF/OVMF_VARS_4M.fd"))
    assert not found.requires_smm


def test_secure_boot_on_x86_64_is_q35_with_smm_and_microsofts_keys() -> None:
    found = pick(Arch.X86_64, "pc-q35-7.2", Firmware.UEFI_SECURE)

    assert found is not None
    assert found.path.name == "40-edk2-x86_64-secure-enrolled.json"
    assert found.template == Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
    assert found.requires_smm and {"secure-boot", "enrolled-keys"} <= found.features
    # The i440fx PC has no SMM-protected flash: no Secure Boot descriptor names it.
    assert pick(Arch.X86_64, "pc-i440fx-7.2", Firmware.UEFI_SECURE) is None
    assert machine_alias(Arch.X86_64, Firmware.UEFI_SECURE) == "q35"


def test_aarch64_is_aavmf_on_virt_and_nothing_on_another_architecture() -> None:
    plain = pick(Arch.AARCH64, "virt-7.2", Firmware.UEFI)
    secure = pick(Arch.AARCH64, "virt-7.2", Firmware.UEFI_SECURE)

    assert plain is not None and plain.code == Path("/usr/share/AAVMF/AAVMF_CODE.fd")
    assert plain.template == Path("/usr/share/AAVMF/AAVMF_VARS.fd")
    assert secure is not None and secure.template == Path("/usr/share/AAVMF/AAVMF_VARS.ms.fd")
    assert not secure.requires_smm
    assert pick(Arch.AARCH64, "pc-i440fx-7.2", Firmware.UEFI) is None
    assert pick(Arch.RISCV64, "virt-7.2", Firmware.UEFI) is None
    assert machine_alias(Arch.AARCH64, Firmware.UEFI) == "virt"


def test_an_etc_file_hides_the_packaged_one_of_its_name_and_priority_is_the_file_name(
    tmp_path: Path,
) -> None:
    etc, share = tmp_path / "etc", tmp_path / "share"
    shutil.copytree(PACKAGED, share)
    etc.mkdir()
    # The administrator turns the plain x86_64 firmware off with an empty file of its name ...
    (etc / "60-edk2-x86_64.json").write_text("")
    # ... and adds one of higher priority (a lower number) that a kvmtasks part can use.
    own = json.loads((share / "60-edk2-x86_64.json").read_text())
    own["description"] = "mine"
    (etc / "10-mine.json").write_text(json.dumps(own))

    names = [path.name for path in descriptor_files((etc, share))]
    assert names == sorted(names) and names[0] == "10-mine.json"
    assert [p.parent for p in descriptor_files((etc, share)) if p.name == "60-edk2-x86_64.json"] == [etc]
    found = choose(read_all((etc, share)), Arch.X86_64, "pc-i440fx-7.2", Firmware.UEFI)
    assert found is not None and found.path == etc / "10-mine.json"
    (etc / "10-mine.json").unlink()
    assert choose(read_all((etc, share)), Arch.X86_64, "pc-i440fx-7.2", Firmware.UEFI) is None


@pytest.mark.parametrize("text", [
    "", "[]", "{", '{"mapping": {"device": "memory", "filename": "/x"}}',
    '{"interface-types": ["uefi"], "mapping": {"device": "flash", "executable": {"filename": "/x"}},'
    ' "targets": []}',
])
def test_a_descriptor_kvmtasks_cannot_use_is_passed_over(text: str) -> None:
    assert parse(Path("x.json"), text) is None


def test_a_descriptor_whose_files_are_missing_is_passed_over(tmp_path: Path) -> None:
    data = json.loads((PACKAGED / "60-edk2-x86_64.json").read_text())
    data["mapping"]["nvram-template"]["filename"] = str(tmp_path / "gone.fd")
    (tmp_path / "60-edk2-x86_64.json").write_text(json.dumps(data))

    assert parse(tmp_path / "60-edk2-x86_64.json", json.dumps(data)) is not None
    assert read_all((tmp_path,)) == []
