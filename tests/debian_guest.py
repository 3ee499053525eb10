"""Build a real Debian 12 guest (systemd, OpenSSH, Debian's kernel) for tests/test_debian_guest.py.

The project's own tiny image (busybox + dropbear) proves little about guests
the project did not build. This one is a stock Debian system made with
``debootstrap`` from the mirror apt is configured with, turned into a raw
whole-disk ext4 image with ``mkfs.ext4 -d`` (no loop device, no mount). The
kernel and initramfs are copied out next to it: the guest boots with QEMU's
``-kernel``/``-initrd``/``-append``, so there is no boot loader to install.

The result is cached in ``.cache/debian-guest/KEY/`` where KEY hashes every
input (suite, packages, files written, image size, command line). A build
goes to a ``tmp-*`` folder renamed into place when complete, under a file
lock, so concurrent and later test sessions reuse it. The ssh key pair whose
public half is baked into the image is cached with it.

Two variants: ``plain`` (the test's key and host keys baked in) and ``cloud-init``
(cloud-init, no key and no host key: a cloud image as published, which gets
both from a NoCloud seed at first boot).

Run ``python -m tests.debian_guest [plain|cloud-init]`` to build (or find) one by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache" / "debian-guest"
SUITE = "bookworm"
IMAGE_SIZE = "1536M"
HOSTNAME = "kvmtasks-debian"
# systemd.show_status puts systemd's progress (and its shutdown) on the serial console
# even with `quiet`, so a test can tell a clean poweroff from a killed qemu.
KERNEL_COMMAND_LINE = "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=1"
# Bump when the build steps change in a way the inputs below do not show.
BUILDER_VERSION = 1
# The drivers the guest cannot boot without, checked in the initramfs.
INITRAMFS_MODULES = ("virtio_blk", "virtio_pci")


@dataclass(frozen=True)
class Variant:
    """What one kind of test guest holds; every field is part of its cache key."""

    name: str
    packages: tuple[str, ...]
    files: Mapping[str, str]
    services: tuple[str, ...]
    directories: tuple[str, ...] = ()
    # The test's key in root's authorized_keys and host keys made at build time; a cloud
    # image has neither: cloud-init brings both at first boot.
    baked_in_keys: bool = True

    def inputs(self) -> dict[str, object]:
        inputs: dict[str, object] = {
            "version": BUILDER_VERSION, "suite": SUITE, "packages": self.packages, "size": IMAGE_SIZE,
            "files": dict(self.files), "services": self.services, "directories": self.directories,
            "command_line": KERNEL_COMMAND_LINE,
        }  # fmt: skip
        if self.name != PLAIN.name:  # the plain guest keeps the cache key it always had
            inputs.update(variant=self.name, baked_in_keys=self.baked_in_keys)
        return inputs


# A stock systemd + OpenSSH system.
# dbus: systemd-logind needs the bus, and logind is what turns the ACPI power button into a
# clean poweroff. e2fsprogs: fsck.ext4 for the root filesystem (fstab pass 1).
# QEMU's user network has a DHCP server; the NIC is e1000 or virtio (en*) or an old-style eth*.
# A persistent journal: after a reboot the previous boot's shutdown can be read back.
PLAIN = Variant(
    name="plain",
    packages=("systemd-sysv", "udev", "dbus", "openssh-server", "linux-image-amd64", "iproute2",
              "kmod", "procps", "e2fsprogs"),
    files={
        "etc/hostname": f"{HOSTNAME}\n",
        "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n",
        "etc/fstab": "/dev/vda / ext4 defaults 0 1\n",
        "etc/systemd/network/20-wired.network": "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
        "etc/resolv.conf": "nameserver 10.0.2.3\n",
    },
    services=("systemd-networkd", "ssh"),
    directories=("var/log/journal",),
)

# A cloud image as published: cloud-init, OpenSSH, no key and no host key inside; ifupdown,
# which cloud-init's Debian network renderer writes for. python3-cffi-backend: debootstrap
# does not resolve cloud-init's virtual dependency on it. The datasource list stops cloud-init
# from probing EC2, OpenStack ... addresses (each probe waits out its timeouts under
# restrict=on); it still finds the seed by its `cidata` label, as on a stock image. The locale
# module is off: in a minbase root update-locale refuses the en_US.UTF-8 it has just generated,
# which would turn every first boot into a cloud-init error (and costs ~15 s under TCG).
CLOUD_INIT = Variant(
    name="cloud-init",
    packages=("systemd-sysv", "udev", "dbus", "iproute2", "kmod", "procps", "e2fsprogs",
              "cloud-init", "openssh-server", "linux-image-amd64", "ifupdown", "isc-dhcp-client",
              "sudo", "locales", "python3-cffi-backend"),
    files={
        "etc/hostname": "localhost\n",
        "etc/fstab": "/dev/vda / ext4 defaults 0 1\n",
        "etc/network/interfaces": "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n",
        "etc/cloud/cloud.cfg.d/90-kvmtasks-test.cfg": "datasource_list: [ NoCloud, None ]\nlocale: false\n",
    },
    services=("ssh",),
    directories=("var/log/journal",),
    baked_in_keys=False,
)

class DebianGuestError(Exception):
    """Building the Debian guest failed; the message says which step."""


@dataclass(frozen=True)
class DebianGuest:
    """A cached build: the raw disk, the kernel and initramfs it boots with, the ssh key (plain only)."""

    folder: Path
    built_now: bool = False  # False: found in the cache

    @property
    def image(self) -> Path:
        return self.folder / "disk.img"

    @property
    def kernel(self) -> Path:
        return self.folder / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.folder / "initrd.img"

    @property
    def key(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def info(self) -> dict[str, str | float]:
        data: dict[str, str | float] = json.loads((self.folder / "build.json").read_text())
        return data

    @property
    def sha256(self) -> str:
        return str(self.info["sha256"])

    @property
    def kernel_release(self) -> str:
        return str(self.info["kernel_release"])

    def kvm_extra_args(self, boot: Path | None = None) -> list[str]:
        """Boot the kernel directly: one QEMU argument per item, as kvm_extra_args wants them.

        boot: a folder holding copies of the kernel and initramfs, to boot those instead.
        """
        folder = self.folder if boot is None else boot
        return ["-kernel", str(folder / "vmlinuz"), "-initrd", str(folder / "initrd.img"),
                "-append", KERNEL_COMMAND_LINE]


def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses: the first URIs of debian.sources, else the first deb line."""
    sources = apt_dir / "sources.list.d" / "debian.sources"
    if sources.is_file():
        for line in sources.read_text().splitlines():
            match = re.match(r"\s*URIs:\s*(\S+)", line)
            if match:
                return match.group(1)
    candidates = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in candidates:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            # deb [options] URI suite components
            match = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if match:
                return match.group(1)
    raise DebianGuestError(f"no Debian mirror found in {sources} or {apt_dir / 'sources.list'}")


def input_key(variant: Variant = PLAIN) -> str:
    """A short hash of everything that decides what the image holds."""
    return hashlib.sha256(json.dumps(variant.inputs(), sort_keys=True).encode()).hexdigest()[:16]


def missing_tools() -> list[str]:
    """The host programs a build needs that are not installed."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/sbin"
    return [tool for tool in ("debootstrap", "mkfs.ext4", "ssh-keygen", "chroot")
            if shutil.which(tool, path=path) is None]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def ensure_debian_guest(cache: Path = CACHE, say: Callable[[str], None] = _to_stderr,
                        variant: Variant = PLAIN) -> DebianGuest:
    """The cached guest of that variant for the current inputs, built first if there is none."""
    cache.mkdir(parents=True, exist_ok=True)
    guest = DebianGuest(cache / input_key(variant))
    if (guest.folder / "build.json").is_file():
        return guest
    with _locked(cache / ".lock"):
        if (guest.folder / "build.json").is_file():
            return guest  # another session built it while we waited
        for stale in cache.glob("tmp-*"):
            _remove_tree(stale)  # an interrupted build: nobody else builds while we hold the lock
        scratch = Path(tempfile.mkdtemp(prefix="tmp-", dir=cache))
        try:
            say(f"building the {variant.name} Debian {SUITE} guest image in {scratch} (a few minutes)")
            _build(scratch, cache / "debs", apt_mirror(), variant)
            scratch.chmod(0o755)  # mkdtemp made it private
            os.rename(scratch, guest.folder)
        except BaseException:
            _remove_tree(scratch)
            raise
    say(f"built the Debian guest image {guest.image} in {guest.info['build_seconds']:.0f} s")
    return DebianGuest(guest.folder, built_now=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: Sequence[str], what: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-15:])
        raise DebianGuestError(f"{what}: {' '.join(argv[:4])} ... failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def _mounts_under(folder: Path) -> list[str]:
    """Mount points under folder, deepest first (debootstrap mounts /proc, /sys ... in the root)."""
    prefix = str(folder.resolve()) + "/"
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _remove_tree(folder: Path) -> None:
    """Delete a build folder, never recursing into a filesystem still mounted inside it."""
    for point in _mounts_under(folder):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    if _mounts_under(folder):
        raise DebianGuestError(f"{folder} still has mounts inside; unmount them and delete it by hand")
    shutil.rmtree(folder, ignore_errors=True)


def _build(folder: Path, debs: Path, mirror: str, variant: Variant) -> None:
    started = time.monotonic()
    root = folder / "root"
    debs.mkdir(parents=True, exist_ok=True)
    key = folder / "id_ed25519"
    if variant.baked_in_keys:
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvmtasks-debian-test", "-f", str(key)],
             "generating the test key")
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(variant.packages)}",
          f"--cache-dir={debs.resolve()}", SUITE, str(root), mirror], "debootstrap")
    if _mounts_under(root):
        raise DebianGuestError(f"debootstrap left mounts under {root}: {_mounts_under(root)}")
    _configure(root, variant, key.with_suffix(".pub"))
    release = _copy_boot_files(root, folder)
    _run(["mkfs.ext4", "-q", "-F", "-L", "debian-root", "-d", str(root), str(folder / "disk.img"),
          IMAGE_SIZE], "mkfs.ext4 -d")
    _remove_tree(root)
    info = {
        "variant": variant.name, "suite": SUITE, "mirror": mirror, "kernel_release": release,
        "sha256": _sha256(folder / "disk.img"), "build_seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip
    (folder / "build.json").write_text(json.dumps(info, indent=2) + "\n")


def _configure(root: Path, variant: Variant, public_key: Path) -> None:
    for name, text in variant.files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # resolv.conf may be a dangling symlink
        path.write_text(text)
    for name in variant.directories:
        (root / name).mkdir(parents=True, exist_ok=True)
    _run(["chroot", str(root), "systemctl", "enable", *variant.services], "enabling the services")
    if not (root / "usr" / "lib" / "openssh" / "sftp-server").is_file():
        raise DebianGuestError("openssh-server brought no sftp-server")
    host_keys = list((root / "etc" / "ssh").glob("ssh_host_*"))
    if not variant.baked_in_keys:
        for path in host_keys:
            path.unlink()
        return
    ssh_dir = root / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(public_key.read_text())
    authorized.chmod(0o600)
    # openssh-server's postinst makes the host keys; make sure, since the guest must keep one key
    # across reboots (a key made at first boot would still be kept, but the image would differ per boot).
    if not host_keys:
        _run(["chroot", str(root), "ssh-keygen", "-A"], "generating the ssh host keys")


def _copy_boot_files(root: Path, folder: Path) -> str:
    """Copy the kernel and initramfs out of the root; return the kernel release."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise DebianGuestError(f"expected one kernel in {root / 'boot'}, found {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise DebianGuestError(f"no initramfs {initrd}: update-initramfs did not run")
    listing = _run(["chroot", str(root), "lsinitramfs", f"/boot/initrd.img-{release}"], "lsinitramfs")
    builtin = (root / "lib" / "modules" / release / "modules.builtin").read_text()
    for module in INITRAMFS_MODULES:
        if not re.search(rf"/{module}\.ko", listing + builtin):
            raise DebianGuestError(f"{initrd} lacks {module}: the guest could not find its disk")
    shutil.copyfile(kernels[0], folder / "vmlinuz")
    shutil.copyfile(initrd, folder / "initrd.img")
    return release


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


VARIANTS = {variant.name: variant for variant in (PLAIN, CLOUD_INIT)}

if __name__ == "__main__":
    built = ensure_debian_guest(variant=VARIANTS[sys.argv[1] if len(sys.argv) > 1 else PLAIN.name])
    print(json.dumps({"folder": str(built.folder), **built.info}, indent=2))
