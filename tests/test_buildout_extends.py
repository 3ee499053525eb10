"""extends of http(s) URLs: relative extends against the URL, extends-cache and offline, as zc.buildout.

A real HTTP server on 127.0.0.1 (tests/httpserver.py) serves the extended files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_parts
from kvmtasks.config.part import Part
from kvmtasks.errors import ConfigError
from tests.httpserver import FileServer

IMAGE = "http://127.0.0.1:9/images/disk.img"


def serve_bases(server: FileServer) -> str:
    """base.cfg extends common/memory.cfg, relative to its own URL; returns base.cfg's URL."""
    server.put("/configs/common/memory.cfg", b"[vm]\nkvm_memory = 1G\nkvm_extra_args = -S\n")
    return server.put("/configs/base.cfg",
                      f"[buildout]\nextends = common/memory.cfg\n[vm]\nimage = {IMAGE}\n"
                      "kvm_extra_args += -no-reboot\n".encode())


def config(tmp_path: Path, url: str, buildout: str = "") -> Path:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\nextends = {url}\n{buildout}\n"
                    "[vm]\nkvm_extra_args += -nodefaults\n")
    return path


def read(path: Path) -> Part:
    (part,) = load_parts([path], cwd=path.parent)
    return part


def test_a_url_and_its_relative_extends_are_read(tmp_path: Path, http_server: FileServer) -> None:
    part = read(config(tmp_path, serve_bases(http_server)))

    assert (part.image, part.kvm_memory) == (IMAGE, "1G")
    assert part.kvm_extra_args == ("-S", "-no-reboot", "-nodefaults")
    assert [r.path for r in http_server.requests] == ["/configs/base.cfg", "/configs/common/memory.cfg"]


def test_the_extends_cache_keeps_each_url_under_its_md5(tmp_path: Path, http_server: FileServer) -> None:
    url = serve_bases(http_server)
    (tmp_path / "cache").mkdir()
    path = config(tmp_path, url, "extends-cache = cache")

    read(path)

    cached = tmp_path / "cache" / hashlib.md5(url.encode()).hexdigest()
    assert cached.read_bytes().startswith(b"[buildout]\nextends = common/memory.cfg")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_the_cached_copy_stands_in_when_the_server_fails(tmp_path: Path, http_server: FileServer) -> None:
    url = serve_bases(http_server)
    (tmp_path / "cache").mkdir()
    path = config(tmp_path, url, "extends-cache = cache")
    read(path)
    http_server.status["/configs/base.cfg"] = 500
    http_server.status["/configs/common/memory.cfg"] = 500

    assert read(path).kvm_memory == "1G"


def test_a_newer_file_on_the_server_replaces_the_cached_copy(tmp_path: Path,
                                                            http_server: FileServer) -> None:
    url = serve_bases(http_server)
    (tmp_path / "cache").mkdir()
    path = config(tmp_path, url, "extends-cache = cache")
    read(path)
    http_server.put("/configs/common/memory.cfg", b"[vm]\nkvm_memory = 2G\n")

    assert read(path).kvm_memory == "2G"


def test_offline_reads_the_cache_and_asks_nothing(tmp_path: Path, http_server: FileServer) -> None:
    url = serve_bases(http_server)
    (tmp_path / "cache").mkdir()
    read(config(tmp_path, url, "extends-cache = cache"))
    asked = len(http_server.requests)

    part = read(config(tmp_path, url, "extends-cache = cache\noffline = true"))

    assert part.kvm_memory == "1G"
    assert len(http_server.requests) == asked


@pytest.mark.parametrize(("buildout", "needle"), [
    ("offline = true", "cannot fetch it with [buildout] offline = true"),
    ("extends-cache = cache\noffline = true", "not in the extends-cache"),
    ("extends-cache = missing", "extends-cache = 'missing': folder"),
    ("extends-cache = ${buildout:directory}/cache", "must not hold a ${section:option}"),
])
def test_what_cannot_be_fetched_is_one_line(tmp_path: Path, http_server: FileServer, buildout: str,
                                            needle: str) -> None:
    (tmp_path / "cache").mkdir()
    with pytest.raises(ConfigError) as raised:
        read(config(tmp_path, serve_bases(http_server), buildout))

    assert needle in str(raised.value)
    assert len(str(raised.value).splitlines()) == 1
    assert http_server.requests == []


def test_a_url_the_server_does_not_have_is_one_line(tmp_path: Path, http_server: FileServer) -> None:
    with pytest.raises(ConfigError) as raised:
        read(config(tmp_path, http_server.url("/configs/nothing.cfg")))

    message = str(raised.value)
    assert message.startswith(f"{http_server.url('/configs/nothing.cfg')}: cannot fetch the extended config")
    assert "404" in message and len(message.splitlines()) == 1


def test_newest_false_reads_the_cached_copy_without_asking(tmp_path: Path, http_server: FileServer) -> None:
    url = serve_bases(http_server)
    (tmp_path / "cache").mkdir()
    read(config(tmp_path, url, "extends-cache = cache"))
    http_server.put("/configs/common/memory.cfg", b"[vm]\nkvm_memory = 2G\n")
    asked = len(http_server.requests)

    part = read(config(tmp_path, url, "extends-cache = cache\nnewest = false"))

    assert part.kvm_memory == "1G"
    assert len(http_server.requests) == asked


def test_an_extended_config_without_an_end_is_one_line(tmp_path: Path, http_server: FileServer) -> None:
    """Read as every input file is (config/bounded.py): a FIFO, by file or file:// URL, is
    refused without waiting for a writer, and a server is not read past the config limit."""
    import os

    from kvmtasks.config import bounded

    fifo = tmp_path / "endless.cfg"
    os.mkfifo(fifo)
    for name in (str(fifo), f"file://{fifo}"):
        with pytest.raises(ConfigError, match=r"endless\.cfg.* is not a regular file \(a FIFO\)"):
            read(config(tmp_path, name))
    big = http_server.put("/configs/big.cfg", b"[vm]\n" + b"# comment\n" * (bounded.CONFIG_LIMIT // 10 + 1))
    with pytest.raises(ConfigError, match=r"big\.cfg: the extended config is larger than the limit of 4 MiB"):
        read(config(tmp_path, big))
