"""The ``cloud-init:PART`` step: the part's keys, made once, and its NoCloud seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmtasks.config import bounded, networks, seedrules
from kvmtasks.config.part import Part
from kvmtasks.errors import ProvisionError
from kvmtasks.provision import keys
from kvmtasks.provision.seed import SeedInput, seed_files, write_iso
from kvmtasks.provision.seednetwork import NetworkConfigError, PrivateNic


def _read(path: Path, what: str, limit: int) -> str:
    try:
        return bounded.read_text(path, limit)
    except bounded.NotReadable as error:
        raise ProvisionError(f"{what} {path} {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ProvisionError(f"{what} {path}: cannot read it ({error})") from None


def user_inputs(part: Part) -> dict[str, Any]:
    """What the user gives the seed, files' contents included: the step's up-to-date check.

    The keys kvmtasks makes are not in it: the step makes them, and makes them only once.
    """
    def content(path: Path | None, limit: int) -> str | None:
        try:
            return None if path is None else bounded.read_text(path, limit)
        except (OSError, ValueError):
            return "(unreadable)"  # the step itself says why, in one line

    given_key = part.ssh_key_path
    return {
        "hostname": part.cloud_init_hostname,
        "user": part.ssh_user,
        "key": str(seedrules.identity_file(part)),
        "public_key": content(keys.public_path(given_key), bounded.KEY_LIMIT) if given_key else None,
        "user_data": content(part.cloud_init_user_data, bounded.USER_DATA_LIMIT),
        "network_config": content(part.cloud_init_network_config, bounded.NETWORK_CONFIG_LIMIT),
        # The other parts' addresses too: a part joining the network changes every seed.
        "networks": [[link.network, link.address, link.mac,
                      [[peer.part, peer.address] for peer in link.peers]] for link in part.links],
    }


def keys_exist(part: Part) -> bool:
    """False when a key the step makes is missing: the step runs again and makes it."""
    made = [seedrules.host_key_path(part)]
    if part.ssh_key_path is None:
        made.append(seedrules.generated_key_path(part))
    return all(path.is_file() and keys.public_path(path).is_file() for path in made)


def seed_input(part: Part) -> SeedInput:
    """The part's seed inputs, making the keys that do not exist yet."""
    identity = seedrules.identity_file(part)
    assert identity is not None, "a part with cloud_init always has an identity file"
    if part.ssh_key_path is None:
        keys.ensure_pair(identity, f"kvmtasks {part.name}")
    host_key = seedrules.host_key_path(part)
    keys.ensure_pair(host_key, f"kvmtasks host key {part.name}")
    user_data, network_config = part.cloud_init_user_data, part.cloud_init_network_config
    return SeedInput(
        hostname=part.cloud_init_hostname,
        user=part.ssh_user,
        authorized_key=keys.read_public(identity),
        host_private_key=_read(host_key, "host key", bounded.KEY_LIMIT),
        host_public_key=keys.read_public(host_key),
        user_data=(None if user_data is None
                   else _read(user_data, "cloud_init_user_data", bounded.USER_DATA_LIMIT)),
        network_config=(None if network_config is None
                        else _read(network_config, "cloud_init_network_config",
                                   bounded.NETWORK_CONFIG_LIMIT)),
        private_nics=tuple(PrivateNic(f"kvmnet{index}", link.mac, link.address)
                           for index, link in enumerate(part.links)),
        primary_mac=networks.user_nic_mac(part.kvm_net),
        hosts=tuple(dict.fromkeys((peer.address.split("/")[0], peer.part)
                                  for link in part.links for peer in link.peers)),
    )


def write_seed(part: Part) -> None:
    try:
        files = seed_files(seed_input(part))
    except NetworkConfigError as error:
        raise ProvisionError(f"{part.config_file}: [{part.name}] cloud_init_network_config = "
                             f"{str(part.cloud_init_network_config)!r}: {error}") from None
    part.state_directory.mkdir(parents=True, exist_ok=True)
    try:
        write_iso(seedrules.seed_path(part), files)
    except OSError as error:
        raise ProvisionError(f"writing {seedrules.seed_path(part)}: {error.strerror or error}") from None
