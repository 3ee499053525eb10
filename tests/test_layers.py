"""Guest setup without a guest: step sections parsed and refused, keys, the store's records.

Real files, real qemu-img; no VM (test_layers_guest.py boots the builder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_parts
from kvmtasks.config.part import Part
from kvmtasks.config.setupsteps import Copy, SetupStep
from kvmtasks.errors import ConfigError
from kvmtasks.graph.tasks import part_tasks
from kvmtasks.layers import key, store
from kvmtasks.layers.builder import _archive, builder_part
from tests.test_config import write
from tests.vmfixtures import loop_device

IMAGE = "http://127.0.0.1:9/images/disk.img"


def load(tmp_path: Path, body: str) -> list[Part]:
    path = write(tmp_path / "kvm.cfg", f"[buildout]\ndirectory = {tmp_path}\n\n{body}")
    return load_parts([path], cwd=tmp_path)


def refused(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, body)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{tmp_path / 'kvm.cfg'}: ["), message
    return message


# -- config ------------------------------------------------------------------------------------

def test_steps_are_parsed_in_order_and_are_not_parts(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "install.sh").write_text("#!/bin/sh\n")
    (part,) = load(tmp_path, f"[web]\nimage = {IMAGE}\nsetup =\n    packages\n    app\n\n"
                             "[packages]\nrun =\n    dpkg -i /tmp/debs/*.deb\n    systemctl enable nginx\n\n"
                             "[app]\ncopy = app/ /srv/app/\nscript = install.sh\ntimeout = 60\n")
    packages, app = part.setup
    lines = "dpkg -i /tmp/debs/*.deb\nsystemctl enable nginx"
    assert packages == SetupStep("packages", (), lines, None, 3600)
    assert app == SetupStep("app", (Copy(tmp_path / "app", "/srv/app/"),), None, tmp_path / "install.sh", 60)


def test_a_setup_part_gets_a_task_per_step_and_an_export(tmp_path: Path) -> None:
    (part,) = load(tmp_path, f"[web]\nimage = {IMAGE}\nsetup =\n    one\n    two\n\n"
                             "[one]\nrun = true\n\n[two]\nrun = true\n")
    names = [f"{task['basename']}:{task['name']}" for task in part_tasks(part)]
    assert "setup:web:one" in names and "setup:web:two" in names
    assert "export:web" in names
    export = next(task for task in part_tasks(part) if task["basename"] == "export")
    assert export["task_dep"] == ["provision:web"]
    (plain,) = load(tmp_path, f"[web]\nimage = {IMAGE}\n")
    assert not any(task["basename"] in ("setup", "export") for task in part_tasks(plain))


def test_a_step_list_is_shared_with_macros_and_extended(tmp_path: Path) -> None:
    parts = load(tmp_path, f"[base]\nimage = {IMAGE}\nsetup = one\n\n"
                           "[web]\n<= base\nsetup += two\n\n[db]\n<= base\n\n"
                           "[one]\nrun = true\n\n[two]\nrun = echo ${one:run}\n")
    steps = {part.name: [(step.name, step.run) for step in part.setup] for part in parts}
    assert steps == {"base": [("one", "true")], "web": [("one", "true"), ("two", "echo true")],
                     "db": [("one", "true")]}


@pytest.mark.parametrize(("body", "says"), [
    ("[vm]\nimage = I\nsetup = nope\n", "[vm] setup = 'nope': no section [nope]"),
    ("[vm]\nimage = I\nsetup = s\n[s]\ncopy = a /x\n", "[s] a setup step needs run"),
    ("[vm]\nimage = I\nsetup = s\n[s]\nrun = true\nscript = f.sh\n", "[s] set run or script, not both"),
    ("[vm]\nimage = I\nsetup = s\n[s]\nrun = true\ncopy = missing /x\n", "[s] copy = 'missing /x': "),
    ("[vm]\nimage = I\nsetup = s\n[s]\nrun = true\ncopy = f.sh x/y\n", "must be absolute"),
    ("[vm]\nimage = I\nsetup = s\n[s]\nrun = true\ncopy = f.sh\n", "one `LOCAL GUESTPATH` per line"),
    ("[vm]\nimage = I\nsetup = s\n[s]\nscript = none.sh\n", "[s] script = 'none.sh': "),
    ("[vm]\nimage = I\nsetup = s\n[s]\nrun = true\ntimeout = soon\n", "[s] timeout = 'soon'"),
    ("[vm]\nimage = I\nsetup = s\n[s]\nrun = true\nimage = x\n", "[s] unknown option 'image'"),
    ("[vm]\nimage = I\nsetup = s\noverlay = false\n[s]\nrun = true\n", "needs overlay = true"),
    ("[vm]\nimage = I\nsetup = s\nkvm_snapshot = true\n[s]\nrun = true\n", "needs kvm_snapshot = false"),
    ("[vm]\nimage = I\nsetup = s\n    s\n[s]\nrun = true\n", "a step is named once"),
])
def test_bad_steps_are_one_line(tmp_path: Path, body: str, says: str) -> None:
    (tmp_path / "f.sh").write_text("#!/bin/sh\n")
    message = refused(tmp_path, body.replace("image = I", f"image = {IMAGE}"))
    assert says in message, message


def test_a_block_device_part_cannot_have_setup(tmp_path: Path) -> None:
    backing = tmp_path / "disk.raw"
    backing.write_bytes(b"\0" * (1 << 20))
    with loop_device(backing) as device:
        message = refused(tmp_path, f"[vm]\nfile = {device}\noverlay = true\nsetup = s\n[s]\nrun = true\n")
    assert "[vm] setup cannot set up a block device" in message


# -- keys --------------------------------------------------------------------------------------

def _steps(tmp_path: Path) -> tuple[SetupStep, Path]:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a").write_text("a")
    (tree / "sub" / "b").write_text("b")
    return SetupStep("s", (Copy(tree, "/srv"),), "make", None, 3600), tree


def test_a_key_depends_on_the_steps_inputs_only(tmp_path: Path) -> None:
    step, tree = _steps(tmp_path)
    parent = key.base_key("0" * 64, None, None)
    first = key.step_key(parent, step)
    assert first == key.step_key(parent, dataclasses.replace(step, name="other", timeout=5))
    assert len(first) == 64 and int(first, 16) >= 0
    changed = {
        "parent": key.step_key(key.base_key("1" * 64, None, None), step),
        "disk_size": key.step_key(key.base_key("0" * 64, "2G", None), step),
        "user": key.step_key(key.base_key("0" * 64, None, "debian"), step),
        "run": key.step_key(parent, dataclasses.replace(step, run="make all")),
        "target": key.step_key(parent, dataclasses.replace(step, copies=(Copy(tree, "/opt"),))),
    }
    (tree / "sub" / "b").write_text("B")
    changed["bytes"] = key.step_key(parent, step)
    (tree / "sub" / "b").chmod(0o600)
    changed["mode"] = key.step_key(parent, step)
    (tree / "sub" / "b").rename(tree / "sub" / "c")
    changed["name"] = key.step_key(parent, step)
    script = tmp_path / "s.sh"
    script.write_text("echo 1\n")
    changed["script"] = key.step_key(parent, dataclasses.replace(step, run=None, script=script))
    script.write_text("echo 2\n")
    changed["script bytes"] = key.step_key(parent, dataclasses.replace(step, run=None, script=script))
    assert len({first, *changed.values()}) == len(changed) + 1, changed


def test_two_parts_of_two_projects_get_the_same_keys(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 65536)
    keys = []
    for project in ("one", "two"):
        folder = tmp_path / project
        folder.mkdir()
        (folder / "go.sh").write_text("#!/bin/sh\necho go\n")
        parts = load(folder, f"[buildout]\n\n[a]\nfile = {image}\noverlay = true\nssh_port = 2{len(keys)}22\n"
                             f"setup = s\n\n[b]\n<= a\nkvm_memory = 2G\nlocation = {folder}/b\n\n"
                             "[s]\nscript = go.sh\n")
        keys += [[link.key for link in store.chain(part)] for part in parts]
    assert len({tuple(k) for k in keys}) == 1, keys


# -- the store ---------------------------------------------------------------------------------

def test_an_entry_is_verified_by_its_record_and_its_parent(tmp_path: Path) -> None:
    root = tmp_path / "layers"
    (root / "base-x").mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(root / "base-x" / "image"), "1M"],
                   check=True)
    store._write_json(root / "base-x" / "record.json", {"version": 1, "kind": "base", "sha256": "x",
                                                        "size": 1 << 20})
    link = store.Link("s", "k" * 64, "base-x")
    with store.entry_lock(root, link.key, "a test"):
        assert store.problem(root, link.key, link.parent) == "missing"
        layer = tmp_path / "t" / "layer.qcow2"
        layer.parent.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "../base-x/image",
                        str(layer), "1M"], check=True)
        sha = store.digest.hash_file(layer, {"sha256"})["sha256"]
        store.insert(root, link, layer, sha, "/b::vm")
        assert store.problem(root, link.key, link.parent) is None
    entry = root / link.key
    record = json.loads((entry / "record.json").read_text())
    assert record["parent"] == "base-x" and record["step"] == "s" and record["sha256"] == sha
    assert record["used_by"].keys() == {"/b::vm"} and record["parent_sha256"] == "x"
    assert oct((entry / "layer.qcow2").stat().st_mode & 0o777) == "0o444"
    assert store.backing_file(entry / "layer.qcow2") == "../base-x/image"
    store.mark_used(root, link.key, "/c::db")
    assert json.loads((entry / "record.json").read_text())["used_by"].keys() == {"/b::vm", "/c::db"}
    # Changed bytes (a new mtime): hashed again and refused.
    os.chmod(entry / "layer.qcow2", 0o644)
    with open(entry / "layer.qcow2", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff")
    assert "has sha256" in (store.problem(root, link.key, link.parent) or "")
    # A parent made again outdates its children.
    store._write_json(root / "base-x" / "record.json", {"version": 1, "kind": "base", "sha256": "y",
                                                        "size": 1 << 20})
    assert "was made again" in (store.problem(root, link.key, link.parent) or "")
    assert "names parent" in (store.problem(root, link.key, "base-z") or "")


def test_the_layers_root_follows_the_download_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (part,) = load(tmp_path, f"[vm]\nimage = {IMAGE}\n")
    assert part.buildout.download_cache is not None
    assert store.layers_root(part) == part.buildout.download_cache / "layers"
    off = dataclasses.replace(part, buildout=dataclasses.replace(part.buildout, download_cache=None))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.layers_root(off) == tmp_path / "xdg" / "kvmtasks" / "layers"


def test_the_builder_is_a_part_of_its_own(tmp_path: Path) -> None:
    (part,) = load(tmp_path, f"[vm]\nimage = {IMAGE}\ncloud_init = true\nssh_port = 2222\n"
                             "kvm_redir = tcp:8080::80\nsetup = s\n[s]\nrun = true\n")
    builder = builder_part(part, tmp_path / "tmp-x", tmp_path / "below", 4444)
    assert builder.name == "vm-builder" and builder.state_directory == part.state_directory / "vm-builder"
    assert builder.ssh_port == 4444 and builder.kvm_redir == () and builder.ssh_key_path is None
    assert builder.cloud_init_hostname != part.cloud_init_hostname and builder.setup == ()
    assert builder.boot_disk.parent == tmp_path / "tmp-x"


def test_copies_keep_modes_and_land_at_their_guest_paths(tmp_path: Path) -> None:
    step, tree = _steps(tmp_path)
    (tree / "a").chmod(0o750)
    one = tmp_path / "one.txt"
    one.write_text("1")
    step = dataclasses.replace(step, copies=(*step.copies, Copy(one, "/etc/x/"), Copy(one, "/etc/y.txt")))
    _archive(step, tmp_path / "c.tar")
    import tarfile

    with tarfile.open(tmp_path / "c.tar") as tar:
        members = {m.name: (m.mode, m.uid) for m in tar.getmembers()}
    assert members == {"srv/a": (0o750, 0), "srv/sub": (0o755, 0), "srv/sub/b": (0o644, 0),
                       "etc/x/one.txt": (0o644, 0), "etc/y.txt": (0o644, 0)}
