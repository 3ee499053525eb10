"""The decompressed image in the download cache, shared by the parts of one URL.

Parts that boot an overlay only read their image, so the parts of one URL can
share one: the first part to make it (while downloading, or in its decompress
step) hard-links it into the cache entry as ``image``, with ``image.json``
naming the download it was made from; the others take it by hard link instead
of decompressing again. The shared file is read-only, and a part that boots
its image without an overlay never uses it (``decompress`` then makes a copy of
its own). Across file systems nothing is shared: a copy would cost what
decompressing does, without its holes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kvmtasks.config.options import Compression
from kvmtasks.config.part import Part
from kvmtasks.errors import ProvisionError
from kvmtasks.provision import digest
from kvmtasks.provision.cache import READ_ONLY, Entry, caches, is_read_only, link


def shares(part: Part) -> bool:
    """The part's image can be the cache's: made from the download, booted only under an overlay."""
    return (caches(part) and part.overlay and part.compression is not Compression.NONE
            and part.image_path != part.download_path)


def take(entry: Entry, part: Part, label: str) -> dict[str, str] | None:
    """Link the entry's image as the part's, returning its digests; None when there is none
    to take (then the part decompresses, and shares what it made). The caller holds the
    entry's lock and has verified the part's download, a link of the entry's file."""
    record = _trusted_record(entry, label)
    if record is None or not _same_file(part.download_path, entry.data):
        return None
    try:
        if not link(entry.image, part.image_path):
            return None
        digests = dict(record.digests)
        missing = set(part.image_digests) - set(digests)
        if missing:
            # A checksum the shared image was not hashed with: hash once, and remember.
            digests |= digest.hash_file(entry.image, missing)
            _record(entry, digests)
    except OSError as error:
        raise ProvisionError(f"download cache: cannot use {entry.image} as {part.image_path}: "
                            f"{error.strerror or error}") from None
    print(f"{label}: the image of {entry.url} is in the download cache ({entry.folder}); "
          "not decompressing it", file=sys.stderr, flush=True)
    return {algorithm: digests[algorithm] for algorithm in part.image_digests}


def share(entry: Entry, part: Part, digests: dict[str, str]) -> None:
    """Offer the image the part just made from the entry's download to the other parts.
    The caller holds the entry's lock. A failure to share costs nothing but time later."""
    if _trusted_record(entry, None) is not None or not _same_file(part.download_path, entry.data):
        return
    try:
        os.chmod(part.image_path, READ_ONLY)  # the same inode as the part's: it boots an overlay
        if link(part.image_path, entry.image):
            _record(entry, digests)
    except OSError as error:
        print(f"download cache: cannot share {part.image_path}: {error.strerror or error}",
              file=sys.stderr, flush=True)


def _trusted_record(entry: Entry, label: str | None) -> digest.Record | None:
    """The entry's image record, when the image is there, unchanged and made from the entry's
    download as it is now; a stale or damaged image is discarded (with a notice, given a label)."""
    if not entry.image.exists() and not entry.image_record.exists():
        return None
    record = digest.read_record(entry.image_record)
    try:
        source = digest.identity(entry.data)
    except OSError:
        source = None
    if record is not None and record.matches(entry.image) and record.source == source \
            and is_read_only(entry.image):
        return record
    if label is not None:
        print(f"{label}: discarding the cached image of {entry.url}: it is not the one made from "
              "the cached download; decompressing again", file=sys.stderr, flush=True)
    entry.image.unlink(missing_ok=True)
    entry.image_record.unlink(missing_ok=True)
    return None


def _record(entry: Entry, digests: dict[str, str]) -> None:
    digest.write_record(entry.image_record, entry.image, digests, digest.identity(entry.data))


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False
