"""The QEMU command line: config in, argv list out, nothing started."""

from __future__ import annotations

from pathlib import Path

from kvmtasks.config.options import Arch, ImageType
from kvmtasks.config.part import Part, forwards
from kvmtasks.config.runfiles import RunFiles, network_socket
from kvmtasks.config.seedrules import seed_path
from kvmtasks.config.shares import Carrier, tag, virtiofs_socket
from kvmtasks.engines import sharing
from kvmtasks.engines.qemu.firmware import Flash


def escape(value: str | Path) -> str:
    """QEMU's own quoting inside option values: a comma is written twice."""
    return str(value).replace(",", ",,")


def network_args(part: Part, listen_address: str) -> list[str]:
    """-net options: the kvm_net lines, with forwards added to the user network."""
    hostfwds = "".join(
        f",hostfwd={r.protocol}:{listen_address}:{r.host_port}-{r.guest_address}:{r.guest_port}"
        for r in forwards(part)
    )
    lines = list(part.kvm_net)
    kinds = [line.split(",", 1)[0] for line in lines]
    if hostfwds:
        if "user" in kinds:
            index = kinds.index("user")
            lines[index] += hostfwds
        else:
            lines.append("user" + hostfwds)
            kinds.append("user")
        if "nic" not in kinds:
            lines.insert(0, "nic")
    args: list[str] = []
    for line in lines:
        args += ["-net", line]
    return args


# A setup layer's cluster size: a file system's block, so that a trim of one block frees it.
LAYER_CLUSTER = 4096


def disk_args(part: Part, disk_format: str, discard: bool = False) -> list[str]:
    """The boot disk; disk_format is qcow2 for an overlay (whose base QEMU opens read-only).
    discard passes the guest's trims to the file (a setup builder's layers stay small), in
    blocks of a file system's 4 KiB: a freed block then leaves nothing behind in a layer of
    4 KiB clusters (layers/capture.py)."""
    image = escape(part.boot_disk)
    unmap = ",discard=unmap" if discard else ""
    if part.image_type is ImageType.HDA:
        return ["-drive", f"file={image},if=ide,index=0,media=disk,format={disk_format}{unmap}"]
    granularity = ["-global", f"virtio-blk-pci.discard_granularity={LAYER_CLUSTER}"] if discard else []
    return [*granularity, "-drive", f"file={image},if=virtio,cache=none,format={disk_format}{unmap}"]


def seed_args(part: Part) -> list[str]:
    """The cloud-init seed as a read-only CD-ROM on the IDE bus of QEMU's pc machine (AHCI on
    q35): Debian's kernel finds it with its stock modules (ata_piix, sr_mod, isofs), and a
    read-only drive never blocks a snapshot of the writable disk. No index: the first free
    IDE slot, so an hda disk or a -cdrom in kvm_extra_args keeps its own."""
    if not part.cloud_init:
        return []
    return ["-drive", f"file={escape(seed_path(part))},if=ide,media=cdrom,readonly=on,format=raw"]


# kvm_net's -net lines share hub 0 (QEMU's legacy VLAN): private networks take hubs of their own.
PRIVATE_HUB_BASE = 100


def private_network_args(part: Part, pci_slot: int | None = None) -> list[str]:
    """One virtio NIC per private network, on a hub inside this QEMU that a datagram unix
    socket joins to each other part of the network: no process but the guests' QEMUs, no IP
    packet on the host, and a part that restarts binds its sockets again while the others'
    datagrams wait for nobody (see README, "Private networks between parts").
    pci_slot: the first NIC's slot on the root bus, from there up (libvirt's domains, whose own
    devices take the slots below); None lets QEMU place them."""
    args: list[str] = []
    for index, link in enumerate(part.links):
        hub, nic = PRIVATE_HUB_BASE + index, f"kvmnet{index}"
        placement = "" if pci_slot is None else f",bus=pci.0,addr={pci_slot + index:#x}"
        args += [
            "-netdev", f"hubport,id={nic},hubid={hub}",
            "-device", f"virtio-net-pci,netdev={nic}{placement},mac={link.mac}",
        ]
        for number, peer in enumerate(link.peers):
            local = escape(network_socket(link, part.name, peer.part))
            remote = escape(network_socket(link, peer.part, part.name))
            args += [
                "-netdev", f"dgram,id={nic}p{number},local.type=unix,local.path={local},"
                           f"remote.type=unix,remote.path={remote}",
                "-netdev", f"hubport,id={nic}h{number},hubid={hub},netdev={nic}p{number}",
            ]
    return args


def cpu_args(part: Part, accel: str) -> list[str]:
    """The CPU of a foreign architecture: the host's under KVM; under TCG the most QEMU emulates
    (aarch64's virt machine would otherwise be a 32-bit Cortex-A15), with QEMU's own pointer
    authentication, which TCG computes several times faster than the architected one."""
    if part.kvm_arch is Arch.X86_64:
        return []
    if accel == "kvm":
        return ["-cpu", "host"]
    return ["-cpu", "max,pauth-impdef=on" if part.kvm_arch is Arch.AARCH64 else "max"]


def firmware_args(flash: Flash | None) -> list[str]:
    """UEFI in flash: the packaged code read-only, the part's variable store writable. Secure
    Boot's store is writable only from SMM, which the machine and the flash must both enforce."""
    if flash is None:
        return []
    args = [
        "-drive", f"if=pflash,unit=0,format={flash.code_format},readonly=on,file={escape(flash.code)}",
        "-drive", f"if=pflash,unit=1,format=qcow2,file={escape(flash.varstore)}",
    ]
    if flash.secure:
        args += ["-machine", "smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]
    return args


def virt_seed_args(part: Part) -> list[str]:
    """The cloud-init seed on a virt machine, which has no IDE: a CD-ROM on virtio-scsi, which
    Debian's and other cloud kernels for arm64 carry."""
    if not part.cloud_init:
        return []
    return [
        "-device", "virtio-scsi-pci,id=seedbus",
        "-drive", f"file={escape(seed_path(part))},if=none,id=seed,media=cdrom,readonly=on,format=raw",
        "-device", "scsi-cd,drive=seed,bus=seedbus.0",
    ]


def qemu_argv(
    part: Part, *, accel: str, disk_format: str, listen_address: str, machine: str | None = None,
    discard: bool = False,
    flash: Flash | None = None,
) -> list[str]:
    """The full command line that starts the part's VM as a daemon.

    machine is the versioned machine type (engines/qemu/machine.py), pinned so that a saved
    state restores on the same machine; None leaves QEMU's default.
    """
    files = RunFiles.of(part)
    argv = [
        part.kvm_binary,
        "-name", escape(part.name),
        *(["-machine", machine] if machine else []),
        "-accel", accel,
        *cpu_args(part, accel),
        *firmware_args(flash),
        "-m", part.kvm_memory,
        "-smp", str(part.kvm_smp),
        *disk_args(part, disk_format, discard),
        *(seed_args(part) if part.kvm_arch is Arch.X86_64 else virt_seed_args(part)),
        *share_args(part),
        # Entropy from the host: guests otherwise stall generating ssh keys at first boot.
        "-device", "virtio-rng-pci",
    ]
    if part.kvm_snapshot:
        argv.append("-snapshot")
    if part.kvm_vnc is not None:
        argv += ["-vnc", part.kvm_vnc]
    else:
        argv += ["-display", "none"]
    if part.kvm_graphic is not None:
        argv += ["-vga", part.kvm_graphic]
    argv += network_args(part, listen_address)
    argv += private_network_args(part)
    argv += [
        "-chardev", f"file,id=console,path={escape(files.console_log)}",
        "-serial", "chardev:console",
        # Not -qmp unix:PATH: there QEMU reads a PATH holding '=' as an option name.
        "-chardev", f"socket,id=qmp,path={escape(files.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-monitor", "none",
        "-pidfile", str(files.pidfile),
        "-daemonize",
        *part.kvm_extra_args,
    ]
    return argv


def memory_size(memory: str) -> str:
    """kvm_memory as a memory backend's size: -m reads a bare number as MiB, a backend as bytes."""
    return memory if memory[-1].isalpha() else f"{memory}M"


def share_args(part: Part) -> list[str]:
    """The live shares' devices. 9p: security_model=mapped-xattr, so what the guest writes is
    owned on the host by the user running QEMU (the guest's owner and mode kept in xattrs),
    never a device or setuid file of the host's. virtiofs: the vhost-user socket of the share's
    virtiofsd, and guest memory shared with it (a memfd backend)."""
    args: list[str] = []
    for index, share, carrier in sharing.live(part):
        if carrier is Carrier.NINEP:
            readonly = ",readonly=on" if share.read_only else ""
            args += ["-fsdev", f"local,id=kvmtasks-fs{index},path={escape(share.host)},"
                               f"security_model=mapped-xattr,multidevs=remap{readonly}",
                     "-device", f"virtio-9p-pci,fsdev=kvmtasks-fs{index},mount_tag={tag(index)}"]
        else:
            socket = virtiofs_socket(part.state_directory, index)
            args += ["-chardev", f"socket,id=kvmtasks-vfs{index},path={escape(socket)}",
                     "-device", f"vhost-user-fs-pci,chardev=kvmtasks-vfs{index},tag={tag(index)}"]
    if any(carrier is Carrier.VIRTIOFS for _, _, carrier in sharing.live(part)):
        args = ["-object", f"memory-backend-memfd,id=kvmtasks-mem,size={memory_size(part.kvm_memory)},"
                           "share=on",
                "-machine", "memory-backend=kvmtasks-mem", *args]
    return args
