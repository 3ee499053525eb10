"""Parallel doit runs (`doit -n N`, processes or `-P thread`) over many parts: provision, start, stop."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmtasks.config.loader import load_parts
from kvmtasks.engines import ports
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

if TYPE_CHECKING:
    from tests.conftest import DoitRun, Project
    from tests.httpserver import FileServer

PARTS = [f"vm{i}" for i in range(4)]


def assert_ok(run: DoitRun) -> None:
    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.output, run.describe()


# -- provisioning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["process", "thread"])
def test_doit_n_4_provisions_four_parts_at_the_same_time(
    project: Project, http_server: FileServer, pool: str
) -> None:
    images = {name: os.urandom(1 << 20) for name in PARTS}
    config = ""
    for name, data in images.items():
        url = http_server.put(f"{name}.img.gz", gzip.compress(data, compresslevel=1))
        config += (f"[{name}]\nimage = {url}\ngzip = true\n"
                   f"sha256_image = {hashlib.sha256(data).hexdigest()}\n\n")
    project.write(config)
    # Every body waits until the four requests have arrived: run one at a time, they never would.
    http_server.hold = threading.Event()

    def release_when_all_asked() -> None:
        deadline = time.monotonic() + 60
        while len(http_server.requests) < len(PARTS) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http_server.hold is not None
        http_server.hold.set()

    releaser = threading.Thread(target=release_when_all_asked, daemon=True)
    releaser.start()
    run = project.run("-n", "4", "-P", pool, *(f"provision:{name}" for name in PARTS), timeout=120)
    releaser.join()

    assert_ok(run)
    assert len(http_server.requests) == len(PARTS)
    for name, data in images.items():
        assert (project.parts / name / f"{name}.img").read_bytes() == data
    # One state file holds every part's steps, so a second parallel run has nothing to do.
    state = project.doit_state()
    # (decompress is not among them: the download inflated each image, so it never ran.)
    assert {f"{step}:{name}" for step in ("download", "verify-image", "render")
            for name in PARTS} <= set(state)
    again = project.run("-n", "4", "-P", pool, *(f"provision:{name}" for name in PARTS))
    assert_ok(again)
    assert not {task for task in again.executed if not task.startswith("provision:")}, again.describe()


# -- host ports shared by parts --------------------------------------------------------------------

def test_shared_host_ports_are_found_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "kvm.cfg"
    config.write_text(f"""[buildout]
directory = {tmp_path}
[a]
file = /dev/null
ssh_port = 2222
kvm_redir = udp:8080::53
[b]
<= a
kvm_redir = tcp:8080::80
[c]
<= a
ssh_port = 2223
kvm_redir = tcp:8080::80
[far]
<= a
kvm_engine = libvirt
libvirt_uri = qemu+ssh://vmhost/system
[far2]
<= far
kvm_redir =
""")
    a, b, c, far, far2 = load_parts([config], cwd=tmp_path)

    found = ports.clashes([a, b, c])

    lock = tmp_path / "var" / ".ports"
    assert found["a"] == (ports.Clash("tcp", 2222, (b,), lock / "tcp-2222.lock"),)
    assert found["b"] == (ports.Clash("tcp", 2222, (a,), lock / "tcp-2222.lock"),
                          ports.Clash("tcp", 8080, (c,), lock / "tcp-8080.lock"))
    assert found["c"] == (ports.Clash("tcp", 8080, (b,), lock / "tcp-8080.lock"),)
    assert ports.clashes([a, c]) == {}  # udp 8080 is not tcp 8080
    # A port on a libvirt host is not one of this machine's.
    assert ports.clashes([a, far]) == {}
    assert ports.clashes([far, far2])["far2"] == (
        ports.Clash("tcp", 2222, (far,), lock / "vmhost-tcp-2222.lock", "vmhost"),
    )


# -- real guests ----------------------------------------------------------------------------------

def guests_config(guest: Guest, url: str, ssh_ports: dict[str, int]) -> str:
    return "".join(
        f"[{name}]\nimage = {url}\ngzip = true\nssh_port = {port}\nssh_key_path = {guest.key}\n"
        "kvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 120\nkvm_shutdown_timeout = 3\n\n"
        for name, port in ssh_ports.items()
    )


def started_at(pid: int) -> float:
    """When the process started, as a time.time() value (/proc/PID/stat field 22, since boot)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    booted = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    return booted + since_boot


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_doit_n_2_starts_two_guests_at_once_and_stops_them(
    project: Project, guest: Guest, http_server: FileServer, tmp_path: Path
) -> None:
    url = http_server.put("guest.img.gz", guest.gzipped())
    project.write(guests_config(guest, url, {"a": free_port(), "b": free_port()}))

    started = project.run("-n", "2", "start:a", "start:b", timeout=300)

    assert_ok(started)
    assert {"a is running", "b is running"} <= {line.split(" (")[0] for line in started.stdout.splitlines()}
    assert len(qemu_pids_under(tmp_path)) == 2
    # A start returns once an ssh login works, which first writes the part's known_hosts: run
    # one after the other, the second qemu would start after the first part's login.
    starts = {name: started_at(pid) for name in "ab" for pid in qemu_pids_under(project.var / name)}
    first = min(starts, key=lambda name: starts[name])
    answered = (project.var / first / "known_hosts").stat().st_mtime
    assert max(starts.values()) < answered, (starts, answered)
    assert project.run("status:a").returncode == 0
    stopped = project.run("-n", "2", "-P", "thread", "stop:a", "stop:b", timeout=120)
    assert_ok(stopped)
    assert qemu_pids_under(tmp_path) == []


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_two_parallel_starts_on_one_host_port_fail_in_one_line_naming_the_port_and_part(
    project: Project, guest: Guest, http_server: FileServer, tmp_path: Path
) -> None:
    url = http_server.put("guest.img.gz", guest.gzipped())
    port = free_port()
    project.write(guests_config(guest, url, {"a": port, "b": port}))

    # Threads here (processes above): both of doit's pools start VMs.
    run = project.run("-n", "2", "-P", "thread", "start:a", "start:b", timeout=300)

    assert run.returncode == 1, run.describe()
    assert "Traceback" not in run.output, run.describe()
    lines = [line for line in run.output.splitlines() if f"host port {port} (tcp)" in line]
    assert len(lines) == 1, run.describe()
    # Which start wins is the lock's business; doit's thread pool may swallow the winner's
    # "is running" line (its output capture is process-wide), so the error line names it.
    match = re.fullmatch(rf"ERROR: start:(a|b): host port {port} \(tcp\) is also forwarded by part "
                         r"(a|b), which is running; stop it first: doit stop:\2", lines[0])
    assert match and match.group(1) != match.group(2), lines[0]
    winner = match.group(2)
    assert len(qemu_pids_under(tmp_path)) == 1
    assert len(qemu_pids_under(project.var / winner)) == 1
    assert_ok(project.run(f"stop:{winner}", timeout=120))
