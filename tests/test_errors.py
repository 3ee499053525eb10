"""The error classes: one per layer, the root never raised itself, details read one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvmtasks
from kvmtasks.config.loader import load_file
from kvmtasks.engines import ports
from kvmtasks.errors import CommandFailed, KvmTasksError, ProvisionError, VerifyError, VmError

PACKAGE = Path(kvmtasks.__file__).parent


def _root_made(path: Path, base: Path = PACKAGE.parent) -> list[str]:
    """Where path builds a KvmTasksError itself (raised, or kept to raise later)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name == "KvmTasksError":
                found.append(f"{path.relative_to(base)}:{node.lineno}")
    return found


def test_no_module_raises_the_root_class_itself() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50  # the walk sees the package
    made = [where for path in modules for where in _root_made(path)]
    assert made == [], "raise the layer's class (ConfigError, ProvisionError, VmError, ...) instead"


def test_the_walk_sees_a_direct_raise_and_a_kept_one(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("from kvmtasks import errors\nfrom kvmtasks.errors import KvmTasksError\n\n"
                       "def f() -> None:\n    raise errors.KvmTasksError('x')\n\n"
                       "def g() -> None:\n    failure = KvmTasksError('y')\n    raise failure\n\n"
                       "def h() -> None:\n    raise errors.VmError('z')\n")
    assert _root_made(planted, tmp_path) == ["planted.py:5", "planted.py:8"]


def test_layers_are_subclasses_and_details_live_on_the_root() -> None:
    assert issubclass(VerifyError, ProvisionError) and issubclass(ProvisionError, KvmTasksError)
    assert VmError("m").details == "" and ProvisionError("m", "more").details == "more"
    assert VmError("qemu failed", "--- log ---\nline").report("start:vm") == (
        "start:vm: qemu failed\n--- log ---\nline")
    assert CommandFailed("x exited 1", 1, "", "").report("vm-ctl") == "vm-ctl: x exited 1"


def test_a_shared_port_lock_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[vm]\nfile = disk.img\n")
    (part,) = load_file(config, tmp_path)
    (tmp_path / "not-a-folder").write_text("")
    clash = ports.Clash("tcp", 2222, (), tmp_path / "not-a-folder" / "tcp-2222.lock")
    refused = r"^cannot open the shared port's lock .*tcp-2222.lock: "
    with pytest.raises(VmError, match=refused), ports.claimed(part, [clash]):
        pass


def test_virsh_errors_are_classified_once() -> None:
    from kvmtasks.engines.libvirt.virsh import VirshError

    gone = VirshError("virsh domstate on qemu:///system: failed to get domain 'vm'",
                      "Domain not found: no domain with matching name 'vm'")
    stopped = VirshError("virsh destroy on qemu:///system: ...",
                         "Requested operation is not valid: domain is not running")
    assert (gone.not_found, gone.not_running) == (True, False)
    assert (stopped.not_found, stopped.not_running) == (False, True)
    assert isinstance(gone, VmError)
