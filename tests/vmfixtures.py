"""Fixtures for tests that boot real QEMU guests: the tiny image, keys, ports, cleanup."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmtasks.demo.guestimage import GuestImage, build_guest_image

REPO_ROOT = Path(__file__).resolve().parent.parent
# Guest packages are downloaded once and kept between runs (and shared with the demo).
PACKAGE_CACHE = REPO_ROOT / ".cache" / "guest"

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)


@dataclass(frozen=True)
class Guest:
    image: GuestImage
    key: Path

    def gzipped(self) -> bytes:
        return gzip.compress(self.image.path.read_bytes(), compresslevel=1)


@pytest.fixture(scope="session")
def guest_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def _build(tmp_path_factory: pytest.TempPathFactory, key: Path, *, with_sftp_server: bool = True,
           with_acpi: bool = True, with_rsync: bool = False, with_shares: bool = False) -> Guest:
    """A fresh image per test session: built from the current builder, it cannot be stale."""
    folder = tmp_path_factory.mktemp("guest")
    image = build_guest_image(folder / "guest.img", key.with_suffix(".pub"), PACKAGE_CACHE,
                              with_sftp_server=with_sftp_server, with_acpi=with_acpi, with_rsync=with_rsync,
                              with_shares=with_shares)
    return Guest(image, key)


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Guest:
    return _build(tmp_path_factory, guest_key)


@pytest.fixture(scope="session")
def guest_without_sftp(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Guest:
    return _build(tmp_path_factory, guest_key, with_sftp_server=False)


@pytest.fixture(scope="session")
def guest_without_acpi(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Guest:
    """A guest that ignores the ACPI power button (no acpid, no button driver)."""
    return _build(tmp_path_factory, guest_key, with_acpi=False)


@pytest.fixture(scope="session")
def guest_with_rsync(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Guest:
    """The tiny guest with rsync in it (Debian's, unpacked like the rest), for rsync over ssh."""
    return _build(tmp_path_factory, guest_key, with_rsync=True)


@pytest.fixture(scope="session")
def guest_with_shares(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Guest:
    """The tiny guest with rsync and the 9p and virtio-fs modules, for shares and copied folders."""
    return _build(tmp_path_factory, guest_key, with_rsync=True, with_shares=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def qemu_pids_under(folder: Path) -> list[int]:
    """Live qemu processes whose command line names a path under folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and "qemu-system" in argv[0] and any(str(folder) in arg for arg in argv):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def no_vm_left(tmp_path: Path) -> Iterator[None]:
    """Whatever the test did, no qemu started under tmp_path survives it."""
    yield
    for pid in qemu_pids_under(tmp_path):
        os.kill(pid, signal.SIGKILL)


@contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """backing attached as a real block device; skips where loop devices cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("a loop device needs root")
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {made.stderr.strip()}")
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


# The arm64 guest's packages, in a cache of their own (a package name stands for one .deb there).
ARM64_PACKAGE_CACHE = REPO_ROOT / ".cache" / "guest-arm64"


@pytest.fixture(scope="session")
def arm64_guest(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Guest:
    """The tiny guest built from Debian's arm64 packages, booted through UEFI (demo/uefiguest.py)."""
    from kvmtasks.demo.uefiguest import build_uefi_guest_image

    folder = tmp_path_factory.mktemp("arm64-guest")
    image = build_uefi_guest_image(folder / "guest.img", guest_key.with_suffix(".pub"), ARM64_PACKAGE_CACHE)
    return Guest(image, guest_key)


AMD64_UEFI_PACKAGE_CACHE = REPO_ROOT / ".cache" / "guest-uefi-amd64"


@pytest.fixture(scope="session")
def amd64_uefi_guest(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Guest:
    """The tiny x86_64 guest on a GPT disk with an EFI system partition (systemd-boot)."""
    from kvmtasks.demo.uefiguest import build_uefi_guest_image

    folder = tmp_path_factory.mktemp("amd64-uefi-guest")
    image = build_uefi_guest_image(folder / "guest.img", guest_key.with_suffix(".pub"),
                                   AMD64_UEFI_PACKAGE_CACHE, arch="amd64")
    return Guest(image, guest_key)


@pytest.fixture(scope="session")
def secure_boot_guest(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Guest:
    """The tiny x86_64 guest booted by Debian's signed shim, GRUB and kernel."""
    from kvmtasks.demo.uefiguest import build_uefi_guest_image

    folder = tmp_path_factory.mktemp("secure-boot-guest")
    image = build_uefi_guest_image(folder / "guest.img", guest_key.with_suffix(".pub"),
                                   AMD64_UEFI_PACKAGE_CACHE, arch="amd64", secure_boot=True)
    return Guest(image, guest_key)
