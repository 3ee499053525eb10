"""Streaming hashes and the size+mtime records that spare a second read of an image."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from kvmtasks.errors import VerifyError
from kvmtasks.provision import digest


def test_multihasher_matches_hashlib_across_chunks() -> None:
    chunks: list[bytes | memoryview] = [b"a" * 1000, memoryview(b"b" * 3), b"", b"c" * 70_000]
    hasher = digest.MultiHasher(["sha256", "md5", "md5"])
    for chunk in chunks:
        hasher.update(chunk)

    whole = b"".join(bytes(chunk) for chunk in chunks)
    assert hasher.hexdigests() == {"md5": hashlib.md5(whole).hexdigest(),
                                   "sha256": hashlib.sha256(whole).hexdigest()}


def test_no_algorithm_gives_no_digest() -> None:
    hasher = digest.MultiHasher([])
    hasher.update(b"data")
    assert hasher.hexdigests() == {}


def test_hash_file_reads_files_larger_than_a_chunk(tmp_path: Path) -> None:
    data = os.urandom(digest.CHUNK * 2 + 17)
    path = tmp_path / "disk.img"
    path.write_bytes(data)

    assert digest.hash_file(path, ["sha512"]) == {"sha512": hashlib.sha512(data).hexdigest()}


def test_a_record_round_trips_and_matches_its_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"image")
    record_path = tmp_path / "records" / "image.json"

    written = digest.write_record(record_path, path, {"md5": "abc"})

    assert digest.read_record(record_path) == written
    assert written.size == 5
    assert written.matches(path)
    assert json.loads(record_path.read_text())["digests"] == {"md5": "abc"}
    assert [p.name for p in record_path.parent.iterdir()] == ["image.json"]


def test_a_record_no_longer_matches_a_written_touched_or_removed_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"image")
    record = digest.write_record(tmp_path / "r.json", path, {})
    info = path.stat()

    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    assert not record.matches(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert record.matches(path)
    with open(path, "ab") as guest:
        guest.write(b"!")
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert not record.matches(path)
    path.unlink()
    assert not record.matches(path)


@pytest.mark.parametrize("text", [None, "", "not json", "[]", '{"size": 1}',
                                  '{"size": "x", "mtime_ns": 1, "digests": {}}',
                                  '{"size": 1, "mtime_ns": 1, "digests": 5}'])
def test_a_missing_or_damaged_record_reads_as_none(tmp_path: Path, text: str | None) -> None:
    record_path = tmp_path / "r.json"
    if text is not None:
        record_path.write_text(text)

    assert digest.read_record(record_path) is None


def test_compare_accepts_matching_digests_and_ignores_extra_ones() -> None:
    digest.compare("image", {"md5": "aa"}, {"md5": "aa", "sha256": "bb"})
    digest.compare("image", {}, {})


def test_compare_names_the_option_the_expected_and_the_actual_digest() -> None:
    with pytest.raises(VerifyError) as error:
        digest.compare("download", {"md5": "aa", "sha256": "bb"}, {"md5": "aa", "sha256": "cc"})

    assert str(error.value) == "sha256_download mismatch: expected bb, got cc"


def test_a_chunk_changed_after_update_is_hashed_as_it_was() -> None:
    buffer = bytearray(b"a" * 5000)
    hasher = digest.MultiHasher(["md5"])
    hasher.update(memoryview(buffer))
    buffer[:] = b"b" * 5000

    assert hasher.hexdigests() == {"md5": hashlib.md5(b"a" * 5000).hexdigest()}


def test_a_hasher_dropped_half_way_leaves_no_thread_behind() -> None:
    def hash_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("hash-")]

    before = set(hash_threads())
    hasher = digest.MultiHasher(["md5", "sha256"])
    for _ in range(20):
        hasher.update(os.urandom(100_000))
    started = [t for t in hash_threads() if t not in before]
    assert len(started) == 2
    del hasher  # as when a download fails: nobody asks for the digests

    for thread in started:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_lent_buffer_is_hashed_in_place_and_given_back_once_every_hash_is_done() -> None:
    buffers = digest.Buffers(count=1, size=4)
    given_back = []
    hasher = digest.MultiHasher(["md5", "sha256"])
    expected = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    for text in (b"abcd", b"efgh", b"ijkl"):
        buffer = buffers.get()  # the only one: waits until the hashes gave it back
        buffer[:] = text
        release = buffers.give_back(buffer)
        hasher.update(buffer, release=lambda release=release: (given_back.append(1), release()))
        for hash_object in expected.values():
            hash_object.update(text)

    assert hasher.hexdigests() == {name: h.hexdigest() for name, h in expected.items()}
    assert len(given_back) == 3
