"""A part: one virtual machine's settings, parsed, validated and immutable."""

from __future__ import annotations

import os
import re
import socket
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvmtasks.config.networks import NetworkLink
from kvmtasks.config.options import (
    Accel,
    Arch,
    Compression,
    Engine,
    Firmware,
    ImageType,
    NetworkRequest,
    Redirect,
)
from kvmtasks.config.setupsteps import SetupStep
from kvmtasks.config.shares import Share
from kvmtasks.errors import ConfigError

ACCEL_ENV = "KVMTASKS_ACCEL"
SAFE_FILE_NAME = re.compile(r"[\w][\w.+-]*")
# The file name suffix of each compression, as images are published.
SUFFIXES = {".gz": Compression.GZIP, ".xz": Compression.XZ, ".zst": Compression.ZSTD,
            ".zstd": Compression.ZSTD, ".bz2": Compression.BZ2}
_DEFAULT_SUFFIX = {Compression.GZIP: ".gz", Compression.XZ: ".xz", Compression.ZSTD: ".zst",
                   Compression.BZ2: ".bz2"}


@dataclass(frozen=True)
class Buildout:
    """The ``[buildout]`` folders, as buildout names them."""

    directory: Path
    bin_directory: Path
    parts_directory: Path
    var_directory: Path
    # The shared download cache (buildout's download-cache); None when turned off.
    download_cache: Path | None = None


@dataclass(frozen=True)
class Part:
    """One virtual machine, fully parsed and validated."""

    name: str
    config_file: Path
    buildout: Buildout
    image: str | None
    file: Path | None
    location: Path
    image_type: ImageType
    compression: Compression
    overlay: bool
    disk_size: str | None
    download_digests: Mapping[str, str]
    image_digests: Mapping[str, str]
    kvm_binary: str
    kvm_memory: str
    kvm_smp: int
    kvm_accel: Accel
    kvm_boot_timeout: float
    kvm_shutdown_timeout: float
    kvm_vnc: str | None
    kvm_graphic: str | None
    kvm_net: tuple[str, ...]
    kvm_redir: tuple[Redirect, ...]
    kvm_snapshot: bool
    kvm_extra_args: tuple[str, ...]
    kvm_bin_directory: Path
    kvm_run_directory: Path
    ssh_port: int | None
    ssh_hostname: str
    ssh_key_path: Path | None
    ssh_user: str
    kvm_engine: Engine
    libvirt_uri: str
    libvirt_pool: str
    cloud_init: bool
    cloud_init_hostname: str
    cloud_init_user_data: Path | None
    cloud_init_network_config: Path | None
    # The guest setup's steps (option `setup`): each one a cached disk layer the part boots over.
    setup: tuple[SetupStep, ...] = ()
    shares: tuple[Share, ...] = ()  # option share: host folders in the guest (config/shares.py)
    networks: tuple[NetworkRequest, ...] = ()  # the option as written
    links: tuple[NetworkLink, ...] = ()  # resolved with the project's other parts (networks.join)
    kvm_arch: Arch = Arch.X86_64
    firmware: Firmware = Firmware.BIOS

    @property
    def download_path(self) -> Path:
        """Where the downloaded file lands (the image itself when it is not compressed)."""
        assert self.image is not None, "only parts with an image URL download"
        url_path = urllib.parse.urlsplit(self.image).path
        name = urllib.parse.unquote(url_path.rsplit("/", 1)[-1])
        if not SAFE_FILE_NAME.fullmatch(name):
            name = "image" + _DEFAULT_SUFFIX.get(self.compression, "")
        return self.location / name

    @property
    def image_path(self) -> Path:
        """The verified image: the download without its compression suffix, or the file.

        With compression = auto and no suffix to strip, a compressed download is
        decompressed into its own name (see provision/steps.decompress).
        """
        if self.file is not None:
            return self.file
        download = self.download_path
        if self.compression is Compression.NONE:
            return download
        stem, suffix = os.path.splitext(download.name)
        if suffix in SUFFIXES and stem:
            return download.with_name(stem)
        if self.compression is Compression.AUTO:
            return download
        return download.with_name(download.name + ".img")

    @property
    def overlay_path(self) -> Path:
        """The part's copy-on-write overlay (named after the part: a shared location is safe)."""
        return self.location / f"{self.name}.overlay.qcow2"

    @property
    def boot_disk(self) -> Path:
        """The disk QEMU boots: the overlay when there is one, else the image itself."""
        return self.overlay_path if self.overlay else self.image_path

    @property
    def varstore_path(self) -> Path:
        """The part's own copy of its UEFI variable store, beside its overlay (qcow2, so that
        named snapshots cover it too)."""
        return self.location / f"{self.name}.efivars.qcow2"

    @property
    def nvram_reset_mark(self) -> Path:
        """kvm_engine = libvirt: there from a reset until the next start, which has libvirt copy the
        domain's nvram from its template again (libvirt keeps the variables on its host)."""
        return self.state_directory / "libvirt-nvram-reset"

    @property
    def state_directory(self) -> Path:
        """This part's own folder for runtime and bookkeeping files."""
        return self.kvm_run_directory / self.name

    @property
    def is_block_device(self) -> bool:
        return self.file is not None and path_is_block_device(self.file)

    @property
    def effective_accel(self) -> Accel:
        """The accelerator asked for, KVMTASKS_ACCEL winning over the config."""
        override = os.environ.get(ACCEL_ENV, "").strip().lower()
        return Accel(override) if override in {a.value for a in Accel} else self.kvm_accel


def path_is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def listen_address(hostname: str) -> str:
    """The IPv4 address forwarded ports listen on, from ssh_hostname."""
    if hostname == "localhost":
        return "127.0.0.1"
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        raise ConfigError(f"ssh_hostname = {hostname!r}: cannot resolve to an IPv4 address") from None


def forwards(part: Part) -> tuple[Redirect, ...]:
    """Every host-to-guest port forward: kvm_redir lines plus ssh_port."""
    extra = (Redirect("tcp", part.ssh_port, "", 22),) if part.ssh_port is not None else ()
    return part.kvm_redir + extra
