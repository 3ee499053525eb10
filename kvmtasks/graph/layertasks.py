"""Task dicts for the layer cache's tasks that stand beside the setup steps: `export:PART`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmtasks.config.part import Part
from kvmtasks.graph.actions import guarded
from kvmtasks.layers import export

Task = dict[str, Any]


def export_task(part: Part, top_layer_path: Callable[[Part], Path]) -> Task:
    """`export:PART`: the part's top layer flattened into LOCATION/export/PART.qcow2 and its
    SHA256SUMS; redone only when the top layer (its key) or the export changed.

    top_layer_path gives the part's top layer once its steps have run (it is called when the
    task runs, not when the graph is made).
    """
    return {
        "basename": "export",
        "name": part.name,
        "actions": [guarded(lambda part: _run_export(part, top_layer_path), part, "export")],
        "targets": [str(export.export_path(part)), str(export.export_path(part).parent / export.SUMS)],
        "uptodate": [lambda: export.up_to_date(part, top_layer_path(part))],
        "task_dep": [f"provision:{part.name}"],
        "verbosity": 2,
        "doc": f"export {part.name}: its top layer as one compressed qcow2 with a SHA256SUMS beside it, "
               "usable as another part's image",
    }


def _run_export(part: Part, top_layer_path: Callable[[Part], Path]) -> None:
    export.export_part(part, top_layer_path(part))
