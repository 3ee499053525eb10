"""Download an image (http, https or file URL), hashing it as it streams.

The data goes to ``NAME.part``; only a complete download is renamed into
place. An interrupted download resumes with ``Range`` + ``If-Range``, so a
file that changed on the server is fetched again from the start, never
stitched together from two versions. A Sink (the image, inflated as the bytes
arrive) is fed every byte of the download from the first, in order.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from kvmtasks.config import bounded
from kvmtasks.errors import FetchError
from kvmtasks.provision.digest import CHUNK, Buffers, MultiHasher

if TYPE_CHECKING:
    # Imported where used: loading them costs a doit run with nothing to download a third of its time.
    import requests

TIMEOUT_ENV = "KVMTASKS_HTTP_TIMEOUT"
CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0


class Sink(Protocol):
    """What else the download's bytes go to, as they arrive (decompress.StreamedImage)."""

    def start(self) -> None:
        """The next byte is the download's first (again)."""

    def update(self, chunk: bytes | bytearray | memoryview, /) -> None:
        """Take the next chunk, in a thread of its own; never raises."""

    def check(self) -> None:
        """Raise what went wrong so far, if anything did."""

    def finish(self) -> None:
        """After the download's last byte: raise unless the sink's work is complete."""


@dataclass(frozen=True)
class Validator:
    """What identifies one version of the remote file (for If-Range)."""

    url: str
    etag: str | None
    last_modified: str | None

    @property
    def if_range(self) -> str | None:
        return self.etag or self.last_modified


def fetch(url: str, dest: Path, algorithms: Iterable[str], label: str,
          sink: Sink | None = None) -> dict[str, str]:
    """Fetch url to dest and return the digests of what was written."""
    return fetch_validated(url, dest, algorithms, label, sink)[0]


def fetch_validated(
    url: str, dest: Path, algorithms: Iterable[str], label: str, sink: Sink | None = None
) -> tuple[dict[str, str], Validator | None]:
    """fetch, also returning the validators the server sent (kept by the download cache).

    With a sink, dest is put in place only once the sink finished too."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.lower().startswith("file://"):
        return _copy_local(url, dest, algorithms, label, sink), None
    return _download(url, dest, tuple(algorithms), label, sink)


def _hasher(algorithms: Iterable[str], sink: Sink | None) -> MultiHasher:
    """A hasher for bytes from the download's first; the sink (started) consumes them too."""
    if sink is None:
        return MultiHasher(algorithms)
    sink.start()
    return MultiHasher(algorithms, also=(sink,))


def _complete(hasher: MultiHasher, sink: Sink | None) -> dict[str, str]:
    """The download's digests, once every byte was hashed and the sink finished."""
    digests = hasher.hexdigests()
    if sink is not None:
        sink.finish()
    return digests


def _partial_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def _copy_local(url: str, dest: Path, algorithms: Iterable[str], label: str,
                sink: Sink | None) -> dict[str, str]:
    import urllib.parse
    import urllib.request  # here: it loads http.client and email, which no-op runs never need

    source = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    partial, _ = _partial_paths(dest)
    hasher, buffers = _hasher(algorithms, sink), Buffers()
    try:
        with open(source, "rb", buffering=0) as reader, open(partial, "wb", buffering=0) as writer:
            size = os.fstat(reader.fileno()).st_size
            with _progress(size, label) as bar:
                while count := reader.readinto(buffer := buffers.get()):
                    chunk = memoryview(buffer)[:count]
                    _write_all(writer, chunk)
                    hasher.update(chunk, release=buffers.give_back(buffer))
                    bar.update(count)
                    if sink is not None:
                        sink.check()
        digests = _complete(hasher, sink)
    except FileNotFoundError:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{url}: file not found") from None
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise FetchError(f"copying {url} to {partial}: {error.strerror or error}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    return digests


def _timeouts() -> tuple[float, float]:
    override = os.environ.get(TIMEOUT_ENV)
    if override:
        try:
            seconds = float(override)
        except ValueError:
            seconds = 0.0
        if not 0 < seconds < 1e6:
            raise FetchError(f"{TIMEOUT_ENV} = {override!r}: not a number of seconds above 0")
        return seconds, seconds
    return CONNECT_TIMEOUT, READ_TIMEOUT


def _load_validator(meta: Path) -> Validator | None:
    try:
        data = json.loads(bounded.read_text(meta))
        return Validator(data["url"], data.get("etag"), data.get("last_modified"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _resume_offset(partial: Path, meta: Path, url: str, hasher: MultiHasher,
                   sink: Sink | None) -> tuple[int, str | None]:
    """Hash (and feed the sink) what an earlier attempt fetched, if it can be resumed."""
    validator = _load_validator(meta)
    if validator is None or validator.url != url or validator.if_range is None:
        return 0, None
    try:
        with open(partial, "rb") as handle:
            offset = 0
            while chunk := handle.read(CHUNK):
                hasher.update(chunk)
                offset += len(chunk)
                if sink is not None:
                    sink.check()
    except FileNotFoundError:
        return 0, None
    return offset, validator.if_range


def _download(
    url: str, dest: Path, algorithms: tuple[str, ...], label: str, sink: Sink | None
) -> tuple[dict[str, str], Validator | None]:
    import requests
    import urllib3

    partial, meta = _partial_paths(dest)
    hasher = _hasher(algorithms, sink)
    offset, if_range = _resume_offset(partial, meta, url, hasher, sink)
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers.update({"Range": f"bytes={offset}-", "If-Range": if_range or ""})
    try:
        with requests.get(url, headers=headers, stream=True, timeout=_timeouts()) as response:
            if response.status_code == 416 and offset and _complete_length(response) == offset:
                # The .part already holds the whole file (the run stopped before the rename).
                digests = _complete(hasher, sink)
                os.replace(partial, dest)
                validator = _load_validator(meta)
                meta.unlink(missing_ok=True)
                return digests, validator
            if response.status_code == 206 and offset and _range_start(response) == offset:
                mode, total = "ab", offset + _content_length(response, 0)
            elif response.status_code in (200, 206, 416) and offset:
                # The server sent the whole file (Range ignored or file changed): start over.
                hasher.hexdigests()  # every kept byte consumed, before the sink starts again
                hasher, offset = _hasher(algorithms, sink), 0
                if response.status_code != 200:
                    meta.unlink(missing_ok=True)
                    return _download(url, dest, algorithms, label, sink)
                mode, total = "wb", _content_length(response, 0)
            elif response.status_code == 200:
                mode, total = "wb", _content_length(response, 0)
            else:
                raise FetchError(f"{url}: HTTP {response.status_code} {response.reason}")
            _save_validator(meta, url, response)
            received = _stream(response, partial, mode, hasher, offset, total, label, sink)
    except requests.exceptions.SSLError as error:
        raise FetchError(f"{url}: TLS certificate verification failed ({_reason(error)})") from None
    except requests.exceptions.TooManyRedirects:
        raise FetchError(f"{url}: too many redirects") from None
    except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema) as error:
        raise FetchError(f"{url}: {not_followed(error)}") from None
    except requests.exceptions.ConnectTimeout:
        raise FetchError(f"{url}: connection timed out") from None
    except (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError):
        raise FetchError(f"{url}: the server stopped answering (timed out); "
                         "run again to resume") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as error:
        raise FetchError(f"{url}: connection failed or interrupted ({_reason(error)}); "
                         "run again to resume") from None
    if total and received != total:
        raise FetchError(f"{url}: download interrupted at {received} of {total} bytes; "
                         "run again to resume")
    digests = _complete(hasher, sink)
    os.replace(partial, dest)
    validator = _load_validator(meta)
    meta.unlink(missing_ok=True)
    return digests, validator


def not_followed(error: BaseException) -> str:
    """A redirect elsewhere than http(s) (file:///etc/passwd): refused, and no network failure."""
    return (f"the server redirected to a URL kvmtasks does not follow ({_reason(error)}): only "
            "http and https are; running again will not help: ask the server's owner, or use "
            "another URL")


def _reason(error: BaseException) -> str:
    """What went wrong, in a few words: the innermost cause, not the layers of retry wrapping."""
    import ssl  # here, as requests is: only a failed download needs it

    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "reason", None)  # urllib3's MaxRetryError
        if not isinstance(inner, BaseException):
            inner = error.__cause__ or next((a for a in error.args if isinstance(a, BaseException)), None)
        if inner is None:
            break
        error = inner
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return str(error.verify_message)
    if isinstance(error, OSError) and error.strerror:
        return str(error.strerror)
    return " ".join(str(error).split())[-200:]


def _range_start(response: requests.Response) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _complete_length(response: requests.Response) -> int | None:
    """The file's whole size from a 416's ``Content-Range: bytes */SIZE``."""
    content_range = response.headers.get("Content-Range", "")
    if not content_range.startswith("bytes */"):
        return None
    size = content_range.removeprefix("bytes */")
    return int(size) if size.isdigit() else None


def _content_length(response: requests.Response, default: int) -> int:
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return default


def _save_validator(meta: Path, url: str, response: requests.Response) -> None:
    meta.write_text(json.dumps({
        "url": url,
        "etag": response.headers.get("ETag"),
        "last_modified": response.headers.get("Last-Modified"),
    }))


def _stream(response: requests.Response, partial: Path, mode: str, hasher: MultiHasher,
            offset: int, total: int, label: str, sink: Sink | None) -> int:
    """Write the raw (still encoded) body to partial; return the size reached.

    The body is read straight from the socket into a few reused buffers, which are
    written (the GIL released) and lent to the hash threads: no chunk is copied,
    decoded or allocated on the way.
    """
    receive = _receiver(response)
    buffers = Buffers()
    received = offset
    try:
        writer = open(partial, mode, buffering=0)  # noqa: SIM115  # closed below
    except OSError as error:
        raise FetchError(f"writing {partial}: {error.strerror or error}") from None
    with writer, _progress(total or None, label, offset) as bar:
        while count := receive(buffer := buffers.get()):
            chunk = memoryview(buffer)[:count]
            try:
                _write_all(writer, chunk)
            except OSError as error:
                raise FetchError(f"writing {partial}: {error.strerror or error}") from None
            hasher.update(chunk, release=buffers.give_back(buffer))
            received += count
            bar.update(count)
            if sink is not None:
                sink.check()  # a corrupt stream stops the download here, not at its end
    return received


def _receiver(response: requests.Response) -> Callable[[bytearray], int]:
    """What fills a buffer with the next bytes of the body, as sent; 0 at its end.

    http.client reads a buffer's worth from the socket straight into it (recv_into,
    no copy); urllib3's own read() would copy each chunk twice. Other transports
    (none today) go through urllib3's stream.
    """
    import http.client

    raw = response.raw
    body = getattr(raw, "_fp", None)
    if isinstance(body, http.client.HTTPResponse):
        return lambda buffer: _checked(body.readinto, buffer)
    chunks = raw.stream(CHUNK, decode_content=False)

    def from_stream(buffer: bytearray) -> int:
        chunk = next(chunks, b"")
        buffer[:len(chunk)] = chunk
        return len(chunk)

    return from_stream


def _checked(readinto: Callable[[bytearray], int], buffer: bytearray) -> int:
    """readinto, with what a dropped or silent connection raises turned into the
    exceptions requests raises for them (handled in _download)."""
    import http.client

    import urllib3

    try:
        return readinto(buffer)
    except TimeoutError:
        raise urllib3.exceptions.ReadTimeoutError(None, "", "read timed out") from None  # type: ignore[arg-type]
    except (OSError, http.client.HTTPException) as error:
        raise urllib3.exceptions.ProtocolError(_reason(error), error) from None


def _write_all(writer: IO[bytes], data: memoryview) -> None:
    while data:
        count = writer.write(data)
        data = data[count or 0:]


class _Bar(Protocol):
    def update(self, n: float = 1, /) -> bool | None: ...


class _NoBar:
    def update(self, n: float = 1, /) -> bool | None:
        return None


@contextmanager
def _progress(total: int | None, label: str, initial: int = 0) -> Iterator[_Bar]:
    if not sys.stderr.isatty():
        # No bar to draw: tqdm (and the monitor thread it starts) is not even loaded.
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
              desc=label, leave=False) as bar:
        yield bar
