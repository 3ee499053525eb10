"""Build the tiny guest image and boot it in real QEMU under TCG (never KVM: guests crash under it here)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmtasks.demo.guestimage import GuestImage, GuestImageError, build_guest_image, main
from tests.vmfixtures import PACKAGE_CACHE, free_port

BOOT_TIMEOUT = 120.0
SSH_OPTS = [
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "IdentitiesOnly=yes",
    "-o", "LogLevel=ERROR",
]  # fmt: skip


@pytest.fixture(scope="session")
def guest_cache() -> Path:
    return PACKAGE_CACHE


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory, guest_key: Path, guest_cache: Path) -> GuestImage:
    dest = tmp_path_factory.mktemp("guest") / "guest.img"
    return build_guest_image(dest, guest_key.with_suffix(".pub"), guest_cache)


@pytest.fixture(scope="session")
def guest_image_no_sftp(
    tmp_path_factory: pytest.TempPathFactory, guest_key: Path, guest_cache: Path, guest_image: GuestImage
) -> GuestImage:
    # built through the command line entry point, which the demo uses
    dest = tmp_path_factory.mktemp("guest-nosftp") / "guest.img"
    argv = [str(dest), "--key", str(guest_key.with_suffix(".pub")), "--cache", str(guest_cache)]
    assert main([*argv, "--no-sftp-server"]) == 0
    return GuestImage(path=dest, kernel_release=guest_image.kernel_release)


@dataclass(frozen=True)
class Guest:
    port: int
    key: Path
    console: Path
    qemu: subprocess.Popen[bytes]

    def ssh(self, *command: str, check: bool = True, wait: int = 10) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", "-p", str(self.port), "-i", str(self.key), *SSH_OPTS, "-o", f"ConnectTimeout={wait}"]
        argv += ["root@127.0.0.1", *command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)

    def scp(self, src: str, dst: str, *extra: str) -> subprocess.CompletedProcess[str]:
        argv = ["scp", *extra, "-P", str(self.port), "-i", str(self.key), *SSH_OPTS]
        argv += ["-o", "ConnectTimeout=10", src, dst]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@contextlib.contextmanager
def booted(
    image: Path, key: Path, workdir: Path, drive: str, net: Callable[[int], list[str]]
) -> Iterator[Guest]:
    """Boot image in QEMU and yield once ssh answers; QEMU is always killed afterwards."""
    port = free_port()
    console = workdir / "console.log"
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "256M", "-display", "none",
        "-serial", f"file:{console}",
        "-drive", f"file={image},if={drive},format=raw",
        *net(port),
    ]  # fmt: skip
    with open(workdir / "qemu.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    guest = Guest(port=port, key=key, console=console, qemu=proc)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"qemu exited with {proc.returncode}: {(workdir / 'qemu.log').read_text()}")
            try:
                # short connect timeout: before the guest NIC is up slirp holds the connection open
                if guest.ssh("true", check=False, wait=3).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                text = console.read_text(errors="replace") if console.exists() else ""
                pytest.fail(f"no ssh after {BOOT_TIMEOUT:.0f} s; console:\n{text[-3000:]}")
            time.sleep(0.5)
        yield guest
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _virtio_net(port: int) -> list[str]:
    return ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", "virtio-net-pci,netdev=n0"]


def _ne2k_net(port: int) -> list[str]:
    return ["-net", "nic,model=ne2k_pci", "-net", f"user,hostfwd=tcp:127.0.0.1:{port}-:22"]


def test_image_is_small_and_written_atomically(guest_image: GuestImage) -> None:
    assert guest_image.path.is_file()
    assert 8 << 20 < guest_image.path.stat().st_size < 24 << 20
    assert not guest_image.path.with_name(guest_image.path.name + ".part").exists()
    assert guest_image.kernel_release.endswith("-amd64")
    # syslinux.cfg is what boots the kernel with the console on the serial port
    cfg = subprocess.run(
        ["mtype", "-i", str(guest_image.path), "::syslinux.cfg"], capture_output=True, text=True, check=True
    ).stdout
    assert "KERNEL vmlinuz" in cfg and "console=ttyS0" in cfg


def test_missing_key_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(GuestImageError, match="not found") as info:
        build_guest_image(tmp_path / "x.img", tmp_path / "nokey.pub", tmp_path / "cache")
    assert "\n" not in str(info.value)


def test_missing_tool_names_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "k.pub"
    key.write_text("ssh-ed25519 AAAA test\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GuestImageError, match=r"^apt-cache not found; install the apt package$"):
        build_guest_image(tmp_path / "x.img", key, tmp_path / "cache")


@pytest.mark.vm
def test_boots_virtio_to_ssh_scp_and_poweroff(
    guest_image: GuestImage, guest_key: Path, tmp_path: Path
) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(300_000))
    back = tmp_path / "back.bin"
    with booted(guest_image.path, guest_key, tmp_path, "virtio", _virtio_net) as guest:
        assert guest.ssh("uname", "-r").stdout.strip() == guest_image.kernel_release
        assert "/dev/vda /mnt vfat" in guest.ssh("cat", "/proc/mounts").stdout
        # modern scp goes over SFTP, served by /usr/lib/sftp-server
        up = guest.scp(str(payload), "root@127.0.0.1:/tmp/payload.bin")
        assert up.returncode == 0, up.stderr
        down = guest.scp("root@127.0.0.1:/tmp/payload.bin", str(back))
        assert down.returncode == 0, down.stderr
        assert back.read_bytes() == payload.read_bytes()
        # busybox init turns poweroff into an ACPI power-off, which ends QEMU
        guest.ssh("poweroff", check=False)
        assert guest.qemu.wait(timeout=60) == 0


@pytest.mark.vm
def test_boots_ide_ne2k_without_sftp_server(
    guest_image_no_sftp: GuestImage, guest_key: Path, tmp_path: Path
) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(100_000))
    back = tmp_path / "back.bin"
    with booted(guest_image_no_sftp.path, guest_key, tmp_path, "ide", _ne2k_net) as guest:
        assert guest.ssh("uname", "-r").stdout.strip() == guest_image_no_sftp.kernel_release
        assert "/dev/sda /mnt vfat" in guest.ssh("cat", "/proc/mounts").stdout
        assert "ne2k-pci" in guest.ssh("readlink", "/sys/class/net/eth0/device/driver").stdout
        assert guest.ssh("test", "-e", "/usr/lib/sftp-server", check=False).returncode != 0
        # without sftp-server modern scp fails; legacy scp -O runs the guest's scp instead
        assert guest.scp(str(payload), "root@127.0.0.1:/tmp/p.bin").returncode != 0
        up = guest.scp(str(payload), "root@127.0.0.1:/tmp/p.bin", "-O")
        assert up.returncode == 0, up.stderr
        down = guest.scp("root@127.0.0.1:/tmp/p.bin", str(back), "-O")
        assert down.returncode == 0, down.stderr
        assert back.read_bytes() == payload.read_bytes()
