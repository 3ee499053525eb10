"""End to end with real cloud-init: a Debian 12 guest with cloud-init and OpenSSH, no key and no
host key inside (tests/debian_guest.py, variant ``cloud-init``), that kvmtasks reaches only
through the seed it writes.

Three boots, all under ``kvm_snapshot = true`` (every boot a first boot, as after reset or
re-provisioning) with strict host-key checking and the host key kvmtasks pinned:
1. root with the key kvmtasks made, plus the user's own user-data (a runcmd leaves a file);
2. an edited user-data (a new instance) whose runcmd fails: a warning, not a failed start;
3. a given key for a user that is not root and gets in as root through sudo; a live share and
   a copied folder, mounted and copied through sudo (ownership as root and as that user).
Then two boots around a reset of an overlay: a fresh first boot from the same seed.
The guest's disk is the cached image itself, used in place: -snapshot or the overlay keeps every
write off it.
The network is user-mode with restrict=on: cloud-init probes metadata addresses, and nothing
may leave the machine; the guest is reached through the 127.0.0.1 forward alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from kvmtasks.config import seedrules
from kvmtasks.config.loader import load_file
from kvmtasks.provision import keys
from tests.conftest import Project
from tests.debian_guest import CLOUD_INIT, DebianGuest
from tests.test_debian_guest import debian_guest_or_skip, run_in_guest, script
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

pytestmark = [needs_qemu, pytest.mark.vm, pytest.mark.usefixtures("no_vm_left")]

BOOT_TIMEOUT = 300
USER_DATA_ONE = "#cloud-config\nruncmd:\n  - [touch, /root/from-user-data-one]\n"
USER_DATA_TWO = (
    "#cloud-config\nruncmd:\n  - [touch, /root/from-user-data-two]\n"
    "  - [sh, -c, 'echo kvmtasks-runcmd-fails; exit 3']\n"
)


@pytest.fixture(scope="session")
def cloud_guest() -> DebianGuest:
    return debian_guest_or_skip(CLOUD_INIT)


def config(guest: DebianGuest, ssh_port: int, extra: str = "") -> str:
    extra_args = "".join(f"  {arg}\n" for arg in guest.kvm_extra_args())
    return (
        "[vm]\n"
        f"file = {guest.image}\n"
        "kvm_snapshot = true\n"
        "cloud_init = true\n"
        "cloud_init_hostname = seeded-guest\n"
        "cloud_init_user_data = user-data\n"
        f"ssh_port = {ssh_port}\n"
        "kvm_memory = 1G\n"
        "kvm_accel = tcg\n"
        f"kvm_boot_timeout = {BOOT_TIMEOUT}\n"
        "kvm_net =\n  user,restrict=on\n  nic,model=virtio\n"
        f"kvm_extra_args =\n{extra_args}"
        f"{extra}"
    )


def guest_output(project: Project, command: str) -> str:
    return run_in_guest(project, command).stdout.strip()


@pytest.mark.timeout(2400)  # a cold image build (~3 min) and three boots under TCG
def test_cloud_image_gets_its_login_host_key_and_user_data_from_the_seed(
        project: Project, cloud_guest: DebianGuest, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    image_before = cloud_guest.image.stat()
    ssh_port = free_port()
    (project.root / "user-data").write_text(USER_DATA_ONE)
    (vm,) = load_file(project.write(config(cloud_guest, ssh_port)), project.root)
    known_hosts = project.var / "vm" / "known_hosts"
    timings: dict[str, float] = {}

    # 1. root, with the key kvmtasks made, and the user's own user-data.
    began = time.monotonic()
    started = project.run("start:vm", timeout=BOOT_TIMEOUT + 120)
    timings["first start (seed, keys, boot, cloud-init)"] = time.monotonic() - began
    assert started.returncode == 0, started.describe()
    assert {"cloud-init:vm", "render:vm", "start:vm"} <= started.executed
    assert "warning" not in started.output, started.describe()
    assert guest_output(project, "id -un") == "root"
    assert guest_output(project, "hostname") == "seeded-guest"
    assert guest_output(project, "cloud-init status") == "status: done"
    assert guest_output(project, "ls /root/from-user-data-one") == "/root/from-user-data-one"
    # The seed is the IDE CD-ROM Debian's stock kernel sees, and cloud-init read it from there.
    assert guest_output(project, "blkid -L cidata") == "/dev/sr0"
    assert "DataSourceNoCloud" in guest_output(project, "cloud-init query subplatform 2>&1; cat "
                                                        "/run/cloud-init/status.json")
    # The guest's one host key is the one kvmtasks made and pinned.
    ours = keys.read_public(seedrules.host_key_path(vm)).split()[:2]
    assert guest_output(project, "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2] == ours
    assert guest_output(project, "ls /etc/ssh/ | grep ssh_host_").split() == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    pinned, first_port = known_hosts.read_text(), ssh_port
    assert pinned == f"[localhost]:{ssh_port},[127.0.0.1]:{ssh_port} {ours[0]} {ours[1]}\n"
    status = script(project, "vm-ctl", "status")
    assert f"ssh key {seedrules.generated_key_path(vm)} (made by kvmtasks)" in status.stdout, status.stdout
    # The same login by hand, with strict checking against the pinned file: no prompt, no TOFU.
    by_hand = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "IdentitiesOnly=yes",
         "-i", str(seedrules.generated_key_path(vm)), "-p", str(ssh_port), "root@localhost", "true"],
        capture_output=True, text=True, timeout=60, check=False)
    assert by_hand.returncode == 0, by_hand.stderr
    assert script(project, "vm-ctl", "stop").returncode == 0

    # 2. Edited user-data: a new seed, a new instance, the same host key; a failing runcmd is a
    # one-line warning with the log's tail, and the start still succeeds. Each boot gets a port of
    # its own: the pinned line follows the port, and no boot waits for the last one's closed
    # connections to leave the port (test_cloudinit_step pins that an edit re-runs the seed alone).
    (project.root / "user-data").write_text(USER_DATA_TWO)
    ssh_port = free_port()
    project.write(config(cloud_guest, ssh_port))
    began = time.monotonic()
    second = project.run("start:vm", timeout=BOOT_TIMEOUT + 120)
    timings["second start (new user-data)"] = time.monotonic() - began
    assert second.returncode == 0, second.describe()
    assert "cloud-init:vm" in second.executed, second.describe()
    warnings = [line for line in second.output.splitlines() if "warning" in line]
    assert len(warnings) == 1, second.describe()
    assert "cloud-init reported an error (status: error)" in warnings[0]
    assert "/var/log/cloud-init-output.log" in warnings[0] and "scripts-user" in warnings[0], warnings[0]
    assert "vm is running" in second.stdout
    assert guest_output(project, "ls /root/") == "from-user-data-two"  # a pristine disk, the new data
    assert known_hosts.read_text() == pinned.replace(str(first_port), str(ssh_port))
    assert script(project, "vm-ctl", "stop").returncode == 0

    # 3. A key of the user's own, for a user that is not root: created, with passwordless sudo.
    # The same boot carries a live share (auto: 9p) and a copied folder (the guest has no rsync).
    given = tmp_path / "given_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(given)], check=True)
    (project.root / "user-data").write_text(USER_DATA_ONE)
    ssh_port = free_port()
    live, copy = tmp_path / "live", tmp_path / "copy"
    for folder in (live, copy):
        folder.mkdir()
    (live / "hello.txt").write_text("hello\n")
    (copy / "a.txt").write_text("a\n")
    project.write(config(cloud_guest, ssh_port, f"ssh_user = alice\nssh_key_path = {given}\n"
                                                f"share =\n  {live} /srv/live\n  {copy} /srv/copy rsync\n"))
    began = time.monotonic()
    third = project.run("start:vm", timeout=BOOT_TIMEOUT + 120)
    timings["third start (alice, given key)"] = time.monotonic() - began
    assert third.returncode == 0, third.describe()
    assert "warning" not in third.output, third.describe()
    assert guest_output(project, "id -un") == "alice"
    assert guest_output(project, "id -u") != "0"
    assert guest_output(project, "sudo -n id -u") == "0"
    assert guest_output(project, "sudo -n ls /root/") == "from-user-data-one"
    assert script(project, "vm-runscript", "cat /root/x").returncode != 0  # alice is not root
    status = script(project, "vm-ctl", "status")
    assert f"ssh key {given}\n" in status.stdout and "made by kvmtasks" not in status.stdout, status.stdout
    assert known_hosts.read_text() == pinned.replace(str(first_port), str(ssh_port))
    check_shares_as_a_normal_user(project, live, copy)
    assert script(project, "vm-ctl", "stop").returncode == 0
    assert qemu_pids_under(project.root) == []

    image_after = cloud_guest.image.stat()
    assert (image_after.st_size, image_after.st_mtime_ns) == (image_before.st_size, image_before.st_mtime_ns)
    with capsys.disabled():
        print("\ncloud-init guest: "
              + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))


def check_shares_as_a_normal_user(project: Project, live: Path, copy: Path) -> None:
    """The shares of a guest whose ssh_user (alice) is not root: mounted and copied through sudo;
    who owns what the guest writes, as root and as alice, in the guest and on the host."""
    facts = json.loads(script(project, "vm-ctl", "status", "--json").stdout)
    assert {s["guest"]: s["carried_by"] for s in facts["shares"]} == {"/srv/live": "9p", "/srv/copy": "tar"}
    # Live: the host's change is there with no command run.
    assert guest_output(project, "cat /srv/live/hello.txt") == "hello"
    (live / "new.txt").write_text("from the host\n")
    assert guest_output(project, "cat /srv/live/new.txt") == "from the host"
    # Root's file (through sudo): root's in the guest; on the host the user running QEMU's,
    # mode 0600, the guest's owner kept in an extended attribute (mapped-xattr).
    made = guest_output(project, "sudo -n sh -c 'echo by root > /srv/live/root.txt'"
                                 " && stat -c '%U %G %a' /srv/live/root.txt")
    assert made == "root root 644"
    on_host = (live / "root.txt").stat()
    assert (live / "root.txt").read_text() == "by root\n"
    assert (on_host.st_uid, on_host.st_mode & 0o777) == (os.getuid(), 0o600)
    assert os.getxattr(live / "root.txt", "user.virtfs.uid") == (0).to_bytes(4, "little")
    # alice: the host's folder is seen with its host owner and mode (root's, 0755 here), so she
    # writes only where root in the guest gave her a folder; her files are hers in the guest.
    assert script(project, "vm-runscript", "touch /srv/live/alice.txt").returncode != 0
    assert not (live / "alice.txt").exists()
    alice = int(guest_output(project, "id -u"))
    mine = guest_output(project, "sudo -n install -d -o alice -g alice /srv/live/alice"
                                 " && echo mine > /srv/live/alice/mine.txt"
                                 " && stat -c '%U %G %a' /srv/live/alice/mine.txt")
    assert mine == "alice alice 644"
    on_host = (live / "alice" / "mine.txt").stat()
    assert (on_host.st_uid, on_host.st_mode & 0o777) == (os.getuid(), 0o600)
    assert os.getxattr(live / "alice" / "mine.txt", "user.virtfs.uid") == alice.to_bytes(4, "little")
    # The copy: GUESTDIR made through sudo and given to alice, who writes in it; pulled back.
    assert guest_output(project, "stat -c '%U' /srv/copy /srv/copy/a.txt && cat /srv/copy/a.txt") == (
        "alice\nalice\na")
    run_in_guest(project, "echo result > /srv/copy/result.txt && rm /srv/copy/a.txt")
    pulled = script(project, "vm-sync", "--pull")
    assert pulled.returncode == 0 and "(tar)" in pulled.stdout, pulled.stdout + pulled.stderr
    assert sorted(p.name for p in copy.iterdir()) == ["result.txt"]
    assert (copy / "result.txt").read_text() == "result\n"


def test_known_hosts_before_a_boot_with_the_tiny_guest(project: Project, guest: Guest) -> None:
    """Without a seed, a pristine disk forgets the old key; with one, a guest that ignores the
    seed (the tiny image has no cloud-init and a host key of its own) fails at once, in one line."""
    ssh_port = free_port()
    base = (f"[vm]\nfile = {guest.image.path}\nkvm_snapshot = true\nssh_port = {ssh_port}\n"
            f"ssh_key_path = {guest.key}\nkvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 120\n"
            "kvm_shutdown_timeout = 3\n")
    project.write(base)
    known_hosts = project.var / "vm" / "known_hosts"
    known_hosts.parent.mkdir(parents=True)
    stale = f"[localhost]:{ssh_port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{'A' * 43}\n"
    known_hosts.write_text(stale)
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    assert "warning" not in started.output  # no cloud-init in this guest: nothing to wait for
    assert stale not in known_hosts.read_text() and known_hosts.read_text().strip()
    assert script(project, "vm-ctl", "stop").returncode == 0

    project.write(base + "cloud_init = true\n")
    began = time.monotonic()
    refused = project.run("start:vm", timeout=300)
    assert refused.returncode == 1, refused.describe()
    lines = [line for line in refused.stderr.splitlines() if line.startswith("ERROR:")]
    assert lines == [f"ERROR: start:vm: the guest's ssh host key is not the one kvmtasks gave it "
                     f"(pinned in {known_hosts}): the guest did not apply the cloud-init seed; "
                     "see its console log"]
    assert time.monotonic() - began < 120  # as soon as ssh answers, not after kvm_boot_timeout
    assert qemu_pids_under(project.root) == []


@pytest.mark.timeout(1800)  # two boots under TCG
def test_a_reset_overlay_boots_fresh_with_the_pinned_host_key(project: Project,
                                                              cloud_guest: DebianGuest) -> None:
    """reset makes a new first boot: cloud-init runs again from the same seed (not rewritten),
    the guest's writes are gone, and the host key kvmtasks pinned holds without a prompt."""
    image_before = cloud_guest.image.stat()
    ssh_port = free_port()
    (project.root / "user-data").write_text(USER_DATA_ONE)
    body = config(cloud_guest, ssh_port).replace("kvm_snapshot = true\n", "overlay = true\n")
    project.write(body)
    known_hosts = project.var / "vm" / "known_hosts"

    started = project.run("start:vm", timeout=BOOT_TIMEOUT + 120)
    assert started.returncode == 0, started.describe()
    assert {"overlay:vm", "cloud-init:vm"} <= started.executed
    run_in_guest(project, "touch /root/written-before-reset && sync")
    first_boot = guest_output(project, "cat /var/lib/cloud/data/instance-id")
    pinned = known_hosts.read_text()
    assert script(project, "vm-ctl", "stop").returncode == 0
    reset = script(project, "vm-ctl", "reset")
    assert reset.returncode == 0, reset.stdout + reset.stderr

    again = project.run("start:vm", timeout=BOOT_TIMEOUT + 120)
    assert again.returncode == 0, again.describe()
    assert "cloud-init:vm" in again.up_to_date, again.describe()  # the same seed
    assert "warning" not in again.output, again.describe()
    assert guest_output(project, "ls /root/") == "from-user-data-one"  # a fresh disk, cloud-init ran
    assert guest_output(project, "cat /var/lib/cloud/data/instance-id") == first_boot
    assert known_hosts.read_text() == pinned
    assert script(project, "vm-ctl", "stop").returncode == 0
    image_after = cloud_guest.image.stat()
    assert (image_after.st_size, image_after.st_mtime_ns) == (image_before.st_size, image_before.st_mtime_ns)


@pytest.mark.timeout(1500)  # two boots under TCG, the first with cloud-init's work
def test_a_stop_during_the_first_boot_lets_cloud_init_finish(project: Project,
                                                            cloud_guest: DebianGuest) -> None:
    """A hard power-off during the first boot could leave the guest without its ssh host keys
    for good; stop waits for cloud-init first, and the next start answers at once."""
    (project.root / "user-data").write_text(USER_DATA_ONE)
    project.write(config(cloud_guest, free_port()).replace("kvm_snapshot = true\n", "overlay = true\n"))
    assert project.run("provision:vm", timeout=600).returncode == 0
    pidfile = project.var / "vm" / "qemu.pid"
    start = subprocess.Popen([str(project.root / "bin" / "vm-ctl"), "start"], env=project.environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    deadline = time.monotonic() + 120
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(5)  # the kernel boots; cloud-init is far from done
    start.kill()  # the start is gone, its guest boots on
    start.wait()
    stopped = script(project, "vm-ctl", "stop", timeout=BOOT_TIMEOUT + 120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    said = stopped.stdout
    assert said.startswith("vm is in its first boot (cloud-init sets it up): waiting"), said
    assert "QEMU was told to quit" not in stopped.stdout, stopped.stdout
    began = time.monotonic()
    again = script(project, "vm-ctl", "start", timeout=BOOT_TIMEOUT + 120)
    assert again.returncode == 0, again.stdout + again.stderr
    took = time.monotonic() - began
    assert guest_output(project, "ls /root/from-user-data-one") == "/root/from-user-data-one"
    assert script(project, "vm-ctl", "stop").returncode == 0
    assert qemu_pids_under(project.root) == []
    print(f"second start after a stop during the first boot: {took:.0f} s")
