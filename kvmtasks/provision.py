"""The provisioning steps of a part, each one a function of the Part.

Producing steps record the digests they computed while streaming; the
verify steps compare those records with the config, so changing a checksum
re-runs only a comparison and no image is ever read twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from kvmtasks import digest, fetch, image, vm
from kvmtasks.config import Part
from kvmtasks.errors import VerifyError, VmError
from kvmtasks.qemu import RunFiles


def record_directory(part: Part) -> Path:
    return part.location / ".kvmtasks"


def download_record(part: Part) -> Path:
    return record_directory(part) / "download.json"


def image_record(part: Part) -> Path:
    if part.file is None and not part.gzip:
        return download_record(part)  # the download is the image
    return record_directory(part) / "image.json"


def _refuse_if_running(part: Part) -> None:
    """Never replace the disk under a running VM; a new image also has new host keys."""
    if vm.current(part).running:
        raise VmError(f"{part.name} is running; stop it first: doit stop:{part.name}")
    RunFiles.of(part).known_hosts.unlink(missing_ok=True)


def download(part: Part) -> None:
    assert part.image is not None
    _refuse_if_running(part)
    algorithms = set(part.download_digests)
    if not part.gzip:
        algorithms |= set(part.image_digests)
    digests = fetch.fetch(part.image, part.download_path, algorithms, part.name)
    digest.write_record(download_record(part), part.download_path, digests)


def decompress(part: Part) -> None:
    _refuse_if_running(part)
    digests = image.gunzip(part.download_path, part.image_path, part.image_digests)
    digest.write_record(image_record(part), part.image_path, digests)


def verify_download(part: Part) -> None:
    _verify(part, "download", part.download_path, download_record(part), part.download_digests)


def verify_image(part: Part) -> None:
    if part.file is not None and part.image_digests:
        _hash_local_file(part)
    _verify(part, "image", part.image_path, image_record(part), part.image_digests)


def local_file_verified(part: Part) -> bool:
    """True when a local file's recorded size and mtime still match (for uptodate)."""
    record = digest.read_record(image_record(part))
    return record is not None and record.matches(part.image_path)


def _hash_local_file(part: Part) -> None:
    if local_file_verified(part):
        return
    digests = digest.hash_file(part.image_path, part.image_digests)
    digest.write_record(image_record(part), part.image_path, digests)


def _verify(
    part: Part, what: str, path: Path, record_path: Path, expected: Mapping[str, str]
) -> None:
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
        record = digest.write_record(
            record_path, path, {**record.digests, **digest.hash_file(path, missing)}
        )
    try:
        digest.compare(what, expected, record.digests)
    except VerifyError as error:
        if part.file is not None:
            raise
        if not record.matches(path):
            # A VM has written to it since: the user's work outranks a checksum (a typo?).
            raise VerifyError(
                f"{error}; {path} was used by a VM since it was provisioned, so it is kept: "
                "fix the checksum, or delete the file to provision again"
            ) from None
        # Never keep an unverified download or image at its final path.
        path.unlink(missing_ok=True)
        record_path.unlink(missing_ok=True)
        raise
