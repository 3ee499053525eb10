"""The ``cloud-init:PART`` step: the part's keys, made once, and its NoCloud seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmtasks.config import seedrules
from kvmtasks.config.part import Part
from kvmtasks.errors import ProvisionError
from kvmtasks.provision import keys
from kvmtasks.provision.seed import SeedInput, seed_files, write_iso


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ProvisionError(f"{what} {path}: cannot read it ({error})") from None


def user_inputs(part: Part) -> dict[str, Any]:
    """What the user gives the seed, files' contents included: the step's up-to-date check.

    The keys kvmtasks makes are not in it: the step makes them, and makes them only once.
    """
    def content(path: Path | None) -> str | None:
        try:
            return None if path is None else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return "(unreadable)"  # the step itself says why, in one line

    given_key = part.ssh_key_path
    return {
        "hostname": part.cloud_init_hostname,
        "user": part.ssh_user,
        "key": str(seedrules.identity_file(part)),
        "public_key": content(keys.public_path(given_key)) if given_key else None,
        "user_data": content(part.cloud_init_user_data),
        "network_config": content(part.cloud_init_network_config),
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
        host_private_key=_read(host_key, "host key"),
        host_public_key=keys.read_public(host_key),
        user_data=None if user_data is None else _read(user_data, "cloud_init_user_data"),
        network_config=(None if network_config is None
                        else _read(network_config, "cloud_init_network_config")),
    )


def write_seed(part: Part) -> None:
    files = seed_files(seed_input(part))
    part.state_directory.mkdir(parents=True, exist_ok=True)
    try:
        write_iso(seedrules.seed_path(part), files)
    except OSError as error:
        raise ProvisionError(f"writing {seedrules.seed_path(part)}: {error.strerror or error}") from None
