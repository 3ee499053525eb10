"""The libvirt domain XML of a part: config in, XML text out, nothing started.

libvirt 9.0 has no XML for user-mode port forwards, so the network goes in
``<qemu:commandline>`` as ``-netdev user,...,hostfwd=...`` with each NIC on a
fixed PCI slot well above the ones libvirt hands out itself.

The private networks go there too, as the direct engine's (engines/qemu/argv.py): a hub in the
part's own QEMU joined to every other part by datagram unix sockets. libvirt's own interfaces
join two guests only (``udp``, ``server``/``client``) or use multicast (``mcast``): more than two
parts would need a hub process, which then cuts every part when it stops.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from kvmtasks.config.options import Arch, Firmware, ImageType
from kvmtasks.config.part import Part, forwards
from kvmtasks.config.shares import tag
from kvmtasks.engines import sharing
from kvmtasks.engines.qemu.argv import private_network_args
from kvmtasks.errors import VmError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Marks a domain as made by kvmtasks: one without it is never touched.
KVMTASKS_NS = "urn:kvmtasks:domain:1"
FIRST_NIC_SLOT = 0x10
# QEMU -net nic models and their -device names.
NIC_DEVICES = {"virtio": "virtio-net-pci"}
DEFAULT_NIC = "e1000"  # what QEMU's pc machine gives a bare -net nic
# QEMU -vga names and libvirt's video models.
VIDEO_MODELS = {"std": "vga", "cirrus": "cirrus", "vmware": "vmvga", "qxl": "qxl", "virtio": "virtio",
                "none": "none"}
MEMORY_UNITS = {"K": "KiB", "M": "MiB", "G": "GiB", "T": "TiB"}


@dataclass(frozen=True)
class Disk:
    """The volume the domain boots, in the part's pool."""

    pool: str
    volume: str
    format: str


def _memory(size: str) -> tuple[str, str]:
    """kvm_memory as libvirt's value and unit; QEMU reads a bare number as MiB."""
    if size[-1] in MEMORY_UNITS:
        return size[:-1], MEMORY_UNITS[size[-1]]
    return size, "MiB"


def network_args(part: Part, listen_address: str) -> list[str]:
    """-netdev/-device pairs for kvm_net's user networks and NICs, the forwards on the first."""
    users: list[list[str]] = []
    models: list[dict[str, str]] = []
    for line in part.kvm_net:
        kind, _, options = line.partition(",")
        if kind == "user":
            users.append([o for o in options.split(",") if o and not o.startswith(("vlan=", "id="))])
        elif kind == "nic":
            models.append(dict(o.partition("=")[::2] for o in options.split(",") if o))
        else:
            raise VmError(f"kvm_net = {line!r}: only user and nic networks work with kvm_engine = libvirt")
    hostfwds = [
        f"hostfwd={r.protocol}:{listen_address}:{r.host_port}-{r.guest_address}:{r.guest_port}"
        for r in forwards(part)
    ]
    if hostfwds and not users:
        users.append([])
    if users and not models:
        models.append({})
    if hostfwds:
        users[0] += hostfwds
    args: list[str] = []
    for index, user_options in enumerate(users):
        args += ["-netdev", ",".join([f"user,id=kvmtasks-net{index}", *user_options])]
    for index, nic in enumerate(models):
        model = nic.get("model", DEFAULT_NIC)
        device = [NIC_DEVICES.get(model, model), f"netdev=kvmtasks-net{min(index, len(users) - 1)}",
                  f"bus=pci.0,addr={FIRST_NIC_SLOT + index:#x}"]
        if nic.get("macaddr"):
            device.append(f"mac={nic['macaddr']}")
        if users:
            args += ["-device", ",".join(device)]
    return args


def domain_xml(part: Part, *, domain_type: str, disk: Disk, listen_address: str,
               console_log: Path | None, uuid: str | None = None, seed: Disk | None = None) -> str:
    """The whole domain definition: every option of the part that libvirt can carry.

    uuid: the defined domain's, when there is one (libvirt redefines a domain only by its uuid).
    seed: the cloud-init seed's volume, attached as a read-only CD-ROM.
    """
    ET.register_namespace("qemu", QEMU_NS)
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = part.name
    if uuid is not None:
        ET.SubElement(domain, "uuid").text = uuid
    ET.SubElement(domain, "description").text = f"kvmtasks part {part.name} ({part.config_file})"
    metadata = ET.SubElement(domain, "metadata")
    ET.SubElement(metadata, f"{{{KVMTASKS_NS}}}part", name=part.name)
    value, unit = _memory(part.kvm_memory)
    ET.SubElement(domain, "memory", unit=unit).text = value
    ET.SubElement(domain, "vcpu").text = str(part.kvm_smp)
    os_element = ET.SubElement(domain, "os")
    os_type = ET.SubElement(os_element, "type", arch=part.kvm_arch.value)
    os_type.text = "hvm"
    if _machine(part) is not None:
        os_type.set("machine", _machine(part) or "")
    _firmware(os_element, part)
    ET.SubElement(os_element, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    if part.firmware is Firmware.UEFI_SECURE and part.kvm_arch is Arch.X86_64:
        ET.SubElement(features, "smm", state="on")  # OVMF's Secure Boot store is SMM's alone
    _cpu(domain, part, domain_type)
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_crash").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    _disk(devices, part, disk)
    if seed is not None:
        _seed_cdrom(devices, seed, "ide" if part.kvm_arch is Arch.X86_64 else "scsi")
    if console_log is not None:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(console_log))
    else:
        ET.SubElement(devices, "serial", type="pty")
    if part.kvm_vnc is not None:
        address, _, display = part.kvm_vnc.rpartition(":")
        ET.SubElement(devices, "graphics", type="vnc", port=str(5900 + int(display)),
                      autoport="no", listen=address or "127.0.0.1")
    if part.kvm_graphic is not None:
        model = VIDEO_MODELS.get(part.kvm_graphic)
        if model is None:
            raise VmError(f"kvm_graphic = {part.kvm_graphic!r} has no libvirt video model")
        ET.SubElement(ET.SubElement(devices, "video"), "model", type=model)
    _filesystems(devices, part)
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    nics = network_args(part, listen_address)
    private = private_network_args(part, pci_slot=FIRST_NIC_SLOT + nics.count("-device"))
    arguments = [*_on_root_bus(part, [*nics, *private]), *part.kvm_extra_args]
    if arguments:
        commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for argument in arguments:
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=argument)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _disk(devices: ET.Element, part: Part, disk: Disk) -> None:
    element = ET.SubElement(devices, "disk", type="volume", device="disk")
    ET.SubElement(element, "driver", name="qemu", type=disk.format)
    ET.SubElement(element, "source", pool=disk.pool, volume=disk.volume)
    if part.image_type is ImageType.HDA:
        ET.SubElement(element, "target", dev="hda", bus="ide")
    else:
        ET.SubElement(element, "target", dev="vda", bus="virtio")
    if part.kvm_snapshot:
        ET.SubElement(element, "transient")  # guest writes are dropped when the domain stops


def _filesystems(devices: ET.Element, part: Part) -> None:
    """The live 9p shares of a local libvirt host: accessmode mapped is QEMU's mapped-xattr
    (the guest's owners and modes in xattrs, files on the host owned by the user QEMU runs as)."""
    for index, share, _carrier in sharing.live(part):
        element = ET.SubElement(devices, "filesystem", type="mount", accessmode="mapped")
        ET.SubElement(element, "driver", type="path", wrpolicy="immediate")
        ET.SubElement(element, "source", dir=share.host)
        ET.SubElement(element, "target", dir=tag(index))
        if share.read_only:
            ET.SubElement(element, "readonly")


def _seed_cdrom(devices: ET.Element, seed: Disk, bus: str = "ide") -> None:
    # IDE, as QEMU's -cdrom: a cloud image's kernel has the driver built in, whatever the disk bus.
    # hdc (the secondary channel) keeps hda free for image_type = hda. Read-only and out of
    # snapshots, so it never blocks one of the writable disk.
    element = ET.SubElement(devices, "disk", type="volume", device="cdrom", snapshot="no")
    ET.SubElement(element, "driver", name="qemu", type=seed.format)
    ET.SubElement(element, "source", pool=seed.pool, volume=seed.volume)
    # virt has no IDE: a CD-ROM on the SCSI controller libvirt adds (virtio-scsi there).
    ET.SubElement(element, "target", dev="hdc" if bus == "ide" else "sdc", bus=bus)
    ET.SubElement(element, "readonly")


def _machine(part: Part) -> str | None:
    """The machine family (None: libvirt's default PC); libvirt stores the versioned name it
    stands for when it defines the domain, which pins it as the direct engine does."""
    if part.kvm_arch is not Arch.X86_64:
        return "virt"
    return "q35" if part.firmware is Firmware.UEFI_SECURE else None


def _firmware(os_element: ET.Element, part: Part) -> None:
    """UEFI chosen by libvirt from the same QEMU descriptors, by its features; libvirt keeps the
    domain's own variable store (its nvram), copied from the descriptor's template."""
    if part.firmware is Firmware.BIOS:
        return
    os_element.set("firmware", "efi")
    secure = "yes" if part.firmware is Firmware.UEFI_SECURE else "no"
    firmware = ET.SubElement(os_element, "firmware")
    ET.SubElement(firmware, "feature", enabled=secure, name="enrolled-keys")
    ET.SubElement(firmware, "feature", enabled=secure, name="secure-boot")


def _cpu(domain: ET.Element, part: Part, domain_type: str) -> None:
    """Another architecture's CPU: the host's under KVM, the most QEMU emulates under TCG."""
    if part.kvm_arch is Arch.X86_64:
        return
    ET.SubElement(domain, "cpu", mode="host-passthrough" if domain_type == "kvm" else "maximum")


def _on_root_bus(part: Part, arguments: list[str]) -> list[str]:
    """The NICs' bus: Q35's and virt's PCI Express root is pcie.0, the PC's is pci.0."""
    if part.kvm_arch is Arch.X86_64 and part.firmware is not Firmware.UEFI_SECURE:
        return arguments
    return [argument.replace(",bus=pci.0,", ",bus=pcie.0,") for argument in arguments]


def made_by_kvmtasks(xml_text: str) -> bool:
    """True when a domain's XML carries kvmtasks' metadata."""
    return KVMTASKS_NS in xml_text
