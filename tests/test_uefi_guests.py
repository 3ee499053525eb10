"""Guests of another architecture and through UEFI, under TCG: the tiny arm64 guest through
AAVMF (one scenario, three boots: start, scripts, files, suspend/resume, a named snapshot, stop on
the ACPI button, and a UEFI variable the guest writes, kept by stop/start and gone after reset)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.test_vm_e2e import script, vm_config
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]

# A variable of kvmtasks' own (a GUID made for these tests): non-volatile, boot and runtime access.
VARIABLE = "KvmtasksTest-6f0a4e1c-53a4-4a4e-9d61-2f0c5e0b9a11"
EFIVARS = "/sys/firmware/efi/efivars"
WRITE_VARIABLE = f"printf '\\007\\000\\000\\000kept-by-uefi' > {EFIVARS}/{VARIABLE}"
READ_VARIABLE = f"tail -c +5 {EFIVARS}/{VARIABLE}"


def store_snapshots(store: Path) -> str:
    return subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(store)], capture_output=True, text=True,
                          check=True).stdout


def started(project: Project) -> None:
    run = project.run("start:vm", timeout=300)
    assert run.returncode == 0, run.describe()


def test_the_arm64_guest_through_uefi(project: Project, arm64_guest: Guest, tmp_path: Path) -> None:
    project.write(vm_config(arm64_guest, f"image = file://{arm64_guest.image.path}", free_port(),
                            "kvm_arch = aarch64\nkvm_boot_timeout = 240\nkvm_shutdown_timeout = 30\n"))
    started(project)
    (pid,) = qemu_pids_under(project.root)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert Path(argv[0]).name == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1].startswith("virt-")
    assert any(arg.startswith("if=pflash,unit=1,format=qcow2,") for arg in argv)
    status = json.loads(script(project, "vm-ctl", "status", "--json").stdout)
    assert (status["arch"], status["firmware"], status["accelerator"]) == ("aarch64", "uefi", "tcg")
    store = Path(status["disks"]["varstore"])
    assert store == project.parts / "vm" / "vm.efivars.qcow2" and store.is_file()

    # Scripts and files; the guest is an arm64 one, booted through UEFI.
    facts = script(project, "vm-runscript", f"uname -m; test -d {EFIVARS} && echo efi")
    assert (facts.returncode, facts.stdout) == (0, "aarch64\nefi\n"), facts.stderr
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 64)
    assert script(project, "vm-sendfile", "/tmp/payload.bin", str(payload)).returncode == 0
    back = tmp_path / "back.bin"
    assert script(project, "vm-getfile", "/tmp/payload.bin", str(back)).returncode == 0
    assert back.read_bytes() == payload.read_bytes()
    written = script(project, "vm-runscript", f"{WRITE_VARIABLE} && {READ_VARIABLE}")
    assert (written.returncode, written.stdout) == (0, "kept-by-uefi"), written.stderr

    # Suspend and resume keep memory; a named snapshot brings it back.
    assert script(project, "vm-runscript", "echo one > /tmp/mem").returncode == 0
    suspended = project.run("suspend:vm", timeout=300)
    assert suspended.returncode == 0 and "vm suspended" in suspended.stdout, suspended.describe()
    assert qemu_pids_under(project.root) == [] and store.is_file()
    resumed = script(project, "vm-ctl", "start")
    assert resumed.returncode == 0 and "vm resumed" in resumed.stdout, resumed.stdout + resumed.stderr
    assert script(project, "vm-runscript", "cat /tmp/mem").stdout == "one\n"
    saved = script(project, "vm-ctl", "snapshot", "save", "one")
    assert saved.returncode == 0 and "snapshot one saved" in saved.stdout, saved.stdout + saved.stderr
    assert script(project, "vm-runscript", "echo two > /tmp/mem").returncode == 0
    restored = script(project, "vm-ctl", "snapshot", "restore", "one")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert script(project, "vm-runscript", "cat /tmp/mem").stdout == "one\n"

    # stop: the guest powers off on the ACPI button.
    began = time.monotonic()
    stopped = script(project, "vm-ctl", "stop")
    assert stopped.stdout == "vm stopped (the guest powered off on the ACPI power button)\n", stopped.stdout
    assert time.monotonic() - began < 30
    # The variable is in the part's store, never in the packaged template.
    name = VARIABLE.split("-")[0].encode("utf-16-le")
    assert name not in Path("/usr/share/AAVMF/AAVMF_VARS.fd").read_bytes()
    # The snapshot covered the store as well as the disk; deleting it (stopped) leaves neither.
    assert " one " in store_snapshots(store)
    assert script(project, "vm-ctl", "snapshot", "delete", "one").returncode == 0
    assert " one " not in store_snapshots(store)

    # A cold start: the variable is still there.
    started(project)
    assert script(project, "vm-runscript", READ_VARIABLE).stdout == "kept-by-uefi"
    assert script(project, "vm-ctl", "stop").returncode == 0

    # reset: disk and variables back to what was provisioned.
    reset = project.run("reset:vm")
    assert reset.returncode == 0 and "UEFI variables reset" in reset.stdout, reset.describe()
    assert not store.exists()
    started(project)
    assert store.is_file()
    gone = script(project, "vm-runscript", f"test -e {EFIVARS}/{VARIABLE} || echo gone")
    assert gone.stdout == "gone\n", gone.stdout + gone.stderr
    assert script(project, "vm-ctl", "stop").returncode == 0


# SecureBoot's value: four bytes of attributes, then 1 when Secure Boot is on.
SECURE_BOOT_STATE = f"od -An -tx1 {EFIVARS}/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c | tr -d ' \\n'"


def test_an_x86_64_guest_through_ovmf(project: Project, amd64_uefi_guest: Guest) -> None:
    project.write(vm_config(amd64_uefi_guest, f"image = file://{amd64_uefi_guest.image.path}", free_port(),
                            "firmware = uefi\nkvm_boot_timeout = 240\n"))
    started(project)
    (pid,) = qemu_pids_under(project.root)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("-machine") + 1].startswith("pc-i440fx-")
    assert "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" in argv
    status = json.loads(script(project, "vm-ctl", "status", "--json").stdout)
    assert (status["arch"], status["firmware"]) == ("x86_64", "uefi")
    booted = script(project, "vm-runscript", f"uname -m; {SECURE_BOOT_STATE}")
    assert (booted.returncode, booted.stdout) == (0, "x86_64\n0600000000"), booted.stdout + booted.stderr
    assert script(project, "vm-ctl", "stop").returncode == 0


def test_secure_boot_with_debians_signed_chain(project: Project, secure_boot_guest: Guest) -> None:
    config = vm_config(secure_boot_guest, f"image = file://{secure_boot_guest.image.path}", free_port(),
                       "firmware = uefi-secure\nkvm_boot_timeout = 240\n")
    # shim, GRUB and the kernel under OVMF with SMM: the memory the chain was tried with by hand.
    project.write(config.replace("kvm_memory = 256M", "kvm_memory = 512M"))
    started(project)
    (pid,) = qemu_pids_under(project.root)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("-machine") + 1].startswith("pc-q35-")
    assert "smm=on" in argv and "driver=cfi.pflash01,property=secure,value=on" in argv
    # The kernel says Secure Boot is on: the variable the firmware sets, and its own word.
    said = "dmesg | grep -c 'Secure boot enabled'"
    booted = script(project, "vm-runscript", f"{SECURE_BOOT_STATE}; echo; {said}")
    assert (booted.returncode, booted.stdout) == (0, "0600000001\n1\n"), booted.stdout + booted.stderr
    # The keys enrolled in the Microsoft-keyed template, in the part's own store.
    status = json.loads(script(project, "vm-ctl", "status", "--json").stdout)
    assert (status["firmware"], Path(status["disks"]["varstore"]).is_file()) == ("uefi-secure", True)
    assert script(project, "vm-ctl", "stop").returncode == 0
