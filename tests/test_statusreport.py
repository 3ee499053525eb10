"""status's lines and JSON from the facts an engine gathered (pure: no VM)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from kvmtasks.engines.statusreport import Facts, Forward, State, as_json, describe

RUNNING = Facts(
    part="web", state=State.RUNNING, engine="qemu", libvirt_uri=None, pid=4242, accelerator="tcg",
    forwards=(Forward("tcp", "127.0.0.1", 2222, "", 22), Forward("udp", "127.0.0.1", 5353, "10.0.2.3", 53)),
    vnc="127.0.0.1:3", ssh_command=("ssh", "-p", "2222", "root@localhost"),
    console_log=Path("/state/console.log"), disks={"image": Path("/i.img"), "overlay": Path("/o.qcow2")},
    ssh_key=Path("/keys/id"), ssh_key_made=True, pinned_known_hosts=Path("/state/known_hosts"),
    ssh_config=Path("/state/ssh_config"),
)


def test_a_running_vm_says_how_to_reach_it() -> None:
    assert describe(RUNNING) == [
        "web is running (pid 4242, accel tcg)",
        "  forward tcp 127.0.0.1:2222 -> guest:22",
        "  forward udp 127.0.0.1:5353 -> 10.0.2.3:53",
        "  vnc 127.0.0.1:3",
        "  console log /state/console.log",
        "  ssh config /state/ssh_config (ssh -F /state/ssh_config web)",
        "  ssh key /keys/id (made by kvmtasks)",
        "  host key pinned in /state/known_hosts",
    ]


def test_a_libvirt_domain_is_named_with_its_host_and_a_remote_console_is_left_out() -> None:
    facts = replace(RUNNING, engine="libvirt", libvirt_uri="qemu+ssh://h/system", pid=None,
                    accelerator=None, forwards=(), vnc=None, console_log=None, ssh_key=None,
                    pinned_known_hosts=None, ssh_config=None)
    assert describe(facts) == ["web is running (libvirt domain web on qemu+ssh://h/system, accel unknown)"]


def test_stopped_and_suspended_are_one_line() -> None:
    assert describe(replace(RUNNING, state=State.STOPPED)) == ["web is stopped"]
    assert describe(replace(RUNNING, state=State.SUSPENDED)) == ["web is suspended; start resumes it"]


def test_the_json_holds_every_fact_programs_read() -> None:
    data = json.loads(as_json(RUNNING))
    assert data == {
        "part": "web", "state": "running", "engine": "qemu", "libvirt_uri": None, "pid": 4242,
        "accelerator": "tcg",
        "forwards": [
            {"protocol": "tcp", "host_address": "127.0.0.1", "host_port": 2222, "guest_address": "",
             "guest_port": 22},
            {"protocol": "udp", "host_address": "127.0.0.1", "host_port": 5353,
             "guest_address": "10.0.2.3", "guest_port": 53},
        ],
        "vnc": "127.0.0.1:3", "ssh_command": ["ssh", "-p", "2222", "root@localhost"],
        "console_log": "/state/console.log", "disks": {"image": "/i.img", "overlay": "/o.qcow2"},
        "ssh_config": "/state/ssh_config", "shares": [], "networks": [], "arch": "x86_64",
        "firmware": "bios",
    }
    foreign = replace(RUNNING, arch="aarch64", firmware="uefi")
    assert json.loads(as_json(foreign))["arch"] == "aarch64"
    assert describe(foreign)[-1] == "  arch aarch64, firmware uefi"
    suspended = json.loads(as_json(replace(RUNNING, state=State.SUSPENDED, ssh_command=None)))
    assert (suspended["state"], suspended["ssh_command"]) == ("suspended", None)


def test_a_frozen_guest_between_running_and_suspended_is_not_called_running() -> None:
    for state, verb in ((State.SUSPENDING, "suspend"), (State.RESUMING, "resume")):
        facts = replace(RUNNING, state=state)
        assert not facts.running  # status exits 3: nothing answers
        assert describe(facts) == [f"web is {state} (pid 4242): its guest is frozen by an interrupted "
                                   f"{verb}; start or stop ends it"]
        assert json.loads(as_json(facts))["state"] == state.value


def test_a_state_that_cannot_be_resumed_is_said() -> None:
    facts = replace(RUNNING, state=State.STOPPED, problem="its record /s/suspended.json is missing")
    assert describe(facts) == ["web is stopped; its suspended state cannot be resumed, its record "
                               "/s/suspended.json is missing"]
