"""``PART-ctl destroy`` and ``doit destroy:PART``, as ``vagrant destroy``: the VM stopped,
then everything the part made for its machine removed, and said.

Removed: the overlay (and the named snapshots in it), the seed, the keys and known_hosts
kvmtasks made, a suspended state, the run files, the console logs, the ssh config file, and
what each engine keeps of its own (libvirt: the domain kvmtasks defined, the part's volumes).
Kept: the download cache, the verified image (shared, or the VM's own disk with overlay =
false), a ``file`` of the user's, an ``ssh_key_path`` of the user's, the scripts and
part.json (``doit start:PART`` builds the machine again from them), and the known_hosts
of a remote libvirt host, which outlives the part.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvmtasks.config import seedrules
from kvmtasks.config.options import Engine
from kvmtasks.config.part import Part
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.engines import engine
from kvmtasks.engines.statusreport import State
from kvmtasks.guest import connection, sshconfig
from kvmtasks.provision import keys, overlay

Say = Callable[[str], None]


def machine_files(part: Part) -> list[Path]:
    """The local files of the part's machine that both engines make."""
    files = RunFiles.of(part)
    made = [files.known_hosts, files.console_log, files.console_log.with_name(files.console_log.name + ".1"),
            files.accel, files.first_boot, sshconfig.path(part), seedrules.seed_path(part),
            seedrules.host_key_path(part), keys.public_path(seedrules.host_key_path(part))]
    if part.ssh_key_path is None:  # the key pair kvmtasks made; never a key of the user's
        generated = seedrules.generated_key_path(part)
        made += [generated, keys.public_path(generated)]
    if part.overlay:
        made += [part.overlay_path, overlay.record_path(part)]
    made.append(part.varstore_path)  # UEFI's variables, the part's own (with or without overlay)
    return made


def remove(paths: list[Path], say: Say) -> int:
    """Remove the files that exist; say each one. How many went."""
    count = 0
    for path in paths:
        if path.is_file() or path.is_symlink() or path.is_socket():
            path.unlink()
            say(f"  removed {path}")
            count += 1
    return count


def _engine_own(part: Part) -> Callable[[Part, Say], int]:
    """What the part's engine removes of its own (imported here: a script loads one engine)."""
    if part.kvm_engine is Engine.LIBVIRT:
        from kvmtasks.engines.libvirt.destroy import remove_own as libvirt_own
        return libvirt_own
    from kvmtasks.engines.qemu.destroy import remove_own as qemu_own
    return qemu_own


def destroy(part: Part, say: Say = print) -> None:
    if engine.facts(part).state is not State.STOPPED:
        engine.stop(part, say)  # a suspended VM's saved state is discarded on the way
    connection.close(part)  # a master a tool opened through the ssh config
    say(f"{part.name}: destroying its machine")
    count = _engine_own(part)(part, say) + remove(machine_files(part), say)
    if not part.overlay:
        say(f"  kept {part.image_path}: with overlay = false it is the VM's disk and the verified image")
    say(f"{part.name} destroyed ({count} removed); doit start:{part.name} makes it again"
        if count else f"{part.name}: nothing of its machine was left to remove")
