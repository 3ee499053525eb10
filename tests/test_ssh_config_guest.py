"""The part's ssh config with a real guest: ssh, scp and rsync through it, a changed host key
refused, a master opened by the first tool when none runs; then ``destroy`` on the direct QEMU
engine, and a start from scratch. One guest (the tiny one, with rsync) serves every check.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.config.runfiles import control_socket
from tests.conftest import Project
from tests.httpserver import FileServer
from tests.test_vm_e2e import script
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]


def tool(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def fingerprints(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under folder: its inode and sha256."""
    return {str(path.relative_to(folder)): (path.stat().st_ino, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_every_ssh_tool_through_the_ssh_config_then_destroy(
    project: Project, guest_with_rsync: Guest, http_server: FileServer, tmp_path: Path
) -> None:
    if shutil.which("rsync") is None:
        pytest.fail("rsync is not installed on this machine (./dev installs it)")
    guest = guest_with_rsync
    # A key in a folder whose name ssh would read as a token unquoted: "%%" must reach it as "%".
    key = tmp_path / "keys 100%" / "id"
    key.parent.mkdir()
    shutil.copyfile(guest.key, key)
    key.chmod(0o600)
    cache = tmp_path / "download cache"
    project.buildout["download-cache"] = str(cache)
    url = http_server.put("guest.img.gz", guest.gzipped())
    port = free_port()
    project.write(f"[vm]\nimage = {url}\nssh_port = {port}\nssh_key_path = {key}\nkvm_memory = 256M\n"
                  "kvm_accel = tcg\nkvm_boot_timeout = 120\nkvm_shutdown_timeout = 3\n")
    (part,) = load_file(project.configs[0], project.root)

    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    config = project.var / "vm" / "ssh_config"
    facts = json.loads(script(project, "vm-ctl", "status", "--json").stdout)
    assert facts["ssh_config"] == str(config)
    ssh = ("ssh", "-F", str(config))

    # ssh, over the master start opened.
    hello = tool(*ssh, "vm", "echo", "hello from the guest")
    assert (hello.returncode, hello.stdout) == (0, "hello from the guest\n"), hello.stderr
    assert tool(*ssh, "-O", "check", "vm").returncode == 0
    # scp, both ways.
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 1024)
    assert tool("scp", "-F", str(config), str(payload), "vm:/tmp/payload.bin").returncode == 0
    assert tool("scp", "-F", str(config), "vm:/tmp/payload.bin", str(tmp_path / "back.bin")).returncode == 0
    assert (tmp_path / "back.bin").read_bytes() == payload.read_bytes()
    # rsync, a tree there and back.
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a\n")
    (tree / "sub" / "b.txt").write_text("b\n")
    rsh = f"ssh -F {config}"
    sent = tool("rsync", "-a", "-e", rsh, f"{tree}/", "vm:/tmp/tree/")
    assert sent.returncode == 0, sent.stderr
    got = tool("rsync", "-a", "-e", rsh, "vm:/tmp/tree/", f"{tmp_path / 'tree-back'}/")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "tree-back" / "sub" / "b.txt").read_text() == "b\n"
    assert tool(*ssh, "vm", "cat /tmp/tree/a.txt").stdout == "a\n"

    # The master gone, the first tool opens one (ControlMaster auto) and the others share it.
    master = control_socket(part)
    assert tool(*ssh, "-O", "exit", "vm").returncode == 0
    deadline = time.monotonic() + 10
    while master.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not master.exists()
    first = subprocess.Popen([*ssh, "vm", "sleep 3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not master.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tool(*ssh, "-O", "check", "vm").returncode == 0
        riding = script(project, "vm-runscript", "echo $SSH_CLIENT")
        assert riding.returncode == 0 and riding.stdout.strip()
    finally:
        assert first.wait(timeout=60) == 0
    assert not master.exists()  # no ControlPersist: it ends with the tool that opened it
    assert script(project, "vm-runscript", "true").returncode == 0  # and directly without one

    # A changed host key is refused through the file, and by the scripts that use it.
    known_hosts = project.var / "vm" / "known_hosts"
    pinned = known_hosts.read_text()
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known_hosts.write_text(f"[localhost]:{port} {other.with_suffix('.pub').read_text()}")
    refused = tool(*ssh, "vm", "true")
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr, refused.stderr
    by_script = script(project, "vm-runscript", "true")
    assert by_script.returncode == 255 and "Host key verification failed" in by_script.stderr
    known_hosts.write_text(pinned)

    assert tool(*ssh, "vm", "echo x > /mnt/written-before-destroy && sync").returncode == 0
    # destroy, the VM running: it stops, then its machine goes; the cache and the image stay.
    kept = {**{f"cache/{k}": v for k, v in fingerprints(cache).items()},
            "image": fingerprints(part.image_path.parent)[part.image_path.name]}
    overlay = part.overlay_path
    assert overlay.is_file()
    destroyed = script(project, "vm-ctl", "destroy")
    assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
    assert "vm stopped" in destroyed.stdout and f"removed {overlay}\n" in destroyed.stdout
    assert f"removed {config}\n" in destroyed.stdout and "vm destroyed (" in destroyed.stdout
    assert qemu_pids_under(project.root) == []
    assert not overlay.exists() and not master.exists()
    assert sorted(p.name for p in (project.var / "vm").iterdir()) == ["part.json", "vm.lock"]
    assert {**{f"cache/{k}": v for k, v in fingerprints(cache).items()},
            "image": fingerprints(part.image_path.parent)[part.image_path.name]} == kept
    again = script(project, "vm-ctl", "destroy")
    assert (again.returncode, again.stdout) == (0, "vm: destroying its machine\n"
                                                   "vm: nothing of its machine was left to remove\n")

    # A start from scratch: a new overlay, a new ssh config; then destroy as a doit task.
    restarted = project.run("start:vm", timeout=300)
    assert restarted.returncode == 0, restarted.describe()
    assert {"overlay:vm", "render:vm"} <= restarted.executed and not restarted.ran()
    assert tool(*ssh, "vm", "test ! -e /mnt/written-before-destroy").returncode == 0
    assert script(project, "vm-runscript", "true").returncode == 0
    by_doit = project.run("destroy:vm", timeout=120)
    assert by_doit.returncode == 0, by_doit.describe()
    assert f"removed {overlay}" in by_doit.output and not overlay.exists()
    assert qemu_pids_under(project.root) == []
