"""Unit tests of the QEMU argv builder: pure, nothing is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.engines.qemu.argv import escape, network_args, qemu_argv

README_COMMON = """
kvm_vnc = 127.0.0.1:3
kvm_graphic = std
kvm_redir =
  tcp:13480::80
kvm_net =
  user,hostname=publicmandriva
  nic,model=ne2k_pci
ssh_port = 13456
ssh_key_path = /path/to/mykey.key
"""


def load(tmp_path: Path, body: str, name: str = "vm") -> Part:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[{name}]\n{body}")
    (part,) = load_file(path, tmp_path)
    return part


def argv(part: Part, accel: str = "tcg", disk_format: str = "raw") -> list[str]:
    return qemu_argv(part, accel=accel, disk_format=disk_format, listen_address="127.0.0.1")


def tail(tmp_path: Path, name: str = "vm") -> list[str]:
    run = tmp_path / "var" / name
    return [
        "-chardev", f"file,id=console,path={run}/console.log",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={run}/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-monitor", "none",
        "-pidfile", f"{run}/qemu.pid",
        "-daemonize",
    ]


def test_readme_remote_gzip_image_with_hda(tmp_path: Path) -> None:
    part = load(tmp_path, "image = http://example.invalid/public.mdv2010.0_x86_64.qcow2.img.gz\n"
                          "gzip = true\nimage_type = hda\n" + README_COMMON)
    assert part.image_path == tmp_path / "parts/vm/public.mdv2010.0_x86_64.qcow2.img"
    image = tmp_path / "parts/vm/vm.overlay.qcow2"  # the image stays as verified, under an overlay
    assert argv(part, disk_format="qcow2") == [
        "qemu-system-x86_64", "-name", "vm", "-accel", "tcg", "-m", "512M", "-smp", "1",
        "-drive", f"file={image},if=ide,index=0,media=disk,format=qcow2",
        "-device", "virtio-rng-pci",
        "-vnc", "127.0.0.1:3",
        "-vga", "std",
        "-net", "user,hostname=publicmandriva"
                ",hostfwd=tcp:127.0.0.1:13480-:80,hostfwd=tcp:127.0.0.1:13456-:22",
        "-net", "nic,model=ne2k_pci",
        *tail(tmp_path),
    ]


def test_readme_remote_raw_image_uses_virtio_drive_without_boot_on(tmp_path: Path) -> None:
    part = load(tmp_path, "image = http://example.invalid/public.img\ngzip = false\noverlay = false\n"
                + README_COMMON)
    args = argv(part)
    drive = args[args.index("-drive") + 1]
    assert drive == f"file={tmp_path}/parts/vm/public.img,if=virtio,cache=none,format=raw"
    assert "boot=on" not in drive


def test_an_image_boots_its_qcow2_overlay_on_virtio_or_as_hda(tmp_path: Path) -> None:
    part = load(tmp_path, "image = http://example.invalid/debian-12.raw.xz\n")
    args = argv(part, disk_format="qcow2")
    overlay = tmp_path / "parts/vm/vm.overlay.qcow2"
    assert args[args.index("-drive") + 1] == f"file={overlay},if=virtio,cache=none,format=qcow2"
    hda = load(tmp_path, "image = http://example.invalid/debian-12.raw.xz\nimage_type = hda\n")
    args = argv(hda, disk_format="qcow2")
    assert args[args.index("-drive") + 1] == f"file={overlay},if=ide,index=0,media=disk,format=qcow2"


def test_a_file_with_overlay_true_boots_an_overlay_named_after_the_part(tmp_path: Path) -> None:
    part = load(tmp_path, "file = /dev/sdb\noverlay = true\nlocation = /srv/a,b\n", name="db")
    args = argv(part, disk_format="qcow2")
    assert part.image_path == Path("/dev/sdb")
    drive = "file=/srv/a,,b/db.overlay.qcow2,if=virtio,cache=none,format=qcow2"
    assert args[args.index("-drive") + 1] == drive


def test_readme_local_image_file_is_used_in_place(tmp_path: Path) -> None:
    image = tmp_path / "my images" / "disk.qcow2"
    part = load(tmp_path, f"file = {image}\n" + README_COMMON)
    args = argv(part, disk_format="qcow2")
    assert args[args.index("-drive") + 1] == f"file={image},if=virtio,cache=none,format=qcow2"


def test_readme_linux_partition_defaults(tmp_path: Path) -> None:
    part = load(tmp_path, "file = /dev/sdb\n")
    assert argv(part, accel="kvm") == [
        "qemu-system-x86_64", "-name", "vm", "-accel", "kvm", "-m", "512M", "-smp", "1",
        "-drive", "file=/dev/sdb,if=virtio,cache=none,format=raw",
        "-device", "virtio-rng-pci",
        "-display", "none",
        *tail(tmp_path),
    ]


def test_the_cloud_init_seed_is_a_read_only_cd_rom_after_the_disk(tmp_path: Path) -> None:
    part = load(tmp_path, f"file = /dev/sdb\ncloud_init = true\nkvm_run_directory = {tmp_path}/r,un\n")
    assert argv(part)[:13] == [
        "qemu-system-x86_64", "-name", "vm", "-accel", "tcg", "-m", "512M", "-smp", "1",
        "-drive", "file=/dev/sdb,if=virtio,cache=none,format=raw",
        "-drive", f"file={tmp_path}/r,,un/vm/seed.iso,if=ide,media=cdrom,readonly=on,format=raw",
    ]
    hda = load(tmp_path, "file = /dev/sdb\ncloud_init = true\nimage_type = hda\n")
    assert [arg for arg in argv(hda) if "if=ide" in arg] == [
        "file=/dev/sdb,if=ide,index=0,media=disk,format=raw",
        f"file={tmp_path}/var/vm/seed.iso,if=ide,media=cdrom,readonly=on,format=raw",
    ]


def test_commas_in_paths_and_names_are_doubled(tmp_path: Path) -> None:
    part = load(tmp_path, f"file = {tmp_path}/a,b.img\nkvm_run_directory = {tmp_path}/run,dir\n")
    args = argv(part)
    assert f"file={tmp_path}/a,,b.img,if=virtio,cache=none,format=raw" in args
    assert f"socket,id=qmp,path={tmp_path}/run,,dir/vm/qmp.sock,server=on,wait=off" in args
    assert f"file,id=console,path={tmp_path}/run,,dir/vm/console.log" in args
    assert escape("a,,b") == "a,,,,b"


def test_forwards_add_user_network_and_default_nic(tmp_path: Path) -> None:
    redirects = "kvm_redir =\n  udp:5353:10.0.2.15:53\n  8080::80\n"
    part = load(tmp_path, f"file = /dev/sdb\nssh_port = 2222\n{redirects}")
    assert network_args(part, "127.0.0.1") == [
        "-net", "nic",
        "-net", "user,hostfwd=udp:127.0.0.1:5353-10.0.2.15:53"
                ",hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22",
    ]


def test_forwards_listen_on_the_given_address(tmp_path: Path) -> None:
    part = load(tmp_path, "file = /dev/sdb\nssh_port = 2222\n")
    assert network_args(part, "0.0.0.0") == ["-net", "nic", "-net", "user,hostfwd=tcp:0.0.0.0:2222-:22"]


def test_no_network_options_leave_qemu_defaults(tmp_path: Path) -> None:
    part = load(tmp_path, "file = /dev/sdb\n")
    assert network_args(part, "127.0.0.1") == []


def test_options_every_user_needs(tmp_path: Path) -> None:
    part = load(tmp_path, "file = /dev/sdb\nkvm_memory = 2G\nkvm_smp = 2\nkvm_snapshot = yes\n"
                          "kvm_binary = /opt/qemu/bin/qemu-system-x86_64\n"
                          "kvm_extra_args =\n  -cpu\n  max,+ssse3\n")
    args = argv(part)
    assert args[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert args[args.index("-m") + 1] == "2G"
    assert args[args.index("-smp") + 1] == "2"
    assert "-snapshot" in args
    assert args[-2:] == ["-cpu", "max,+ssse3"]


@pytest.mark.parametrize("value", ["a b", "$(touch x)", "`id`", "-o ProxyCommand=x", "é;'\"", "a,b"])
def test_config_values_stay_single_argv_elements(tmp_path: Path, value: str) -> None:
    # buildout syntax: a $ not followed by { is text ($$ would reach the part as $$).
    part = load(tmp_path, f"file = {tmp_path}/{value}.img\nkvm_extra_args =\n  {value}\n")
    args = argv(part)
    assert f"file={escape(tmp_path / (value + '.img'))},if=virtio,cache=none,format=raw" in args
    assert args[-1] == value


def test_the_qmp_socket_leaves_a_folder_too_deep_for_a_unix_socket_for_a_hashed_private_name(
    tmp_path: Path,
) -> None:
    from kvmtasks.config.runfiles import SOCKET_PATH_MAX, long_path_socket_folder, qmp_socket

    assert qmp_socket(tmp_path / "vm") == tmp_path / "vm" / "qmp.sock"
    deep = tmp_path / ("d" * (SOCKET_PATH_MAX - len(str(tmp_path)))) / "vm"
    moved = qmp_socket(deep)
    assert moved.parent == long_path_socket_folder() and moved.name.startswith("qmp-")
    assert len(str(moved)) < 50
    assert qmp_socket(deep) == moved and qmp_socket(deep.parent / "other") != moved  # stable, per part
