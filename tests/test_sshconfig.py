"""The part's ssh config file, read back by ssh itself (``ssh -G`` resolves a host's options
without connecting): quoting, Include from a user's config, the jump of a remote libvirt part,
and the values it cannot carry refused when the config is read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.vmfixtures import free_port

# Characters ssh_config reads specially in a value: quotes, escapes, %-tokens, '#', '='.
AWKWARD = 'run dir "q" 100% #1 \\x =y'


def resolved(config: Path, host: str) -> dict[str, list[str]]:
    """What ssh would use for host with this config file: option -> values."""
    out = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    options: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        options.setdefault(name, []).append(value)
    return options


def test_ssh_reads_every_option_back_from_an_awkward_path(project: Project) -> None:
    port = free_port()
    run_dir = project.root / AWKWARD
    key = project.root / "key 50%" / "id"
    key.parent.mkdir()
    (project.root / "disk.img").write_bytes(bytes(4096))
    project.write(f"[vm]\nfile = {project.root / 'disk.img'}\nssh_port = {port}\nssh_user = tester\n"
                  f"ssh_key_path = {key}\nkvm_run_directory = {run_dir}\n")
    assert project.run("render:vm").returncode == 0
    config = run_dir / "vm" / "ssh_config"
    options = resolved(config, "vm")
    assert options["hostname"] == ["localhost"] and options["port"] == [str(port)]
    # ssh -G shows IdentityFile before its %-tokens are expanded: %% is the one '%' ssh then reads.
    assert options["user"] == ["tester"] and options["identityfile"] == [str(key).replace("%", "%%")]
    assert options["userknownhostsfile"] == [str(run_dir / "vm" / "known_hosts")]
    assert options["stricthostkeychecking"] == ["accept-new"]  # no host key kvmtasks made
    assert options["controlmaster"] == ["auto"]
    assert options["controlpath"][0].startswith("/") and "proxyjump" not in options
    # The file is what the scripts run with.
    status = subprocess.run([str(project.root / "bin" / "vm-ctl"), "status", "--json"], capture_output=True,
                            text=True, env=project.environment(), check=False)
    assert f'"ssh_config": "{config}"'.replace("\\", "\\\\").replace('"q"', '\\"q\\"') in status.stdout


def test_a_remote_libvirt_part_reaches_its_guest_through_the_jump(project: Project) -> None:
    (project.root / "disk.img").write_bytes(bytes(4096))
    project.write(f"[vm]\nfile = {project.root / 'disk.img'}\nssh_port = 2222\nkvm_engine = libvirt\n"
                  "libvirt_uri = qemu+ssh://admin@192.0.2.7:2200/system?keyfile=/k/id\n")
    assert project.run("render:vm").returncode == 0
    config = project.var / "vm" / "ssh_config"
    assert resolved(config, "vm")["proxyjump"] == ["vm-libvirt-host"]
    jump = resolved(config, "vm-libvirt-host")
    assert (jump["hostname"], jump["port"], jump["user"]) == (["192.0.2.7"], ["2200"], ["admin"])
    assert jump["identityfile"] == ["/k/id"] and "proxyjump" not in jump
    # Included from a user's own config, as ~/.ssh/config would hold it (Include takes a glob
    # pattern: a path with glob characters needs them escaped there).
    user_config = project.root / "user_config"
    user_config.write_text(f"Include {config}\n")
    assert resolved(user_config, "vm") == resolved(config, "vm")
    assert resolved(user_config, "vm-libvirt-host") == jump


@pytest.mark.parametrize(("option", "value"), [
    ("kvm_run_directory", "/tmp/$${HOME}/run"),  # buildout hands $$ on as it is: still a ${
    ("ssh_key_path", "/keys/$${USER}/id"),
])
def test_a_path_ssh_cannot_carry_is_refused_when_the_config_is_read(project: Project, option: str,
                                                                      value: str) -> None:
    (project.root / "disk.img").write_bytes(bytes(4096))
    config = project.write(f"[vm]\nfile = {project.root / 'disk.img'}\nssh_port = 2222\n{option} = {value}\n")
    result = project.run("render:vm")
    assert result.returncode != 0 and "Traceback" not in result.output
    lines = result.error_lines(f"{config}: [vm] {option} = '{value}'")
    assert len(lines) == 1 and "environment variable" in lines[0], result.describe()
    assert not (project.root / "bin").exists()


def test_a_part_without_ssh_port_has_no_ssh_config(project: Project) -> None:
    (project.root / "disk.img").write_bytes(bytes(4096))
    project.write(f"[vm]\nfile = {project.root / 'disk.img'}\nssh_port = 2222\n")
    assert project.run("render:vm").returncode == 0
    assert (project.var / "vm" / "ssh_config").is_file()
    project.write(f"[vm]\nfile = {project.root / 'disk.img'}\n")
    assert project.run("render:vm").returncode == 0
    assert not (project.var / "vm" / "ssh_config").exists()


def test_a_remote_key_ssh_cannot_carry_is_refused_when_the_config_is_read(project: Project) -> None:
    (project.root / "disk.img").write_bytes(bytes(4096))
    uri = "qemu+ssh://root@host.example/system?keyfile=/k/$${HOME}/id"
    config = project.write(f"[vm]\nfile = {project.root / 'disk.img'}\nssh_port = 2222\n"
                           f"kvm_engine = libvirt\nlibvirt_uri = {uri}\n")
    result = project.run("render:vm")
    assert result.returncode != 0 and "Traceback" not in result.output
    lines = result.error_lines(f"{config}: [vm] libvirt_uri = '{uri}': keyfile '/k/$${{HOME}}/id'")
    assert len(lines) == 1 and "environment variable" in lines[0], result.describe()
