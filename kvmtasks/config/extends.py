"""``[buildout] extends``: the files (and http, https or file URLs) a config builds on.

As zc.buildout's ``_open``: each file's ``extends`` are read first, depth
first, then the file itself; a relative name in a file read from a URL is
that URL's folder + ``/`` + the name. The root file's ``[buildout]`` says how
URLs are fetched:

- ``extends-cache = FOLDER`` (relative to ``directory``; it must exist): each
  URL is kept there under the MD5 of the URL. A URL is fetched again on its
  first use in a run and the cached copy used when that fails; ``newest =
  false`` uses the cached copy without asking.
- ``offline = true``: nothing is fetched; a URL not in the cache is an error.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from kvmtasks.config import bounded, cfgfile
from kvmtasks.config.buildout import Section, Sections, annotated, update, update_section
from kvmtasks.errors import ConfigError

_IS_URL = re.compile(r"([a-zA-Z0-9+.-]+)://")
FETCH_TIMEOUT = 60.0


def read(path: Path, defaults: Section) -> Sections:
    """path with everything it extends, merged over defaults (the [buildout] section's)."""
    reader = _Reader(defaults)
    merged: Sections = {}
    for result in reader.open(str(path.parent), path.name, [], root=True):
        merged = update(merged, result)
    return update({"buildout": defaults}, merged)


class _Reader:
    def __init__(self, defaults: Section) -> None:
        self.options = defaults
        self.fetched: set[str] = set()

    def open(self, base: str, name: str, seen: list[str], root: bool = False) -> list[Sections]:
        if _IS_URL.match(name):
            filename, text = name, self._fetch(name)
            base = name[:name.rfind("/")]
        elif _IS_URL.match(base) and not os.path.isabs(name):
            filename = f"{base}/{name}"
            text = self._fetch(filename)
            base = filename[:filename.rfind("/")]
        else:
            filename = name if _IS_URL.match(base) else os.path.join(base, name)
            text = _read_file(filename, seen)
            base = os.path.dirname(filename)
        self.fetched.add(filename)
        if filename in seen:
            raise ConfigError(f"{seen[-1]}: [buildout] extends: {filename} is already being read "
                              f"({' -> '.join((*seen, filename))})")
        raw = cfgfile.parse(text, filename)
        options = raw.get("buildout", {})
        extends = options.pop("extends", "")
        for unsupported in ("extended-by", "optional-extends"):
            if unsupported in options:
                raise ConfigError(f"{filename}: [buildout] {unsupported} = {options[unsupported]!r}: "
                                  "not supported (use extends)")
        result = annotated(raw, filename)
        if root and "buildout" in result:
            self.options = update_section(self.options, result["buildout"])
        results: list[Sections] = []
        seen.append(filename)
        for extended in extends.split():
            results += self.open(base, extended, seen)
        seen.pop()
        results.append(result)
        return results

    def _fetch(self, url: str) -> str:
        options = {name: key.value for name, key in self.options.items()}
        offline = options.get("offline") == "true" or options.get("install-from-cache") == "true"
        cache = options.get("extends-cache")
        if not cache:
            if offline:
                raise ConfigError(f"{url}: cannot fetch it with [buildout] offline = true")
            return _decoded(_download(url), url)
        if "${" in cache:
            raise ConfigError(f"[buildout] extends-cache = {cache!r}: must not hold a ${{section:option}}")
        folder = os.path.realpath(os.path.join(options.get("directory", ""), cache))
        if not os.path.isdir(folder):
            raise ConfigError(f"[buildout] extends-cache = {cache!r}: folder {folder} does not exist")
        import hashlib  # here: only a config with an extends-cache pays for it

        cached = Path(folder, hashlib.md5(url.encode(), usedforsecurity=False).hexdigest())
        if cached.exists():
            if _boolean(options, "newest") and url not in self.fetched and not offline:
                with contextlib.suppress(ConfigError):  # buildout's fallback: the cached copy
                    _write_atomically(cached, _download(url))
        elif offline:
            raise ConfigError(f"{url}: not in the extends-cache ({folder}) and [buildout] offline = true")
        else:
            _write_atomically(cached, _download(url))
        try:
            return _decoded(bounded.read_bytes(cached, bounded.CONFIG_LIMIT), url)
        except bounded.NotReadable as error:
            raise ConfigError(f"{cached}: the extends-cache's copy of {url} {error}") from None
        except OSError as error:
            raise ConfigError(f"{cached}: cannot read the extends-cache's copy of {url}: {error}") from None


def _boolean(options: Mapping[str, str], name: str) -> bool:
    value = options.get(name, "true")
    if value not in ("true", "false"):
        raise ConfigError(f"[buildout] {name} = {value!r}: must be true or false")
    return value == "true"


def _read_file(filename: str, seen: list[str]) -> str:
    # Bounded: a config path may name a FIFO, a device or a huge file (config/bounded.py).
    try:
        text = bounded.read_text(Path(filename), bounded.CONFIG_LIMIT)
    except FileNotFoundError:
        where = f"{seen[-1]}: [buildout] extends: " if seen else ""
        raise ConfigError(f"{where}{filename}: config file not found") from None
    except bounded.NotReadable as error:
        raise ConfigError(f"{filename}: config file {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{filename}: cannot read config file: {error}") from None
    return _newlines(text)


def _download(url: str) -> bytes:
    # Imported here: only configs that extend a URL pay for it.
    import urllib.error
    import urllib.request

    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https", "file"):
        raise ConfigError(f"{url}: extends over {scheme} is not supported (http, https, file)")
    if scheme == "file":
        return _local_url(url)
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:  # noqa: S310 - scheme checked
            data: bytes = response.read(bounded.CONFIG_LIMIT + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ConfigError(f"{url}: cannot fetch the extended config: {error}") from None
    # As a config file: a server that never stops sending is not read to the end.
    if len(data) > bounded.CONFIG_LIMIT:
        raise ConfigError(f"{url}: the extended config is larger than the limit of "
                          f"{bounded.size_text(bounded.CONFIG_LIMIT)}")
    return data


def _local_url(url: str) -> bytes:
    """A file:// URL read as a config file is: bounded, and a FIFO does not block its open."""
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(f"{url}: cannot fetch the extended config: file not on local host")
    try:
        return bounded.read_bytes(Path(urllib.request.url2pathname(parts.path)), bounded.CONFIG_LIMIT)
    except bounded.NotReadable as error:
        raise ConfigError(f"{url}: the extended config {error}") from None
    except OSError as error:
        raise ConfigError(f"{url}: cannot fetch the extended config: {error}") from None


def _decoded(content: bytes, url: str) -> str:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{url}: not UTF-8 text: {error}") from None
    return _newlines(text)


def _newlines(text: str) -> str:
    # As a file read in text mode: every line ending is a newline.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _write_atomically(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)
