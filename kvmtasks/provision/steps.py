"""The provisioning steps of a part, each one a function of the Part.

Producing steps record the digests they computed while streaming; the
verify steps compare those records with the config, so changing a checksum
re-runs only a comparison and no image is ever read twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TextIO

from kvmtasks.config.options import Compression
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles, Status
from kvmtasks.errors import ProvisionError, VerifyError, VmError
from kvmtasks.provision import cache, checksums, digest, fetch, sharedimage
from kvmtasks.provision.decompress import StreamedImage, detect
from kvmtasks.provision.decompress import decompress as decompress_file
from kvmtasks.provision.locking import held

# "Is its VM running?" is the engines' question (engines.running.current), and they sit above
# provisioning: the steps that must not replace a running VM's disk are handed the check by
# their caller (the doit boundary, the ctl script), so every import still points down.
VmStatus = Callable[[Part], Status]


def record_directory(part: Part) -> Path:
    return part.location / ".kvmtasks"


def download_record(part: Part) -> Path:
    return record_directory(part) / "download.json"


def image_record(part: Part) -> Path:
    if part.file is None and part.compression is Compression.NONE:
        return download_record(part)  # the download is the image
    return record_directory(part) / "image.json"


def lock_path(part: Part) -> Path:
    return record_directory(part) / "lock"


@contextmanager
def exclusive(part: Part, step: str) -> Iterator[None]:
    """Hold the part's lock: a second doit run provisioning the same part waits for the first."""
    with _open_lock(part, lock_path(part)) as handle, held(
        handle, f"{step}:{part.name}: waiting for another run provisioning {part.name}"
    ):
        yield


def _open_lock(part: Part, path: Path) -> TextIO:
    if part.location.exists() and not part.location.is_dir():
        raise ProvisionError(f"location = {str(part.location)!r} is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")
    except OSError as error:
        raise ProvisionError(f"cannot create {path}: {error.strerror or error}") from None


def _write_record(record_path: Path, file_path: Path, digests: Mapping[str, str],
                  made_from: tuple[int, int] | None = None) -> digest.Record:
    try:
        return digest.write_record(record_path, file_path, digests, made_from)
    except OSError as error:
        raise ProvisionError(f"writing {record_path}: {error.strerror or error}") from None


def _refuse_if_running(part: Part, vm_status: VmStatus) -> None:
    """Never replace the disk under a running VM; a new image also has new host keys, and
    an overlay over the old one would show the new one corrupt: it goes too."""
    if vm_status(part).running:
        raise VmError(f"{part.name} is running; stop it first: doit stop:{part.name}")
    RunFiles.of(part).known_hosts.unlink(missing_ok=True)
    part.overlay_path.unlink(missing_ok=True)


def download(part: Part, vm_status: VmStatus) -> None:
    """Download the image; a compressed one is inflated into the image as its bytes arrive, so
    that decompress finds its work done (the image's record names the download it came from).
    Through the download cache, the image is also shared with the other parts of the URL."""
    assert part.image is not None
    label = f"download:{part.name}"
    with exclusive(part, "download"):
        _refuse_if_running(part, vm_status)
        algorithms = set(part.download_digests)
        if part.compression in (Compression.NONE, Compression.AUTO):
            algorithms |= set(part.image_digests)  # it may well be the image
        image = StreamedImage(part.image_path, part.compression, part.image_digests, part.image) \
            if streams(part) else None
        try:
            with cache.held_entry(part, label) as entry:
                if entry is None:
                    digests = fetch.fetch(part.image, part.download_path, algorithms, part.name,
                                          image)
                else:
                    digests = cache.fetch_into(entry, part, part.download_path, algorithms, label,
                                               image)
                _write_record(download_record(part), part.download_path, digests)
                # An image from a download that verify-download will refuse is not kept.
                if not all(digests[name] == value for name, value in part.download_digests.items()):
                    return
                if image is not None and image.complete:
                    _keep_streamed(part, image, entry)
                elif entry is not None and sharedimage.shares(part):
                    _take_shared(part, entry, label)
        finally:
            if image is not None:
                image.abandon()  # whatever did not reach its final path


def streams(part: Part) -> bool:
    """The download step inflates the image while the bytes arrive: a compressed download
    (declared, or found out from its first bytes) with a name of its own for the image."""
    return (part.image is not None and part.compression is not Compression.NONE
            and part.image_path != part.download_path)


def _keep_streamed(part: Part, image: StreamedImage, entry: cache.Entry | None) -> None:
    """Put the image inflated while downloading in place, recorded as made from this download."""
    made_from = digest.identity(part.download_path)
    try:
        digests = image.commit()
    except OSError as error:
        raise ProvisionError(f"renaming {image.partial}: {error.strerror or error}") from None
    _write_record(image_record(part), part.image_path, digests, made_from)
    if entry is not None and sharedimage.shares(part):
        sharedimage.share(entry, part, digests)


def _take_shared(part: Part, entry: cache.Entry, label: str) -> bool:
    """The image another part made from this download, linked from the cache, if there is one."""
    digests = sharedimage.take(entry, part, label)
    if digests is None:
        return False
    _write_record(image_record(part), part.image_path, digests, digest.identity(part.download_path))
    return True


def decompress(part: Part, vm_status: VmStatus) -> None:
    """The download, decompressed into the image; with compression = auto, a download that is
    not compressed is the image itself (a second name for it, never a copy). A part under an
    overlay takes the image another part of the URL left in the download cache, or leaves its
    own there; the entry's lock makes the parts of one URL decompress it once."""
    label = f"decompress:{part.name}"
    with exclusive(part, "decompress"):
        _refuse_if_running(part, vm_status)
        shared = sharedimage.shares(part)
        with cache.held_entry(part, label, "decompressing") if shared else nullcontext() as entry:
            if entry is not None and _take_shared(part, entry, label):
                return
            digests, kind = _decompress(part)
            if entry is not None and kind is not None:
                sharedimage.share(entry, part, digests)


def _decompress(part: Part) -> tuple[dict[str, str], Compression | None]:
    """The image made from the download, recorded; its digests, and the compression found."""
    download, image = part.download_path, part.image_path
    # What the image is made from, for decompress's up-to-date check (see streams).
    made_from = digest.identity(download) if image != download else None
    kind = detect(download) if part.compression is Compression.AUTO else part.compression
    # Without a suffix to strip, the image takes the download's name: one copy.
    digests = _as_image(part) if kind is None else \
        decompress_file(download, image, kind, part.image_digests)
    _write_record(image_record(part), image, digests, made_from)
    return digests, kind


def _as_image(part: Part) -> dict[str, str]:
    """An uncompressed download used as the image: linked, and its digests are the image's."""
    download, image = part.download_path, part.image_path
    if image != download:
        partial = image.with_name(image.name + ".part")
        partial.unlink(missing_ok=True)
        try:
            os.link(download, partial)
        except OSError as error:
            raise ProvisionError(f"linking {download} as {image}: {error.strerror or error}") from None
        os.replace(partial, image)
    record = digest.read_record(download_record(part))
    known = dict(record.digests) if record is not None and record.matches(download) else {}
    missing = set(part.image_digests) - set(known)
    if missing:
        known |= digest.hash_file(image, missing)
    return {algorithm: known[algorithm] for algorithm in part.image_digests}


def image_made_from_download(part: Part) -> bool:
    """The image is there, made from the download as it is now (for decompress's uptodate).

    The download step inflates while it downloads, and the decompress step from the file:
    either records the download's size and mtime in the image's record. The image itself is
    not compared (a VM may write to it)."""
    record = digest.read_record(image_record(part))
    try:
        download = digest.identity(part.download_path)
    except OSError:
        return False
    if record is None or not part.image_path.exists():
        return False
    if not part.overlay and cache.is_read_only(part.image_path):
        return False  # the cache's shared image, and the VM would now boot it: make a copy
    if record.source is None:
        # A record from before records named their download: the image was made after it.
        return record.mtime_ns >= download[1]
    return record.source == download


def verify_download(part: Part, vm_status: VmStatus) -> None:
    _verify(part, "download", part.download_path, download_record(part), vm_status)


def verify_image(part: Part, vm_status: VmStatus) -> None:
    if part.file is not None and part.image_digests:
        _hash_local_file(part)
    _verify(part, "image", part.image_path, image_record(part), vm_status)


def local_file_verified(part: Part) -> bool:
    """True when a local file's recorded size and mtime still match (for uptodate)."""
    record = digest.read_record(image_record(part))
    return record is not None and record.matches(part.image_path)


def _hash_local_file(part: Part) -> None:
    if local_file_verified(part):
        return
    if not part.image_path.is_file():
        what = "is not a file" if part.image_path.exists() else "not found"
        raise VerifyError(f"file = {str(part.image_path)!r} {what}")
    try:
        digests = digest.hash_file(part.image_path, part.image_digests)
    except OSError as error:
        raise VerifyError(f"cannot read {part.image_path}: {error.strerror or error}") from None
    _write_record(image_record(part), part.image_path, digests)


def _verify(part: Part, what: str, path: Path, record_path: Path, vm_status: VmStatus) -> None:
    expected, sources = checksums.expected(part, what)
    if not expected:
        return
    record = digest.read_record(record_path)
    if record is None:
        raise VerifyError(f"no checksum record {record_path}; delete {path} to provision again")
    missing = set(expected) - set(record.digests)
    if missing:
        # A checksum was added to the config after the step ran: hash once, if unchanged.
        if not record.matches(path):
            raise VerifyError(
                f"{path} changed since it was provisioned (a VM wrote to it?), so it cannot be "
                f"checked against {', '.join(f'{a}_{what}' for a in sorted(missing))}; "
                "delete it to provision again"
            )
        try:
            added = digest.hash_file(path, missing)
        except OSError as error:
            raise VerifyError(f"cannot read {path}: {error.strerror or error}") from None
        record = _write_record(record_path, path, {**record.digests, **added}, record.source)
    try:
        digest.compare(what, expected, record.digests, sources)
    except VerifyError as error:
        if part.file is not None:
            raise
        if not record.matches(path):
            # A VM has written to it since: the user's work outranks a checksum (a typo?).
            raise VerifyError(
                f"{error}; {path} was used by a VM since it was provisioned, so it is kept: "
                "fix the checksum, or delete the file to provision again"
            ) from None
        if vm_status(part).running:
            # Deleted, the disk would take every later write of the guest with it.
            raise VerifyError(
                f"{error}; {path} is the disk of the running VM, so it is kept: stop it, "
                "then fix the checksum or provision again"
            ) from None
        # Never keep an unverified download or image at its final path.
        path.unlink(missing_ok=True)
        record_path.unlink(missing_ok=True)
        raise
