"""A guest without a seed joins its private networks over ssh once it answers: its NICs found
by MAC, brought up with their addresses, and the other parts' names in /etc/hosts.

The script is the same for every part; the part's addresses reach it on its standard input,
as data, so no config value is ever read by a shell. It needs only `ip`, `cat`, `grep` and
`mv` (busybox has them all) and replaces its own /etc/hosts lines at each boot."""

from __future__ import annotations

from kvmtasks import command
from kvmtasks.config.part import Part
from kvmtasks.errors import CommandError, VmError
from kvmtasks.guest import ssh

HOSTS_MARK = "# kvmtasks network"

# Lines on stdin: "nic MAC ADDRESS/PREFIX" and "host ADDRESS NAME".
SCRIPT = r"""
set -e
hosts=/etc/hosts.kvmtasks.$$
grep -v ' MARK$' /etc/hosts > "$hosts" || true
while read -r kind first second; do
  case "$kind" in
  nic)
    found=
    for device in /sys/class/net/*; do
      if [ "$(cat "$device/address")" = "$first" ]; then found=${device##*/}; fi
    done
    if [ -z "$found" ]; then echo "no NIC with MAC $first" >&2; exit 3; fi
    ip addr flush dev "$found"
    ip addr add "$second" dev "$found"
    ip link set "$found" up
    ;;
  host) echo "$first $second MARK" >> "$hosts" ;;
  esac
done
cat "$hosts" > /etc/hosts
rm -f "$hosts"
""".replace("MARK", HOSTS_MARK)


def plan(part: Part) -> str:
    """The script's input: this part's NICs, then every peer's name and address."""
    lines = [f"nic {link.mac} {link.address}" for link in part.links]
    for link in part.links:
        lines += [f"host {peer.address.split('/')[0]} {peer.part}" for peer in link.peers]
    return "".join(line + "\n" for line in lines)


def configure(part: Part) -> None:
    """Bring the guest's private NICs up; one line naming the part when it cannot."""
    try:
        command.checked(ssh.ssh_argv(part, ["sh", "-c", _quoted(SCRIPT)]), timeout=60,
                        doing=f"{part.name}: setting up its private networks over ssh",
                        stdin=plan(part))
    except CommandError as error:
        raise VmError(str(error)) from None


def _quoted(script: str) -> str:
    """The constant script as one word for the guest's shell (ssh joins the words it sends)."""
    return "'" + script.replace("'", "'\\''") + "'"
