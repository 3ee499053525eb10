"""The generated scripts without a guest: status --json of a stopped VM, console (printed and
followed across a restart's new log, ended by Ctrl-C), argument handling, doit's task docs.

Real doit runs write the scripts; the scripts run as the user runs them. What needs a guest
is in test_vm_ctl.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.guest import ssh
from kvmtasks.scripts import cli
from tests.conftest import Project
from tests.vmfixtures import free_port

STATUS_KEYS = {"part", "state", "engine", "libvirt_uri", "pid", "accelerator", "forwards", "vnc",
               "ssh_command", "console_log", "disks", "ssh_config", "shares", "networks",
               "arch", "firmware"}


def run(project: Project, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(project.root / "bin" / name), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=project.environment())


def check_status_json(text: str, project: Project, *, state: str, ssh_port: int) -> dict[str, Any]:
    """One JSON object with every documented key, consistent with the part; returns it."""
    data = json.loads(text)
    assert set(data) == STATUS_KEYS
    assert (data["arch"], data["firmware"]) == ("x86_64", "bios")
    assert (data["part"], data["state"], data["engine"], data["libvirt_uri"]) == ("vm", state, "qemu", None)
    run_dir = project.var / "vm"
    assert data["console_log"] == str(run_dir / "console.log")
    assert data["disks"] == {"image": str(project.root / "disk.img")}
    assert {"protocol": "tcp", "host_address": "127.0.0.1", "host_port": ssh_port,
            "guest_address": "", "guest_port": 22} in data["forwards"]
    command = data["ssh_command"]
    assert isinstance(command, list) and command[0] == "ssh" and command[-1] == "vm"
    assert data["ssh_config"] == str(run_dir / "ssh_config")
    assert command[1:3] == ["-F", data["ssh_config"]]
    assert f"  UserKnownHostsFile \"{run_dir / 'known_hosts'}\"" in (run_dir / "ssh_config").read_text()
    if state == "running":
        assert data["pid"] == int((run_dir / "qemu.pid").read_text())
        assert data["accelerator"] == "tcg"
    else:
        assert (data["pid"], data["accelerator"]) == (None, None)
    return data


@pytest.fixture
def rendered(project: Project) -> tuple[Project, int]:
    port = free_port()
    (project.root / "disk.img").write_bytes(bytes(4096))
    project.write(f"[vm]\nfile = {project.root / 'disk.img'}\nssh_port = {port}\n"
                  "kvm_redir =\n  udp:5353::53\n")
    assert project.run("render:vm").returncode == 0
    return project, port


def test_status_json_of_a_stopped_vm_exits_3(rendered: tuple[Project, int]) -> None:
    project, port = rendered
    status = run(project, "vm-ctl", "status", "--json")
    assert status.returncode == 3, status.stderr
    data = check_status_json(status.stdout, project, state="stopped", ssh_port=port)
    assert {"protocol": "udp", "host_address": "127.0.0.1", "host_port": 5353,
            "guest_address": "", "guest_port": 53} in data["forwards"]
    plain = run(project, "vm-ctl", "status")
    assert (plain.returncode, plain.stdout) == (3, "vm is stopped\n")


def test_status_json_names_the_overlay_a_part_boots(project: Project) -> None:
    project.write("[vm]\nimage = http://127.0.0.1:9/disk.img\n")
    assert project.run("render:vm").returncode == 0
    status = run(project, "vm-ctl", "status", "--json")
    assert status.returncode == 3
    assert json.loads(status.stdout)["disks"] == {
        "image": str(project.parts / "vm" / "disk.img"),
        "overlay": str(project.parts / "vm" / "vm.overlay.qcow2"),
    }


def test_console_before_any_start_is_one_line(rendered: tuple[Project, int]) -> None:
    project, _ = rendered
    shown = run(project, "vm-ctl", "console")
    assert shown.returncode == 1
    assert shown.stderr == (f"vm-ctl: no console log yet ({project.var / 'vm' / 'console.log'}): "
                            "the VM of vm has not been started\n")


def assert_ends_quietly_on_ctrl_c(follower: subprocess.Popen[bytes]) -> None:
    """console --follow ends on Ctrl-C with 130 and no traceback."""
    follower.send_signal(signal.SIGINT)
    assert follower.wait(timeout=20) == 130
    assert follower.stderr is not None and follower.stderr.read() == b""


def read_until(stream: IO[bytes], wanted: bytes, timeout: float = 20) -> bytes:
    """Read from a pipe until wanted came (or fail after timeout)."""
    fd = stream.fileno()
    os.set_blocking(fd, False)
    got, deadline = b"", time.monotonic() + timeout
    while wanted not in got:
        assert time.monotonic() < deadline, f"never saw {wanted!r}; got {got!r}"
        try:
            got += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
    return got


def test_console_prints_and_follows_across_a_new_boot_until_ctrl_c(rendered: tuple[Project, int]) -> None:
    project, _ = rendered
    log = project.var / "vm" / "console.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"boot line 1\n\xff not utf-8\n")
    shown = subprocess.run([str(project.root / "bin" / "vm-ctl"), "console"], capture_output=True,
                           timeout=60, check=False, env=project.environment())
    assert (shown.returncode, shown.stdout) == (0, b"boot line 1\n\xff not utf-8\n")

    follower = subprocess.Popen([str(project.root / "bin" / "vm-ctl"), "console", "--follow"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=project.environment())
    try:
        assert follower.stdout is not None
        read_until(follower.stdout, b"not utf-8\n")
        with open(log, "ab") as writer:
            writer.write(b"boot line 2\n")
        read_until(follower.stdout, b"boot line 2\n")
        # A new start moves the log aside and QEMU writes a new one: followed from its start.
        os.replace(log, log.with_name("console.log.1"))
        log.write_bytes(b"second boot\n")
        read_until(follower.stdout, b"second boot\n")
        assert_ends_quietly_on_ctrl_c(follower)
    finally:
        follower.kill()
        follower.wait()


def test_remote_names_starting_with_a_dash_are_names(rendered: tuple[Project, int]) -> None:
    project, _ = rendered
    (part,) = load_file(project.configs[0], project.root)
    for kind in ("sendfile", "getfile"):
        parser = cli._parser(part, kind)
        for args in (["-rf", "-local"], ["--", "-rf", "-local"], ["-h", "--help"], ["--", "--"],
                     ["a", "--"]):
            assert cli._names(parser, args) == (args[-2], Path(args[-1]))
        help_ = run(project, f"vm-{kind}", "-h")
        assert help_.returncode == 0 and "REMOTEFILE LOCALFILE" in help_.stdout
        for wrong in (["-x"], ["a", "--", "b"], ["-x", "y", "z"]):
            refused = run(project, f"vm-{kind}", *wrong)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
            assert refused.stderr.startswith(f"usage: vm-{kind}"), refused.stderr


def test_ssh_script_uses_the_options_of_every_other_script(rendered: tuple[Project, int]) -> None:
    project, _port = rendered
    (part,) = load_file(project.configs[0], project.root)
    common = ssh.common_options(part)
    for tty in (False, True):
        argv = ssh.login_argv(part, ["-L", "8080:localhost:80", "uname"], tty=tty)
        assert argv[1:1 + len(common)] == common  # whatever common_options holds, now or later
        assert argv[len(common) + 1:] == [*(["-t"] if tty else []), "vm", "-L", "8080:localhost:80", "uname"]


def test_ssh_script_help_and_a_part_without_ssh_port(project: Project) -> None:
    (project.root / "disk.img").write_bytes(bytes(4096))
    project.write(f"[vm]\nfile = {project.root / 'disk.img'}\n")
    assert project.run("render:vm").returncode == 0
    help_ = run(project, "vm-ssh", "--help")
    assert help_.returncode == 0 and "usage: vm-ssh [SSH OPTIONS] [COMMAND...]" in help_.stdout
    refused = run(project, "vm-ssh", "true")
    assert (refused.returncode, refused.stderr) == (
        1, "vm-ssh: part vm has no ssh_port: set it to reach the guest over ssh\n")
    status = json.loads(run(project, "vm-ctl", "status", "--json").stdout)
    assert status["ssh_command"] is None


def test_doit_list_names_the_part_in_each_sentence(rendered: tuple[Project, int]) -> None:
    project, _ = rendered
    listed = project.run("list", "--all")
    assert listed.returncode == 0, listed.describe()
    lines = {line.split()[0]: line.split(None, 1)[1] for line in listed.stdout.splitlines() if line.strip()}
    assert lines["provision:vm"] == ("provision vm: download, verify and decompress the image, "
                                     "make its overlay, write the control scripts")
    assert lines["render:vm"].startswith("render vm: write the control scripts vm-ctl, -ssh,")
    assert lines["verify-image:vm"].startswith("verify-image vm: check the image")
    assert lines["provision"].startswith("provision a part: download")
    assert lines["start:vm"].startswith("start vm: provision it, then start its VM")
    assert not any(doc.endswith(" vm") for doc in lines.values())
