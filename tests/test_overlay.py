"""The copy-on-write overlay, reset and disk_size: real doit runs, real qemu-img, real guests.

The pipeline tests provision over the suite's HTTP server and read the overlay
back with `qemu-img info`; the VM tests boot the tiny busybox guest from an
overlay and write to its disk from inside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.test_provision_pipeline import assert_ok, assert_one_line_error, part, payload
from tests.test_vm_e2e import script, vm_config
from tests.vmfixtures import Guest, free_port, loop_device, needs_qemu, qemu_pids_under

if TYPE_CHECKING:
    from tests.conftest import Project
    from tests.httpserver import FileServer
    from tests.reliability import Recorder

MIB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def info(path: Path) -> dict[str, Any]:
    done = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                          capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def write_into(overlay: Path, data: bytes) -> None:
    """What a guest write does: data lands in the overlay (qemu-io, no VM needed)."""
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {len(data)}", str(overlay)],
                   capture_output=True, check=True)


def read_disk(overlay: Path, length: int) -> bytes:
    out = overlay.with_name("read.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(overlay), str(out)], check=True)
    try:
        return out.read_bytes()[:length]
    finally:
        out.unlink()


# -- the overlay step --------------------------------------------------------------------------

def test_an_image_is_booted_through_an_overlay_that_outlives_a_changed_checksum(
    project: Project, http_server: FileServer
) -> None:
    raw = payload(2 * MIB)
    url = http_server.put("disk.img", raw)
    project.write(part(image=url, sha256_image=hashlib.sha256(raw).hexdigest()))

    first = project.provision()

    assert_ok(first)
    assert "overlay:vm" in first.executed
    base, overlay = project.parts / "vm" / "disk.img", project.parts / "vm" / "vm.overlay.qcow2"
    described = info(overlay)
    assert described["format"] == "qcow2"
    assert described["backing-filename"] == str(base)
    assert described["backing-filename-format"] == "raw"
    assert described["virtual-size"] == len(raw)
    write_into(overlay, b"Z" * 4096)
    assert read_disk(overlay, 4096) == b"Z" * 4096
    assert base.read_bytes() == raw

    again = project.provision()
    assert_ok(again)
    assert "overlay:vm" in again.up_to_date

    project.write(part(image=url, md5_image=hashlib.md5(raw).hexdigest()))
    checked = project.provision()
    assert_ok(checked)
    assert checked.ran() == {"verify-image"}
    assert "overlay:vm" in checked.up_to_date
    assert read_disk(overlay, 4096) == b"Z" * 4096, "a changed checksum threw the guest's writes away"


def test_a_new_image_gets_a_new_overlay(project: Project, http_server: FileServer) -> None:
    first_url = http_server.put("one/disk.img", payload(MIB, seed=1))
    project.write(part(image=first_url))
    assert_ok(project.provision())
    overlay = project.parts / "vm" / "vm.overlay.qcow2"
    write_into(overlay, b"Z" * 4096)

    second = payload(2 * MIB, seed=2)
    project.write(part(image=http_server.put("two/disk.img", second)))
    run = project.provision()

    assert_ok(run)
    assert {"download:vm", "overlay:vm"} <= run.executed
    assert info(overlay)["virtual-size"] == len(second)
    assert read_disk(overlay, 4096) == second[:4096]


def test_overlay_false_boots_the_image_and_makes_no_overlay(
    project: Project, http_server: FileServer
) -> None:
    project.write(part(image=http_server.put("disk.img", payload()), overlay="false"))
    run = project.provision()
    assert_ok(run)
    assert "overlay:vm" not in run.executed
    assert not (project.parts / "vm" / "vm.overlay.qcow2").exists()
    reset = project.run("reset:vm")
    assert_one_line_error(reset, "reset:vm", "reset needs overlay = true")


def test_reset_makes_a_new_empty_overlay_and_forgets_the_host_key(
    project: Project, http_server: FileServer
) -> None:
    raw = payload(MIB)
    project.write(part(image=http_server.put("disk.img", raw)))
    assert_ok(project.provision())
    overlay = project.parts / "vm" / "vm.overlay.qcow2"
    write_into(overlay, b"Z" * 4096)
    known_hosts = project.var / "vm" / "known_hosts"
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    known_hosts.write_text("[localhost]:2222 ssh-ed25519 AAAA\n")

    reset = project.run("reset:vm")

    assert_ok(reset)
    assert "vm: disk reset to" in reset.stdout
    assert read_disk(overlay, 4096) == raw[:4096]
    assert not known_hosts.exists()
    assert (project.parts / "vm" / "disk.img").read_bytes() == raw
    write_into(overlay, b"Z" * 4096)
    by_script = subprocess.run([str(project.root / "bin" / "vm-ctl"), "reset"], capture_output=True,
                               text=True, check=False, env=project.environment())
    assert by_script.returncode == 0, by_script.stderr
    assert read_disk(overlay, 4096) == raw[:4096]


def test_doit_clean_removes_the_overlay_and_never_a_local_file(
    project: Project, tmp_path: Path, reliability: Recorder
) -> None:
    image = tmp_path / "mine.img"
    image.write_bytes(payload(MIB))
    reliability.keep(image)
    project.write(part(file=image, overlay="true"))
    assert_ok(project.provision())
    overlay = project.parts / "vm" / "vm.overlay.qcow2"
    assert info(overlay)["backing-filename"] == str(image)

    cleaned = project.run("clean", "overlay:vm", "verify-image:vm")

    assert_ok(cleaned)
    assert not overlay.exists()
    assert reliability.lost() == 0


# -- disk_size -----------------------------------------------------------------------------------

def test_disk_size_is_the_overlays_virtual_size_and_a_change_makes_a_new_overlay(
    project: Project, http_server: FileServer
) -> None:
    url = http_server.put("disk.img", payload(MIB))
    project.write(part(image=url, disk_size="64M"))
    assert_ok(project.provision())
    overlay = project.parts / "vm" / "vm.overlay.qcow2"
    assert info(overlay)["virtual-size"] == 64 * MIB

    project.write(part(image=url, disk_size="1G"))
    run = project.provision()

    assert_ok(run)
    assert run.executed & {"download:vm", "decompress:vm", "verify-image:vm"} == set()
    assert "overlay:vm" in run.executed
    assert info(overlay)["virtual-size"] == 1 << 30


def test_disk_size_smaller_than_the_image_is_refused_in_one_line(
    project: Project, http_server: FileServer, reliability: Recorder
) -> None:
    reliability.bad_input("disk-size")
    project.write(part(image=http_server.put("disk.img", payload(2 * MIB)), disk_size="1M"))

    run = project.provision()

    line = assert_one_line_error(run, "overlay:vm", "disk_size = 1M", "smaller than the image")
    assert "2097152 bytes" in line
    assert not (project.parts / "vm" / "vm.overlay.qcow2").exists()


def test_disk_size_without_an_overlay_is_a_config_error(
    project: Project, tmp_path: Path, reliability: Recorder
) -> None:
    reliability.bad_input("disk-size")
    image = tmp_path / "mine.img"
    image.write_bytes(payload(MIB))
    reliability.keep(image)
    config = project.write(part(file=image, disk_size="20G"))

    run = project.run("list")

    assert_one_line_error(run, f"{config}: [vm] disk_size = '20G'", "needs overlay = true")
    assert reliability.lost() == 0


def test_an_image_with_a_backing_file_of_its_own_is_refused(
    project: Project, tmp_path: Path, reliability: Recorder
) -> None:
    reliability.bad_input("backing")
    lower = tmp_path / "lower.img"
    lower.write_bytes(payload(MIB))
    upper = tmp_path / "upper.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(lower), str(upper)],
                   check=True)
    reliability.keep(lower, upper)
    project.write(part(file=upper, overlay="true"))

    run = project.provision()

    assert_one_line_error(run, "overlay:vm", f"{upper} has a backing file of its own")
    assert not (project.parts / "vm" / "vm.overlay.qcow2").exists()
    assert reliability.lost() == 0


def test_an_overlay_over_a_block_device_never_writes_it(
    project: Project, tmp_path: Path, reliability: Recorder
) -> None:
    backing = tmp_path / "device.img"
    backing.write_bytes(payload(4 * MIB))
    with loop_device(backing) as device:
        reliability.keep(device)
        project.write(part(file=device, overlay="true", disk_size="8M"))
        assert_ok(project.provision())
        overlay = project.parts / "vm" / "vm.overlay.qcow2"
        described = info(overlay)
        assert (described["backing-filename"], described["backing-filename-format"]) == (str(device), "raw")
        assert described["virtual-size"] == 8 * MIB
        write_into(overlay, b"Z" * MIB)
        assert reliability.lost() == 0


# -- real guests -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["image", "block device"])
@pytest.mark.usefixtures("no_vm_left")
@pytest.mark.vm
@needs_qemu
def test_a_guest_write_survives_stop_and_start_and_reset_throws_it_away(
    project: Project, guest: Guest, http_server: FileServer, tmp_path: Path, reliability: Recorder,
    where: str,
) -> None:
    raw = guest.image.path.read_bytes()
    copy = tmp_path / "device.img"
    copy.write_bytes(raw)
    context = loop_device(copy) if where == "block device" else contextlib.nullcontext(None)
    with context as device:
        if device is None:
            source = f"image = {http_server.put('guest.img', raw)}\ndisk_size = 64M\n"
            base = project.parts / "vm" / "guest.img"
        else:
            # As the first IDE disk: image_type = hda boots the overlay too.
            source = f"file = {device}\noverlay = true\ndisk_size = 64M\nimage_type = hda\n"
            base = device
        project.write(vm_config(guest, source, free_port()))
        started = project.run("start:vm", timeout=300)
        assert started.returncode == 0, started.describe()
        assert "overlay:vm" in started.executed
        pristine = sha256(base)
        reliability.keep(base)

        disk = "vda" if device is None else "sda"
        sectors = script(project, "vm-runscript", f"cat /sys/block/{disk}/size")
        assert (sectors.returncode, sectors.stdout.strip()) == (0, str(64 * MIB // 512)), sectors.stderr
        wrote = script(project, "vm-runscript",
                       "grep -q ' /mnt ' /proc/mounts && echo kept-by-the-overlay > /mnt/marker && sync")
        assert wrote.returncode == 0, wrote.stderr

        reliability.fault("reset-running")
        refused = script(project, "vm-ctl", "reset")
        assert refused.returncode == 1
        assert refused.stderr.strip().startswith("vm-ctl: vm is running (pid ")
        assert len(refused.stderr.strip().splitlines()) == 1
        by_doit = project.run("reset:vm")
        assert_one_line_error(by_doit, "reset:vm", "vm is running")
        assert script(project, "vm-runscript", "cat /mnt/marker").stdout == "kept-by-the-overlay\n"
        config = project.configs[0].read_text()
        project.configs[0].write_text(config.replace("disk_size = 64M", "disk_size = 128M"))
        regrow = project.provision()
        assert_one_line_error(regrow, "overlay:vm", "vm is running")
        project.configs[0].write_text(config)

        assert script(project, "vm-ctl", "stop").returncode == 0
        assert script(project, "vm-ctl", "start").returncode == 0
        kept = script(project, "vm-runscript", "cat /mnt/marker")
        assert (kept.returncode, kept.stdout) == (0, "kept-by-the-overlay\n"), kept.stderr
        assert script(project, "vm-ctl", "stop").returncode == 0

        reset = script(project, "vm-ctl", "reset")
        assert reset.returncode == 0, reset.stderr
        restarted = project.run("start:vm", timeout=300)
        assert restarted.returncode == 0, restarted.describe()
        assert "overlay:vm" not in restarted.executed
        gone = script(project, "vm-runscript", "test -e /mnt/marker")
        assert gone.returncode == 1, "the guest's write outlived reset"
        assert script(project, "vm-ctl", "stop").returncode == 0
        assert qemu_pids_under(project.root) == []
        assert sha256(base) == pristine
        assert reliability.lost() == 0


def test_reset_leaves_no_partial_overlay_when_the_base_is_gone(
    project: Project, http_server: FileServer
) -> None:
    project.write(part(image=http_server.put("disk.img", payload(MIB))))
    assert_ok(project.provision())
    (project.parts / "vm" / "disk.img").unlink()
    run = subprocess.run([str(project.root / "bin" / "vm-ctl"), "reset"], capture_output=True, text=True,
                         check=False, env=project.environment())
    assert run.returncode == 1
    assert run.stderr.strip().endswith("not found; run: doit provision:vm")
    assert [p.name for p in (project.parts / "vm").iterdir() if p.name.endswith(".part")] == []
    assert os.path.exists(project.parts / "vm" / "vm.overlay.qcow2")


def test_a_libvirt_part_has_an_overlay_too_unless_it_says_otherwise(project: Project) -> None:
    """With libvirt the overlay becomes a volume backed by the image's (tests/test_libvirt.py)."""
    body = part(image="http://127.0.0.1:9/disk.img", kvm_engine="libvirt")
    project.write(body)
    listed = project.run("list", "--all")
    assert_ok(listed)
    assert "reset:vm" in listed.stdout and "overlay:vm" in listed.stdout

    project.write(body + "\noverlay = false")
    listed = project.run("list", "--all")
    assert_ok(listed)
    assert "overlay:vm" not in listed.stdout
