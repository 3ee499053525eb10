"""End to end: real QEMU guests, driven only through doit and the generated scripts.

Guests run under TCG: /dev/kvm exists on the test machines but guests crash
under it (nested virtualisation). The `auto` test relies on exactly that.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.httpserver import FileServer
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]


def script(project: Project, name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(project.root / "home"), **project.env}
    env.pop("KVMTASKS_ACCEL", None)
    env.update({k: v for k, v in project.env.items()})
    return subprocess.run(
        [str(project.root / "bin" / name), *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd="/", env=env,
    )


def vm_config(guest: Guest, source: str, ssh_port: int, extra: str = "") -> str:
    return (
        f"[vm]\n{source}\n"
        f"ssh_port = {ssh_port}\n"
        f"ssh_key_path = {guest.key}\n"
        "kvm_memory = 256M\n"
        "kvm_accel = tcg\n"
        "kvm_boot_timeout = 120\n"
        "kvm_shutdown_timeout = 3\n"
        f"{extra}"
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_provision_start_use_and_stop(project: Project, guest: Guest, http_server: FileServer,
                                      tmp_path: Path) -> None:
    raw = guest.image.path.read_bytes()
    packed = guest.gzipped()
    url = http_server.put("/guest.img.gz", packed)
    source = (
        f"image = {url}\ngzip = true\n"
        f"md5_download = {hashlib.md5(packed).hexdigest()}\n"
        f"sha256_download = {hashlib.sha256(packed).hexdigest()}\n"
        f"md5_image = {hashlib.md5(raw).hexdigest()}\n"
        f"sha256_image = {hashlib.sha256(raw).hexdigest()}\n"
    )
    project.write(vm_config(guest, source, free_port()))

    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    # The download inflated the image as it arrived: decompress was up to date.
    assert {"download:vm", "render:vm", "start:vm"} <= started.executed
    assert "decompress:vm" not in started.executed
    assert "vm is running" in started.stdout

    uname = script(project, "vm-runscript", "uname", "-r")
    assert (uname.returncode, uname.stdout.strip()) == (0, guest.image.kernel_release)
    assert script(project, "vm-runscript", "false").returncode == 1
    assert script(project, "vm-runscript", "exit 7").returncode == 7

    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3 * 1024 * 1024))
    sent = script(project, "vm-sendfile", "/tmp/payload.bin", str(payload))
    assert sent.returncode == 0, sent.stderr
    back = tmp_path / "back.bin"
    got = script(project, "vm-getfile", "/tmp/payload.bin", str(back))
    assert got.returncode == 0, got.stderr
    assert back.read_bytes() == payload.read_bytes()

    again = script(project, "vm-ctl", "start")
    assert again.returncode == 0 and "already running" in again.stdout

    status = script(project, "vm-ctl", "status")
    assert status.returncode == 0, status.stdout
    assert "running" in status.stdout and "accel tcg" in status.stdout

    restarted = script(project, "vm-ctl", "restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert script(project, "vm-runscript", "true").returncode == 0

    stopped = script(project, "vm-ctl", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    status = script(project, "vm-ctl", "status")
    assert status.returncode == 3 and "stopped" in status.stdout
    assert qemu_pids_under(project.root) == []
    assert script(project, "vm-ctl", "stop").stdout.strip() == "vm is not running"

    # Nothing changed: provision is a no-op even though the guest wrote to its disk.
    rerun = project.run("provision:vm")
    assert rerun.returncode == 0 and not rerun.executed, rerun.describe()


def _http_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := connection.recv(4096):
            data += chunk
    return data


def test_hda_ne2k_redirect_vnc_and_snapshot(project: Project, guest: Guest, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(guest.image.path.read_bytes())
    before = sha256(image)
    web_port, vnc_display = free_port(), free_port() - 5900  # ephemeral ports are far above 5900
    project.write(vm_config(guest, f"file = {image}", free_port(), (
        "image_type = hda\n"
        "kvm_net =\n  user,hostname=testvm\n  nic,model=ne2k_pci\n"
        f"kvm_redir =\n  tcp:{web_port}::80\n"
        f"kvm_vnc = 127.0.0.1:{vnc_display}\n"
        "kvm_snapshot = true\n"
    )))
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()

    assert script(project, "vm-runscript", "grep -q ne2k /proc/modules").returncode == 0
    serve = "mkdir -p /www && echo hello-from-guest > /www/hello.txt && busybox httpd -p 80 -h /www"
    assert script(project, "vm-runscript", serve).returncode == 0
    assert b"hello-from-guest" in _http_get(web_port)

    with socket.create_connection(("127.0.0.1", 5900 + vnc_display), timeout=10) as vnc:
        assert vnc.recv(12).startswith(b"RFB ")

    write = "dd if=/dev/urandom of=/mnt/junk bs=1k count=512 && sync"
    wrote = script(project, "vm-runscript", f"grep -q ' /mnt ' /proc/mounts && {write}")
    assert wrote.returncode == 0, wrote.stderr
    assert script(project, "vm-ctl", "stop").returncode == 0
    assert sha256(image) == before


def test_auto_accel_falls_back_and_scp_works_without_sftp(
    project: Project, guest_without_sftp: Guest, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(guest_without_sftp.image.path.read_bytes())
    config = vm_config(guest_without_sftp, f"file = {image}", free_port()).replace(
        "kvm_accel = tcg", "kvm_accel = auto"
    )
    project.write(config)
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    status = script(project, "vm-ctl", "status")
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and "accel tcg" in status.stdout:
        # KVM was tried and failed: the user was told why.
        assert "starting again under TCG" in started.stdout

    payload = tmp_path / "small.txt"
    payload.write_text("legacy scp\n")
    assert script(project, "vm-sendfile", "/tmp/small.txt", str(payload)).returncode == 0
    back = tmp_path / "back.txt"
    got = script(project, "vm-getfile", "/tmp/small.txt", str(back))
    assert got.returncode == 0, got.stderr
    assert back.read_text() == "legacy scp\n"
    assert script(project, "vm-ctl", "stop").returncode == 0


def test_boot_timeout_leaves_nothing_running(project: Project, guest: Guest, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(guest.image.path.read_bytes())
    project.write(vm_config(guest, f"file = {image}", free_port()).replace(
        "kvm_boot_timeout = 120", "kvm_boot_timeout = 2"))
    started = project.run("start:vm", timeout=120)
    assert started.returncode != 0
    assert "never answered on ssh within kvm_boot_timeout = 2 s" in started.output
    assert "console.log" in started.output
    assert "Traceback" not in started.output
    assert qemu_pids_under(project.root) == []
    assert script(project, "vm-ctl", "status").returncode == 3


def test_port_in_use_is_named(project: Project, guest: Guest, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        project.write(vm_config(guest, f"file = {guest.image.path}", port))
        started = project.run("start:vm")
    assert started.returncode != 0
    assert f"host port {port} (tcp on 127.0.0.1) is already in use" in started.output
    assert qemu_pids_under(project.root) == []


def test_qemu_failing_at_start_shows_its_stderr(project: Project, guest: Guest) -> None:
    project.write(vm_config(guest, f"file = {guest.image.path}", free_port(),
                            "kvm_extra_args =\n  -no-such-option\n"))
    started = project.run("start:vm")
    assert started.returncode != 0
    assert "qemu failed to start" in started.output and "no-such-option" in started.output
    assert qemu_pids_under(project.root) == []


def test_stale_pid_file_of_an_unrelated_process(project: Project, guest: Guest) -> None:
    project.write(vm_config(guest, f"file = {guest.image.path}", free_port()))
    assert project.run("render:vm").returncode == 0
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = project.var / "vm" / "qemu.pid"
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{bystander.pid}\n")
        status = script(project, "vm-ctl", "status")
        assert status.returncode == 3
        assert not pidfile.exists()
        pidfile.write_text(f"{bystander.pid}\n")
        assert script(project, "vm-ctl", "stop").returncode == 0
        time.sleep(0.2)
        assert bystander.poll() is None, "an unrelated process was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_missing_qemu_binary_says_what_to_install(project: Project, guest: Guest) -> None:
    project.write(vm_config(guest, f"file = {guest.image.path}", free_port(),
                            "kvm_binary = qemu-system-nonexistent\n"))
    started = project.run("start:vm")
    assert started.returncode != 0
    assert "qemu-system-nonexistent not found" in started.output
