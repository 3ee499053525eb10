"""kvm_arch and firmware in a part's config: defaults, the program they choose, what is refused."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmtasks import command
from kvmtasks.config.loader import load_file
from kvmtasks.config.options import Accel, Arch, Firmware
from kvmtasks.config.part import Part
from kvmtasks.config.partjson import from_json, to_json
from kvmtasks.engines.libvirt.domain import QEMU_NS, Disk, domain_xml
from kvmtasks.engines.qemu import firmware, machine, varstore, vm
from kvmtasks.engines.qemu.argv import qemu_argv
from kvmtasks.engines.qemu.firmware import Flash
from kvmtasks.errors import CommandNotFound, VmError
from kvmtasks.provision import overlay
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


def argv_of(part: Part, accel: str = "tcg", machine: str | None = None,
            flash: Flash | None = None) -> list[str]:
    return qemu_argv(part, accel=accel, disk_format="qcow2", listen_address="127.0.0.1",
                     machine=machine, flash=flash)


def test_the_aarch64_argv_is_its_program_virt_cpu_max_and_the_flash(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}\nkvm_arch = aarch64\nssh_port = 2222\ncloud_init = true")
    flash = Flash(Path("/usr/share/AAVMF/AAVMF_CODE.fd"), "raw", part.varstore_path, secure=False)
    args = argv_of(part, machine="virt-7.2", flash=flash)

    assert args[0] == "qemu-system-aarch64"
    assert args[args.index("-machine") + 1] == "virt-7.2"
    assert args[args.index("-cpu") + 1] == "max,pauth-impdef=on"
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "-drive"][:2] == [
        "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd",
        f"if=pflash,unit=1,format=qcow2,file={part.varstore_path}",
    ]
    # No IDE on virt: the seed is a CD-ROM on virtio-scsi, the disk a virtio-blk PCI device.
    assert "if=ide" not in " ".join(args)
    assert "scsi-cd,drive=seed,bus=seedbus.0" in args
    assert "smm=on" not in args
    assert argv_of(part, accel="kvm")[argv_of(part, accel="kvm").index("-cpu") + 1] == "host"


def test_secure_boot_turns_smm_on_and_locks_the_flash(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}\nfirmware = uefi-secure")
    flash = Flash(Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"), "raw", part.varstore_path, secure=True)
    args = argv_of(part, machine="pc-q35-7.2", flash=flash)

    assert args[0] == "qemu-system-x86_64" and "-cpu" not in args
    assert args[args.index("-machine") + 1] == "pc-q35-7.2"
    machines = [args[i + 1] for i, arg in enumerate(args) if arg == "-machine"]
    assert machines == ["pc-q35-7.2", "smm=on"]
    assert args[args.index("-global") + 1] == "driver=cfi.pflash01,property=secure,value=on"


def test_a_bios_part_keeps_the_argv_it_had(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}")

    assert not {"-cpu", "-global"} & set(argv_of(part))
    assert "pflash" not in " ".join(argv_of(part))


def test_machine_help_aliases_resolve_for_each_family() -> None:
    listing = subprocess.run(["qemu-system-aarch64", "-machine", "help"], capture_output=True,
                             text=True, check=True).stdout
    virt = machine.parse_alias(listing, "virt") or ""
    assert re.fullmatch(r"virt-[0-9]+\.[0-9]+", virt)
    assert f"\n{virt} " in listing
    x86 = subprocess.run(["qemu-system-x86_64", "-machine", "help"], capture_output=True,
                         text=True, check=True).stdout
    assert (machine.parse_alias(x86, "q35") or "").startswith("pc-q35-")
    assert machine.parse_alias(x86, "pc") == machine.parse_help(x86)


def test_the_variable_store_is_the_parts_own_copy_and_reset_removes_it(tmp_path: Path) -> None:
    part = load_one(tmp_path, f"image = {IMAGE}\nkvm_arch = aarch64")
    template = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
    before = template.stat()

    flash = varstore.prepare(part, "virt-7.2")

    assert flash is not None and flash.varstore == part.varstore_path
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(part.varstore_path)],
                                     capture_output=True, text=True, check=True).stdout)
    assert (info["format"], info["virtual-size"]) == ("qcow2", before.st_size)
    assert template.stat().st_mtime_ns == before.st_mtime_ns
    # The guest's variables stay: a second start keeps the copy it has.
    mark = part.varstore_path.stat().st_mtime_ns
    varstore.prepare(part, "virt-7.2")
    assert part.varstore_path.stat().st_mtime_ns == mark
    said: list[str] = []
    overlay.reset_varstore(part, said.append)
    assert not part.varstore_path.exists() and "UEFI variables reset" in said[0]
    assert varstore.prepare(load_one(tmp_path, f"image = {IMAGE}"), "pc-i440fx-7.2") is None


def test_a_libvirt_parts_reset_marks_its_nvram_for_a_fresh_copy(tmp_path: Path) -> None:
    """libvirt keeps the variables on its host: the reset is carried out by the next start."""
    part = load_one(tmp_path, f"image = {IMAGE}\nkvm_engine = libvirt\nkvm_arch = aarch64")
    said: list[str] = []
    overlay.reset_varstore(part, said.append)
    assert part.nvram_reset_mark.is_file()
    assert said == [f"{part.name}: UEFI variables reset (the domain's nvram is copied from its template "
                    "at the next start)"]
    bios = load_one(tmp_path / "bios", f"image = {IMAGE}\nkvm_engine = libvirt")
    overlay.reset_varstore(bios, said.append)
    assert not bios.nvram_reset_mark.exists() and len(said) == 1


def test_no_descriptor_names_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(firmware, "DESCRIPTOR_FOLDERS", (tmp_path / "none",))
    part = load_one(tmp_path, f"image = {IMAGE}\nkvm_arch = aarch64")

    with pytest.raises(VmError) as error:
        varstore.prepare(part, "virt-7.2")
    assert str(error.value).startswith("firmware = uefi for aarch64 on virt-7.2: no QEMU firmware "
                                       "descriptor fits")
    assert str(error.value).endswith("install the qemu-efi-aarch64 package")
    assert not part.varstore_path.exists()


def test_a_missing_qemu_program_names_its_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CommandNotFound, match="qemu-system-aarch64 not found; install the qemu-system-arm"):
        command.find("qemu-system-aarch64")


def test_kvm_runs_only_the_hosts_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    foreign = load_one(tmp_path, f"image = {IMAGE}\nkvm_arch = aarch64\nkvm_accel = kvm")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")

    assert not vm.kvm_runs(foreign)
    with pytest.raises(VmError, match="kvm_accel = kvm cannot run a aarch64 guest on this x86_64 host"):
        vm.choose_accel(foreign)
    auto = load_one(tmp_path, f"image = {IMAGE}\nkvm_arch = aarch64")
    assert vm.choose_accel(auto) is Accel.TCG


def domain_of(tmp_path: Path, body: str, domain_type: str = "qemu") -> ET.Element:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\nfile = /srv/disk.img\n"
                    f"kvm_engine = libvirt\nssh_port = 2222\n{body}")
    (part,) = load_file(path, tmp_path)
    return ET.fromstring(domain_xml(part, domain_type=domain_type, disk=Disk("pool", "vm-disk", "qcow2"),
                                    listen_address="127.0.0.1", console_log=None,
                                    seed=Disk("pool", "vm-seed", "raw")))


def test_the_libvirt_domain_of_an_aarch64_part(tmp_path: Path) -> None:
    domain = domain_of(tmp_path, "kvm_arch = aarch64")

    os_element = domain.find("os")
    assert os_element is not None and os_element.get("firmware") == "efi"
    assert domain.find("os/type").attrib == {"arch": "aarch64", "machine": "virt"}  # type: ignore[union-attr]
    features = {f.get("name"): f.get("enabled") for f in domain.iterfind("os/firmware/feature")}
    assert features == {"secure-boot": "no", "enrolled-keys": "no"}
    assert domain.find("cpu").attrib == {"mode": "maximum"}  # type: ignore[union-attr]
    assert domain.find("devices/disk[@device='cdrom']/target").attrib["bus"] == "scsi"  # type: ignore[union-attr]
    assert any("bus=pcie.0" in arg.attrib["value"] for arg in domain.iter(f"{{{QEMU_NS}}}arg"))
    kvm = domain_of(tmp_path, "kvm_arch = aarch64", domain_type="kvm")
    assert kvm.find("cpu").attrib == {"mode": "host-passthrough"}  # type: ignore[union-attr]


def test_the_libvirt_domain_with_secure_boot_and_with_the_bios(tmp_path: Path) -> None:
    secure = domain_of(tmp_path, "firmware = uefi-secure")
    assert secure.find("os/type").attrib == {"arch": "x86_64", "machine": "q35"}  # type: ignore[union-attr]
    features = {f.get("name"): f.get("enabled") for f in secure.iterfind("os/firmware/feature")}
    assert features == {"secure-boot": "yes", "enrolled-keys": "yes"}
    assert secure.find("features/smm").attrib == {"state": "on"}  # type: ignore[union-attr]

    bios = domain_of(tmp_path, "")
    assert bios.find("os").attrib == {} and bios.find("os/firmware") is None  # type: ignore[union-attr]
    assert bios.find("os/type").attrib == {"arch": "x86_64"}  # type: ignore[union-attr]
    assert bios.find("cpu") is None and bios.find("features/smm") is None
    assert any("bus=pci.0" in arg.attrib["value"] for arg in bios.iter(f"{{{QEMU_NS}}}arg"))
