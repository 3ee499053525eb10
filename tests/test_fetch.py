"""fetch.fetch against the real local HTTP server, in process (faster than doit runs)."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmtasks.errors import FetchError
from kvmtasks.provision import fetch

if TYPE_CHECKING:
    from tests.httpserver import FileServer

ALGORITHMS = ("md5", "sha256")


def payload(size: int = 1 << 20, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def digests(data: bytes) -> dict[str, str]:
    return {name: hashlib.new(name, data).hexdigest() for name in ALGORITHMS}


def partial(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def meta(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def test_a_download_lands_whole_with_its_digests(http_server: FileServer, tmp_path: Path) -> None:
    data = payload()
    dest = tmp_path / "sub" / "disk.img"

    result = fetch.fetch(http_server.put("disk.img", data), dest, ALGORITHMS, "vm")

    assert result == digests(data)
    assert dest.read_bytes() == data
    assert not partial(dest).exists()
    assert not meta(dest).exists()
    assert http_server.requests[0].headers["Accept-Encoding"] == "identity"
    assert "Range" not in http_server.requests[0].headers


def test_no_progress_bar_without_a_terminal(
    http_server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fetch.fetch(http_server.put("disk.img", payload()), tmp_path / "disk.img", ALGORITHMS, "vm")

    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == ""


def test_an_interrupted_download_resumes_with_range_and_if_range(
    http_server: FileServer, tmp_path: Path
) -> None:
    data = payload(3 << 20)
    url = http_server.put("disk.img", data)
    dest = tmp_path / "disk.img"
    http_server.drop_after = [1_000_000]

    with pytest.raises(FetchError) as failure:
        fetch.fetch(url, dest, ALGORITHMS, "vm")

    message = str(failure.value)
    assert url in message
    assert "run again to resume" in message
    assert "\n" not in message
    assert partial(dest).stat().st_size == 1_000_000
    assert json.loads(meta(dest).read_text())["url"] == url
    assert not dest.exists()

    assert fetch.fetch(url, dest, ALGORITHMS, "vm") == digests(data)
    assert dest.read_bytes() == data
    resumed = http_server.requests[-1]
    assert resumed.headers["Range"] == "bytes=1000000-"
    assert resumed.headers["If-Range"] == http_server.files["/disk.img"].etag
    assert resumed.status == 206
    assert http_server.bytes_sent == len(data)


def test_several_interruptions_add_up_to_one_file(http_server: FileServer, tmp_path: Path) -> None:
    data = payload(2 << 20)
    url = http_server.put("disk.img", data)
    dest = tmp_path / "disk.img"
    http_server.drop_after = [300_000, 0, 500_000]

    for _ in range(3):
        with pytest.raises(FetchError):
            fetch.fetch(url, dest, ALGORITHMS, "vm")

    assert fetch.fetch(url, dest, ALGORITHMS, "vm") == digests(data)
    assert dest.read_bytes() == data
    assert http_server.bytes_sent == len(data)


@pytest.mark.parametrize("etag", [True, False], ids=["etag", "last-modified"])
def test_a_file_changed_between_attempts_is_fetched_from_zero(
    http_server: FileServer, tmp_path: Path, etag: bool
) -> None:
    old, new = payload(seed=1), payload(seed=2)
    url = http_server.put("disk.img", old, etag=etag)
    dest = tmp_path / "disk.img"
    http_server.drop_after = [400_000]
    with pytest.raises(FetchError):
        fetch.fetch(url, dest, ALGORITHMS, "vm")
    http_server.put("disk.img", new, etag=etag)

    assert fetch.fetch(url, dest, ALGORITHMS, "vm") == digests(new)

    assert dest.read_bytes() == new
    served = http_server.files["/disk.img"]
    sent_validator = http_server.requests[-1].headers["If-Range"]
    assert sent_validator != (served.etag if etag else served.last_modified)
    assert http_server.requests[-1].status == 200


def test_a_server_ignoring_range_restarts_cleanly(http_server: FileServer, tmp_path: Path) -> None:
    data = payload()
    url = http_server.put("disk.img", data)
    dest = tmp_path / "disk.img"
    http_server.drop_after = [600_000]
    with pytest.raises(FetchError):
        fetch.fetch(url, dest, ALGORITHMS, "vm")
    http_server.ignore_range = True

    assert fetch.fetch(url, dest, ALGORITHMS, "vm") == digests(data)

    assert dest.read_bytes() == data
    assert http_server.requests[-1].status == 200


def test_a_complete_partial_file_is_finished_on_416(http_server: FileServer, tmp_path: Path) -> None:
    """A .part as long as the file gets 416 from the server: it is complete, so it is renamed
    into place with its digests, and no byte is fetched again."""
    data = payload(100_000)
    url = http_server.put("disk.img", data)
    dest = tmp_path / "disk.img"
    http_server.drop_after = [50_000]
    with pytest.raises(FetchError):
        fetch.fetch(url, dest, ALGORITHMS, "vm")
    partial(dest).write_bytes(data)
    sent_before = http_server.bytes_sent

    assert fetch.fetch(url, dest, ALGORITHMS, "vm") == digests(data)

    assert dest.read_bytes() == data
    assert [request.status for request in http_server.requests][-1] == 416
    assert http_server.bytes_sent == sent_before
    assert not partial(dest).exists()


def test_a_416_for_a_partial_file_of_another_size_starts_over(
    http_server: FileServer, tmp_path: Path
) -> None:
    """A .part longer than the file on the server is not the file: fetched again from zero."""
    data = payload(100_000)
    url = http_server.put("disk.img", data)
    dest = tmp_path / "disk.img"
    http_server.drop_after = [50_000]
    with pytest.raises(FetchError):
        fetch.fetch(url, dest, ALGORITHMS, "vm")
    partial(dest).write_bytes(data + b"extra")

    assert fetch.fetch(url, dest, ALGORITHMS, "vm") == digests(data)

    assert dest.read_bytes() == data
    assert [request.status for request in http_server.requests][-2:] == [416, 200]


def test_a_partial_file_of_another_url_is_not_resumed(http_server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    http_server.drop_after = [50_000]
    with pytest.raises(FetchError):
        fetch.fetch(http_server.put("a/disk.img", payload(seed=1)), dest, ALGORITHMS, "vm")
    data = payload(seed=2)

    assert fetch.fetch(http_server.put("b/disk.img", data), dest, ALGORITHMS, "vm") == digests(data)

    assert "Range" not in http_server.requests[-1].headers
    assert dest.read_bytes() == data


def test_a_partial_file_without_its_validator_starts_over(http_server: FileServer, tmp_path: Path) -> None:
    data = payload()
    dest = tmp_path / "disk.img"
    partial(dest).write_bytes(b"junk from nowhere")

    assert fetch.fetch(http_server.put("disk.img", data), dest, ALGORITHMS, "vm") == digests(data)

    assert "Range" not in http_server.requests[-1].headers
    assert dest.read_bytes() == data


def test_content_encoding_gzip_is_kept_byte_exact(http_server: FileServer, tmp_path: Path) -> None:
    packed = gzip.compress(payload(), mtime=0)
    dest = tmp_path / "disk.img.gz"

    result = fetch.fetch(http_server.put("disk.img.gz", packed, gzip_encoding=True), dest, ALGORITHMS, "vm")

    assert result == digests(packed)
    assert dest.read_bytes() == packed


@pytest.mark.parametrize(("status", "reason"), [(404, "Not Found"), (500, "Internal Server Error"),
                                                (403, "Forbidden")])
def test_an_http_error_names_url_and_status(
    http_server: FileServer, tmp_path: Path, status: int, reason: str
) -> None:
    url = http_server.put("disk.img", payload(1000))
    http_server.status["/disk.img"] = status
    dest = tmp_path / "disk.img"

    with pytest.raises(FetchError, match=f"^{url}: HTTP {status} {reason}$"):
        fetch.fetch(url, dest, ALGORITHMS, "vm")

    assert list(tmp_path.iterdir()) == []


def test_a_redirect_loop_is_reported(http_server: FileServer, tmp_path: Path) -> None:
    http_server.redirect_loop.add("/loop")
    url = http_server.url("loop")

    with pytest.raises(FetchError, match="too many redirects"):
        fetch.fetch(url, tmp_path / "disk.img", ALGORITHMS, "vm")


def test_a_silent_server_times_out(
    http_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fetch.TIMEOUT_ENV, "0.3")
    http_server.hang = True
    url = http_server.url("disk.img")

    with pytest.raises(FetchError, match="timed out"):
        fetch.fetch(url, tmp_path / "disk.img", ALGORITHMS, "vm")


def test_a_server_that_stalls_mid_body_times_out_then_the_download_completes(
    http_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fetch.TIMEOUT_ENV, "0.3")
    data = payload(3 << 20)
    http_server.hold = threading.Event()  # the body stops after its first 64 KiB
    url = http_server.put("disk.img", data)
    dest = tmp_path / "disk.img"

    try:
        with pytest.raises(FetchError, match=f"^{url}: the server stopped answering .*resume$"):
            fetch.fetch(url, dest, ALGORITHMS, "vm")
    finally:
        http_server.hold.set()
    http_server.hold = None

    # Whatever reached the file is the start of the body (a buffer not yet full is dropped).
    assert data.startswith(partial(dest).read_bytes())
    assert fetch.fetch(url, dest, ALGORITHMS, "vm") == digests(data)
    assert dest.read_bytes() == data


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_a_bad_timeout_setting_is_a_clear_error(
    http_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(fetch.TIMEOUT_ENV, value)

    with pytest.raises(FetchError, match=f"{fetch.TIMEOUT_ENV} = '{value}'"):
        fetch.fetch(http_server.put("disk.img", b"x"), tmp_path / "disk.img", ALGORITHMS, "vm")


def test_a_refused_connection_is_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/disk.img"

    with pytest.raises(FetchError, match="connection failed"):
        fetch.fetch(url, tmp_path / "disk.img", ALGORITHMS, "vm")


def test_a_file_url_is_copied_with_its_digests(tmp_path: Path) -> None:
    data = payload()
    source = tmp_path / "with space" / "disk.img"
    source.parent.mkdir()
    source.write_bytes(data)
    dest = tmp_path / "out" / "disk.img"

    assert fetch.fetch(source.as_uri(), dest, ALGORITHMS, "vm") == digests(data)

    assert dest.read_bytes() == data
    assert not partial(dest).exists()


def test_a_missing_file_url_is_reported(tmp_path: Path) -> None:
    url = (tmp_path / "nothing.img").as_uri()
    dest = tmp_path / "out" / "disk.img"

    with pytest.raises(FetchError, match=f"^{url}: file not found$"):
        fetch.fetch(url, dest, ALGORITHMS, "vm")

    assert list(dest.parent.iterdir()) == []
