"""export: a chain of layers flattened into one compressed qcow2 and its SHA256SUMS; the export
booted as another part's image, downloaded over HTTP and checked against that list."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.errors import CommandFailed, ProvisionError
from kvmtasks.graph import layertasks
from kvmtasks.layers import export
from tests.conftest import Project
from tests.httpserver import FileServer
from tests.layerchain import add_base, add_layer, entry_file, make_chain
from tests.vmfixtures import Guest, free_port, needs_qemu

pytestmark = needs_qemu
MiB = 1 << 20


def info(path: Path) -> dict[str, object]:
    done = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True,
                          check=True)
    data: dict[str, object] = json.loads(done.stdout)
    return data


def same_content(first: Path, second: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", str(first), str(second)], capture_output=True, text=True,
                          check=False)


def test_a_chain_exports_to_one_compressed_qcow2_listed_in_sha256sums(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(MiB) + bytes(7 * MiB))
    root = tmp_path / "layers"
    entries = [add_base(root, base)]
    for number in range(1, 4):  # each layer writes its own pattern, the last over the first's
        offset = (number % 3) * MiB
        writes = [(0x10 + number, offset, MiB), (0x20 + number, 4 * MiB + number, 512)]
        entries.append(add_layer(root, entries[-1], f"step{number}", writes=writes))
    top = entry_file(root, entries[-1])
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / export.SUMS).write_text(f"{'0' * 64}  other.img\n{'1' * 64}  guest.qcow2\n")
    said: list[str] = []

    written = export.export(top, folder / "guest.qcow2", said.append)

    assert written == folder / "guest.qcow2"
    assert same_content(top, written).returncode == 0, same_content(top, written).stdout
    details = info(written)
    assert details["format"] == "qcow2" and "backing-filename" not in details
    check = subprocess.run(["qemu-img", "check", "--output=json", str(written)], capture_output=True,
                           text=True, check=True)
    assert json.loads(check.stdout)["compressed-clusters"] > 0
    sha256 = hashlib.sha256(written.read_bytes()).hexdigest()
    # The other file's line stays; ours is replaced; sha256sum reads the list as a user's would.
    assert (folder / export.SUMS).read_text() == f"{'0' * 64}  other.img\n{sha256}  guest.qcow2\n"
    verified = subprocess.run(["sha256sum", "-c", "--ignore-missing", export.SUMS], cwd=folder,
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0 and "guest.qcow2: OK" in verified.stdout
    assert sorted(path.name for path in folder.iterdir()) == [export.SUMS, "guest.qcow2"]
    assert said == [f"exported {top} to {written} ({written.stat().st_size} bytes, sha256 {sha256}, "
                    f"listed in {folder / export.SUMS})"]
    # The cached layers were read, never written.
    assert all(entry_file(root, entry).stat().st_mode & 0o777 == 0o444 for entry in entries)


def test_a_failed_export_leaves_the_last_one_and_no_temporary_file(tmp_path: Path) -> None:
    root = tmp_path / "layers"
    base = tmp_path / "base.img"
    base.write_bytes(bytes(MiB))
    top = entry_file(root, add_layer(root, add_base(root, base), "step1", writes=[(0x41, 0, 4096)]))
    folder = tmp_path / "out"
    export.export(top, folder / "vm.qcow2", lambda line: None)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    with pytest.raises(ProvisionError) as missing:
        export.export(tmp_path / "nowhere" / "layer.qcow2", folder / "vm.qcow2", lambda line: None)
    assert str(missing.value) == f"cannot export {tmp_path / 'nowhere' / 'layer.qcow2'}: no such layer"
    # A layer whose parent is gone: qemu-img fails; one line names the layer.
    (root / add_base(root, base) / "image").unlink()
    with pytest.raises(CommandFailed) as broken:
        export.export(top, folder / "vm.qcow2", lambda line: None)
    assert f"exporting {top}" in str(broken.value) and "\n" not in str(broken.value), str(broken.value)

    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_the_export_task_runs_again_only_for_a_new_top_layer_or_a_changed_export(tmp_path: Path) -> None:
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[web]\nimage = http://127.0.0.1:9/web.img\n")
    (part,) = load_file(config, tmp_path)
    root = tmp_path / "layers"
    base = tmp_path / "base.img"
    base.write_bytes(bytes(MiB))
    first = add_layer(root, add_base(root, base), "step1", writes=[(0x41, 0, 4096)])
    second = add_layer(root, first, "step2", writes=[(0x42, 4096, 4096)])
    top = {"path": entry_file(root, first)}
    task = layertasks.export_task(part, lambda part: top["path"])

    assert (task["basename"], task["name"], task["task_dep"]) == ("export", "web", ["provision:web"])
    assert task["targets"] == [str(tmp_path / "parts" / "web" / "export" / "web.qcow2"),
                               str(tmp_path / "parts" / "web" / "export" / "SHA256SUMS")]
    (uptodate,) = task["uptodate"]
    assert not uptodate()
    (action,) = task["actions"]
    assert action() is None
    assert uptodate()
    assert same_content(entry_file(root, first), export.export_path(part)).returncode == 0
    top["path"] = entry_file(root, second)  # a step changed: a new top layer
    assert not uptodate()
    assert action() is None and uptodate()
    assert same_content(entry_file(root, second), export.export_path(part)).returncode == 0
    os.utime(export.export_path(part), (1, 1))  # the export touched by hand
    assert not uptodate()
    top["path"] = tmp_path / "missing" / "layer.qcow2"
    failed = action()
    assert failed is not None and str(failed).strip().endswith(f"cannot export {top['path']}: no such layer")


@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_an_export_boots_as_another_parts_image(project: Project, guest: Guest, http_server: FileServer,
                                                tmp_path: Path) -> None:
    root = tmp_path / "layers"
    steps = [{"step1.txt": b"one\n"}, {"step2.txt": b"two\n"}, {"step3.txt": b"three\n", "step1.txt": b"1\n"}]
    entries = make_chain(root, guest.image.path, steps)
    top = entry_file(root, entries[-1])
    published = tmp_path / "published"

    exported = export.export(top, published / "setup.qcow2", lambda line: None)

    assert same_content(top, exported).returncode == 0
    url = http_server.put("/setup.qcow2", exported.read_bytes())
    sums = http_server.put("/SHA256SUMS", (published / export.SUMS).read_bytes())
    project.write(
        f"[vm]\nimage = {url}\nsha256_download = {sums}\nssh_port = {free_port()}\n"
        f"ssh_key_path = {guest.key}\nkvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 120\n"
        "kvm_shutdown_timeout = 3\n"
    )
    started = project.run("start:vm", timeout=300)
    try:
        assert started.returncode == 0, started.describe()
        assert {"checksums:vm", "download:vm", "verify-download:vm", "start:vm"} <= started.executed
        env = {**os.environ, "HOME": str(project.root / "home")}
        seen = subprocess.run([str(project.root / "bin" / "vm-runscript"),
                               "cat /mnt/step1.txt /mnt/step2.txt /mnt/step3.txt"],
                              capture_output=True, text=True, timeout=60, check=False, env=env)
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout == "1\ntwo\nthree\n"  # every layer's files, the last one's write on top
    finally:
        stopped = project.run("stop:vm", timeout=120)
    assert stopped.returncode == 0, stopped.describe()
