"""virsh's errors, classified once: the real virsh against libvirt's built-in test driver
(test:///default, no daemon), so no guest and no libvirtd are needed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.engines.libvirt.virsh import VirshError, virsh
from kvmtasks.engines.running import current


def load(tmp_path: Path, name: str) -> Part:
    path = tmp_path / "kvm.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n\n[{name}]\nfile = disk.img\n"
                    "kvm_engine = libvirt\n")
    (part,) = load_file(path, tmp_path)
    # A config accepts only QEMU URIs; the test driver is set past the parser.
    return replace(part, libvirt_uri="test:///default")


def test_a_missing_domain_is_not_found(tmp_path: Path) -> None:
    part = load(tmp_path, "nosuch")
    with pytest.raises(VirshError) as raised:
        virsh(part, "domstate", part.name)
    assert raised.value.not_found and not raised.value.not_running
    assert str(raised.value).startswith("virsh domstate on test:///default: ")


def test_a_missing_volume_is_not_found(tmp_path: Path) -> None:
    part = load(tmp_path, "nosuch")
    with pytest.raises(VirshError) as raised:
        virsh(part, "vol-info", "--pool", "default-pool", "nosuch")
    assert raised.value.not_found


def test_a_domain_kvmtasks_started_and_that_is_gone_is_stopped(tmp_path: Path) -> None:
    """The run file says kvmtasks started it; libvirt no longer knows it: stopped, no error."""
    part = load(tmp_path, "nosuch")
    files = RunFiles.of(part)
    files.domain.parent.mkdir(parents=True)
    files.domain.write_text("{}")
    assert not current(part).running
    assert not files.domain.exists()


def test_the_test_drivers_domain_runs(tmp_path: Path) -> None:
    part = load(tmp_path, "test")
    assert virsh(part, "domstate", part.name).strip() == "running"
