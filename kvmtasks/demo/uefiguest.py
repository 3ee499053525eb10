"""Build the tiny guest booted through UEFI: for arm64, or for amd64 (plain, or Secure Boot).

The same guest as guestimage.py (Debian's kernel, busybox, dropbear), from Debian's packages of
that architecture (downloaded and unpacked, never installed; arm64 needs `dpkg --add-architecture
arm64`, which ./dev does): a GPT disk with one EFI system partition holding the removable-media
boot loader (BOOTAA64.EFI, BOOTX64.EFI: an empty variable store boots it), the kernel and the
initramfs. The loader is systemd-boot with one entry; for Secure Boot it is Debian's signed chain,
shim then GRUB, which boot Debian's signed kernel. The FAT is made in a file and placed at its
offset, so building needs no root and no loop device. The guest mounts efivarfs, so that it can
read and write UEFI variables.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmtasks.demo import guestimage
from kvmtasks.demo.guestimage import GuestImage, GuestImageError

PACKAGES = ("busybox-static", "dropbear-bin", "libtomcrypt1", "libtommath1", "libgmp10", "libc6",
            "libcrypt1", "zlib1g", "openssh-sftp-server", "systemd-boot-efi")
# Debian's signed boot chain: shim (signed by Microsoft), GRUB and the kernel (signed by Debian).
SECURE_BOOT_PACKAGES = ("shim-signed", "grub-efi-amd64-signed")


# Debian's arm64 kernel has its PCI, virtio-blk and vfat drivers as modules; ACPI's power button
# reaches acpid through button and evdev.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "vfat", "nls_cp437", "nls_ascii",
                  "nls_utf8", "nls_iso8859_1", "efivarfs")

@dataclass(frozen=True)
class Target:
    """What differs between the architectures the builder knows."""

    arch: str  # Debian's name
    triplet: str  # the multiarch library folder
    loader: tuple[str, str]  # the dynamic loader's path, and where its link points
    removable: str  # the boot loader's file name on removable media
    systemd_boot: str
    console: str
    modules: tuple[str, ...]


TARGETS = {
    "arm64": Target("arm64", "aarch64-linux-gnu",
                    ("lib/ld-linux-aarch64.so.1", "aarch64-linux-gnu/ld-linux-aarch64.so.1"),
                    "BOOTAA64.EFI", "systemd-bootaa64.efi", "ttyAMA0", WANTED_MODULES),
    "amd64": Target("amd64", "x86_64-linux-gnu",
                    ("lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
                    "BOOTX64.EFI", "systemd-bootx64.efi", "ttyS0",
                    (*guestimage.WANTED_MODULES, "e1000e", "efivarfs")),  # the PC's NICs (Q35: e1000e)
}
ARCH = "arm64"
# dropbearkey runs on the host: the host key is made by the host's own dropbear build.
HOST_KEY_PACKAGES = ("dropbear-bin", "libtomcrypt1", "libtommath1")
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_OFFSET = 1 << 20  # the partition's first byte: sector 2048, as partitioning tools align it
LOADER_CONF = "default kvmtasks.conf\ntimeout 0\n"
ENTRY = "title kvmtasks\nlinux /vmlinuz\ninitrd /initrd.gz\noptions console={console} quiet\n"
# Debian's signed GRUB reads grub.cfg beside itself, else from /EFI/debian.
GRUB_CFG = ("set timeout=0\nmenuentry kvmtasks {{\n  linux /vmlinuz console={console} quiet\n"
            "  initrd /initrd.gz\n}}\n")
EFIVARFS = "mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null\n"


def _kernel_package(debs: Path, arch: str) -> str:
    cached = guestimage._newest_deb(debs, f"linux-image-*-{arch}")
    if cached is not None:
        return cached.name.split("_")[0]
    out = guestimage._run(["apt-cache", "depends", f"linux-image-{arch}:{arch}"],
                          hint=f"run dpkg --add-architecture {arch} and apt-get update first (./dev setup)")
    match = re.search(rf"Depends: (linux-image-\d\S*?)(:{arch})?$", out, re.MULTILINE)
    if match is None:
        raise GuestImageError(f"apt-cache names no versioned linux-image package for {arch} "
                              f"(run dpkg --add-architecture {arch} and apt-get update first)")
    return match.group(1)


def _initramfs(target: Target, root: Path, release: str, authorized_key: Path, host_key: bytes) -> bytes:
    modules = guestimage._module_closure(root / "lib/modules" / release,
                                         target.modules + guestimage.ACPI_MODULES)
    init = guestimage.INIT.format(modules=" ".join(guestimage.module_names(modules)), release=release)
    init = init.replace("hostname kvmtasks-guest\n", EFIVARFS + "hostname kvmtasks-guest\n", 1)
    initramfs = guestimage.guest_system(root, release, init, modules, authorized_key.read_bytes(), host_key,
                                        with_acpi=True)
    add = initramfs.add
    add("usr/sbin/dropbear", (root / "usr/sbin/dropbear").read_bytes(), 0o755)
    add("usr/lib/sftp-server", (root / "usr/lib/openssh/sftp-server").read_bytes(), 0o755)
    # Another architecture's libraries cannot be asked of the host's ldd: every one unpacked goes
    # in (~5 MB).
    for libdir in (f"lib/{target.triplet}", f"usr/lib/{target.triplet}"):
        for library in sorted((root / libdir).glob("*.so*")):
            add(f"lib/{target.triplet}/{library.name}", library.resolve().read_bytes(), 0o755)
    add(target.loader[0], target.loader[1].encode(), 0o777, stat.S_IFLNK)
    return initramfs.archive()


def _kernel_image(path: Path) -> bytes:
    """The kernel as an EFI application: Debian ships arm64's Image gzip'd, its EFI stub inside."""
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _gpt(total_sectors: int, first: int, last: int) -> tuple[bytes, bytes, bytes]:
    """The protective MBR, the primary GPT (header and entries) and the backup GPT (entries and
    header) of a disk with one EFI system partition from sector first to last (inclusive)."""
    entry = (uuid.UUID(ESP_TYPE).bytes_le + uuid.uuid4().bytes_le + struct.pack("<QQQ", first, last, 0)
             + "ESP".encode("utf-16-le").ljust(72, b"\0"))
    entries = entry.ljust(128 * 128, b"\0")
    end = total_sectors - 1
    disk_guid = uuid.uuid4().bytes_le

    def header(current: int, backup: int, entries_at: int) -> bytes:
        def fields(crc: int) -> bytes:
            return struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, crc, 0, current, backup,
                               34, end - 33, disk_guid, entries_at, 128, 128, zlib.crc32(entries))
        return fields(zlib.crc32(fields(0))).ljust(512, b"\0")

    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                               min(end, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr), header(1, end, 2) + entries, entries + header(end, 1, end - 32)


def _gpt_disk(dest: Path, fat: Path) -> None:
    """A GPT disk holding fat as its one EFI system partition."""
    size = fat.stat().st_size
    total = (ESP_OFFSET + size + ESP_OFFSET) // 512  # room for the backup GPT at the end
    first = ESP_OFFSET // 512
    mbr, primary, backup = _gpt(total, first, first + size // 512 - 1)
    with open(fat, "rb") as source, open(dest, "wb") as disk:
        disk.truncate(total * 512)
        disk.write(mbr + primary)
        disk.seek(ESP_OFFSET)
        shutil.copyfileobj(source, disk, 1 << 20)
        disk.seek((total - 33) * 512)
        disk.write(backup)


def _boot_loader(target: Target, root: Path, esp: Path, secure_boot: bool) -> None:
    """The removable-media boot loader and its configuration on the ESP."""
    (esp / "EFI/BOOT").mkdir(parents=True)
    if secure_boot:
        chain = {"BOOTX64.EFI": "usr/lib/shim/shimx64.efi.signed",
                 "grubx64.efi": "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"}
        for name, packaged in chain.items():
            _copy_needed(root / packaged, esp / "EFI/BOOT" / name, root)
        (esp / "EFI/debian").mkdir(parents=True)
        for folder in ("EFI/BOOT", "EFI/debian"):
            (esp / folder / "grub.cfg").write_text(GRUB_CFG.format(console=target.console))
        return
    (esp / "loader/entries").mkdir(parents=True)
    _copy_needed(root / "usr/lib/systemd/boot/efi" / target.systemd_boot, esp / "EFI/BOOT" / target.removable,
                 root)
    (esp / "loader/loader.conf").write_text(LOADER_CONF)
    (esp / "loader/entries/kvmtasks.conf").write_text(ENTRY.format(console=target.console))


def _copy_needed(source: Path, dest: Path, root: Path) -> None:
    if not source.is_file():
        raise GuestImageError(f"{source.relative_to(root)} is missing from the unpacked packages")
    shutil.copyfile(source, dest)


def build_uefi_guest_image(dest: Path, authorized_key: Path, cache_dir: Path, *, arch: str = ARCH,
                           secure_boot: bool = False) -> GuestImage:
    """Build the image at dest (atomically); packages are cached in cache_dir (one per arch).

    secure_boot (amd64): Debian's signed shim, GRUB and kernel, which boot with Secure Boot on.
    """
    target = TARGETS[arch]
    dest, cache_dir = Path(dest).absolute(), Path(cache_dir).absolute()
    if not Path(authorized_key).is_file():
        raise GuestImageError(f"authorized key {authorized_key} not found")
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = (*PACKAGES, *(SECURE_BOOT_PACKAGES if secure_boot else ()))
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel_pkg = _kernel_package(cache_dir / "debs", arch)
        root = guestimage._fetch_and_unpack(cache_dir, (kernel_pkg, *packages), arch=arch)
        host_root = guestimage._fetch_and_unpack(cache_dir / "host", HOST_KEY_PACKAGES)
    release = kernel_pkg.removeprefix("linux-image-").removesuffix("-unsigned")
    kernel = root / "boot" / f"vmlinuz-{release}"
    if not kernel.is_file():
        raise GuestImageError(f"{kernel_pkg} has no {kernel.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        esp = tmp / "esp"
        _boot_loader(target, root, esp, secure_boot)
        (esp / "vmlinuz").write_bytes(_kernel_image(kernel))
        host_key = guestimage._host_key(host_root)
        (esp / "initrd.gz").write_bytes(_initramfs(target, root, release, Path(authorized_key), host_key))
        payload = sum(p.stat().st_size for p in esp.rglob("*") if p.is_file())
        # ~3 MB spare for the guest's writes, the FAT itself, and whole MiB for the partition
        size_kb = -(-(payload // 1024 + 4096) // 1024) * 1024
        fat = tmp / "esp.fat"
        guestimage._run(["mkfs.fat", "-C", "-n", "KVMTASKS", str(fat), str(size_kb)])
        guestimage._run(["mcopy", "-s", "-i", str(fat), *map(str, sorted(esp.iterdir())), "::"])
        try:
            _gpt_disk(partial, fat)
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
    return GuestImage(path=dest, kernel_release=release)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmtasks.demo.uefiguest", description=__doc__)
    parser.add_argument("dest", type=Path, help="raw disk image to write")
    parser.add_argument("--key", type=Path, required=True, help="ssh public key to authorize for root")
    parser.add_argument("--cache", type=Path, required=True,
                        help="download/unpack cache directory (one per architecture)")
    parser.add_argument("--arch", choices=sorted(TARGETS), default=ARCH, help="Debian's architecture name")
    parser.add_argument("--secure-boot", action="store_true",
                        help="amd64: boot through Debian's signed shim and GRUB (Secure Boot)")
    args = parser.parse_args(argv)
    if args.secure_boot and args.arch != "amd64":
        parser.error("--secure-boot is for --arch amd64 (Debian's signed shim and GRUB)")
    try:
        image = build_uefi_guest_image(args.dest, args.key, args.cache, arch=args.arch,
                                       secure_boot=args.secure_boot)
    except GuestImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{image.path} (kernel {image.kernel_release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
