"""A part with setup steps on libvirt: its top layer (a hand-made chain, as the layer cache
holds it) reaches the pool flattened into its image volume, once; the guest boots over it."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmtasks.config.loader import load_file
from kvmtasks.engines.libvirt import layervolume
from tests.conftest import Project
from tests.httpserver import FileServer
from tests.layerchain import entry_file, make_chain
from tests.test_libvirt import _virsh, domain_name, libvirt_config, libvirtd, pool
from tests.test_vm_e2e import script
from tests.vmfixtures import Guest, free_port, needs_qemu

__all__ = ["domain_name", "libvirtd", "pool"]  # the fixtures, shared with test_libvirt.py


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_a_setup_parts_top_layer_reaches_the_pool_once_flattened(
        project: Project, guest: Guest, http_server: FileServer, pool: str, domain_name: str,
        tmp_path: Path) -> None:
    name = domain_name
    url = http_server.put("guest.img", guest.image.path.read_bytes())
    config = project.write(libvirt_config(guest, name, f"image = {url}", pool, free_port()))
    provisioned = project.run(f"provision:{name}", timeout=120)
    assert provisioned.returncode == 0, provisioned.describe()
    (part,) = load_file(config, project.root)
    # What a part with setup steps boots: its own overlay over its top layer.
    root = tmp_path / "layers"
    chain = make_chain(root, guest.image.path, [{"one.txt": b"one\n"}, {"two.txt": b"two\n"}])
    top = entry_file(root, chain[-1])
    part.overlay_path.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2",
                    str(part.overlay_path)], check=True)
    assert layervolume.top_layer_of(part) == top

    started = project.run(f"start:{name}", timeout=400)
    try:
        assert started.returncode == 0, started.describe()
        assert f"{name}: flattening its top layer {top.parent.name[:12]} for pool {pool}" in started.stdout
        assert "uploading" in started.stdout
        seen = script(project, f"{name}-runscript", "cat /mnt/one.txt /mnt/two.txt")
        assert (seen.returncode, seen.stdout) == (0, "one\ntwo\n"), seen.stderr
    finally:
        stopped = script(project, f"{name}-ctl", "stop")
    assert stopped.returncode == 0, stopped.stderr

    image = ET.fromstring(_virsh("vol-dumpxml", "--pool", pool, f"{name}-guest.img").stdout)
    overlay = ET.fromstring(_virsh("vol-dumpxml", "--pool", pool, f"{name}.overlay.qcow2").stdout)
    assert image.find("target/format").attrib["type"] == "qcow2"  # type: ignore[union-attr]
    assert overlay.find("backingStore/format").attrib["type"] == "qcow2"  # type: ignore[union-attr]
    # Once per top layer: the next start sends nothing.
    said: list[str] = []
    assert layervolume.ensure_image_volume(part, top, said.append) == "qcow2"
    assert said == []
