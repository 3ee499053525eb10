"""A minimal QMP client: enough to ask a VM's status, stop it and hand it file descriptors."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from kvmtasks.errors import VmError


class QmpClient:
    """One QMP session over the VM's unix socket."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout)
        try:
            self._socket.connect(str(path))
        except OSError as error:
            self._socket.close()
            raise VmError(f"cannot connect to QMP socket {path}: {error.strerror or error}") from None
        self._reader = self._socket.makefile("rb")
        self._receive()  # the greeting
        self.execute("qmp_capabilities")

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()
        self._socket.close()

    def _receive(self) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        except OSError as error:
            raise VmError(f"QMP: {error}") from None
        if not line:
            raise VmError("QMP: connection closed by QEMU")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        return self._execute(command, arguments, None)

    def pass_fd(self, name: str, fd: int) -> None:
        """Give QEMU an open file as NAME (``getfd`` with the descriptor sent as SCM_RIGHTS):
        QEMU then reads or writes it as ``fd:NAME`` and never opens a path itself."""
        self._execute("getfd", {"fdname": name}, fd)

    def _execute(self, command: str, arguments: dict[str, Any], fd: int | None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        try:
            if fd is None:
                self._socket.sendall(data)
            else:
                socket.send_fds(self._socket, [data], [fd])
        except OSError as error:
            raise VmError(f"QMP: {error}") from None
        while True:
            reply = self._receive()
            if "event" in reply:
                continue
            if "error" in reply:
                raise VmError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")


def query_status(path: Path, timeout: float = 5.0) -> str:
    """The VM's run state: running, internal-error, guest-panicked, shutdown, ..."""
    with QmpClient(path, timeout) as client:
        status: str = client.execute("query-status")["status"]
        return status
