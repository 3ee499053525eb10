"""The cloud-init:PART step in real doit runs (no guest booted), and what the seed changes in the
task graph, the ssh options and known_hosts."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pycdlib
import yaml

from kvmtasks.config import seedrules
from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.graph.tasks import part_tasks
from kvmtasks.guest import hostkeys, ssh, sshconfig
from kvmtasks.provision import keys
from kvmtasks.provision.seedstep import write_seed
from tests.conftest import Project
from tests.test_provision_pipeline import assert_ok, part


def instance_id(seed: Path) -> str:
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        buffer = io.BytesIO()
        iso.get_file_from_iso_fp(buffer, rr_path="/meta-data")
    finally:
        iso.close()
    return str(yaml.safe_load(buffer.getvalue())["instance-id"])


def seeded_project(project: Project, **options: object) -> Part:
    disk = project.root / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    (project.root / "user-data").write_text("#cloud-config\nruncmd:\n  - [touch, /root/one]\n")
    config = project.write(part(file=disk, cloud_init="true", cloud_init_user_data="user-data",
                                ssh_port=2222, **options))
    (loaded,) = load_file(config, project.root)
    return loaded


def test_an_edited_user_data_re_runs_only_the_seed_and_changes_the_instance(project: Project) -> None:
    vm = seeded_project(project)
    first = project.provision()
    assert_ok(first)
    assert {"cloud-init:vm", "render:vm", "verify-image:vm"} <= first.executed
    seed = seedrules.seed_path(vm)
    made = seedrules.generated_key_path(vm).read_text(), seedrules.host_key_path(vm).read_text()
    first_id = instance_id(seed)

    again = project.provision()
    assert_ok(again)
    assert again.executed == set(), again.describe()
    assert "cloud-init:vm" in again.up_to_date

    (project.root / "user-data").write_text("#cloud-config\nruncmd:\n  - [touch, /root/two]\n")
    edited = project.provision()
    assert_ok(edited)
    assert edited.executed == {"cloud-init:vm"}, edited.describe()
    assert instance_id(seed) != first_id
    # The keys are made once: a new seed carries the same ones.
    assert (seedrules.generated_key_path(vm).read_text(), seedrules.host_key_path(vm).read_text()) == made


def test_a_deleted_key_is_made_again_with_a_new_seed(project: Project) -> None:
    vm = seeded_project(project)
    assert_ok(project.provision())
    old_id = instance_id(seedrules.seed_path(vm))
    old_key = keys.read_public(seedrules.generated_key_path(vm))
    seedrules.generated_key_path(vm).unlink()
    rerun = project.provision()
    assert_ok(rerun)
    assert rerun.executed == {"cloud-init:vm"}, rerun.describe()
    assert keys.read_public(seedrules.generated_key_path(vm)) != old_key
    assert instance_id(seedrules.seed_path(vm)) != old_id


def test_a_changed_host_name_re_runs_the_seed_and_the_scripts(project: Project) -> None:
    vm = seeded_project(project)
    assert_ok(project.provision())
    old_id = instance_id(seedrules.seed_path(vm))
    seeded_project(project, cloud_init_hostname="renamed")
    rerun = project.provision()
    assert_ok(rerun)
    assert rerun.executed == {"cloud-init:vm", "render:vm"}, rerun.describe()
    assert instance_id(seedrules.seed_path(vm)) != old_id


def test_clean_removes_the_seed_and_keeps_the_keys(project: Project) -> None:
    vm = seeded_project(project)
    assert_ok(project.provision())
    assert_ok(project.run("clean", "cloud-init:vm"))
    assert not seedrules.seed_path(vm).exists()
    assert seedrules.generated_key_path(vm).exists() and seedrules.host_key_path(vm).exists()


def test_the_seed_step_comes_before_provision_and_needs_no_vm(tmp_path: Path) -> None:
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[vm]\nfile = {tmp_path}/d.img\ncloud_init = true\n")
    (vm,) = load_file(config, tmp_path)
    tasks = {f"{task['basename']}:{task['name']}": task for task in part_tasks(vm)}
    assert "cloud-init:vm" in tasks["provision:vm"]["task_dep"]
    assert "task_dep" not in tasks["cloud-init:vm"]
    assert tasks["cloud-init:vm"]["targets"] == [str(tmp_path / "var/vm/seed.iso")]
    config.write_text(f"[vm]\nfile = {tmp_path}/d.img\n")
    (plain,) = load_file(config, tmp_path)
    assert not any(task["basename"] == "cloud-init" for task in part_tasks(plain))


# -- ssh and known_hosts ----------------------------------------------------------------------------

def options_of(part: Part) -> dict[str, str]:
    """The options of the part's Host entry in its ssh config, which the scripts run ssh with."""
    argv = ssh.ssh_argv(part, ["true"])
    assert argv[1:3] == ["-F", str(sshconfig.path(part))]
    lines = sshconfig.host_entry(part)[1:]
    return dict(line.strip().split(" ", 1) for line in lines)


def test_with_a_seed_ssh_checks_strictly_with_the_made_key(project: Project) -> None:
    vm = seeded_project(project)
    options = options_of(vm)
    assert options["StrictHostKeyChecking"] == "yes"
    assert options["IdentityFile"] == f'"{seedrules.generated_key_path(vm)}"'
    assert options["IdentitiesOnly"] == "yes"


def test_known_hosts_pins_the_host_key_before_the_boot(project: Project) -> None:
    vm = seeded_project(project)
    write_seed(vm)
    known_hosts = RunFiles.of(vm).known_hosts
    known_hosts.write_text("[localhost]:2222 ssh-ed25519 AAAAstale\n")
    hostkeys.prepare(vm)
    key_type, key = keys.read_public(seedrules.host_key_path(vm)).split()[:2]
    assert known_hosts.read_text() == f"[localhost]:2222,[127.0.0.1]:2222 {key_type} {key}\n"
    # ssh itself finds the key under the name and port it connects to.
    found = subprocess.run(
        ["ssh-keygen", "-F", "[localhost]:2222", "-f", str(known_hosts)], capture_output=True, text=True)
    assert found.returncode == 0 and key in found.stdout


def test_port_22_is_written_without_brackets(tmp_path: Path) -> None:
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[vm]\nfile = {tmp_path}/d.img\nssh_port = 22\nssh_hostname = 127.0.0.1\n")
    (vm,) = load_file(config, tmp_path)
    assert hostkeys.known_hosts_line(vm, "ssh-ed25519 AAAAx comment") == "127.0.0.1 ssh-ed25519 AAAAx\n"


def test_without_a_seed_a_pristine_disk_forgets_known_hosts(tmp_path: Path) -> None:
    for snapshot, kept in (("true", False), ("false", True)):
        config = tmp_path / "kvm.cfg"
        config.write_text(f"[vm]\nfile = {tmp_path}/d.img\nssh_port = 2222\nkvm_snapshot = {snapshot}\n")
        (vm,) = load_file(config, tmp_path)
        known_hosts = RunFiles.of(vm).known_hosts
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        known_hosts.write_text("[localhost]:2222 ssh-ed25519 AAAAold\n")
        hostkeys.prepare(vm)
        assert known_hosts.exists() is kept
        assert options_of(vm)["StrictHostKeyChecking"] == "accept-new"
