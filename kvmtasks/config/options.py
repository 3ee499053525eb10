"""The option table: every option a part accepts, declared once.

The same table drives parsing, validation, defaults and the option
reference in README.md (``python -m kvmtasks.config.options``).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmtasks.config.shares import parse_shares


class ImageType(enum.StrEnum):
    DRIVE = "drive"
    HDA = "hda"


class Compression(enum.StrEnum):
    AUTO = "auto"
    NONE = "none"
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    BZ2 = "bz2"


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class Arch(enum.StrEnum):
    """The guest's architecture, as QEMU's qemu-system-ARCH programs and descriptors name it."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"
    RISCV64 = "riscv64"


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"
    UEFI_SECURE = "uefi-secure"


class Engine(enum.StrEnum):
    """What runs a part's VM: QEMU started directly, or a libvirt host (local or remote)."""

    QEMU = "qemu"
    LIBVIRT = "libvirt"


@dataclass(frozen=True)
class Redirect:
    """One port forward, from the old ``-redir`` syntax."""

    protocol: str
    host_port: int
    guest_address: str
    guest_port: int


@dataclass(frozen=True)
class NetworkRequest:
    """One line of ``networks``: a network the part joins, with the address it asks for."""

    line: str
    name: str
    address: str | None  # ADDRESS/PREFIX as given; None: assigned from the subnet


# Each network is one more virtio NIC on the pc machine's PCI bus (32 slots, a few taken).
NIC_SLOTS = 8
NETWORK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")

DIGEST_LENGTHS = {"md5": 32, "sha256": 64, "sha512": 128}
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
VGA_TYPES = ("std", "cirrus", "vmware", "qxl", "xenfb", "tcx", "cg3", "virtio", "none")
NET_TYPES = frozenset(
    {"nic", "user", "tap", "bridge", "socket", "vde", "l2tpv3", "hubport",
     "dump", "none", "netmap", "vhost-user", "vhost-vdpa", "stream", "dgram"}
)
URL_SCHEMES = ("http://", "https://", "file://")


def parse_text(value: str) -> str:
    if "\n" in value or "\x00" in value:
        raise ValueError("must be a single line")
    if not value:
        raise ValueError("must not be empty")
    return value


def parse_bool(value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("not a boolean (true/false/yes/no/on/off/1/0)")


def parse_lines(value: str) -> tuple[str, ...]:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return tuple(line.strip() for line in value.splitlines() if line.strip())


def parse_port(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 1 <= int(value) <= 65535:
        raise ValueError("not a TCP port (1-65535)")
    return int(value)


def parse_url(value: str) -> str:
    text = parse_text(value)
    if not text.lower().startswith(URL_SCHEMES):
        raise ValueError("URL scheme must be http, https or file")
    if any(c.isspace() for c in text):
        raise ValueError("URL must not contain white space")
    return text


def parse_path(value: str) -> str:
    # Relative paths are resolved against the buildout directory in config.py.
    return parse_text(value)


def checksum_parser(algorithm: str) -> Callable[[str], str]:
    length = DIGEST_LENGTHS[algorithm]

    def parse(value: str) -> str:
        if value.strip().lower().startswith(URL_SCHEMES):
            return parse_url(value.strip())  # a checksum list (SHA256SUMS, CHECKSUM...)
        digest = value.strip().lower()
        if not re.fullmatch(f"[0-9a-f]{{{length}}}", digest):
            raise ValueError(f"not a {algorithm} checksum ({length} hex digits) nor the URL of a list")
        return digest

    return parse


def parse_image_type(value: str) -> ImageType:
    try:
        return ImageType(value.strip().lower())
    except ValueError:
        raise ValueError("must be drive or hda") from None


def parse_compression(value: str) -> Compression:
    try:
        return Compression(value.strip().lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(Compression)}") from None


def parse_accel(value: str) -> Accel:
    try:
        return Accel(value.strip().lower())
    except ValueError:
        raise ValueError("must be auto, kvm or tcg") from None


def parse_arch(value: str) -> Arch:
    try:
        return Arch(value.strip().lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(Arch)}") from None


def parse_firmware(value: str) -> Firmware:
    try:
        return Firmware(value.strip().lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(Firmware)}") from None


def parse_engine(value: str) -> Engine:
    try:
        return Engine(value.strip().lower())
    except ValueError:
        raise ValueError("must be qemu or libvirt") from None


def parse_libvirt_uri(value: str) -> str:
    text = parse_text(value.strip())
    if not re.fullmatch(r"qemu(\+(ssh|tcp|tls|unix|libssh2?))?://\S*/(system|session)(\?\S*)?", text):
        raise ValueError("not a libvirt QEMU URI, e.g. qemu:///system or qemu+ssh://user@host/system")
    return text


def parse_pool(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value.strip()):
        raise ValueError("not a storage pool name (letters, digits, '_', '.', '-')")
    return value.strip()


def parse_vnc(value: str) -> str:
    match = re.fullmatch(r"([0-9A-Za-z.:\[\]-]*):([0-9]{1,5})", value.strip())
    if not match:
        raise ValueError("must be IP:DISPLAY, e.g. 127.0.0.1:1")
    return value.strip()


def parse_vga(value: str) -> str:
    if value.strip() not in VGA_TYPES:
        raise ValueError(f"must be one of {', '.join(VGA_TYPES)}")
    return value.strip()


def parse_net(value: str) -> tuple[str, ...]:
    lines = parse_lines(value)
    for line in lines:
        if line.split(",", 1)[0] not in NET_TYPES:
            raise ValueError(f"line {line!r} does not start with a -net type (user, nic, tap, ...)")
    return lines


def parse_redirects(value: str) -> tuple[Redirect, ...]:
    redirects: list[Redirect] = []
    for line in parse_lines(value):
        fields = line.split(":")
        if len(fields) == 3:
            fields.insert(0, "tcp")
        if len(fields) != 4 or fields[0] not in ("tcp", "udp"):
            raise ValueError(f"line {line!r} is not [tcp|udp]:HOSTPORT:[GUESTADDR]:GUESTPORT")
        protocol, host, address, guest = fields
        if address:
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise ValueError(f"line {line!r}: guest address must be an IPv4 address") from None
        try:
            redirect = Redirect(protocol, parse_port(host), address, parse_port(guest))
        except ValueError:
            raise ValueError(f"line {line!r}: ports must be 1-65535") from None
        # QEMU would refuse the second forward of a host port at start, after provisioning.
        if any((r.protocol, r.host_port) == (protocol, redirect.host_port) for r in redirects):
            raise ValueError(f"line {line!r}: host port {protocol}:{redirect.host_port} is "
                             "forwarded twice")
        redirects.append(redirect)
    return tuple(redirects)


def parse_networks(value: str) -> tuple[NetworkRequest, ...]:
    requests: list[NetworkRequest] = []
    for line in parse_lines(value):
        fields = line.split()
        if len(fields) > 2:
            raise ValueError(f"line {line!r} is not NAME or NAME ADDRESS/PREFIX")
        name = fields[0]
        if not NETWORK_NAME.fullmatch(name):
            raise ValueError(f"line {line!r}: network name {name!r} is not a plain word "
                             "(a letter, then letters, digits, '_' or '-'; 32 at most)")
        if any(r.name == name for r in requests):
            raise ValueError(f"line {line!r}: network {name} is joined twice")
        address = fields[1] if len(fields) == 2 else None
        if address is not None:
            try:
                interface = ipaddress.IPv4Interface(address)
            except ValueError:
                interface = None
            if interface is None or "/" not in address:
                raise ValueError(f"line {line!r}: {address!r} is not an IPv4 ADDRESS/PREFIX, "
                                 "e.g. 192.168.50.10/24")
            if interface.network.prefixlen > 30:
                raise ValueError(f"line {line!r}: a /{interface.network.prefixlen} holds no "
                                 "two parts; use a prefix of 30 or less")
            if not interface.ip.is_private or interface.ip.is_loopback:
                raise ValueError(f"line {line!r}: {interface.ip} is not a private address "
                                 "(10/8, 172.16/12, 192.168/16)")
            if interface.ip in (interface.network.network_address,
                                interface.network.broadcast_address):
                raise ValueError(f"line {line!r}: {interface.ip} is not a host address of "
                                 f"{interface.network}")
            address = str(interface)
        requests.append(NetworkRequest(line, name, address))
    if len(requests) > NIC_SLOTS:
        raise ValueError(f"{len(requests)} networks, more than the {NIC_SLOTS} NIC slots a part has")
    return tuple(requests)


def parse_hostname(value: str) -> str:
    text = value.strip()
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.:-]*", text):
        raise ValueError("not a host name or IP address")
    return text


def parse_guest_hostname(value: str) -> str:
    """A host name the guest can take (RFC 1123 labels), as cloud-init's local-hostname."""
    text = value.strip()
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if not re.fullmatch(rf"{label}(?:\.{label})*", text) or len(text) > 253:
        raise ValueError("not a host name (letters, digits and '-', labels separated by '.')")
    return text


def parse_user(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value.strip()):
        raise ValueError("not a user name")
    return value.strip()


def parse_memory(value: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*[KMGT]?", value.strip().upper()):
        raise ValueError("must be a size such as 512M or 2G")
    return value.strip().upper()


def parse_disk_size(value: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*[KMGT]", value.strip().upper()):
        raise ValueError("must be a size with its unit, such as 20G or 512M")
    return value.strip().upper()


def size_bytes(size: str) -> int:
    """A disk_size such as 512M or 20G (binary units, as QEMU reads them) in bytes."""
    return int(size[:-1]) << (10 * ("KMGT".index(size[-1]) + 1))


def parse_cpus(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,4}", value.strip()) or not 1 <= int(value) <= 1024:
        raise ValueError("must be a whole number from 1 to 1024")
    return int(value)


def parse_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not 0 < seconds < 1e6:
        raise ValueError("must be a number of seconds above 0")
    return seconds


def parse_program(value: str) -> str:
    text = parse_text(value.strip())
    if text.startswith("-"):
        raise ValueError("must be a program name or path")
    return text


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: str | None
    help: str


_CHECKSUM_HELP = ("{algo} checksum of the {what}: hex, or the http/https/file URL of a checksum "
                  "list (GNU or BSD format) holding its entry; when set, a mismatch fails the part.")

OPTIONS: tuple[Option, ...] = (
    Option("recipe", parse_text, None,
           "Accepted for buildout compatibility (`erp5.recipe.kvm`); marks a section as a part."),
    Option("image", parse_url, None,
           "URL of the image to download: http, https or file. Exactly one of `image` and `file`."),
    Option("file", parse_path, None,
           "A local image file or block device (e.g. /dev/sdb), used in place: never copied, "
           "never written by provisioning."),
    Option("location", parse_path, None,
           "Folder that receives the downloaded image. Default: `${buildout:parts-directory}/PART`."),
    Option("image_type", parse_image_type, "drive",
           "`drive` attaches the disk with `-drive ...,if=virtio`; `hda` as the first IDE disk."),
    Option("overlay", parse_bool, None,
           "Boot a qcow2 copy-on-write overlay (`LOCATION/PART.overlay.qcow2`) over the image, which "
           "then stays as verified; `reset` brings the disk back to it. Default: true with `image`, "
           "false with `file`."),
    Option("disk_size", parse_disk_size, None,
           "Virtual size of the overlay's disk, e.g. 20G (K, M, G, T); at least the image's own. "
           "Needs `overlay = true`. Default: the image's size."),
    Option("compression", parse_compression, "auto",
           "How the download is compressed: `auto` (detected from its first bytes), `none`, `gzip`, "
           "`xz`, `zstd` or `bz2`. The image is named after the download without its `.gz`, `.xz`, "
           "`.zst` or `.bz2`."),
    Option("gzip", parse_bool, None,
           "`true` is `compression = gzip` (the recipe's option); `false` changes nothing."),
    Option("md5_download", checksum_parser("md5"), None,
           _CHECKSUM_HELP.format(algo="MD5", what="downloaded file")),
    Option("sha256_download", checksum_parser("sha256"), None,
           _CHECKSUM_HELP.format(algo="SHA-256", what="downloaded file")),
    Option("sha512_download", checksum_parser("sha512"), None,
           _CHECKSUM_HELP.format(algo="SHA-512", what="downloaded file")),
    Option("md5_image", checksum_parser("md5"), None,
           _CHECKSUM_HELP.format(algo="MD5", what="image (after decompression)")),
    Option("sha256_image", checksum_parser("sha256"), None,
           _CHECKSUM_HELP.format(algo="SHA-256", what="image (after decompression)")),
    Option("sha512_image", checksum_parser("sha512"), None,
           _CHECKSUM_HELP.format(algo="SHA-512", what="image (after decompression)")),
    Option("kvm_binary", parse_program, None,
           "The QEMU program to run. Default: `qemu-system-ARCH` for `kvm_arch`."),
    Option("kvm_memory", parse_memory, "512M", "Guest memory (`-m`), e.g. 512M or 2G."),
    Option("kvm_smp", parse_cpus, "1", "Number of guest CPUs (`-smp`)."),
    Option("kvm_accel", parse_accel, "auto",
           "`kvm`, `tcg` or `auto` (KVM when it works, else TCG). "
           "The environment variable KVMTASKS_ACCEL overrides it."),
    Option("kvm_boot_timeout", parse_seconds, "300",
           "Seconds `start` waits for the guest to answer (ssh, or QMP when no `ssh_port`)."),
    Option("kvm_shutdown_timeout", parse_seconds, "30",
           "Seconds `stop` waits for the guest to power off (ACPI button; when the guest ignores it "
           "for 3 s, poweroff over ssh) before QEMU is told to quit."),
    Option("kvm_vnc", parse_vnc, None, "`IP:DISPLAY` for a VNC server; without it the VM is headless."),
    Option("kvm_graphic", parse_vga, None, "Graphics card (`-vga`), e.g. std."),
    Option("kvm_net", parse_net, None,
           "One `-net` definition per line, e.g. `user,hostname=vm` and `nic,model=ne2k_pci`."),
    Option("networks", parse_networks, None,
           "Private networks the part joins with other parts of this project, one per line: "
           "`NAME` or `NAME ADDRESS/PREFIX`; one more NIC on each (at most "
           f"{NIC_SLOTS}). Addresses not given are assigned stably from the subnet the given "
           "ones name, else from a private /24 chosen per project and network. See "
           "[Private networks](#private-networks-between-parts)."),
    Option("kvm_redir", parse_redirects, None,
           "Port forwards, one per line: `[tcp|udp]:HOSTPORT:[GUESTADDR]:GUESTPORT`; "
           "a host port (per protocol) once."),
    Option("kvm_snapshot", parse_bool, "false", "Run with `-snapshot`: guest writes never reach the image."),
    Option("kvm_extra_args", parse_lines, None, "Extra QEMU arguments, one argument per line."),
    Option("kvm_bin_directory", parse_path, None,
           "Where the control scripts go. Default: `${buildout:bin-directory}`."),
    Option("kvm_run_directory", parse_path, None,
           "Where pid file, QMP socket, console log and known_hosts go (in a PART subfolder). "
           "Default: `${buildout:var-directory}`."),
    Option("ssh_port", parse_port, None, "Host port forwarded to the guest's port 22."),
    Option("ssh_hostname", parse_hostname, "localhost",
           "Host used to reach the guest; forwarded ports listen on its address."),
    Option("ssh_key_path", parse_path, None, "Private key for ssh/scp (`-i`)."),
    Option("ssh_user", parse_user, "root", "User to log in as in the guest."),
    Option("kvm_engine", parse_engine, "qemu",
           "`qemu` starts QEMU directly on this machine; `libvirt` runs the VM as a libvirt domain "
           "named after the part, on the host of `libvirt_uri`."),
    Option("libvirt_uri", parse_libvirt_uri, "qemu:///system",
           "The libvirt host for `kvm_engine = libvirt`, e.g. "
           "`qemu+ssh://root@host/system?keyfile=/path/key`."),
    Option("libvirt_pool", parse_pool, "kvmtasks",
           "The libvirt storage pool that receives the image and the cloud-init seed "
           "(a directory pool, created if missing)."),
    Option("cloud_init", parse_bool, "false",
           "Give the guest a cloud-init NoCloud seed (a CD-ROM labelled `cidata`): the ssh key "
           "for `ssh_user` (generated in the run directory without `ssh_key_path`), the host key "
           "kvmtasks pins, the host name. For cloud images, which hold no key."),
    Option("cloud_init_hostname", parse_guest_hostname, None,
           "The guest's host name (`local-hostname`). Default: the part name, "
           "other characters than letters, digits, `.` and `-` made `-`."),
    Option("cloud_init_user_data", parse_path, None,
           "Your own user-data (`#cloud-config`, `#!` script or MIME), merged after kvmtasks' "
           "cloud-config (lists append)."),
    Option("cloud_init_network_config", parse_path, None,
           "A cloud-init network-config file for the seed. Default: cloud-init's (DHCP on the first NIC)."),
    Option("setup", parse_lines, None,
           "Guest setup: step sections, one per line, run in order in a throwaway builder VM; each "
           "step's result is a cached disk layer keyed by its content, and the part boots over the "
           "last one (see *Guest setup and its cache*). Needs an overlay."),
    Option("share", parse_shares, None,
           "Host folders in the guest, one per line: `HOSTDIR GUESTDIR [FLAG...]` (HOSTDIR relative "
           "to the buildout directory, GUESTDIR absolute; quotes for spaces). Flags: `ro`; how it "
           "is carried: `auto` (default: a live 9p share where the guest mounts it, else a copy), "
           "`9p`, `virtiofs` (live), `rsync` (a copy at start and by `PART-sync`); "
           "`exclude=PATTERN` (rsync's pattern, repeatable) for copies."),
    Option("kvm_arch", parse_arch, "x86_64",
           "The guest's architecture: `x86_64` or `aarch64` (the `virt` machine, CPU `max` under "
           "TCG). KVM only when it is the host's. `riscv64` is refused: Debian 12 packages no UEFI "
           "firmware for it."),
    Option("firmware", parse_firmware, None,
           "`bios` (x86_64 only), `uefi` or `uefi-secure` (Secure Boot with Microsoft's keys "
           "enrolled), found through QEMU's firmware descriptors; the part's own variable store "
           "lives beside its overlay and `reset` resets it. Default: `bios` on x86_64, `uefi` "
           "elsewhere."),
)

# The options of a step section (a section named in a part's `setup`): declared as the part's are.
STEP_OPTIONS: tuple[Option, ...] = (
    Option("copy", parse_lines, None,
           "Files or folders to copy into the guest before the step runs, one `LOCAL GUESTPATH` per "
           "line: LOCAL relative to the buildout directory, GUESTPATH absolute; folders recursively, "
           "modes kept."),
    Option("run", parse_lines, None,
           "Shell lines run as root in the guest with `set -e` (through sudo when `ssh_user` is not "
           "root). Exactly one of `run` and `script`."),
    Option("script", parse_path, None,
           "A local script file (relative to the buildout directory), sent to the guest and run as root."),
    Option("timeout", parse_seconds, "3600",
           "Seconds the step may take (its copies and commands); past it the step fails and its "
           "builder VM is ended."),
)
STEP_OPTIONS_BY_NAME = {option.name: option for option in STEP_OPTIONS}

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def closest(name: str) -> str | None:
    """The declared option a misspelt name most likely meant."""
    import difflib  # only on the error path

    matches = difflib.get_close_matches(name, list(OPTIONS_BY_NAME), n=1, cutoff=0.6)
    return matches[0] if matches else None


def reference_markdown() -> str:
    """The option reference table for README.md."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for option in OPTIONS:
        default = f"`{option.default}`" if option.default is not None else ""
        rows.append(f"| `{option.name}` | {default} | {option.help} |")
    rows += ["", "Options of a step section (named in a part's `setup`):", "",
             "| option | default | meaning |", "| --- | --- | --- |"]
    for option in STEP_OPTIONS:
        default = f"`{option.default}`" if option.default is not None else ""
        rows.append(f"| `{option.name}` | {default} | {option.help} |")
    return "\n".join(rows) + "\n"


BEGIN_MARK = "<!-- option table: generated by python -m kvmtasks.config.options README.md -->"
END_MARK = "<!-- end of option table -->"


def with_reference(document: str) -> str:
    """document with the text between the option table marks regenerated."""
    head, _, rest = document.partition(BEGIN_MARK)
    _, _, foot = rest.partition(END_MARK)
    return f"{head}{BEGIN_MARK}\n{reference_markdown()}{END_MARK}{foot}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    for name in sys.argv[1:]:
        readme = Path(name)
        readme.write_text(with_reference(readme.read_text()))
    if len(sys.argv) == 1:
        print(reference_markdown(), end="")
