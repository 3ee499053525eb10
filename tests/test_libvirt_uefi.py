"""UEFI guests on libvirt (kvm_engine = libvirt, qemu:///system), under TCG: the tiny x86_64 guest
through OVMF and the tiny arm64 guest through AAVMF, each a domain of libvirt's own firmware
choice (``<os firmware='efi'>``) with its nvram, copied by libvirt from the firmware's template.

x86_64: a variable the guest writes through efivarfs is kept by stop/start and gone after
``reset`` (the next start asks libvirt for a fresh nvram). aarch64: one boot, its variable seen in
the domain's nvram on the host once the guest powered off. Secure Boot: Debian's signed shim,
GRUB and kernel through libvirt's secure OVMF (q35, SMM), the kernel reporting Secure Boot on."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.test_libvirt import _virsh, domain_name, libvirt_config, libvirtd, pool
from tests.test_uefi_guests import EFIVARS, READ_VARIABLE, SECURE_BOOT_STATE, VARIABLE, WRITE_VARIABLE
from tests.test_vm_e2e import script
from tests.vmfixtures import Guest, free_port, needs_qemu

__all__ = ["domain_name", "libvirtd", "pool"]  # the fixtures, shared with test_libvirt.py

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]

# The variable's name as the firmware stores it (UCS-2): what finds it in a variable store.
STORED_NAME = VARIABLE.split("-")[0].encode("utf-16-le")


@pytest.fixture
def uefi_domain(domain_name: str) -> Iterator[str]:
    """The part's domain name; the domain goes with its nvram afterwards (libvirt refuses to
    undefine a domain that has one unless told what to do with it)."""
    yield domain_name
    _virsh("destroy", domain_name)
    _virsh("undefine", "--nvram", "--snapshots-metadata", "--managed-save", domain_name)


def started(project: Project, name: str) -> None:
    run = project.run(f"start:{name}", timeout=400)
    assert run.returncode == 0, run.describe()


def ctl(project: Project, name: str, *args: str) -> str:
    done = script(project, f"{name}-ctl", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run(project: Project, name: str, text: str) -> str:
    done = script(project, f"{name}-runscript", text)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def defined(name: str) -> ET.Element:
    return ET.fromstring(_virsh("dumpxml", name).stdout)


def nvram_of(name: str) -> Path:
    """The running domain's nvram (libvirt 9.0 names it only while the domain runs)."""
    path = defined(name).findtext("os/nvram")
    assert path, _virsh("dumpxml", name).stdout
    return Path(path)


def test_an_x86_64_guest_through_ovmf_on_libvirt(project: Project, amd64_uefi_guest: Guest, pool: str,
                                                  uefi_domain: str) -> None:
    name = uefi_domain
    project.write(libvirt_config(amd64_uefi_guest, name, f"image = file://{amd64_uefi_guest.image.path}",
                                 pool, free_port(), "firmware = uefi\nkvm_boot_timeout = 240\n"))
    started(project, name)
    domain = defined(name)
    assert domain.attrib["type"] == "qemu"
    assert domain.find("os/type").attrib["machine"].startswith("pc-i440fx-")  # type: ignore[union-attr]
    assert domain.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    nvram = nvram_of(name)
    status = json.loads(ctl(project, name, "status", "--json"))
    assert (status["engine"], status["arch"], status["firmware"]) == ("libvirt", "x86_64", "uefi")
    assert status["disks"]["varstore"] == str(nvram)
    assert run(project, name, f"uname -m; test -d {EFIVARS} && echo efi") == "x86_64\nefi\n"
    assert run(project, name, f"{WRITE_VARIABLE} && {READ_VARIABLE}") == "kept-by-uefi"
    ctl(project, name, "stop")
    assert STORED_NAME in nvram.read_bytes()

    # A cold start: the variable is still there.
    ctl(project, name, "start")
    assert run(project, name, READ_VARIABLE) == "kept-by-uefi"
    ctl(project, name, "stop")

    # reset: a new disk and, at the next start, a fresh nvram from the template.
    reset = ctl(project, name, "reset")
    assert f"{name}: UEFI variables reset" in reset, reset
    ctl(project, name, "start")
    assert run(project, name, f"test -e {EFIVARS}/{VARIABLE} || echo gone") == "gone\n"
    assert STORED_NAME not in nvram.read_bytes()
    assert not (project.var / name / "libvirt-nvram-reset").exists()  # only that start had a fresh one
    ctl(project, name, "stop")


def test_the_arm64_guest_through_aavmf_on_libvirt(project: Project, arm64_guest: Guest, pool: str,
                                                  uefi_domain: str) -> None:
    name = uefi_domain
    project.write(libvirt_config(arm64_guest, name, f"image = file://{arm64_guest.image.path}", pool,
                                 free_port(), "kvm_arch = aarch64\nkvm_boot_timeout = 240\n"
                                              "kvm_shutdown_timeout = 30\n"))
    started(project, name)
    domain = defined(name)
    assert domain.attrib["type"] == "qemu"
    assert domain.find("os/type").attrib["arch"] == "aarch64"  # type: ignore[union-attr]
    assert domain.find("os/type").attrib["machine"].startswith("virt-")  # type: ignore[union-attr]
    assert domain.findtext("os/loader", "").startswith("/usr/share/AAVMF/")
    status = json.loads(ctl(project, name, "status", "--json"))
    assert (status["arch"], status["firmware"], status["accelerator"]) == ("aarch64", "uefi", "tcg")
    assert run(project, name, f"uname -m; test -d {EFIVARS} && echo efi") == "aarch64\nefi\n"
    assert run(project, name, WRITE_VARIABLE + " && echo written") == "written\n"
    nvram = nvram_of(name)
    assert status["disks"]["varstore"] == str(nvram)
    # libvirt takes no internal snapshot of a UEFI domain: refused in one line; suspend keeps memory.
    refused = script(project, f"{name}-ctl", "snapshot", "save", "one")
    assert refused.returncode == 1 and refused.stdout == "", refused.stdout
    assert refused.stderr == (f"{name}-ctl: no named snapshots of {name} on libvirt: libvirt takes none of a "
                              "domain booted through UEFI (firmware = uefi); suspend keeps its state, and "
                              "kvm_engine = qemu snapshots UEFI parts with their variables\n")
    assert run(project, name, "echo one > /tmp/mem && echo ok") == "ok\n"
    assert f"{name} suspended" in ctl(project, name, "suspend")
    assert f"{name} resumed" in ctl(project, name, "start")
    assert run(project, name, "cat /tmp/mem") == "one\n"
    stopped = ctl(project, name, "stop")
    assert stopped == f"{name} stopped (the guest powered off on the ACPI power button)\n"
    # The variable is in the domain's own nvram, never in the packaged template.
    assert STORED_NAME in nvram.read_bytes()
    assert STORED_NAME not in Path("/usr/share/AAVMF/AAVMF_VARS.fd").read_bytes()

    # destroy: the domain goes with its nvram.
    destroyed = ctl(project, name, "destroy")
    assert f"removed libvirt domain {name} on qemu:///system" in destroyed, destroyed
    assert name not in _virsh("list", "--all", "--name").stdout.split()
    assert not nvram.exists()


def test_secure_boot_on_libvirt(project: Project, secure_boot_guest: Guest, pool: str,
                                uefi_domain: str) -> None:
    name = uefi_domain
    config = libvirt_config(secure_boot_guest, name, f"image = file://{secure_boot_guest.image.path}", pool,
                            free_port(), "firmware = uefi-secure\nkvm_boot_timeout = 300\n")
    project.write(config.replace("kvm_memory = 256M", "kvm_memory = 512M"))  # shim, GRUB, the kernel
    started(project, name)
    domain = defined(name)
    assert domain.find("os/type").attrib["machine"].startswith("pc-q35-")  # type: ignore[union-attr]
    assert domain.find("os/loader").attrib["secure"] == "yes"  # type: ignore[union-attr]
    assert domain.find("features/smm").attrib.get("state", "on") == "on"  # type: ignore[union-attr]
    said = "dmesg | grep -c 'Secure boot enabled'"
    assert run(project, name, f"{SECURE_BOOT_STATE}; echo; {said}") == "0600000001\n1\n"
    status = json.loads(ctl(project, name, "status", "--json"))
    assert (status["engine"], status["firmware"]) == ("libvirt", "uefi-secure")
    ctl(project, name, "stop")
