"""Buildout's syntax: <= macros, += and -=, ${:option}, a lone $, [buildout] parts, across extends."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmtasks.config.loader import load_parts
from kvmtasks.config.part import Part
from kvmtasks.errors import ConfigError

IMAGE = "http://127.0.0.1:9/images/disk.img"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, body: str, name: str = "kvm.cfg") -> dict[str, Part]:
    path = write(tmp_path / name, f"[buildout]\ndirectory = {tmp_path}\n{body}")
    return {part.name: part for part in load_parts([path], cwd=tmp_path)}


def error(tmp_path: Path, body: str) -> str:
    path = write(tmp_path / "bad.cfg", f"[buildout]\ndirectory = {tmp_path}\n{body}")
    with pytest.raises(ConfigError) as raised:
        load_parts([path], cwd=tmp_path)
    message = str(raised.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{path}: ["), message
    return message


# -- <= SECTION ---------------------------------------------------------------------------------

def test_a_macro_copies_the_options_then_the_section_overrides_them(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""
[base]
recipe = erp5.recipe.kvm
image = {IMAGE}
kvm_memory = 1G
kvm_smp = 2

[vm]
<= base
kvm_memory = 2G
""")

    vm = parts["vm"]
    assert (vm.image, vm.kvm_memory, vm.kvm_smp) == (IMAGE, "2G", 2)
    assert parts["base"].kvm_memory == "1G"  # the macro itself is unchanged


def test_macros_chain_and_several_apply_in_order(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""parts = vm

[small]
kvm_memory = 256M
kvm_smp = 3

[disk]
image = {IMAGE}
kvm_memory = 1G

[tiny]
<= disk
kvm_smp = 1

[vm]
<= tiny
  small
""")

    vm = parts["vm"]
    assert (vm.image, vm.kvm_memory, vm.kvm_smp) == (IMAGE, "256M", 3)


def test_references_in_a_macro_are_read_in_the_section_that_uses_it(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""parts = vm

[template]
image = {IMAGE}
location = ${{buildout:directory}}/disks/${{:kvm_graphic}}

[vm]
<= template
kvm_graphic = std
""")

    assert parts["vm"].location == tmp_path / "disks" / "std"


@pytest.mark.parametrize(("body", "needles"), [
    ("[vm]\n<= nowhere\nimage = x\n", ["[vm] <= 'nowhere'", "no section [nowhere]"]),
    ("[a]\n<= b\n[b]\n<= c\n[c]\n<= a\nimage = x\n", ["circular section extension", "a <= b <= c <= a"]),
    ("[vm]\n<= vm\nimage = x\n", ["circular section extension: vm <= vm"]),
])
def test_a_bad_macro_is_one_line(tmp_path: Path, body: str, needles: list[str]) -> None:
    message = error(tmp_path, body)

    for needle in needles:
        assert needle in message


# -- += and -= ----------------------------------------------------------------------------------

def test_add_and_remove_lines_in_the_same_section(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""
[vm]
image = {IMAGE}
kvm_extra_args =
  -no-reboot
  -nodefaults
kvm_extra_args += -S
kvm_extra_args -= -nodefaults
""")

    assert parts["vm"].kvm_extra_args == ("-no-reboot", "-S")


def test_add_and_remove_across_extends(tmp_path: Path) -> None:
    write(tmp_path / "base.cfg", f"""
[vm]
image = {IMAGE}
kvm_net =
  user,restrict=on
  nic,model=e1000
kvm_extra_args = -no-reboot
""")
    parts = load(tmp_path, """extends = base.cfg

[vm]
kvm_net -= nic,model=e1000
kvm_net += nic,model=virtio-net-pci
kvm_extra_args +=
  -S
  -nodefaults
""")

    vm = parts["vm"]
    assert vm.kvm_net == ("user,restrict=on", "nic,model=virtio-net-pci")
    assert vm.kvm_extra_args == ("-no-reboot", "-S", "-nodefaults")


def test_removes_and_adds_apply_in_the_order_of_the_files(tmp_path: Path) -> None:
    write(tmp_path / "base.cfg", f"[template]\nimage = {IMAGE}\nkvm_extra_args = -S\n"
                                 "[vm]\n<= template\nkvm_extra_args -= -S\n")
    parts = load(tmp_path, "extends = base.cfg\nparts = vm\n[vm]\nkvm_extra_args += -S\n")

    # zc.buildout: the += applies to [vm] as base.cfg left it (-= of nothing: empty), before the
    # macro is read; that value then replaces the macro's.
    assert parts["vm"].kvm_extra_args == ()


def test_add_with_nothing_to_add_to_is_the_value(tmp_path: Path) -> None:
    parts = load(tmp_path, f"[vm]\nimage = {IMAGE}\nkvm_extra_args += -S\nkvm_net -= user\n")

    assert (parts["vm"].kvm_extra_args, parts["vm"].kvm_net) == (("-S",), ())


def test_add_and_remove_apply_to_a_macros_value(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""
[template]
image = {IMAGE}
kvm_extra_args =
  -no-reboot
  -nodefaults

[vm]
<= template
kvm_extra_args += -S
kvm_extra_args -= -no-reboot
""")

    assert parts["vm"].kvm_extra_args == ("-nodefaults", "-S")
    assert parts["template"].kvm_extra_args == ("-no-reboot", "-nodefaults")


def test_add_in_an_extending_file_does_not_reach_the_macro_of_the_base_file(tmp_path: Path) -> None:
    write(tmp_path / "base.cfg", f"""
[template]
image = {IMAGE}
kvm_extra_args = -no-reboot

[vm]
<= template
""")
    parts = load(tmp_path, "extends = base.cfg\n\n[vm]\nkvm_extra_args += -S\n")

    # As zc.buildout: [vm] had no kvm_extra_args in base.cfg, so += starts from nothing.
    assert parts["vm"].kvm_extra_args == ("-S",)


def test_an_operator_without_an_option_is_one_line(tmp_path: Path) -> None:
    assert "+= needs an option name" in error(tmp_path, f"[vm]\nimage = {IMAGE}\n+= -S\n")


def test_add_to_a_single_line_option_names_it(tmp_path: Path) -> None:
    message = error(tmp_path, f"[vm]\nimage = {IMAGE}\nkvm_memory = 1G\nkvm_memory += 2G\n")

    assert "[vm] kvm_memory = '1G\\n2G': must be a size" in message


# -- ${:option}, $$ and a lone $ ----------------------------------------------------------------

def test_same_section_references(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""
[vm]
image = {IMAGE}
kvm_graphic = std
kvm_extra_args = -name ${{:kvm_graphic}}-${{vm:kvm_graphic}}-${{:_buildout_section_name_}}
""")

    assert parts["vm"].kvm_extra_args == ("-name std-std-vm",)


def test_dollars_reach_the_part_as_buildout_hands_them_to_a_recipe(tmp_path: Path) -> None:
    body = "kvm_smp = 1\nkvm_extra_args =\n  a$b\n  $\n  $$HOME\n  x$$${:kvm_smp}$\n  $${:kvm_smp}\n  ${:x\n"
    parts = load(tmp_path, f"[vm]\nimage = {IMAGE}\n{body}")

    # $$ stays $$ (so $${...} is no substitution); a ${ without } is text.
    assert parts["vm"].kvm_extra_args == ("a$b", "$", "$$HOME", "x$$1$", "$${:kvm_smp}", "${:x")


@pytest.mark.parametrize(("value", "needle"), [
    ("${vm:kvm_graphic}", "circular reference: ${vm:kvm_graphic} -> ${vm:kvm_graphic}"),
    ("${a:b:c}", "substitution ${a:b:c} has too many colons"),
    ("${:}", "substitution ${:} has invalid characters"),
    ("${kvm_smp}", "substitution ${kvm_smp} has no colon; write ${:kvm_smp}"),
    ("${:a/b}", "the section name in substitution ${:a/b} has invalid characters"),
    ("${:nothing}", "substitution ${:nothing}: no option 'nothing' in [vm]"),
    ("${ghost:x}", "no section [ghost]"),
])
def test_a_bad_reference_is_one_line_naming_the_option(tmp_path: Path, value: str, needle: str) -> None:
    message = error(tmp_path, f"[vm]\nimage = {IMAGE}\nkvm_graphic = {value}\n")

    assert f"[vm] kvm_graphic = {value!r}: " in message
    assert needle in message


# -- [buildout] parts ---------------------------------------------------------------------------

def test_buildout_parts_selects_the_parts(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""parts =
  second
  other

[first]
image = {IMAGE}

[second]
recipe = erp5.recipe.kvm
image = {IMAGE}

[other]
recipe = zc.recipe.egg
""")

    assert list(parts) == ["second"]


def test_a_listed_section_that_is_missing_is_one_line(tmp_path: Path) -> None:
    message = error(tmp_path, f"parts = vm ghost\n[vm]\nimage = {IMAGE}\n")

    assert "[buildout] parts = 'vm ghost': no section [ghost]" in message


def test_a_listed_section_that_is_no_vm_says_what_it_lacks(tmp_path: Path) -> None:
    assert "[notes] needs an image URL or a file" in error(tmp_path, "parts = notes\n[notes]\nkvm_smp = 2\n")


# -- all together -------------------------------------------------------------------------------

def test_a_macro_extended_with_add_in_a_listed_part_across_extends(tmp_path: Path) -> None:
    write(tmp_path / "base.cfg", f"""
[buildout]
parts = vm-template

[vm-template]
recipe = erp5.recipe.kvm
image = {IMAGE}
kvm_memory = 1G
kvm_net = user,restrict=on
kvm_extra_args =
  -no-reboot
  -nodefaults
""")
    parts = load(tmp_path, """extends = base.cfg
parts = web db

[web]
<= vm-template
kvm_extra_args += -name ${:ssh_user}$
kvm_extra_args -= -nodefaults
ssh_user = www

[db]
<= web
kvm_memory = 2G
kvm_net += nic,model=virtio-net-pci
""")

    assert list(parts) == ["web", "db"]
    web, db = parts["web"], parts["db"]
    assert (web.image, web.kvm_memory) == (IMAGE, "1G")
    assert web.kvm_extra_args == db.kvm_extra_args == ("-no-reboot", "-name www$")
    assert db.kvm_memory == "2G"
    assert db.kvm_net == ("user,restrict=on", "nic,model=virtio-net-pci")


def test_a_location_copied_by_a_macro_to_two_parts_is_one_line(tmp_path: Path) -> None:
    message = error(tmp_path, f"[a]\nimage = {IMAGE}\nlocation = shared\n[b]\n<= a\n")

    assert f"[b] location = '{tmp_path}/shared': part a uses {tmp_path}/shared/disk.img too" in message


# -- options of the user's own ------------------------------------------------------------------

def test_an_option_of_your_own_is_accepted_when_a_substitution_uses_it(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""parts = vm db

[sizes]
big = 2G

[tpl]
image = {IMAGE}
kvm_extra_args = -name ${{:label}}

[vm]
<= tpl
label = web
mirror = 127.0.0.1:9
kvm_memory = ${{sizes:big}}

[db]
<= tpl
label = ${{vm:mirror}}
""")

    assert parts["vm"].kvm_extra_args == ("-name web",)
    assert parts["vm"].kvm_memory == "2G"
    assert parts["db"].kvm_extra_args == ("-name 127.0.0.1:9",)


def test_an_option_a_section_copying_the_part_uses_is_accepted(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""
[vm]
image = {IMAGE}
label = web
location = ${{:_buildout_section_name_}}

[vm2]
<= vm
kvm_extra_args = -name ${{:label}}
""")

    assert parts["vm2"].kvm_extra_args == ("-name web",)
    assert parts["vm"].kvm_extra_args == ()


@pytest.mark.parametrize(("body", "needle"), [
    ("kvm_memroy = 1G", "[vm] unknown option 'kvm_memroy'; did you mean `kvm_memory`?"),
    ("ssh_prot = 2222", "did you mean `ssh_port`?"),
    ("colour = blue", "[vm] unknown option 'colour' (an option of your own is accepted when a ${:colour}"),
    # Used only by another section's own ${:label}: not this one's.
    ("label = x\n[other]\nlabel = y\nname = ${:label}", "[vm] unknown option 'label'"),
])
def test_an_unused_unknown_option_is_refused_naming_the_closest(tmp_path: Path, body: str,
                                                                  needle: str) -> None:
    assert needle in error(tmp_path, f"[vm]\nimage = {IMAGE}\n{body}\n")


# -- blank and comment lines inside values --------------------------------------------------------

def test_blank_and_comment_lines_inside_a_value(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""
[vm]
image = {IMAGE}
kvm_extra_args =
  -no-reboot

# the next one stops at the first instruction
  -S
; and this one
  -nodefaults
kvm_memory = 1G
""")

    assert parts["vm"].kvm_extra_args == ("-no-reboot", "-S", "-nodefaults")
    assert parts["vm"].kvm_memory == "1G"


# -- conditional sections ---------------------------------------------------------------------

def test_conditional_sections_apply_when_their_expression_holds(tmp_path: Path) -> None:
    parts = load(tmp_path, f"""
[vm]
image = {IMAGE}
kvm_extra_args = -S

[vm:sys.platform.startswith('linux')]
kvm_memory = 1G

[vm:windows or macosx]
kvm_memory = 4G

[vm:python_version >= "3.8" and os_name == "posix"]
kvm_extra_args += -no-reboot

[vm:python2]
kvm_smp = 8
""")

    vm = parts["vm"]
    assert (vm.kvm_memory, vm.kvm_smp, vm.kvm_extra_args) == ("1G", 1, ("-S", "-no-reboot"))


@pytest.mark.parametrize(("expression", "needle"), [
    ("os.system('touch x')", "os.system is not evaluated by kvmtasks"),
    ("__import__('os')", "unknown name '__import__'"),
    ("sys.__class__", "private attribute '__class__'"),
    ("(lambda: 1)()", "is not evaluated by kvmtasks"),
    ("open('/etc/passwd')", "unknown name 'open'"),
    ("platform.sys", "platform.sys is not evaluated by kvmtasks"),
    ("nothing_known", "unknown name 'nothing_known'"),
    ("linux and (", "not a Python expression nor an environment marker"),
    ('python_version ~= "3.8"', "kvmtasks compares release versions"),
    ("1/0", "ZeroDivisionError"),
    ("'{0.__class__}'.format(sys)", "calling '{0.__class__}'.format is not evaluated"),
    ("os.environ.copy()", "calling os.environ.copy is not evaluated"),
])
def test_an_expression_kvmtasks_does_not_evaluate_is_one_line(tmp_path: Path, expression: str,
                                                                needle: str) -> None:
    canary = tmp_path / "x"
    message = error(tmp_path, f"[vm]\nimage = {IMAGE}\n[vm:{expression}]\nkvm_smp = 2\n")

    assert f"[vm:{expression}]: " in message
    assert needle in message
    assert not canary.exists()


# -- annotate -----------------------------------------------------------------------------------

def test_annotate_names_the_file_and_section_of_each_value(tmp_path: Path) -> None:
    from kvmtasks.config.annotate import annotate

    write(tmp_path / "base.cfg", f"[tpl]\nimage = {IMAGE}\nkvm_extra_args =\n  -S\n  -nodefaults\n")
    path = write(tmp_path / "kvm.cfg", f"""[buildout]
directory = {tmp_path}
extends = base.cfg

[vm]
<= tpl
label = web
kvm_extra_args += -name ${{:label}}
kvm_extra_args -= -S
""")

    lines = annotate(path, tmp_path, "vm")

    assert lines[0] == "[vm]"
    assert lines[lines.index(f"image = {IMAGE}") + 1] == "    base.cfg [tpl]"
    at = lines.index("kvm_extra_args = -nodefaults")
    assert lines[at + 1:at + 5] == [
        "    -name web", "    base.cfg [tpl]", "+=  kvm.cfg [vm]", "-=  kvm.cfg [vm]",
    ]
    assert lines[lines.index("label = web") + 1] == "    kvm.cfg [vm]"
    assert lines[lines.index("kvm_memory = 512M") + 1] == "    (kvmtasks default)"
