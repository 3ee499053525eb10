"""The option table and every value parser: good values, bad values, and any text at all."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtasks.config import options
from kvmtasks.config.options import (
    OPTIONS,
    OPTIONS_BY_NAME,
    Accel,
    Compression,
    ImageType,
    NetworkRequest,
    Redirect,
)
from kvmtasks.config.shares import Share

from .conftest import REPO_ROOT

GOOD: dict[str, list[tuple[str, Any]]] = {
    "parse_text": [("erp5.recipe.kvm", "erp5.recipe.kvm"), ("a b", "a b")],
    "parse_bool": [("true", True), ("Yes", True), (" on ", True), ("1", True),
                   ("false", False), ("NO", False), ("off", False), ("0", False)],
    "parse_lines": [("a\n b \n\n c", ("a", "b", "c")), ("", ())],
    "parse_port": [("1", 1), ("22", 22), ("65535", 65535)],
    "parse_url": [("http://host/a.img", "http://host/a.img"), ("HTTPS://h/x", "HTTPS://h/x"),
                  ("file:///srv/a.img", "file:///srv/a.img")],
    "parse_path": [("/dev/sdb", "/dev/sdb"), ("images/a.img", "images/a.img"), ("~/a", "~/a")],
    "parse_image_type": [("drive", ImageType.DRIVE), ("HDA", ImageType.HDA)],
    "parse_accel": [("auto", Accel.AUTO), ("kvm", Accel.KVM), (" TCG ", Accel.TCG)],
    "parse_vnc": [("127.0.0.1:1", "127.0.0.1:1"), (":0", ":0"), ("[::1]:3", "[::1]:3")],
    "parse_vga": [("std", "std"), ("virtio", "virtio"), ("none", "none")],
    "parse_net": [("user,hostname=vm\nnic,model=virtio", ("user,hostname=vm", "nic,model=virtio")),
                  ("none", ("none",))],
    "parse_redirects": [
        ("2222::22", (Redirect("tcp", 2222, "", 22),)),
        ("udp:5353:10.0.2.15:53\ntcp:8080::80",
         (Redirect("udp", 5353, "10.0.2.15", 53), Redirect("tcp", 8080, "", 80))),
    ],
    "parse_networks": [
        ("back\nfront 192.168.5.7/24", (NetworkRequest("back", "back", None),
                                        NetworkRequest("front 192.168.5.7/24", "front", "192.168.5.7/24"))),
        ("", ()),
    ],
    "parse_hostname": [("localhost", "localhost"), ("10.0.0.1", "10.0.0.1"),
                       ("vm-1.example", "vm-1.example")],
    "parse_user": [("root", "root"), ("_svc.name-1", "_svc.name-1")],
    "parse_guest_hostname": [("vm", "vm"), (" web-1.example.org ", "web-1.example.org"), ("9", "9")],
    "parse_memory": [("512M", "512M"), ("2G", "2G"), ("1024", "1024"), ("1T", "1T")],
    "parse_disk_size": [("20G", "20G"), (" 512m ", "512M"), ("1T", "1T"), ("64K", "64K")],
    "parse_compression": [("auto", Compression.AUTO), ("none", Compression.NONE), ("GZIP", Compression.GZIP),
                          ("xz", Compression.XZ), (" zstd ", Compression.ZSTD), ("bz2", Compression.BZ2)],
    "parse_cpus": [("1", 1), ("16", 16), ("1024", 1024)],
    "parse_seconds": [("300", 300.0), ("0.5", 0.5), ("1e3", 1000.0)],
    "parse_program": [("qemu-system-x86_64", "qemu-system-x86_64"), ("/usr/bin/kvm", "/usr/bin/kvm")],
    "md5": [("d41d8cd98f00b204e9800998ecf8427e",) * 2, ("D41D8CD98F00B204E9800998ECF8427E",
                                                        "d41d8cd98f00b204e9800998ecf8427e")],
    "sha256": [("ab" * 32, "ab" * 32), (" " + "0" * 64 + " ", "0" * 64)],
    "sha512": [("f" * 128, "f" * 128)],
    "parse_engine": [("qemu", options.Engine.QEMU), ("LibVirt", options.Engine.LIBVIRT)],
    "parse_arch": [("x86_64", options.Arch.X86_64), (" AArch64 ", options.Arch.AARCH64),
                   ("riscv64", options.Arch.RISCV64)],
    "parse_firmware": [("bios", options.Firmware.BIOS), ("UEFI", options.Firmware.UEFI),
                       ("uefi-secure", options.Firmware.UEFI_SECURE)],
    "parse_libvirt_uri": [("qemu:///system", "qemu:///system"), ("qemu:///session", "qemu:///session"),
                          ("qemu+ssh://root@h:22/system?keyfile=/k&no_verify=1",
                           "qemu+ssh://root@h:22/system?keyfile=/k&no_verify=1")],
    "parse_pool": [("kvmtasks", "kvmtasks"), ("pool_2.a-b", "pool_2.a-b")],
    "parse_shares": [("src /srv ro", (Share("src", "/srv", read_only=True),)), ("", ())],
}

BAD: dict[str, list[str]] = {
    "parse_text": ["", "a\nb", "nul\x00"],
    "parse_bool": ["", "maybe", "2", "truthy"],
    "parse_lines": ["a\x00b"],
    "parse_port": ["0", "65536", "-1", "22a", "", "123456", "٢٢"],
    "parse_url": ["", "ftp://h/a", "/srv/a.img", "http://h/a b", "http://h/\na"],
    "parse_path": ["", "a\nb", "a\x00b"],
    "parse_image_type": ["", "ide", "virtio"],
    "parse_accel": ["", "xen", "hvf"],
    "parse_engine": ["", "docker", "virsh"],
    "parse_arch": ["", "arm64", "amd64", "i386", "ppc64le"],
    "parse_firmware": ["", "efi", "uefi_secure", "coreboot"],
    "parse_libvirt_uri": ["", "xen:///system", "qemu://", "qemu+ssh://h/other", "qemu:///system x"],
    "parse_pool": ["", "-pool", "a b", "a/b"],
    "parse_vnc": ["", "1", "host", "a b:1"],
    "parse_vga": ["", "vga", "STD"],
    "parse_net": ["bogus,a=b", "user\nnonsense"],
    "parse_redirects": ["22", "sctp:1::2", "tcp:0::22", "tcp:1::70000", "tcp:1:not-an-ip:22", "a:b:c"],
    "parse_networks": ["a b", "n 1.2.3.4/24", "n 10.0.0.1", "n\nn", "n 10.0.0.0/24", "-n"],
    "parse_hostname": ["", "-bad", "a b", "host/name"],
    "parse_user": ["", "1root", "a b", "-x"],
    "parse_guest_hostname": ["", "-vm", "vm-", "my_vm", "a..b", "a b", "x" * 64, ".".join(["a"] * 128)],
    "parse_memory": ["", "0", "512MB", "-1G", "1.5G"],
    "parse_disk_size": ["", "0G", "20", "20GB", "1.5G", "-1G", "G"],
    "parse_compression": ["", "zip", "lz4", "gz", "true"],
    "parse_cpus": ["", "0", "1025", "two", "-1"],
    "parse_seconds": ["", "0", "-5", "nan", "inf", "1e6", "soon"],
    "parse_program": ["", "-x", "a\nb"],
    "md5": ["", "0" * 31, "0" * 33, "g" * 32, "0" * 64],
    "sha256": ["0" * 32, "z" * 64],
    "sha512": ["0" * 64, "0" * 127],
    "parse_shares": ["src", "src dst", "src /dst bogus", "a /x\nb /x", "src /dst 9p virtiofs"],
}


def parser_key(option: options.Option) -> str:
    """Checksum parsers are closures: name them by algorithm; the others by function name."""
    for algorithm in options.DIGEST_LENGTHS:
        if option.name.startswith(f"{algorithm}_"):
            return algorithm
    return option.parse.__name__


def parser_for(key: str) -> Callable[[str], Any]:
    if key in options.DIGEST_LENGTHS:
        return options.checksum_parser(key)
    parse: Callable[[str], Any] = getattr(options, key)
    return parse


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_every_option_has_a_tested_parser(option: options.Option) -> None:
    assert parser_key(option) in GOOD
    assert parser_key(option) in BAD


@pytest.mark.parametrize(("key", "text", "expected"),
                         [(key, text, expected) for key, cases in GOOD.items() for text, expected in cases])
def test_good_values_parse(key: str, text: str, expected: Any) -> None:
    assert parser_for(key)(text) == expected


@pytest.mark.parametrize(("key", "text"), [(key, text) for key, texts in BAD.items() for text in texts])
def test_bad_values_raise_a_one_line_value_error(key: str, text: str) -> None:
    with pytest.raises(ValueError) as error:
        parser_for(key)(text)

    assert str(error.value)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.default is not None], ids=lambda o: o.name)
def test_every_default_parses(option: options.Option) -> None:
    assert option.default is not None
    option.parse(option.default)


def test_option_names_are_unique_and_indexed() -> None:
    assert len(OPTIONS_BY_NAME) == len(OPTIONS)
    assert all(OPTIONS_BY_NAME[o.name] is o for o in OPTIONS)


def test_the_reference_lists_every_option_once() -> None:
    reference = options.reference_markdown()

    for option in OPTIONS:
        assert reference.count(f"| `{option.name}` |") == 1
    assert reference.startswith("| option | default | meaning |\n")


def test_the_module_prints_the_reference() -> None:
    printed = subprocess.run([sys.executable, "-m", "kvmtasks.config.options"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True)

    assert printed.stdout == options.reference_markdown()


@settings(max_examples=400, deadline=None)
@given(option=st.sampled_from(OPTIONS), text=st.text())
def test_any_text_parses_or_raises_value_error(option: options.Option, text: str) -> None:
    """config.py turns ValueError into a ConfigError; anything else would be a traceback."""
    try:
        option.parse(text)
    except ValueError as error:
        assert len(str(error).splitlines()) == 1
