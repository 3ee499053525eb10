"""How `./dev test` splits the suite over its two xdist workers (`pytest -n 2`).

A guest under TCG keeps one core busy, so two tests run side by side. Every test is a unit of
its own, so one file's guest tests spread over both workers, except:
- the tests of a file with a module- or class-scoped fixture (a guest booted once for the file)
  stay together on one worker, so that it boots once;
- every test of a file that uses the ``libvirtd`` fixture is one unit: the fixture stops the
  daemon it started when its worker ends, which would cut another worker's tests.
The controller decides this from the test ids alone (it collects no tests itself), so the rule is
read from each file's text. Tests that boot guests come first (the workers sort them so): they are
the long ones, and the quick tests then fill the gaps at the end.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURE = re.compile(r"""scope=["'](module|class|package)["']""")


@functools.cache
def unit_of_file(path: str) -> str | None:
    """The unit every test of the file belongs to, or None when each test is its own."""
    try:
        text = (ROOT / path).read_text(encoding="utf-8")
    except OSError:
        return None
    if re.search(r"\blibvirtd\b", text):
        return "libvirtd"
    return path if SHARED_FIXTURE.search(text) else None


def unit_of(nodeid: str) -> str:
    return unit_of_file(nodeid.split("::", 1)[0]) or nodeid


@pytest.hookimpl(optionalhook=True)  # a hook of xdist, absent when it is not loaded
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return WorkUnits(config, log)


def _boots_guests(item: pytest.Item) -> bool:
    return item.get_closest_marker("vm") is not None or "libvirtd" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not _boots_guests(item))  # stable: the order is kept within each
