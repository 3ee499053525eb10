"""A real HTTP file server on 127.0.0.1 for the download tests, with switches for misbehaviour.

It serves byte strings from memory and honours ``Range`` (206 + ``Content-Range``)
and ``If-Range`` (against its ETag or Last-Modified), like a well-behaved static
file server. Switches make it misbehave the ways real servers and networks do:
drop the connection part-way through a body, pause a body until told, ignore ``Range``, change a file
between requests, send ``Content-Encoding: gzip``, answer with an error status,
redirect in a loop, or accept a request and never answer.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Last-Modified has a one-second resolution: every version gets its own second.
_EPOCH = 1_700_000_000


@dataclass
class Served:
    """One file the server holds, in one version."""

    content: bytes
    version: int
    gzip_encoding: bool = False
    send_etag: bool = True

    @property
    def etag(self) -> str:
        return '"' + hashlib.md5(self.content).hexdigest() + f'-{self.version}"'

    @property
    def last_modified(self) -> str:
        return formatdate(_EPOCH + self.version, usegmt=True)


@dataclass
class Request:
    """What the server saw and answered, for assertions."""

    path: str
    headers: dict[str, str]
    status: int
    body_bytes: int = 0


@dataclass
class FileServer:
    """State and switches shared by the handler threads; tests flip the switches."""

    host: str = "127.0.0.1"
    port: int = 0
    files: dict[str, Served] = field(default_factory=dict)
    drop_after: list[int] = field(default_factory=list)
    ignore_range: bool = False
    status: dict[str, int] = field(default_factory=dict)
    redirect_loop: set[str] = field(default_factory=set)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    hang: bool = False
    # When set: every body pauses after its first chunk until hold is set (or 60 s pass),
    # so that concurrent clients are sure to overlap.
    hold: threading.Event | None = None
    requests: list[Request] = field(default_factory=list)
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    _versions: int = 0

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def put(self, path: str, content: bytes, *, gzip_encoding: bool = False, etag: bool = True) -> str:
        """Serve content at path (a new version: new ETag and Last-Modified); return its URL."""
        with self.lock:
            self._versions += 1
            self.files["/" + path.lstrip("/")] = Served(content, self._versions, gzip_encoding, etag)
        return self.url(path)

    def next_drop(self) -> int | None:
        with self.lock:
            return self.drop_after.pop(0) if self.drop_after else None

    def count(self, request: Request, sent: int) -> None:
        with self.lock:
            request.body_bytes += sent
            self.bytes_sent += sent


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: pytest shows the requests list on failure instead."""

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        state = self.server.state
        if state.hang:
            # Read the request, then say nothing until the test ends.
            state.stop.wait()
            self.close_connection = True
            return
        request = Request(self.path, dict(self.headers.items()), 0)
        state.requests.append(request)
        if self.path in state.redirect_loop:
            request.status = 302
            self._empty(302, {"Location": self.path})
            return
        if self.path in state.redirects:
            request.status = 302
            self._empty(302, {"Location": state.redirects[self.path]})
            return
        if self.path in state.status:
            request.status = state.status[self.path]
            self._empty(request.status, {}, text=f"error {request.status}\n".encode())
            return
        served = state.files.get(self.path)
        if served is None:
            request.status = 404
            self._empty(404, {}, text=b"not found\n")
            return
        self._send_file(request, served, body)

    def _empty(self, status: int, headers: dict[str, str], text: bytes = b"") -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def _send_file(self, request: Request, served: Served, body: bool) -> None:
        content, size = served.content, len(served.content)
        start, end, status = 0, size - 1, 200
        wanted = self._range(size)
        if isinstance(wanted, str):
            request.status = 416
            self._empty(416, {"Content-Range": f"bytes */{size}"})
            return
        if wanted is not None:
            start, end = wanted
            status = 206
        request.status = status
        self.send_response(status)
        kind = "application/gzip" if served.gzip_encoding else "application/octet-stream"
        self.send_header("Content-Type", kind)
        if served.gzip_encoding:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Accept-Ranges", "bytes")
        if served.send_etag:
            self.send_header("ETag", served.etag)
        self.send_header("Last-Modified", served.last_modified)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if not body:
            return
        part = content[start:end + 1]
        drop = self.server.state.next_drop()
        if drop is not None and drop < len(part):
            self._write(request, part[:drop])
            self._drop()
            return
        self._write(request, part)

    def _range(self, size: int) -> tuple[int, int] | str | None:
        """The byte range to send, None for the whole file, or "unsatisfiable"."""
        state = self.server.state
        header = self.headers.get("Range")
        if header is None or state.ignore_range:
            return None
        if_range = self.headers.get("If-Range")
        served = state.files[self.path]
        if if_range is not None and if_range not in (served.etag if served.send_etag else None,
                                                     served.last_modified):
            return None  # the client's copy is of another version: send it all
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        if not match or match.group(1) == "":
            return None
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else size - 1
        if start >= size:
            return "unsatisfiable"
        return start, min(end, size - 1)

    def _write(self, request: Request, data: bytes) -> None:
        for offset in range(0, len(data), 64 * 1024):
            chunk = data[offset:offset + 64 * 1024]
            self.wfile.write(chunk)
            self.server.state.count(request, len(chunk))
            hold = self.server.state.hold
            if offset == 0 and hold is not None:
                self.wfile.flush()
                hold.wait(60)
        self.wfile.flush()

    def _drop(self) -> None:
        """Cut the connection mid-body, as a network failure would."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: FileServer


@contextmanager
def serve() -> Iterator[FileServer]:
    """Run a FileServer on an ephemeral port for the duration of the block."""
    state = FileServer()
    server = _Server((state.host, 0), _Handler)
    server.state = state
    state.port = server.server_address[1]
    # A short poll interval keeps shutdown (and so every test's teardown) quick.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              name="test-http-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
