"""``destroy`` without a guest: what a provisioned part made for its machine goes, what the
user owns stays, and provisioning makes it all again. (With guests, on both engines:
test_ssh_config_guest.py and test_libvirt.py.)"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Project


def ctl(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(project.root / "bin" / "vm-ctl"), *args], capture_output=True, text=True,
                          timeout=60, check=False, env=project.environment())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("own_key", [False, True])
def test_destroy_removes_the_machine_and_keeps_what_is_yours(project: Project, own_key: bool) -> None:
    disk = project.root / "disk.img"
    disk.write_bytes(b"\x01" * 65536)
    key = project.root / "my key" / "id"
    key_line = ""
    if own_key:
        key.parent.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        key_line = f"ssh_key_path = {key}\n"
    project.write(f"[vm]\nfile = {disk}\noverlay = true\ncloud_init = true\nssh_port = 2222\n{key_line}")
    assert project.provision().returncode == 0
    state = project.var / "vm"
    made = {state / "seed.iso", state / "ssh_host_ed25519_key", state / "ssh_host_ed25519_key.pub",
            state / "ssh_config", project.parts / "vm" / "vm.overlay.qcow2"}
    if not own_key:
        made |= {state / "id_ed25519", state / "id_ed25519.pub"}
    assert all(path.is_file() for path in made)
    before = {path: digest(path) for path in (disk, key, key.with_suffix(".pub")) if path.exists()}

    destroyed = ctl(project, "destroy")

    assert destroyed.returncode == 0, destroyed.stderr
    lines = destroyed.stdout.splitlines()
    assert lines[0] == "vm: destroying its machine"
    assert {line.removeprefix("  removed ") for line in lines[1:-1]} >= {str(path) for path in made}
    assert lines[-1].startswith("vm destroyed (") and "doit start:vm makes it again" in lines[-1]
    assert not any(path.exists() for path in made)
    # part.json stays for the scripts, vm.lock for the next operation (a held lock is never removed).
    assert sorted(p.name for p in state.iterdir()) == ["part.json", "vm.lock"]
    assert {path: digest(path) for path in before} == before  # the user's disk and key
    # Provisioning makes the machine again: overlay, seed, keys, ssh config.
    again = project.provision()
    assert again.returncode == 0, again.describe()
    assert all(path.is_file() for path in made)
    assert {path: digest(path) for path in before} == before


def test_destroy_as_a_doit_task_and_with_overlay_false(project: Project) -> None:
    disk = project.root / "disk.img"
    disk.write_bytes(b"\x02" * 65536)
    project.write(f"[vm]\nfile = {disk}\nssh_port = 2222\n")
    assert project.provision().returncode == 0
    destroyed = project.run("destroy:vm")
    assert destroyed.returncode == 0, destroyed.describe()
    assert f"  kept {disk}: with overlay = false it is the VM's disk" in destroyed.stdout
    assert f"  removed {project.var / 'vm' / 'ssh_config'}" in destroyed.stdout
    assert disk.read_bytes() == b"\x02" * 65536
