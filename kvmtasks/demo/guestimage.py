"""Build a tiny bootable x86_64 guest disk image (Debian kernel + busybox + dropbear).

The image is a raw, whole-disk FAT filesystem made bootable with syslinux. It
holds the Debian kernel and an initramfs whose /init brings up the network with
QEMU user-mode defaults (10.0.2.15/24 via 10.0.2.2) and starts dropbear on port
22 accepting one authorized key for root, and busybox acpid, which powers the
guest off when QEMU presses the ACPI power button (a build flag leaves it out,
for a guest that ignores the button). Guest packages are only downloaded and
unpacked (never installed), so building needs no root, no loop device, no mount.
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
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GUEST_PACKAGES = ("busybox-static", "dropbear-bin", "libtomcrypt1", "libtommath1", "openssh-sftp-server")
# rsync and the libraries it needs that a minimal host may lack (a build flag adds them).
RSYNC_PACKAGES = ("rsync", "libpopt0", "libxxhash0", "liblz4-1", "libacl1")
# Drivers for the QEMU devices tests use; dependencies are added from each module's modinfo.
# The crc ones are soft dependencies of sd_mod's t10-pi that modinfo "depends=" does not list.
# fmt: off
WANTED_MODULES = (
    "crct10dif_generic", "crc64_rocksoft_generic", "virtio_pci", "virtio_blk", "virtio_net",
    "ata_piix", "sd_mod", "e1000", "ne2k_pci", "8139cp", "8139too", "pcnet32",
    "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859_1",
)
# fmt: on
# Live shares (9p and virtio-fs), for a guest built with them (a build flag).
SHARE_MODULES = ("9pnet_virtio", "9p", "virtiofs")
# The ACPI power button reaches acpid through these (modules in Debian's kernel).
ACPI_MODULES = ("button", "evdev")
TOOL_PACKAGES = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "ldd": "libc-bin",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
}
LIBDIR = "lib/x86_64-linux-gnu"

INIT = """#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# no modules.dep in here: stop the kernel from spawning modprobe for every request
echo > /proc/sys/kernel/modprobe
for m in {modules}; do insmod /lib/modules/{release}/$m.ko 2>/dev/null; done
hostname kvmtasks-guest
ip link set lo up
n=0; while ! ip link show eth0 >/dev/null 2>&1 && [ $n -lt 50 ]; do usleep 100000; n=$((n+1)); done
# the user-mode NIC: the first whose MAC is not locally administered (02:..., kvmtasks'
# private networks, which kvmtasks sets up over ssh once the guest answers)
nic=eth0
for d in /sys/class/net/eth*; do
  case $(cat $d/address) in 02:*) ;; *) nic=${{d##*/}}; break ;; esac
done
ip link set $nic up
ip addr add 10.0.2.15/24 dev $nic
ip route add default via 10.0.2.2
# the boot disk is a whole-disk FAT; IDE probing is asynchronous, hence the retries
n=0
while [ $n -lt 30 ]; do
  for d in /dev/vda /dev/sda /dev/hda /dev/vda1 /dev/sda1; do
    [ -b $d ] && mount -t vfat $d /mnt 2>/dev/null && break 2
  done
  usleep 100000; n=$((n+1))
done
echo "kvmtasks-guest: up, kernel $(uname -r)"
# busybox init reaps orphans, respawns dropbear and makes poweroff/reboot work
exec /sbin/init
"""
INITTAB = """::respawn:/usr/sbin/dropbear -F -R -E -p 22 -s
{acpid}::askfirst:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
"""
ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\n",
    "etc/group": "root:x:0:\n",
    "etc/shells": "/bin/sh\n",
    "etc/hosts": "127.0.0.1 localhost kvmtasks-guest\n",
    "etc/resolv.conf": "nameserver 10.0.2.3\n",
    # /etc/hosts first: the other parts of a private network are named there (glibc's default
    # without this file asks DNS first, and a "not found" from it ends the search).
    "etc/nsswitch.conf": "hosts: files dns\n",
}
ACPID = "::respawn:/bin/busybox acpid -f\n"
# busybox acpid runs /etc/acpi/ACTION/PARAMETER for an event; this one is the power button.
ACPI_POWER_BUTTON = "etc/acpi/PWRF/00000080"
# busybox init's own poweroff pauses 2 s (after SIGTERM, then for the console); this guest
# needs neither once its one disk is synced and read-only, so the button powers off at once.
POWER_BUTTON_SCRIPT = "#!/bin/sh\nsync\numount -a -r\npoweroff -f\n"
SYSLINUX_CFG = "DEFAULT linux\nLABEL linux\n  KERNEL vmlinuz\n  APPEND initrd=initrd.gz console=ttyS0 quiet\n"


class GuestImageError(Exception):
    """Building the guest image failed; the message is one line."""


@dataclass(frozen=True)
class GuestImage:
    path: Path  # the raw disk image
    kernel_release: str  # what `uname -r` prints in the guest


def _run(
    argv: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None, hint: str = ""
) -> str:
    tool = argv[0]
    # mkfs.fat lives in /usr/sbin, which a non-root PATH may lack
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/sbin"
    exe = shutil.which(tool, path=path)
    if exe is None:
        raise GuestImageError(f"{tool} not found; install the {TOOL_PACKAGES.get(tool, tool)} package")
    proc = subprocess.run([exe, *argv[1:]], check=False, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        hint = f" ({hint})" if hint else ""
        raise GuestImageError(f"{' '.join(argv[:3])} failed ({proc.returncode}): {lines[-1]}{hint}")
    return proc.stdout


def _newest_deb(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _kernel_package(debs: Path) -> str:
    # a cached kernel wins: saves the apt-cache call (~1 s) and works offline
    cached = _newest_deb(debs, "linux-image-*-amd64")
    if cached is not None:
        return cached.name.split("_")[0]
    out = _run(["apt-cache", "depends", "linux-image-amd64"], hint="run apt-get update first")
    match = re.search(r"Depends: (linux-image-\d\S*)", out)
    if match is None:
        raise GuestImageError("apt-cache names no versioned linux-image package (run apt-get update first)")
    return match.group(1)


def _fetch_and_unpack(cache_dir: Path, packages: Sequence[str], arch: str | None = None) -> Path:
    """arch: another architecture's packages (its lists must be there: dpkg --add-architecture),
    each in a cache_dir of its own, so that a package name stands for one .deb."""
    debs, root = cache_dir / "debs", cache_dir / "root"
    stamps = root / ".unpacked"
    stamps.mkdir(parents=True, exist_ok=True)
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if _newest_deb(debs, p) is None]
    if missing:
        # download into a scratch dir so an interrupted download never looks cached
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            names = [f"{package}:{arch}" if arch else package for package in missing]
            argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *names]
            _run(argv, cwd=Path(tmp), hint="run apt-get update first")
            for fetched in Path(tmp).glob("*.deb"):
                os.replace(fetched, debs / fetched.name)
    for package in packages:
        deb = _newest_deb(debs, package)
        if deb is None:
            raise GuestImageError(f"apt-get download {package} produced no .deb")
        if not (stamps / deb.name).exists():
            _run(["dpkg-deb", "-x", str(deb), str(root)])
            (stamps / deb.name).touch()
    return root


def _needed_libs(binary: Path, root: Path) -> dict[str, Path]:
    """Map in-image path -> host file for every library (and the loader) that binary needs."""
    # unpacked libraries (libtomcrypt...) first, the host's for the rest (same Debian release)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{root / 'usr' / LIBDIR}:{root / LIBDIR}"}
    libs: dict[str, Path] = {}
    for line in _run(["ldd", str(binary)], env=env).splitlines():
        if "not found" in line:
            raise GuestImageError(f"{binary.name} needs {line.split()[0]}, which was not found")
        match = re.search(r"(/\S+) \(0x", line)
        if match is None:
            continue  # linux-vdso
        host = Path(match.group(1))
        # the loader must stay at its absolute path; libraries go to the default search dir
        libs[match.group(1).lstrip("/") if "=>" not in line else f"{LIBDIR}/{host.name}"] = host
    return libs


def _module_closure(moddir: Path, wanted: Sequence[str]) -> list[Path]:
    """Wanted modules plus their dependencies, dependencies first."""
    files = {p.name.split(".ko")[0].replace("-", "_"): p for p in moddir.rglob("*.ko*")}
    order: list[Path] = []

    def visit(name: str) -> None:
        path = files.get(name.replace("-", "_"))
        if path is None or path in order:
            return  # absent: built into this kernel or not needed
        data = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
        match = re.search(rb"\0depends=([^\0]*)\0", data)
        for dep in match.group(1).decode().split(",") if match else []:
            if dep:
                visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def _cpio_gz(entries: dict[str, tuple[int, bytes]]) -> bytes:
    """A gzip'd newc cpio archive; written here so files get uid 0 and /dev/console without root."""
    out = bytearray()
    items = [*sorted(entries.items()), ("TRAILER!!!", (0, b""))]
    for ino, (name, (mode, data)) in enumerate(items, 1):
        rdev = (5, 1) if stat.S_ISCHR(mode) else (0, 0)
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return gzip.compress(bytes(out), compresslevel=6, mtime=0)


def _host_key(root: Path) -> bytes:
    dropbearkey = root / "usr/bin/dropbearkey"
    libraries = f"{root / 'usr' / LIBDIR}:{root / LIBDIR}"
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "host_key"
        _run([str(dropbearkey), "-t", "ed25519", "-f", str(key)],
             env={**os.environ, "LD_LIBRARY_PATH": libraries})
        return key.read_bytes()


class Initramfs:
    """The files of a tiny guest's initramfs, by path; ``archive`` writes them as a gzip'd cpio."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes]] = {}

    def add(self, name: str, data: bytes = b"", mode: int = 0o644, kind: int = stat.S_IFREG) -> None:
        """A file (or a folder, link or device); its parent folders, where not added, 0755."""
        parts = name.split("/")
        for i in range(1, len(parts)):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b""))
        self.entries[name] = (kind | mode, data)

    def archive(self) -> bytes:
        return _cpio_gz(self.entries)


def module_names(modules: Sequence[Path]) -> list[str]:
    return [m.name.split(".ko")[0] for m in modules]


def guest_system(root: Path, release: str, init: str, modules: Sequence[Path], authorized_key: bytes,
                 host_key: bytes, with_acpi: bool) -> Initramfs:
    """What every tiny guest's initramfs holds, whatever its architecture and boot: the folders,
    /init and /etc, busybox, root's authorized key, dropbear's host key, the kernel modules."""
    initramfs = Initramfs()
    add = initramfs.add
    for d in ("proc", "sys", "dev", "mnt", "var/run", "var/log", "etc/dropbear", "usr/bin", "sbin"):
        add(d, mode=0o755, kind=stat.S_IFDIR)
    add("tmp", mode=0o1777, kind=stat.S_IFDIR)
    add("root/.ssh", mode=0o700, kind=stat.S_IFDIR)
    add("root", mode=0o700, kind=stat.S_IFDIR)  # dropbear refuses keys under a group-writable home
    add("dev/console", mode=0o600, kind=stat.S_IFCHR)  # the kernel opens it before /init runs
    add("init", init.encode(), 0o755)
    for name, text in ETC.items():
        add(name, text.encode(), 0o640 if name == "etc/shadow" else 0o644)
    add("etc/inittab", INITTAB.format(acpid=ACPID if with_acpi else "").encode())
    if with_acpi:
        add(ACPI_POWER_BUTTON, POWER_BUTTON_SCRIPT.encode(), 0o755)
    add("root/.ssh/authorized_keys", authorized_key, 0o600)
    add("etc/dropbear/dropbear_ed25519_host_key", host_key, 0o600)
    add("bin/busybox", (root / "bin/busybox").read_bytes(), 0o755)
    add("bin/sh", b"busybox", 0o777, stat.S_IFLNK)
    for name, mod in zip(module_names(modules), modules, strict=True):
        # busybox insmod cannot decompress, so store modules plain
        data = lzma.decompress(mod.read_bytes()) if mod.suffix == ".xz" else mod.read_bytes()
        add(f"lib/modules/{release}/{name}.ko", data)
    return initramfs


def _initramfs(
    root: Path, release: str, authorized_key: Path, with_sftp_server: bool, with_acpi: bool,
    with_rsync: bool = False, with_shares: bool = False,
) -> bytes:
    wanted = WANTED_MODULES + (ACPI_MODULES if with_acpi else ()) + (SHARE_MODULES if with_shares else ())
    modules = _module_closure(root / "lib/modules" / release, wanted)
    init = INIT.format(modules=" ".join(module_names(modules)), release=release)
    # A host key made once per image, as an installed system has: restarts keep it,
    # so clients that pinned it (StrictHostKeyChecking=accept-new) keep trusting it.
    initramfs = guest_system(root, release, init, modules, authorized_key.read_bytes(), _host_key(root),
                             with_acpi)
    scp = shutil.which("scp", path="/usr/bin:/bin")
    if scp is None:
        raise GuestImageError("scp not found; install the openssh-client package")
    # the host's scp serves legacy `scp -O`, which runs `scp -t` on the remote side
    binaries = {"usr/sbin/dropbear": root / "usr/sbin/dropbear", "usr/bin/scp": Path(scp)}
    if with_sftp_server:
        # dropbear runs the SFTP subsystem from this path; modern scp needs it
        binaries["usr/lib/sftp-server"] = root / "usr/lib/openssh/sftp-server"
    if with_rsync:
        # rsync over ssh runs `rsync --server` in the guest
        binaries["usr/bin/rsync"] = root / "usr/bin/rsync"
    for name, host in binaries.items():
        initramfs.add(name, host.read_bytes(), 0o755)
        for lib, lib_host in _needed_libs(host, root).items():
            initramfs.add(lib, lib_host.read_bytes(), 0o755)
    return initramfs.archive()


def build_guest_image(
    dest: Path, authorized_key: Path, cache_dir: Path, *, with_sftp_server: bool = True,
    with_acpi: bool = True, with_rsync: bool = False, with_shares: bool = False,
    spare_kb: int = 3072,
) -> GuestImage:
    """Build the image at dest (atomically: write to dest.part then rename).

    Packages are downloaded once into cache_dir/debs and unpacked into
    cache_dir/root; later calls reuse the cache.
    """
    dest, cache_dir, authorized_key = Path(dest).absolute(), Path(cache_dir).absolute(), Path(authorized_key)
    if not authorized_key.is_file():
        raise GuestImageError(f"authorized key {authorized_key} not found")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers share one cache
        kernel_pkg = _kernel_package(cache_dir / "debs")
        root = _fetch_and_unpack(cache_dir, (kernel_pkg, *GUEST_PACKAGES,
                                             *(RSYNC_PACKAGES if with_rsync else ())))
    release = kernel_pkg.removeprefix("linux-image-").removesuffix("-unsigned")
    kernel = root / "boot" / f"vmlinuz-{release}"
    if not kernel.is_file():
        raise GuestImageError(f"{kernel_pkg} has no {kernel.name}")
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shutil.copyfile(kernel, tmp / "vmlinuz")
        initrd = _initramfs(root, release, authorized_key, with_sftp_server, with_acpi, with_rsync,
                            with_shares)
        (tmp / "initrd.gz").write_bytes(initrd)
        (tmp / "syslinux.cfg").write_text(SYSLINUX_CFG)
        payload = [tmp / "vmlinuz", tmp / "initrd.gz", tmp / "syslinux.cfg"]
        # ~3 MB spare (spare_kb) so tests can write files to the disk from inside the guest
        size_kb = sum(p.stat().st_size for p in payload) // 1024 + spare_kb
        part.unlink(missing_ok=True)
        try:
            _run(["mkfs.fat", "-C", "-n", "KVMTASKS", str(part), str(size_kb)])
            _run(["mcopy", "-i", str(part), *map(str, payload), "::"])
            _run(["syslinux", "--install", str(part)])
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    return GuestImage(path=dest, kernel_release=release)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmtasks.demo.guestimage", description=__doc__)
    parser.add_argument("dest", type=Path, help="raw disk image to write")
    parser.add_argument("--key", type=Path, required=True, help="ssh public key to authorize for root")
    parser.add_argument("--cache", type=Path, required=True, help="download/unpack cache directory")
    parser.add_argument("--no-sftp-server", action="store_true", help="leave out /usr/lib/sftp-server")
    parser.add_argument("--no-acpi", action="store_true",
                        help="leave out acpid: the guest ignores the ACPI power button")
    parser.add_argument("--rsync", action="store_true", help="add rsync (for rsync over ssh)")
    parser.add_argument("--shares", action="store_true",
                        help="add the 9p and virtio-fs modules (for live shares)")
    args = parser.parse_args(argv)
    try:
        image = build_guest_image(args.dest, args.key, args.cache, with_sftp_server=not args.no_sftp_server,
                                  with_acpi=not args.no_acpi, with_rsync=args.rsync,
                                  with_shares=args.shares)
    except GuestImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{image.path} (kernel {image.kernel_release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
