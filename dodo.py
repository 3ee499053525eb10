"""doit entry point: load the configs, yield the tasks the package builds."""

from pathlib import Path

from kvmtasks.graph.dodo_support import load
from kvmtasks.graph.tasks import all_tasks

PARTS, DOIT_CONFIG = load(Path(__file__).parent)


def task_kvmtasks():  # type: ignore[no-untyped-def]
    yield from all_tasks(PARTS)
