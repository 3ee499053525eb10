"""Guest setup over the cloud-init Debian test guest: layers built once, shared by two parts of one
project and a part of another, each booting as a machine of its own.

The guest has no network (user-mode, restrict=on): its package comes in as a .deb a step copies.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvmtasks.config import seedrules
from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.layers import store
from kvmtasks.provision import keys
from tests.conftest import Project
from tests.debian_guest import CLOUD_INIT, DebianGuest
from tests.test_debian_guest import debian_guest_or_skip
from tests.vmfixtures import free_port, needs_qemu

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]
BOOT_TIMEOUT = 400


def tiny_deb(folder: Path) -> Path:
    """A package of one command, built with dpkg-deb."""
    root = folder / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: kvmtasks-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: kvmtasks <t@example.org>\n"
        "Description: a test package\n")
    tool = root / "usr" / "bin" / "kvmtasks-hello"
    tool.write_text("#!/bin/sh\necho hello from a layer\n")
    tool.chmod(0o755)
    deb = folder / "hello.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def part_config(name: str, guest: DebianGuest, port: int) -> str:
    extra_args = "".join(f"  {arg}\n" for arg in guest.kvm_extra_args())
    return (f"[{name}]\nfile = {guest.image}\noverlay = true\ncloud_init = true\nssh_port = {port}\n"
            f"kvm_memory = 1G\nkvm_accel = tcg\nkvm_boot_timeout = {BOOT_TIMEOUT}\n"
            "kvm_net =\n  user,restrict=on\n  nic,model=virtio\n"
            f"kvm_extra_args =\n{extra_args}setup =\n    package\n    marker\n\n")


STEPS = ("[package]\ncopy = hello.deb /tmp/debs/hello.deb\nrun =\n    dpkg -i /tmp/debs/hello.deb\n"
         "    rm -rf /tmp/debs\n\n[marker]\nrun = echo set up > /etc/kvmtasks-marker\n")


def in_guest(project: Project, part: str, command: str) -> str:
    done = subprocess.run([str(project.root / "bin" / f"{part}-runscript"), command], capture_output=True,
                          text=True, timeout=120, check=False, env={"HOME": str(project.root / "home"),
                                                                     "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, f"{part}: {command!r}: {done.stdout}{done.stderr}"
    return done.stdout.strip()


@pytest.mark.timeout(2400)
def test_two_projects_share_the_layers_and_boot_machines_of_their_own(tmp_path: Path) -> None:
    guest = debian_guest_or_skip(CLOUD_INIT)
    cache = tmp_path / "download-cache"
    # One package for both projects: dpkg-deb stamps the time, and a step's key is its files' bytes.
    deb = tiny_deb(tmp_path)
    projects = []
    for name, parts in (("one", ("web", "db")), ("two", ("api",))):
        project = Project(tmp_path / name)
        project.root.mkdir()
        project.buildout = {"download-cache": str(cache)}
        shutil.copy2(deb, project.root / "hello.deb")
        project.write("".join(part_config(part, guest, free_port()) for part in parts) + STEPS)
        projects.append((project, parts))

    (one, (web, db)), (two, (api,)) = projects
    # Two parts at once: one builds the layers, the other waits at their locks, then finds them.
    first = one.run("-n", "2", f"start:{web}", f"start:{db}", timeout=3 * BOOT_TIMEOUT)
    assert first.returncode == 0, first.describe()
    assert first.output.count("booting a builder VM") == 1, first.describe()
    second = two.run(f"start:{api}", timeout=2 * BOOT_TIMEOUT)
    assert second.returncode == 0, second.describe()
    assert "booting a builder VM" not in second.output, second.describe()
    try:
        seen = {}
        for project, part in ((one, web), (one, db), (two, api)):
            assert in_guest(project, part, "kvmtasks-hello") == "hello from a layer"
            assert in_guest(project, part, "cat /etc/kvmtasks-marker") == "set up"
            (loaded,) = [p for p in load_file(project.configs[0], project.root) if p.name == part]
            known_hosts = project.var / part / "known_hosts"

            def strict(command: str, loaded: Part = loaded, known_hosts: Path = known_hosts) -> str:
                """A login by hand with strict host-key checking against the part's pinned key."""
                done = subprocess.run(
                    ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                     "-o", f"UserKnownHostsFile={known_hosts}", "-o", "IdentitiesOnly=yes",
                     "-i", str(seedrules.generated_key_path(loaded)), "-p", str(loaded.ssh_port),
                     "root@localhost", command], capture_output=True, text=True, timeout=60, check=False)
                assert done.returncode == 0, done.stderr
                return done.stdout.strip()

            machine_id = strict("cat /etc/machine-id")
            assert len(machine_id) == 32, machine_id
            host_keys = strict("cat /etc/ssh/ssh_host_*_key.pub").splitlines()
            own = keys.read_public(seedrules.generated_key_path(loaded)).split()[1]
            authorized = strict("cat /root/.ssh/authorized_keys").splitlines()
            assert len(authorized) == 1 and own in authorized[0], authorized  # not the builder's
            seen[part] = (machine_id, tuple(sorted(host_keys)), strict("hostname"), own)
        for index in range(4):
            assert len({facts[index] for facts in seen.values()}) == 3, seen

        # Nothing of the builder's is left on the disk: its login key, its host key.
        (web_part,) = [p for p in load_file(one.configs[0], one.root) if p.name == web]
        # Whichever part's setup task won the race built the layers: its builder's keys.
        (builder_state,) = [key.parent for key in one.var.glob("*/*-builder/id_ed25519")]
        secrets = [keys.read_public(builder_state / "id_ed25519").split()[1],
                   keys.read_public(builder_state / "ssh_host_ed25519_key").split()[1],
                   # key material (the first line after the header is the same for every ed25519 key)
                   (builder_state / "ssh_host_ed25519_key").read_text().splitlines()[2]]
        flat = tmp_path / "flat.raw"
        top = store.top_layer(web_part)
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(top), str(flat)], check=True)
        for secret in secrets:
            found = subprocess.run(["grep", "-c", "-a", "-F", secret, str(flat)], capture_output=True,
                                   text=True, check=False)
            assert found.stdout.strip() == "0", secret
    finally:
        one.run(f"stop:{web}", f"stop:{db}", timeout=120)
        two.run(f"stop:{api}", timeout=120)
