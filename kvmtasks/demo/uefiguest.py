"""Build the tiny guest for arm64, booted through UEFI (Debian's arm64 kernel, busybox, dropbear).

The same guest as guestimage.py, from Debian's arm64 packages (downloaded and unpacked, never
installed; the host needs `dpkg --add-architecture arm64`, which ./dev does): a GPT disk with
one EFI system partition holding systemd-boot (as the removable-media BOOTAA64.EFI, so that an
empty variable store boots it), its one entry, the kernel and the initramfs. The FAT is made in
a file and placed at its offset, so building needs no root and no loop device. The guest mounts
efivarfs, so that it can write UEFI variables.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import lzma
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
from pathlib import Path

from kvmtasks.demo import guestimage
from kvmtasks.demo.guestimage import GuestImage, GuestImageError

ARCH = "arm64"
PACKAGES = ("busybox-static", "dropbear-bin", "libtomcrypt1", "libtommath1", "libgmp10", "libc6",
            "libcrypt1", "zlib1g", "openssh-sftp-server", "systemd-boot-efi")
# dropbearkey runs on the host: the host key is made by the host's own dropbear build.
HOST_KEY_PACKAGES = ("dropbear-bin", "libtomcrypt1", "libtommath1")
LIBDIRS = ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu")
LOADER = "lib/ld-linux-aarch64.so.1"
# Debian's arm64 kernel has its PCI, virtio-blk and vfat drivers as modules; ACPI's power button
# reaches acpid through button and evdev.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "vfat", "nls_cp437", "nls_ascii",
                  "nls_utf8", "nls_iso8859_1", "efivarfs")
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_OFFSET = 1 << 20  # the partition's first byte: sector 2048, as partitioning tools align it
LOADER_CONF = "default kvmtasks.conf\ntimeout 0\n"
ENTRY = "title kvmtasks\nlinux /vmlinuz\ninitrd /initrd.gz\noptions console=ttyAMA0 quiet\n"
EFIVARFS = "mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null\n"


def _kernel_package(debs: Path) -> str:
    cached = guestimage._newest_deb(debs, "linux-image-*-arm64")
    if cached is not None:
        return cached.name.split("_")[0]
    out = guestimage._run(["apt-cache", "depends", f"linux-image-{ARCH}:{ARCH}"],
                          hint=f"run dpkg --add-architecture {ARCH} and apt-get update first (./dev setup)")
    match = re.search(r"Depends: (linux-image-\d\S*?)(:arm64)?$", out, re.MULTILINE)
    if match is None:
        raise GuestImageError(f"apt-cache names no versioned linux-image package for {ARCH} "
                              f"(run dpkg --add-architecture {ARCH} and apt-get update first)")
    return match.group(1)


def _initramfs(root: Path, release: str, authorized_key: Path, host_key: bytes) -> bytes:
    entries: dict[str, tuple[int, bytes]] = {}

    def add(name: str, data: bytes = b"", mode: int = 0o644, kind: int = stat.S_IFREG) -> None:
        parts = name.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b""))
        entries[name] = (kind | mode, data)

    for d in ("proc", "sys", "dev", "mnt", "var/run", "var/log", "etc/dropbear", "usr/bin", "sbin"):
        add(d, mode=0o755, kind=stat.S_IFDIR)
    add("tmp", mode=0o1777, kind=stat.S_IFDIR)
    add("root/.ssh", mode=0o700, kind=stat.S_IFDIR)
    add("root", mode=0o700, kind=stat.S_IFDIR)
    add("dev/console", mode=0o600, kind=stat.S_IFCHR)
    modules = guestimage._module_closure(root / "lib/modules" / release,
                                         WANTED_MODULES + guestimage.ACPI_MODULES)
    names = [m.name.split(".ko")[0] for m in modules]
    init = guestimage.INIT.format(modules=" ".join(names), release=release)
    init = init.replace("hostname kvmtasks-guest\n", EFIVARFS + "hostname kvmtasks-guest\n", 1)
    add("init", init.encode(), 0o755)
    for name, text in guestimage.ETC.items():
        add(name, text.encode(), 0o640 if name == "etc/shadow" else 0o644)
    add("etc/inittab", guestimage.INITTAB.format(acpid=guestimage.ACPID).encode())
    add(guestimage.ACPI_POWER_BUTTON, guestimage.POWER_BUTTON_SCRIPT.encode(), 0o755)
    add("root/.ssh/authorized_keys", authorized_key.read_bytes(), 0o600)
    add("etc/dropbear/dropbear_ed25519_host_key", host_key, 0o600)
    add("bin/busybox", (root / "bin/busybox").read_bytes(), 0o755)
    add("bin/sh", b"busybox", 0o777, stat.S_IFLNK)
    for name, module in zip(names, modules, strict=True):
        data = module.read_bytes()
        add(f"lib/modules/{release}/{name}.ko", lzma.decompress(data)
            if module.suffix == ".xz" else data)
    add("usr/sbin/dropbear", (root / "usr/sbin/dropbear").read_bytes(), 0o755)
    add("usr/lib/sftp-server", (root / "usr/lib/openssh/sftp-server").read_bytes(), 0o755)
    # The arm64 libraries cannot be asked of the host's ldd: every one unpacked goes in (~5 MB).
    for libdir in LIBDIRS:
        for library in sorted((root / libdir).glob("*.so*")):
            add(f"lib/aarch64-linux-gnu/{library.name}", library.resolve().read_bytes(), 0o755)
    add(LOADER, b"aarch64-linux-gnu/ld-linux-aarch64.so.1", 0o777, stat.S_IFLNK)
    return guestimage._cpio_gz(entries)


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


def build_uefi_guest_image(dest: Path, authorized_key: Path, cache_dir: Path) -> GuestImage:
    """Build the arm64 image at dest (atomically); packages are cached in cache_dir."""
    dest, cache_dir = Path(dest).absolute(), Path(cache_dir).absolute()
    if not Path(authorized_key).is_file():
        raise GuestImageError(f"authorized key {authorized_key} not found")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel_pkg = _kernel_package(cache_dir / "debs")
        root = guestimage._fetch_and_unpack(cache_dir, (kernel_pkg, *PACKAGES), arch=ARCH)
        host_root = guestimage._fetch_and_unpack(cache_dir / "host", HOST_KEY_PACKAGES)
    release = kernel_pkg.removeprefix("linux-image-").removesuffix("-unsigned")
    kernel = root / "boot" / f"vmlinuz-{release}"
    boot = root / "usr/lib/systemd/boot/efi/systemd-bootaa64.efi"
    for needed in (kernel, boot):
        if not needed.is_file():
            raise GuestImageError(f"{needed.relative_to(root)} is missing from the unpacked packages")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        esp = tmp / "esp"
        (esp / "EFI/BOOT").mkdir(parents=True)
        (esp / "loader/entries").mkdir(parents=True)
        shutil.copyfile(boot, esp / "EFI/BOOT/BOOTAA64.EFI")
        (esp / "loader/loader.conf").write_text(LOADER_CONF)
        (esp / "loader/entries/kvmtasks.conf").write_text(ENTRY)
        (esp / "vmlinuz").write_bytes(_kernel_image(kernel))
        host_key = guestimage._host_key(host_root)
        (esp / "initrd.gz").write_bytes(_initramfs(root, release, Path(authorized_key), host_key))
        payload = sum(p.stat().st_size for p in esp.rglob("*") if p.is_file())
        # ~3 MB spare for the guest's writes, the FAT itself, and whole MiB for the partition
        size_kb = -(-(payload // 1024 + 4096) // 1024) * 1024
        fat = tmp / "esp.fat"
        guestimage._run(["mkfs.fat", "-C", "-F", "32", "-n", "KVMTASKS", str(fat), str(size_kb)])
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
    parser.add_argument("--cache", type=Path, required=True, help="download/unpack cache directory")
    args = parser.parse_args(argv)
    try:
        image = build_uefi_guest_image(args.dest, args.key, args.cache)
    except GuestImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{image.path} (kernel {image.kernel_release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
