"""Task dicts for doit: one sub-task per step and part, named STEP:PART.

Pure functions of the parsed parts, so tests can pin the graph without
running anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from doit.dependency import FileChangedChecker
from doit.exceptions import TaskFailed
from doit.tools import config_changed

from kvmtasks.config import seedrules
from kvmtasks.config.annotate import print_annotation
from kvmtasks.config.options import Compression
from kvmtasks.config.part import Part
from kvmtasks.engines import destroy, engine, partlock, ports
from kvmtasks.engines.running import current
from kvmtasks.graph import layertasks
from kvmtasks.graph.actions import clean_unless_running, guarded
from kvmtasks.graph.report import Reporter
from kvmtasks.guest import sshconfig
from kvmtasks.layers import builder, partdisk, store
from kvmtasks.provision import cache, checksums, overlay, seedstep
from kvmtasks.provision import steps as provision
from kvmtasks.scripts import render

Task = dict[str, Any]

# One sentence per step, naming the part ("a part", "PART" and "the image" for the step as a whole).
STEP_DOCS = {
    "checksums": "checksums {part}: fetch the checksum lists it names and find its files' entries",
    "download": "download {part}: fetch {image} (resumes an interrupted download)",
    "verify-download": "verify-download {part}: check the download against md5/sha256/sha512_download",
    "decompress": "decompress {part}: decompress the download (gzip, xz, zstd, bz2) into the image",
    "verify-image": "verify-image {part}: check the image against md5/sha256/sha512_image",
    "overlay": "overlay {part}: create the copy-on-write overlay the VM boots, over the verified image",
    "reset": "reset {part}: throw the guest's changes away (a new overlay over the verified image)",
    "render": "render {part}: write the control scripts {name}-ctl, -ssh, -sendfile, -getfile, -runscript "
              "and its ssh config file",
    "cloud-init": "cloud-init {part}: write its cloud-init seed (and make its keys, once)",
    "setup": "setup {part}: run a guest setup step in a builder VM, caching its result as a disk layer "
             "(the first missing step builds the rest of the chain in the same boot)",
    "provision": "provision {part}: download, verify and decompress the image, make its overlay, "
                 "write the control scripts",
    "start": "start {part}: provision it, then start its VM and wait until it answers",
    "stop": "stop {part}: power its VM off (ACPI button, then poweroff over ssh), else end QEMU",
    "status": "status {part}: show whether its VM runs, and how to reach it",
    "suspend": "suspend {part}: save its running VM's state and stop it; start resumes it",
    "annotate": "annotate {part}: print its options, each with the file and section it came from",
    "destroy": "destroy {part}: stop its VM, then remove what it made for its machine (overlay, seed, "
               "state, keys, ssh config, libvirt domain and volumes); never the image",
}


def _refusing_a_running_vm(step: Callable[..., None], doing: str) -> Callable[[Part], None]:
    """A provisioning step handed the engines' "is it running" (provision sits below them),
    run under the part's VM lock: no start can launch QEMU between its check and its work."""
    return partlock.locked(doing, partial(step, vm_status=current))


def _disk_step(step: Callable[..., None], part: Part, name: str) -> Callable[[], TaskFailed | None]:
    return guarded(_refusing_a_running_vm(step, name), part, name)


def step_doc(step: str, part: Part | None = None) -> str:
    if part is None:
        return STEP_DOCS[step].format(part="a part", name="PART", image="the image")
    return STEP_DOCS[step].format(part=part.name, name=part.name, image=part.image or part.file)


class SizeMtimeChecker(FileChangedChecker):  # type: ignore[misc]
    """A file changed when its size or mtime did: never re-hash multi-GB images."""

    def check_modified(self, file_path: str, file_stat: os.stat_result, state: Any) -> bool:
        return [file_stat.st_mtime_ns, file_stat.st_size] != list(state)

    def get_state(self, dep: str, current_state: Any) -> list[int]:
        info = os.stat(dep)
        return [info.st_mtime_ns, info.st_size]


def doit_config(parts: Sequence[Part], default_var: Path) -> dict[str, Any]:
    var = parts[0].buildout.var_directory if parts else default_var
    var.mkdir(parents=True, exist_ok=True)
    return {
        # sqlite3 writes only the tasks a run changed, under sqlite's lock: two doit runs
        # at once (say, two parts started in parallel) never overwrite each other's state.
        "dep_file": str(var / ".doit.sqlite3"),
        "backend": "sqlite3",
        "check_file_uptodate": SizeMtimeChecker,
        "default_tasks": [],
        "reporter": Reporter,
    }


def part_tasks(part: Part, shared_ports: tuple[ports.Clash, ...] = ()) -> Iterator[Task]:
    """Every task of one part, in the order the steps run."""
    steps: list[str] = []
    if checksums.has_lists(part):
        yield _checksums_task(part)
        steps.append("checksums")
    if part.image is not None:
        yield {
            "basename": "download",
            "name": part.name,
            "actions": [_disk_step(provision.download, part, "download")],
            "targets": [str(part.download_path), str(provision.download_record(part))],
            "uptodate": [config_changed({"url": part.image}), lambda: cache.placed_safely(part)],
            # An unreachable list or a missing entry fails before gigabytes are fetched.
            "task_dep": [f"checksums:{part.name}"] if steps else [],
            "clean": [clean_unless_running(part)],
            "doc": step_doc("download", part),
        }
        yield {
            "basename": "verify-download",
            "name": part.name,
            "actions": [_disk_step(provision.verify_download, part, "verify-download")],
            "file_dep": [str(provision.download_record(part)), *_expected_files(part, "download")],
            "uptodate": [config_changed(dict(part.download_digests))],
            "task_dep": [f"download:{part.name}"],
            "doc": step_doc("verify-download", part),
        }
        steps += ["download", "verify-download"]
    if part.image is not None and part.compression is not Compression.NONE:
        yield _decompress_task(part)
        steps.append("decompress")
    yield _verify_image_task(part, steps)
    steps.append("verify-image")
    if part.setup:
        yield from _setup_tasks(part)
    if part.overlay:
        yield _overlay_task(part)
        steps.append("overlay")
    yield _reset_task(part)
    yield _render_task(part)
    steps.append("render")
    if part.cloud_init:
        yield _cloud_init_task(part)
        steps.append("cloud-init")
    yield {
        "basename": "provision",
        "name": part.name,
        # Setup layers in use are marked so (last_used, used_by in their records): what a prune spares.
        "actions": [guarded(partdisk.mark_used, part, "provision")] if part.setup else None,
        "task_dep": [f"{step}:{part.name}" for step in steps] + _setup_names(part)[-1:],
        "doc": step_doc("provision", part),
    }
    if part.setup:
        yield layertasks.export_task(part, store.top_layer)
    yield from _vm_tasks(part, shared_ports)


def _checksums_task(part: Part) -> Task:
    paths = [str(checksums.expected_path(part, what)) for what in checksums.KINDS
             if checksums.lists(part, what)]
    return {
        "basename": "checksums",
        "name": part.name,
        "actions": [guarded(checksums.resolve, part, "checksums")],
        "targets": paths,
        # Fetched on every run (a list is small): a published image can be replaced under its
        # URL. The files it writes change only when an entry did.
        "uptodate": [False],
        "doc": step_doc("checksums", part),
    }


def _expected_files(part: Part, what: str) -> list[str]:
    return [str(checksums.expected_path(part, what))] if checksums.lists(part, what) else []


def _decompress_task(part: Part) -> Task:
    task: Task = {
        "basename": "decompress",
        "name": part.name,
        "actions": [_disk_step(provision.decompress, part, "decompress")],
        "file_dep": [str(part.download_path)],
        "targets": [str(part.image_path), str(provision.image_record(part))],
        "task_dep": [f"verify-download:{part.name}"],
        "clean": [clean_unless_running(part)],
        "doc": step_doc("decompress", part),
    }
    if part.image_path == part.download_path:
        # Decompressed in place (no suffix to strip): the download's record says when it is new.
        task["file_dep"] = [str(provision.download_record(part))]
        task["targets"] = [str(provision.image_record(part))]
    else:
        # Up to date when the image was made from the download as it is now: by this step, by
        # the download step inflating as it downloaded, or taken from the download cache
        # (the image's record says which download).
        del task["file_dep"]
        task["uptodate"] = [lambda: provision.image_made_from_download(part)]
    return task


def _setup_names(part: Part) -> list[str]:
    return [f"setup:{part.name}:{step.name}" for step in part.setup]


def _setup_tasks(part: Part) -> Iterator[Task]:
    """One task per setup step, up to date while its layer (and those below) verify. The first
    one that is not builds every missing layer of the chain in one builder boot: the later ones
    then find theirs."""
    previous = f"verify-image:{part.name}"
    for index, (step, name) in enumerate(zip(part.setup, _setup_names(part), strict=True)):
        yield {
            "basename": "setup",
            "name": name.removeprefix("setup:"),
            "actions": [guarded(builder.build, part, "setup")],
            "uptodate": [partial(partdisk.step_ready, part, index)],
            "task_dep": [previous],
            "verbosity": 2,
            "doc": f"setup {part.name}: step {step.name} as a cached disk layer (in a builder VM)",
        }
        previous = name


def _overlay_task(part: Part) -> Task:
    if part.setup:
        # Over the top setup layer: a changed chain (or a layer made again) makes a new overlay.
        create: Callable[..., None] = partdisk.create_overlay
        current_base: Callable[[], bool] = partial(partdisk.overlay_up_to_date, part)
    else:
        create, current_base = overlay.create, partial(overlay.up_to_date, part)
    return {
        "basename": "overlay",
        "name": part.name,
        "actions": [_disk_step(create, part, "overlay")],
        # A new image (its size and mtime) or a new disk_size makes a new overlay; nothing else
        # does, so the guest's changes outlive a changed checksum, stop and start.
        "targets": [str(part.overlay_path), str(overlay.record_path(part))],
        "uptodate": [current_base],
        "task_dep": _setup_names(part)[-1:] or [f"verify-image:{part.name}"],
        "clean": [clean_unless_running(part)],
        # A deep chain is flattened here (layers/flatten.py): a minute for a large image, said.
        "verbosity": 2 if part.setup else 1,
        "doc": step_doc("overlay", part),
    }


def _reset_task(part: Part) -> Task:
    return {
        "basename": "reset",
        "name": part.name,
        "actions": [_disk_step(partdisk.reset if part.setup else overlay.reset, part, "reset")],
        "task_dep": [f"overlay:{part.name}"] if part.overlay else [],
        "uptodate": [False],
        "verbosity": 2,
        "doc": step_doc("reset", part),
    }


def _verify_image_task(part: Part, earlier: list[str]) -> Task:
    task: Task = {
        "basename": "verify-image",
        "name": part.name,
        "actions": [_disk_step(provision.verify_image, part, "verify-image")],
        "file_dep": _expected_files(part, "image"),
        "uptodate": [config_changed(dict(part.image_digests))],
        "task_dep": [f"{step}:{part.name}" for step in earlier[-1:]],
        "doc": step_doc("verify-image", part),
    }
    if part.file is None:
        task["file_dep"].append(str(provision.image_record(part)))
    elif part.image_digests:
        # A local file is hashed once, then trusted while its size and mtime hold.
        task["uptodate"].append(lambda: provision.local_file_verified(part))
    return task


def _render_task(part: Part) -> Task:
    scripts = [render.script_path(part, kind) for kind in render.SCRIPTS]
    texts = [render.script_text(part, kind, render.snapshot_path(part)) for kind in render.SCRIPTS]
    return {
        "basename": "render",
        "name": part.name,
        "actions": [guarded(render.render, part, "render")],
        "targets": [str(render.snapshot_path(part)), *map(str, scripts),
                    *([str(sshconfig.path(part))] if sshconfig.needed(part) else [])],
        "uptodate": [config_changed({"part": render.runtime_snapshot(part), "scripts": texts}),
                     lambda: render.written(part)],
        "clean": [clean_unless_running(part)],
        "doc": step_doc("render", part),
    }


def _cloud_init_task(part: Part) -> Task:
    """Up to date by content: editing the user-data file re-runs this step alone."""
    return {
        "basename": "cloud-init",
        "name": part.name,
        "actions": [guarded(seedstep.write_seed, part, "cloud-init")],
        "targets": [str(seedrules.seed_path(part))],
        "uptodate": [config_changed(seedstep.user_inputs(part)), lambda: seedstep.keys_exist(part)],
        "clean": [clean_unless_running(part)],
        "doc": step_doc("cloud-init", part),
    }


def _vm_tasks(part: Part, shared_ports: tuple[ports.Clash, ...]) -> Iterator[Task]:
    def status(part: Part) -> None:
        print("\n".join(engine.describe(part)))

    def start(part: Part) -> None:
        with ports.claimed(part, shared_ports):
            engine.start(part)

    for name, step, deps in (
        ("start", start, [f"provision:{part.name}"]),
        ("stop", engine.stop, []),
        ("status", status, []),
        ("suspend", engine.suspend, []),
        ("destroy", partlock.locked("destroy", destroy.destroy), []),
    ):
        yield {
            "basename": name,
            "name": part.name,
            "actions": [guarded(step, part, name)],
            "task_dep": deps,
            "uptodate": [False],
            "verbosity": 2,
            "doc": step_doc(name, part),
        }


def _annotate_task(part: Part) -> Task:
    return {
        "basename": "annotate",
        "name": part.name,
        "actions": [guarded(lambda part: print_annotation(part.config_file, part.name), part, "annotate")],
        "uptodate": [False],
        "verbosity": 2,
        "doc": step_doc("annotate", part),
    }


def all_tasks(parts: Sequence[Part]) -> Iterator[Task]:
    for basename in STEP_DOCS:
        yield {"basename": basename, "name": None, "doc": step_doc(basename)}
    # Decided here, before doit runs anything in parallel: which parts share a host port.
    shared = ports.clashes(parts)
    for part in parts:
        yield from part_tasks(part, shared.get(part.name, ()))
        yield _annotate_task(part)
