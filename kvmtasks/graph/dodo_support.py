"""What dodo.py needs: config loading with errors turned into one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from doit import get_initial_workdir
from doit.exceptions import InvalidDodoFile

from kvmtasks.config import loader as config
from kvmtasks.config.part import Part
from kvmtasks.errors import KvmTasksError
from kvmtasks.graph.tasks import doit_config


def load(dodo_directory: Path) -> tuple[list[Part], dict[str, Any]]:
    """Parse every config before any task runs; a bad one stops doit with one line."""
    try:
        invoked_from = get_initial_workdir()
        parts = config.load_parts(config.config_paths(
            dodo_directory, Path(invoked_from) if invoked_from else None))
    except KvmTasksError as error:
        # doit prints InvalidDodoFile as "ERROR: message" with no traceback, exit 3.
        raise InvalidDodoFile(str(error)) from None
    return parts, doit_config(parts, Path.cwd() / "var")


