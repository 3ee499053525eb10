"""The private networks in a seed (pure): the network-config (version 2) that brings each NIC
up by its MAC, merged into the user's own, and the boot command that names the other parts in
/etc/hosts.

Every name and address here comes from config/networks.py (plain words, checked addresses);
they are written as JSON, which YAML reads as it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HOSTS_MARK = "# kvmtasks network"
# cloud-init rewrites /etc/hosts from its template at every boot (manage_etc_hosts): the
# entries go into the templates too, before that happens (bootcmd runs first), and into
# /etc/hosts itself for a user-data that turns manage_etc_hosts off. The names and addresses
# are the script's arguments, never read as shell code.
HOSTS_SCRIPT = (
    'for f in /etc/hosts /etc/cloud/templates/hosts.*.tmpl; do [ -f "$f" ] || continue; '
    f"grep -v ' {HOSTS_MARK}$' \"$f\" > \"$f.kvmtasks\" || true; "
    f"for entry; do echo \"$entry {HOSTS_MARK}\"; done >> \"$f.kvmtasks\"; "
    'cat "$f.kvmtasks" > "$f"; rm -f "$f.kvmtasks"; done'
)


class NetworkConfigError(ValueError):
    """The user's network-config cannot take the private networks' NICs."""


@dataclass(frozen=True)
class PrivateNic:
    interface: str  # the name cloud-init gives it (set-name)
    mac: str
    address: str  # with its prefix


def network_config(user_text: str | None, nics: Sequence[PrivateNic],
                   primary_mac: str | None) -> str | None:
    """The seed's network-config: the user's own as written when there is no private NIC;
    else version 2, the user's ethernets (or, without a file of theirs, DHCP on the user-mode
    NIC, as cloud-init would do by default) with one static entry per private NIC."""
    if not nics:
        return user_text
    if user_text is None:
        config: dict[str, Any] = {"version": 2, "ethernets": {}}
        if primary_mac is not None:
            config["ethernets"]["eth0"] = {"match": {"macaddress": primary_mac},
                                           "set-name": "eth0", "dhcp4": True}
    else:
        config = _version_2(user_text)
    ethernets = config.setdefault("ethernets", {})
    if not isinstance(ethernets, dict):
        raise NetworkConfigError("its ethernets is not a mapping")
    for nic in nics:
        if nic.interface in ethernets:
            raise NetworkConfigError(f"it names {nic.interface}, the interface kvmtasks gives "
                                     "a private network")
        ethernets[nic.interface] = {"match": {"macaddress": nic.mac}, "set-name": nic.interface,
                                    "addresses": [nic.address], "dhcp4": False}
    return "# Written by kvmtasks: the private networks' NICs added.\n" + json.dumps(
        config, indent=1) + "\n"


def _version_2(text: str) -> dict[str, Any]:
    import yaml  # only seeds with private networks and a network-config of the user's

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise NetworkConfigError(f"it is not YAML ({str(error).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("network"), dict):
        data = data["network"]  # the form with a top-level network key
    if not isinstance(data, dict) or data.get("version") != 2:
        raise NetworkConfigError("private networks are added to a version 2 network-config "
                                 "only; write yours as version 2")
    return data


def hosts_bootcmd(entries: Sequence[tuple[str, str]]) -> list[str]:
    """cloud-config lines: a bootcmd that writes "ADDRESS NAME" for every other part."""
    if not entries:
        return []
    argv = ["sh", "-c", HOSTS_SCRIPT, "kvmtasks-hosts",
            *(f"{address} {name}" for address, name in entries)]
    return ["bootcmd:", f"  - {json.dumps(argv)}"]
