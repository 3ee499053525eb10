"""Checksum lists (SHA256SUMS, SHA512SUMS, Fedora's CHECKSUM) as the value of a checksum option.

The ``checksums`` step fetches each list on every run (they are small), finds
the file's entry and writes the digests it resolved to
``LOCATION/.kvmtasks/expected-{download,image}.json`` only when they changed:
the verify steps depend on those files, so a changed list re-runs a comparison
and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from kvmtasks.config import bounded
from kvmtasks.config.options import URL_SCHEMES
from kvmtasks.config.part import Part
from kvmtasks.errors import FetchError, VerifyError

KINDS = ("download", "image")
# A list far bigger than this is not a checksum list.
MAX_LIST_BYTES = 16 << 20
_GNU = re.compile(r"([0-9a-fA-F]+) [ *](.+)")
_BSD = re.compile(r"(MD5|SHA256|SHA512) ?\((.+)\) ?= ?([0-9a-fA-F]+)")


def is_list(value: str) -> bool:
    return value.lower().startswith(URL_SCHEMES)


def _configured(part: Part, what: str) -> Mapping[str, str]:
    return part.download_digests if what == "download" else part.image_digests


def lists(part: Part, what: str) -> dict[str, str]:
    """algorithm -> list URL, for the checksums of `what` given as a list."""
    return {algorithm: value for algorithm, value in _configured(part, what).items() if is_list(value)}


def has_lists(part: Part) -> bool:
    return any(lists(part, what) for what in KINDS)


def expected_path(part: Part, what: str) -> Path:
    return part.location / ".kvmtasks" / f"expected-{what}.json"


def entry_name(part: Part, what: str) -> str:
    """The name the list gives the file: the URL's for the download, the image's own otherwise."""
    if what == "download" and part.image is not None:
        return urllib.parse.unquote(urllib.parse.urlsplit(part.image).path.rsplit("/", 1)[-1])
    return part.image_path.name


def resolve(part: Part) -> None:
    """The checksums step: fetch every list, find the entries, record what changed."""
    texts: dict[str, str] = {}
    for what in KINDS:
        wanted = lists(part, what)
        if not wanted:
            continue
        path, name = expected_path(part, what), entry_name(part, what)
        before = _load(path)
        resolved: dict[str, dict[str, str]] = {}
        for algorithm, url in sorted(wanted.items()):
            try:
                if url not in texts:
                    texts[url] = fetch_list(url)
            except FetchError as error:
                kept = before.get(algorithm)
                if kept is None or (kept["list"], kept["name"]) != (url, name):
                    raise FetchError(f"checksum list {url} for {name}: {error}") from None
                # Verified against it before: an offline re-run keeps what it knew.
                print(f"checksums:{part.name}: cannot fetch checksum list {url} ({error}); "
                      f"keeping the {algorithm} of {name} it gave before", file=sys.stderr)
                resolved[algorithm] = kept
                continue
            resolved[algorithm] = {"digest": find(texts[url], algorithm, name, url), "list": url,
                                   "name": name}
        if resolved != before:
            _save(path, resolved)


def expected(part: Part, what: str) -> tuple[dict[str, str], dict[str, str]]:
    """The digests to check `what` against, and where each listed one came from."""
    digests, sources = {}, {}
    resolved = _load(expected_path(part, what)) if lists(part, what) else {}
    name = entry_name(part, what)
    for algorithm, value in _configured(part, what).items():
        if not is_list(value):
            digests[algorithm] = value
            continue
        entry = resolved.get(algorithm)
        if entry is None or (entry["list"], entry["name"]) != (value, name):
            raise VerifyError(f"checksum list {value} was not read for {name}; "
                              f"run: doit checksums:{part.name}")
        digests[algorithm] = entry["digest"]
        sources[algorithm] = f"{name} in {value}"
    return digests, sources


def find(text: str, algorithm: str, name: str, url: str) -> str:
    """The digest the list gives name, GNU (`HEX  NAME`, `HEX *NAME`) or BSD (`SHA256 (NAME) = HEX`)."""
    length = {"md5": 32, "sha256": 64, "sha512": 128}[algorithm]
    found: set[str] = set()
    for line in _entries(text):
        bsd = _BSD.fullmatch(line)
        if bsd is not None:
            listed_algorithm, listed_name, digest = bsd.groups()
            if listed_algorithm.lower() != algorithm:
                continue
        else:
            gnu = _GNU.fullmatch(line)
            if gnu is None:
                continue
            digest, listed_name = gnu.groups()
        if len(digest) == length and _same_file(listed_name, name):
            found.add(digest.lower())
    if not found:
        raise VerifyError(f"checksum list {url} has no {algorithm} entry for {name}")
    if len(found) > 1:
        raise VerifyError(f"checksum list {url} gives {name} {len(found)} different {algorithm} digests")
    return found.pop()


def _entries(text: str) -> list[str]:
    """The lines that can be entries: no comments, no PGP armour or signature."""
    lines, in_signature = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("-----BEGIN PGP SIGNATURE"):
            in_signature = True
        elif line.startswith("-----END PGP SIGNATURE"):
            in_signature = False
        elif not (in_signature or line.startswith(("#", "-----", "Hash:")) or not line):
            lines.append(line)
    return lines


def _same_file(listed: str, name: str) -> bool:
    return listed.removeprefix("./") == name or listed.rsplit("/", 1)[-1] == name


def fetch_list(url: str) -> str:
    """The list's text (http, https or file), small and whole; FetchError in a few words."""
    if url.lower().startswith("file://"):
        import urllib.request

        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        try:
            return _text(bounded.read_bytes(path, MAX_LIST_BYTES))
        except bounded.NotReadable as error:
            raise FetchError(f"{path} {error}: not a checksum list") from None
        except OSError as error:
            raise FetchError(error.strerror or str(error)) from None
    return _download(url)


def _download(url: str) -> str:
    import requests
    import urllib3

    from kvmtasks.provision.fetch import _reason, _timeouts, not_followed  # the download's words

    try:
        with requests.get(url, stream=True, timeout=_timeouts()) as response:
            if response.status_code != 200:
                raise FetchError(f"HTTP {response.status_code} {response.reason}")
            return _text(response.raw.read(MAX_LIST_BYTES + 1, decode_content=True))
    except requests.exceptions.SSLError as error:
        raise FetchError(f"TLS certificate verification failed ({_reason(error)})") from None
    except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema) as error:
        raise FetchError(not_followed(error)) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as error:
        raise FetchError(f"connection failed ({_reason(error)})") from None


def _text(data: bytes) -> str:
    if len(data) > MAX_LIST_BYTES:
        raise FetchError(f"more than {MAX_LIST_BYTES >> 20} MiB: not a checksum list")
    return data.decode("utf-8", errors="replace")


def _load(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(bounded.read_text(path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, resolved: Mapping[str, Mapping[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(resolved, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError as error:
        raise FetchError(f"writing {path}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)  # a full disk leaves no half-written list behind
