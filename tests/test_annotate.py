"""`doit annotate:PART`, a real doit run: the part's options and where each came from."""

from __future__ import annotations

from tests.conftest import Project

IMAGE = "http://127.0.0.1:9/images/disk.img"


def test_doit_annotate_prints_each_option_with_its_file_and_section(project: Project) -> None:
    (project.root / "base.cfg").write_text(f"[tpl]\nimage = {IMAGE}\nkvm_memory = 1G\n")
    project.buildout["extends"] = "base.cfg"
    project.write("[vm]\n<= tpl\nkvm_memory = 2G\nkvm_extra_args += -S\n")

    run = project.run("annotate:vm")

    assert run.returncode == 0, run.describe()
    lines = run.stdout.splitlines()
    assert lines[lines.index(f"image = {IMAGE}") + 1] == "    base.cfg [tpl]"
    assert lines[lines.index("kvm_memory = 2G") + 1] == "    kvm.cfg [vm]"
    # += with nothing before it in the file: buildout's empty first line, then -S.
    at = lines.index("kvm_extra_args =")
    assert lines[at + 1:at + 4] == ["    -S", "    (implicit value)", "+=  kvm.cfg [vm]"]
    assert "ssh_user = root" in lines
    assert not (project.root / "parts").exists(), "annotate provisions nothing"
