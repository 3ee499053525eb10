"""The shared download cache (``[buildout] download-cache``): one verified entry per URL.

An entry is a folder ``CACHE/KEY/`` (KEY from the URL) holding the file,
``record.json`` (URL, validators, size, mtime, digests) and ``lock``. Every
read or write of an entry holds its lock, so N parts or N doit runs wanting
one URL fetch it once; the others wait, then use it. An entry is trusted
only while its size and mtime are those recorded and its digests agree with
the part's checksums; otherwise it is discarded and fetched again.

Cached files are read-only. A part gets its download by hard link (a copy
when the cache is on another file system); when the VM would boot the
downloaded file itself, the part gets a copy of its own (a reflink where the
file system can), so no VM ever writes into the cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kvmtasks.config.options import Compression
from kvmtasks.config.part import SAFE_FILE_NAME, Part
from kvmtasks.errors import FetchError, ProvisionError
from kvmtasks.provision import checksums, digest, fetch
from kvmtasks.provision.locking import held

FICLONE = 0x40049409  # linux/fs.h: share the blocks of another file (btrfs, XFS)
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def needs_own_copy(part: Part) -> bool:
    """The VM would boot the downloaded file itself, so it must not be the cached file.

    Without an overlay, compression = auto boots it too when it turns out not compressed
    (the image is then a second name for it: provision/steps.decompress). Under an overlay
    the VM only reads it: a link will do.
    """
    if part.overlay:
        return False
    return part.image_path == part.download_path or part.compression is Compression.AUTO


def is_read_only(path: Path) -> bool:
    """Whether path is read-only, as every file of the cache is (and root could still write it)."""
    try:
        return path.stat().st_mode & 0o222 == 0
    except OSError:
        return False


def placed_safely(part: Part) -> bool:
    """False when a part that needs its own copy still has the cache's file (its overlay was
    turned off since): the download step then runs again and makes the copy."""
    return not (caches(part) and needs_own_copy(part) and is_read_only(part.download_path))


def caches(part: Part) -> bool:
    """A file:// URL is already on this machine: it is copied as before, not cached."""
    return (
        part.buildout.download_cache is not None
        and part.image is not None
        and not part.image.lower().startswith("file://")
    )


@dataclass(frozen=True)
class Entry:
    """Where one URL's download lives in the cache."""

    cache: Path
    url: str

    @property
    def folder(self) -> Path:
        return self.cache / hashlib.sha256(self.url.encode()).hexdigest()[:32]

    @property
    def data(self) -> Path:
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])
        return self.folder / (name if SAFE_FILE_NAME.fullmatch(name) else "download")

    @property
    def record(self) -> Path:
        return self.folder / "record.json"

    @property
    def lock(self) -> Path:
        return self.folder / "lock"

    @property
    def image(self) -> Path:
        """The decompressed image, shared by parts under overlays (provision/sharedimage)."""
        return self.folder / "image"

    @property
    def image_record(self) -> Path:
        return self.folder / "image.json"


@contextlib.contextmanager
def held_entry(part: Part, label: str, doing: str = "downloading") -> Iterator[Entry | None]:
    """The part's cache entry, locked (None when the part does not use the cache): a second
    run wanting it waits, saying what the first is doing."""
    if not caches(part):
        yield None
        return
    assert part.image is not None and part.buildout.download_cache is not None
    entry = Entry(part.buildout.download_cache, part.image)
    with _open_lock(entry) as handle, held(
        handle, f"{label}: waiting for another run {doing} {entry.url} into the cache"
    ):
        yield entry


def fetch_into(entry: Entry, part: Part, dest: Path, algorithms: set[str], label: str,
               sink: fetch.Sink | None = None) -> dict[str, str]:
    """The part's download at dest, through the entry (the caller holds its lock); returns its
    digests. The sink gets the bytes only when they are downloaded (not when the cache has them)."""
    # A checksum list's digest, as the checksums step resolved it, not the list's URL.
    expected, _ = checksums.expected(part, "download")
    digests = _trusted_digests(entry, algorithms, expected, label)
    if digests is None:
        digests = _fetch(entry, algorithms, label, sink)
    else:
        print(f"{label}: {part.image} is in the download cache ({entry.folder}); "
              "not downloading it", file=sys.stderr, flush=True)
    _place(entry.data, dest, private=needs_own_copy(part))
    return {algorithm: digests[algorithm] for algorithm in algorithms}


def _open_lock(entry: Entry) -> TextIO:
    try:
        entry.folder.mkdir(parents=True, exist_ok=True)
        return open(entry.lock, "a+")
    except OSError as error:
        raise ProvisionError(
            f"download cache: cannot create {entry.lock}: {error.strerror or error}; set "
            "[buildout] download-cache to a folder you can write, or empty to turn it off"
        ) from None


def _read_record(entry: Entry) -> tuple[digest.Record, dict[str, str | None]] | None:
    record = digest.read_record(entry.record)
    try:
        data = json.loads(entry.record.read_text())
        validators = {"etag": data.get("etag"), "last_modified": data.get("last_modified")}
    except (OSError, ValueError, AttributeError):
        return None
    if record is None or data.get("url") != entry.url:
        return None
    return record, validators


def _trusted_digests(
    entry: Entry, algorithms: set[str], expected: Mapping[str, str], label: str
) -> dict[str, str] | None:
    """The entry's digests if it can be used as it is; a damaged or stale entry is discarded."""
    if not entry.data.exists() and not entry.record.exists():
        return None
    found = _read_record(entry)
    why = _damage(entry, found)
    digests: dict[str, str] = {}
    if why is None:
        assert found is not None
        record, validators = found
        digests = dict(record.digests)
        missing = (algorithms | set(expected)) - set(digests)
        if missing:
            # A checksum the entry was not hashed with: hash once, and remember.
            digests |= digest.hash_file(entry.data, missing)
            _write_record(entry, digests, validators)
        why = _disagreement(digests, expected)
    if why is not None:
        print(f"{label}: discarding the cache entry for {entry.url}: {why}; fetching it again",
              file=sys.stderr, flush=True)
        entry.data.unlink(missing_ok=True)
        entry.record.unlink(missing_ok=True)
        return None
    return digests


def _damage(entry: Entry, found: tuple[digest.Record, dict[str, str | None]] | None) -> str | None:
    """Why the entry's file is not the one its record describes, if it is not."""
    if found is None:
        return "no readable record" if entry.data.exists() else "its file is missing"
    record = found[0]
    try:
        info = entry.data.stat()
    except OSError:
        return "its file is missing"
    if (info.st_size, info.st_mtime_ns) != (record.size, record.mtime_ns):
        what = "truncated" if info.st_size < record.size else "changed"
        return (f"{what} since it was stored (size {info.st_size}, recorded {record.size}; "
                f"mtime changed: {info.st_mtime_ns != record.mtime_ns})")
    return None


def _disagreement(digests: Mapping[str, str], expected: Mapping[str, str]) -> str | None:
    for algorithm, value in expected.items():
        if digests[algorithm] != value:
            return f"its {algorithm} is {digests[algorithm]}, not {algorithm}_download {value}"
    return None


def _fetch(entry: Entry, algorithms: set[str], label: str, sink: fetch.Sink | None) -> dict[str, str]:
    # Only what this part checks: a part asking for another digest later hashes the entry once.
    digests, validator = fetch.fetch_validated(entry.url, entry.data, algorithms, label, sink)
    try:
        os.chmod(entry.data, READ_ONLY)
    except OSError as error:
        raise FetchError(f"download cache: cannot protect {entry.data}: {error.strerror or error}") \
            from None
    validators = {
        "etag": validator.etag if validator else None,
        "last_modified": validator.last_modified if validator else None,
    }
    _write_record(entry, digests, validators)
    return digests


def _write_record(entry: Entry, digests: Mapping[str, str], validators: Mapping[str, str | None]) -> None:
    try:
        info = entry.data.stat()
        temporary = entry.record.with_name(entry.record.name + ".tmp")
        temporary.write_text(json.dumps({
            "url": entry.url, **validators,
            "size": info.st_size, "mtime_ns": info.st_mtime_ns, "digests": dict(digests),
        }, indent=1))
        os.replace(temporary, entry.record)
    except OSError as error:
        raise FetchError(f"download cache: writing {entry.record}: {error.strerror or error}") \
            from None


def _place(source: Path, dest: Path, private: bool) -> None:
    """dest becomes source's content: a hard link, or (private, or across file systems) a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not private and link(source, dest):
            return
        temporary = dest.with_name(dest.name + ".part")
        try:
            _copy(source, temporary)
            os.replace(temporary, dest)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise FetchError(
            f"download cache: cannot put {source} at {dest}: {error.strerror or error}"
        ) from None


def link(source: Path, dest: Path) -> bool:
    """dest becomes another name of source (through a .part: never half there); False where
    the file system cannot link (another file system, or links not allowed)."""
    with contextlib.suppress(OSError):
        if dest.samefile(source):
            return True  # rename(2) would do nothing and leave the .part behind
    temporary = dest.with_name(dest.name + ".part")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError as error:
        if error.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return False
        raise
    os.replace(temporary, dest)
    return True


def _copy(source: Path, dest: Path) -> None:
    """A writable copy: a reflink where the file system shares blocks, else the bytes."""
    with open(source, "rb") as reader, open(dest, "wb") as writer:
        try:
            fcntl.ioctl(writer.fileno(), FICLONE, reader.fileno())
            return
        except OSError:
            pass  # not btrfs/XFS, or another file system: copy the bytes
        shutil.copyfileobj(reader, writer, digest.CHUNK)
