"""The port preflight agrees with QEMU: real sockets, real TIME-WAIT entries, the holder named."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmtasks.engines import portprobe
from kvmtasks.errors import VmError
from tests.otheruser import run_as


def time_wait_entries(port: int) -> list[str]:
    """What ``ss`` lists in TIME-WAIT on port, as the local side."""
    listed = subprocess.run(["ss", "-tan", "state", "time-wait", f"( sport = :{port} )"],
                            capture_output=True, text=True, check=True).stdout
    return [line for line in listed.splitlines()[1:] if line.strip()]


def leave_time_wait(port: int | None = None, connections: int = 3) -> int:
    """A listener that accepts connections and closes them first, as a guest refusing ssh does
    through QEMU's forward: the listening side of the port is left in TIME-WAIT. Returns the port."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port or 0))
        listener.listen()
        port = listener.getsockname()[1]
        for _ in range(connections):
            with socket.create_connection(("127.0.0.1", port)) as client:
                accepted, _ = listener.accept()
                accepted.close()  # the server side closes first
                client.recv(1)  # sees the close, then closes its side
    return port


def test_a_port_held_only_by_time_wait_is_free_as_for_qemu() -> None:
    port = leave_time_wait()
    assert time_wait_entries(port), "the test needs TIME-WAIT entries on the port"
    # A probe without SO_REUSEADDR (what the preflight did) refuses it; QEMU would not.
    with socket.socket() as plain, pytest.raises(OSError) as refused:
        plain.bind(("127.0.0.1", port))
    assert refused.value.errno == errno.EADDRINUSE
    portprobe.check_free("tcp", "127.0.0.1", port)


@pytest.fixture
def listener_process() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Another program listening on a port, as a user's web server would."""
    code = ("import socket,sys; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen();"
            "print(s.getsockname()[1], flush=True); sys.stdin.read()")
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield process, int(process.stdout.readline())
    finally:
        process.kill()
        process.wait()


def test_a_listening_port_is_refused_with_the_program_named(
    listener_process: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = listener_process
    with pytest.raises(VmError) as refused:
        portprobe.check_free("tcp", "127.0.0.1", port)
    program = Path(sys.executable).name
    assert str(refused.value) == (
        f"host port {port} (tcp on 127.0.0.1) is already in use by {program} (pid {process.pid})")


def test_a_listener_on_every_address_is_refused_too() -> None:
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(VmError, match=rf"in use by \S+ \(pid {os.getpid()}\)$"):
            portprobe.check_free("tcp", "127.0.0.1", port)


def test_a_bound_udp_port_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(VmError, match=rf"host port {port} \(udp on 127.0.0.1\) is already in use by"):
            portprobe.check_free("udp", "127.0.0.1", port)


def test_time_wait_sockets_are_never_named_as_holders() -> None:
    port = leave_time_wait()
    assert time_wait_entries(port)
    assert portprobe.socket_inodes("tcp", port) == set()
    assert portprobe.holder_text("tcp", port) == ""


def test_an_address_that_is_not_ours_is_one_line() -> None:
    with pytest.raises(VmError, match=r"^cannot listen on 192\.0\.2\.1:40000: "):
        portprobe.check_free("tcp", "192.0.2.1", 40000)


def test_a_holder_this_user_cannot_see_is_said_so(
    listener_process: tuple[subprocess.Popen[str], int],
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to check as another user (nobody)")
    _, port = listener_process

    def check() -> str:
        try:
            portprobe.check_free("tcp", "127.0.0.1", port)
        except VmError as error:
            return str(error)
        return "free"

    assert run_as("nobody", check) == (
        f"host port {port} (tcp on 127.0.0.1) is already in use by a process this user cannot see "
        "(another user's or another namespace's)")
