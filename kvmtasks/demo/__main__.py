"""The demo: build a tiny image locally, provision and boot the ``demo`` part, use it.

Run by ``./dev demo``. The image is built from Debian packages that are only
downloaded and unpacked into ``.cache/``, never installed on this machine.
Running it again reuses the image, and doit finds the provisioning up to date.
``--arch aarch64`` does the same with the tiny arm64 guest, booted through UEFI under
emulation: the part ``demo-arm64``, whose config the demo writes beside its image.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmtasks import command
from kvmtasks.demo import guestimage, uefiguest
from kvmtasks.demo.guestimage import GuestImageError, build_guest_image
from kvmtasks.errors import DemoError, KvmTasksError
from kvmtasks.provision.digest import CHUNK, MultiHasher, hash_file

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
DEMO = CACHE / "demo"
# configs/demo.cfg reads the image's URL and checksums from this file ([buildout] extends).
IMAGE_CONFIG = DEMO / "demo-image.cfg"
BIN = ROOT / "bin"


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def ensure_key() -> Path:
    key = DEMO / "id_ed25519"
    if not key.exists():
        DEMO.mkdir(parents=True, exist_ok=True)
        command.checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvmtasks-demo",
                         "-f", str(key)], doing=f"making the demo's key {key}")
    return key


def _gzip_and_hash(raw: Path, packed: Path) -> dict[str, str]:
    """Compress raw into packed; return the four checksums demo.cfg verifies."""
    image = MultiHasher(("md5", "sha256"))
    with open(raw, "rb") as reader, gzip.open(packed, "wb", compresslevel=6) as writer:
        while chunk := reader.read(CHUNK):
            image.update(chunk)
            writer.write(chunk)
    download = hash_file(packed, ("md5", "sha256"))
    return {
        **{f"{name}_image": value for name, value in image.hexdigests().items()},
        **{f"{name}_download": value for name, value in download.items()},
    }


def builder_digest() -> str:
    """Names the image builder's code: an image built by an older builder is built again."""
    return hashlib.sha256(Path(guestimage.__file__).read_bytes()).hexdigest()[:16]


def ensure_image(key: Path) -> None:
    """Build the demo image once (per version of the builder) and describe it for configs/demo.cfg."""
    packed = DEMO / "demo.img.gz"
    builder = f"builder = {builder_digest()}"
    if packed.exists() and IMAGE_CONFIG.exists() and builder in IMAGE_CONFIG.read_text().splitlines():
        say(f"demo image already built: {packed}")
        return
    say("building the demo image (Debian kernel, busybox, dropbear; packages go to .cache/guest)")
    with tempfile.TemporaryDirectory(dir=DEMO) as scratch:
        raw = Path(scratch) / "demo.img"
        image = build_guest_image(raw, key.with_suffix(".pub"), CACHE / "guest")
        digests = _gzip_and_hash(raw, Path(scratch) / "demo.img.gz")
        os.replace(Path(scratch) / "demo.img.gz", packed)
    lines = [
        "# Written by python -m kvmtasks.demo; delete .cache/demo to build a new image.",
        "[demo-image]",
        f"url = {packed.as_uri()}",
        f"kernel = {image.kernel_release}",
        f"key = {key}",
        builder,
        *(f"{name} = {value}" for name, value in sorted(digests.items())),
    ]
    IMAGE_CONFIG.write_text("\n".join(lines) + "\n")


# The arm64 demo part: its config is written here (configs/ holds only what every run reads).
ARM64_CONFIG = DEMO / "demo-arm64.cfg"
ARM64_PART = """[buildout]
directory = {root}

[demo-arm64]
# The tiny arm64 guest (python -m kvmtasks.demo --arch aarch64 builds it).
image = {url}
md5_image = {md5}
sha256_image = {sha256}
# qemu-system-aarch64, the virt machine, CPU max under TCG, UEFI (AAVMF) with its own variables.
kvm_arch = aarch64
firmware = uefi
kvm_memory = 256M
kvm_accel = auto
kvm_boot_timeout = 240
kvm_shutdown_timeout = 20
kvm_net =
  user,hostname=demo-arm64,restrict=on
ssh_port = 10023
ssh_key_path = {key}
"""


def ensure_arm64_config(key: Path) -> None:
    """Build the arm64 image once (per version of its builders); write its part's config."""
    image, stamp = DEMO / "demo-arm64.img", DEMO / "demo-arm64.builder"
    builder = hashlib.sha256(Path(uefiguest.__file__).read_bytes()).hexdigest()[:16] + builder_digest()
    if image.exists() and stamp.exists() and stamp.read_text() == builder:
        say(f"arm64 demo image already built: {image}")
    else:
        say("building the arm64 demo image (packages go to .cache/guest-arm64)")
        with tempfile.TemporaryDirectory(dir=DEMO) as scratch:
            raw = Path(scratch) / "demo-arm64.img"
            uefiguest.build_uefi_guest_image(raw, key.with_suffix(".pub"), CACHE / "guest-arm64")
            os.replace(raw, image)
        stamp.write_text(builder)
    digests = hash_file(image, ("md5", "sha256"))
    text = ARM64_PART.format(root=ROOT, url=image.as_uri(), key=key, **digests)
    ARM64_CONFIG.write_text(f"# Written by python -m kvmtasks.demo --arch aarch64.\n{text}")


def doit(*tasks: str, config: Path | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KVMTASKS_CONFIG"}
    if config is not None:
        env["KVMTASKS_CONFIG"] = str(config)
    argv = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *tasks]
    say(" ".join(["doit", *tasks]))
    if subprocess.run(argv, env=env, check=False).returncode != 0:
        raise DemoError(f"doit {' '.join(tasks)} failed (see above)")


def use_vm(part: str = "demo") -> None:
    runscript, sendfile, getfile = (
        str(BIN / f"{part}-{kind}") for kind in ("runscript", "sendfile", "getfile")
    )
    say(f"{part}-runscript uname -a")
    result = command.checked([runscript, "uname", "-a"])
    print(f"    the guest says: {result.stdout.strip()}")
    with tempfile.TemporaryDirectory() as scratch:
        outbound, inbound = Path(scratch) / "hello.txt", Path(scratch) / "back.txt"
        outbound.write_text("hello from the host\n")
        say(f"{part}-sendfile /root/hello.txt hello.txt, then {part}-getfile it back")
        remote = "/root/hello.txt"
        for argv in ([sendfile, remote, str(outbound)], [getfile, remote, str(inbound)]):
            command.checked(argv)
        same = inbound.read_text() == outbound.read_text()
        print(f"    the file came back {'unchanged' if same else 'CHANGED'}")
        if not same:
            raise DemoError("the file copied through the guest came back changed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmtasks.demo", description=__doc__)
    parser.add_argument("--arch", choices=("x86_64", "aarch64"), default="x86_64",
                        help="the guest's architecture (aarch64: under emulation, through UEFI)")
    arch = parser.parse_args(argv).arch
    part = "demo" if arch == "x86_64" else "demo-arm64"
    try:
        program = f"qemu-system-{arch}"
        if shutil.which(program) is None:
            raise DemoError(f"{program} not found; install the {command.PACKAGES[program]} package")
        key = ensure_key()
        if arch == "x86_64":
            ensure_image(key)
            doit("start:demo")
        else:
            ensure_arm64_config(key)
            doit("start:demo-arm64", config=ARM64_CONFIG)
        use_vm(part)
    except (KvmTasksError, GuestImageError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    if part != "demo":
        print(f"\nThe {part} VM is running (aarch64 through UEFI). Use it as the demo part:\n"
              f"  bin/{part}-runscript 'uname -m'\n  bin/{part}-ssh\n"
              f"Stop it:\n  bin/{part}-ctl stop\n")
        return 0
    print(
        "\nThe demo VM is running. Use it:\n"
        "  bin/demo-runscript 'cat /proc/cpuinfo | head -5'\n"
        "  bin/demo-sendfile /tmp/file.txt ./file.txt    # REMOTEFILE LOCALFILE\n"
        "  bin/demo-getfile /tmp/file.txt ./copy.txt\n"
        "  bin/demo-ssh             # log in (exit, or Ctrl-D, to leave)\n"
        "  bin/demo-ctl status      # add --json for programs\n"
        "  bin/demo-ctl console     # its serial console; --follow to watch it\n"
        "Stop it:\n"
        "  bin/demo-ctl stop        (or: .venv/bin/doit stop:demo)\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
