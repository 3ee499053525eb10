"""Checksum lists as checksum values: real doit runs, lists served by the suite's HTTP server."""

from __future__ import annotations

import hashlib
import lzma
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmtasks.errors import VerifyError
from kvmtasks.provision import checksums
from tests.test_provision_pipeline import assert_ok, assert_one_line_error, leftovers, part, payload
from tests.vmfixtures import free_port

if TYPE_CHECKING:
    from tests.conftest import Project
    from tests.httpserver import FileServer
    from tests.reliability import Recorder

NAME = "debian-12-genericcloud-amd64.qcow2"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def gnu_list(entries: dict[str, str], star: bool = False) -> bytes:
    """As sha512sum writes it (`*` for binary mode), with other files around."""
    mark = "*" if star else " "
    lines = [f"{'0' * 128} {mark}other.raw", *(f"{h} {mark}{n}" for n, h in entries.items()),
             f"{'f' * 128} {mark}{NAME}.json"]
    return ("\n".join(lines) + "\n").encode()


def bsd_list(algorithm: str, entries: dict[str, str]) -> bytes:
    """As Fedora's CHECKSUM: PGP-signed, comments, BSD lines."""
    body = [f"# {name}: 123 bytes\n{algorithm} ({name}) = {digest}" for name, digest in entries.items()]
    return ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
            "# Fedora-Cloud-Base-Generic-41.x86_64.qcow2: 5 bytes\n"
            f"{algorithm} (Fedora-Cloud-Base-Generic-41.x86_64.qcow2) = {'1' * 64}\n"
            + "\n".join(body) + "\n"
            "-----BEGIN PGP SIGNATURE-----\n\niQIzBAEBCAAdFiEE\n=abcd\n-----END PGP SIGNATURE-----\n"
            ).encode()


@pytest.mark.parametrize("style", ["gnu", "gnu-binary", "bsd"])
def test_the_downloads_entry_is_found_and_checked_then_a_no_op_run(
    project: Project, http_server: FileServer, style: str
) -> None:
    raw = payload()
    url = http_server.put(f"images/{NAME}", raw)
    listed = {NAME: sha512(raw)}
    text = bsd_list("SHA512", listed) if style == "bsd" else gnu_list(listed, star=style == "gnu-binary")
    list_url = http_server.put("images/SHA512SUMS", text)
    project.write(part(image=url, sha512_download=list_url))

    first = project.provision()

    assert_ok(first)
    assert {"checksums:vm", "download:vm", "verify-download:vm"} <= first.executed
    assert (project.parts / "vm" / NAME).read_bytes() == raw
    again = project.provision()
    assert_ok(again)
    assert again.ran() == set()


def test_the_images_entry_is_the_decompressed_name(project: Project, http_server: FileServer) -> None:
    raw = payload()
    packed = lzma.compress(raw, preset=1)
    url = http_server.put("Fedora-Cloud-Base-41.raw.xz", packed)
    text = bsd_list("SHA256", {"Fedora-Cloud-Base-41.raw.xz": sha256(packed),
                               "Fedora-Cloud-Base-41.raw": sha256(raw)})
    list_url = http_server.put("CHECKSUM", text)
    project.write(part(image=url, sha256_download=list_url, sha256_image=list_url))

    run = project.provision()

    assert_ok(run)
    assert (project.parts / "vm" / "Fedora-Cloud-Base-41.raw").read_bytes() == raw
    fetched = [r for r in http_server.requests if r.path.endswith("CHECKSUM")]
    assert len(fetched) == 1, "one list, fetched once for both checksums"


def test_a_list_without_the_files_entry_fails_before_the_download(
    project: Project, http_server: FileServer, reliability: Recorder
) -> None:
    reliability.bad_input("checksum-list")
    url = http_server.put(f"images/{NAME}", payload())
    list_url = http_server.put("images/SHA512SUMS", gnu_list({"debian-11.qcow2": "a" * 128}))
    project.write(part(image=url, sha512_download=list_url))

    run = project.provision()

    assert_one_line_error(run, "checksums:vm", f"checksum list {list_url} has no sha512 entry for {NAME}")
    assert not any(r.path.endswith(NAME) for r in http_server.requests)
    assert not (project.parts / "vm" / NAME).exists()


def test_a_mismatch_names_the_list_and_the_file_and_keeps_no_image(
    project: Project, http_server: FileServer, reliability: Recorder
) -> None:
    reliability.bad_input("checksum-list")
    url = http_server.put(f"images/{NAME}", payload())
    list_url = http_server.put("images/SHA512SUMS", gnu_list({NAME: "a" * 128}))
    project.write(part(image=url, sha512_download=list_url))

    run = project.provision()

    assert_one_line_error(run, "verify-download:vm", "sha512_download mismatch", f"{NAME} in {list_url}")
    assert not (project.parts / "vm" / NAME).exists()
    assert leftovers(project.parts) == []


@pytest.mark.parametrize("how", ["refused", "404"])
def test_an_unreachable_list_fails_in_one_line_then_a_verified_image_carries_on(
    project: Project, http_server: FileServer, reliability: Recorder, how: str
) -> None:
    reliability.fault("list-unreachable", 2)
    raw = payload()
    url = http_server.put(f"images/{NAME}", raw)
    dead = f"http://127.0.0.1:{free_port()}/SHA512SUMS" if how == "refused" else http_server.url("gone")
    project.write(part(image=url, sha512_download=dead))

    failed = project.provision()

    line = assert_one_line_error(failed, "checksums:vm", f"checksum list {dead} for {NAME}")
    assert ("connection failed" if how == "refused" else "HTTP 404") in line
    assert not (project.parts / "vm" / NAME).exists()

    # Verified once against a reachable list, the image survives the list going away.
    list_url = http_server.put("images/SHA512SUMS", gnu_list({NAME: sha512(raw)}))
    project.write(part(image=url, sha512_download=list_url))
    assert_ok(project.provision())
    http_server.status["/images/SHA512SUMS"] = 404
    offline = project.provision()
    assert_ok(offline)
    assert f"cannot fetch checksum list {list_url}" in offline.stderr
    assert offline.ran() == set()
    assert (project.parts / "vm" / NAME).read_bytes() == raw


def test_a_changed_list_re_verifies_and_nothing_else(
    project: Project, http_server: FileServer, reliability: Recorder
) -> None:
    reliability.fault("list-changed")
    raw = payload()
    url = http_server.put(f"images/{NAME}", raw)
    list_url = http_server.put("images/SHA512SUMS", gnu_list({NAME: sha512(raw)}))
    project.write(part(image=url, sha512_download=list_url))
    assert_ok(project.provision())
    overlay = project.parts / "vm" / "vm.overlay.qcow2"
    overlay_state = overlay.stat().st_mtime_ns

    http_server.put("images/SHA512SUMS", gnu_list({NAME: sha512(raw), "other-new.qcow2": "b" * 128}))
    same_entry = project.provision()
    assert_ok(same_entry)
    assert same_entry.ran() == set(), "an unrelated line of the list re-ran a step"

    http_server.put("images/SHA512SUMS", gnu_list({NAME: "c" * 128}))
    changed = project.provision()

    assert_one_line_error(changed, "verify-download:vm", "sha512_download mismatch", f"{NAME} in {list_url}")
    assert changed.ran() == {"verify-download"}
    assert overlay.stat().st_mtime_ns == overlay_state


def test_list_parsing_ignores_armour_and_other_algorithms() -> None:
    text = bsd_list("SHA256", {"a.img": "2" * 64}).decode() + f"MD5 (a.img) = {'3' * 32}\n"
    assert checksums.find(text, "sha256", "a.img", "u") == "2" * 64
    assert checksums.find(text, "md5", "a.img", "u") == "3" * 32
    assert checksums.find(f"{'4' * 64}  ./sub/a.img\n", "sha256", "a.img", "u") == "4" * 64
    with pytest.raises(VerifyError, match=r"no sha512 entry for a\.img"):
        checksums.find(text, "sha512", "a.img", "u")
    with pytest.raises(VerifyError, match="2 different sha256 digests"):
        checksums.find(f"{'5' * 64}  a.img\n{'6' * 64} *a.img\n", "sha256", "a.img", "u")


def test_a_file_url_list_works_for_a_local_file(project: Project, tmp_path: Path) -> None:
    image = tmp_path / "mine.img"
    image.write_bytes(payload())
    sums = tmp_path / "SHA256SUMS"
    sums.write_bytes(f"{sha256(image.read_bytes())}  mine.img\n".encode())
    project.write(part(file=image, sha256_image=sums.as_uri()))
    assert_ok(project.provision())
    sums.write_bytes(f"{'7' * 64}  mine.img\n".encode())
    run = project.provision()
    assert_one_line_error(run, "verify-image:vm", "sha256_image mismatch", f"mine.img in {sums.as_uri()}")
    assert image.exists()


def test_a_cached_download_is_trusted_against_the_digest_its_list_gives(
    tmp_path: Path, http_server: FileServer
) -> None:
    from tests.test_cache import entry, make_project

    cache = tmp_path / "shared-cache"
    raw = payload()
    url = http_server.put(f"images/{NAME}", raw)
    list_url = http_server.put("images/SHA512SUMS", gnu_list({NAME: sha512(raw)}))
    first, second = (make_project(tmp_path, name, cache) for name in ("first", "second"))
    for project in (first, second):
        project.write(part(image=url, sha512_download=list_url))
    assert_ok(first.provision())
    downloads = [r for r in http_server.requests if r.path.endswith(NAME)]

    run = second.provision()

    assert_ok(run)
    assert run.error_lines(f"download:vm: {url} is in the download cache")
    assert [r for r in http_server.requests if r.path.endswith(NAME)] == downloads
    assert entry(cache, url).data.read_bytes() == raw
