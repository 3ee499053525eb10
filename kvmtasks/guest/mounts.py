"""Live shares mounted in the guest over ssh: 9p and virtiofs, by their mount tag.

Every guest gets them the same way, cloud-init or not, at start and again after a resume or
a snapshot restore (which bring back a guest whose mounts were taken down before the save).
"""

from __future__ import annotations

import shlex

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.config.shares import Carrier, Share
from kvmtasks.guest import ssh

# 9p's largest message the guest's virtio transport takes (kernel 6.1): fewer round trips.
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"
TIMEOUT = ssh.CONNECT_TIMEOUT + 60


def mounted_test(guest: str) -> str:
    """The guest shell's test that GUESTDIR is a mount point, as /proc/mounts writes it (no
    mountpoint(1) in busybox builds without it)."""
    escaped = "".join({" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}.get(c, c)
                      for c in guest)
    return f"grep -qF -- {shlex.quote(f' {escaped} ')} /proc/mounts"


def mount_script(share: Share, tag: str, carrier: Carrier) -> str:
    """The guest shell's words: create GUESTDIR, mount it unless it already is."""
    folder = shlex.quote(share.guest)
    ro = ",ro" if share.read_only else ""
    if carrier is Carrier.NINEP:
        how = f"-t 9p -o {NINEP_OPTIONS}{ro}"
    else:
        how = f"-t virtiofs{' -o ro' if share.read_only else ''}"
    return f"mkdir -p -- {folder} && {{ {mounted_test(share.guest)} || mount {how} {tag} {folder}; }}"


def as_root(part: Part, script: str) -> str:
    """Mounting takes root: another ssh_user goes through sudo (cloud-init's user has it)."""
    return script if part.ssh_user == "root" else f"sudo -n sh -c {shlex.quote(script)}"


def mount(part: Part, share: Share, tag: str, carrier: Carrier) -> str | None:
    """Mount the share in the guest; why not (the guest's last error line) or None."""
    result = command.run(ssh.ssh_argv(part, [as_root(part, mount_script(share, tag, carrier))]),
                         timeout=TIMEOUT)
    if result.exit_code == 0:
        return None
    return command.last_error_line(result.stderr) or f"exit status {result.exit_code}"


def unmount(part: Part, share: Share) -> str | None:
    """Unmount GUESTDIR if mounted (a live share blocks saving the VM's state); why not, or None."""
    folder = shlex.quote(share.guest)
    script = f"! {mounted_test(share.guest)} || umount {folder}"
    result = command.run(ssh.ssh_argv(part, [as_root(part, script)]),
                         timeout=TIMEOUT)
    if result.exit_code == 0:
        return None
    return command.last_error_line(result.stderr) or f"exit status {result.exit_code}"
