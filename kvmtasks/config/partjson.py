"""A part saved as JSON, so the generated scripts run exactly what was rendered."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kvmtasks.config.networks import Member, NetworkLink
from kvmtasks.config.options import (
    Accel,
    Arch,
    Compression,
    Engine,
    Firmware,
    ImageType,
    NetworkRequest,
    Redirect,
)
from kvmtasks.config.part import Buildout, Part
from kvmtasks.config.setupsteps import Copy, SetupStep
from kvmtasks.config.shares import Carrier, Share

_PATHS = {"config_file", "file", "location", "kvm_bin_directory", "kvm_run_directory", "ssh_key_path",
          "cloud_init_user_data", "cloud_init_network_config"}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Redirect | Buildout | SetupStep | Copy | Share | NetworkRequest | NetworkLink
                  | Member):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def _step(data: dict[str, Any]) -> SetupStep:
    copies = tuple(Copy(Path(copy["source"]), copy["target"]) for copy in data["copies"])
    script = None if data["script"] is None else Path(data["script"])
    return SetupStep(data["name"], copies, data["run"], script, data["timeout"])


def to_json(part: Part) -> str:
    fields = {field.name: getattr(part, field.name) for field in dataclasses.fields(part)}
    return json.dumps(_plain(fields), indent=1, sort_keys=True, ensure_ascii=False)


def from_json(text: str) -> Part:
    data: dict[str, Any] = json.loads(text)
    for name in _PATHS:
        if data[name] is not None:
            data[name] = Path(data[name])
    folders: dict[str, Any] = {
        key: None if value is None else Path(value) for key, value in data["buildout"].items()
    }
    data["buildout"] = Buildout(**folders)
    data["image_type"] = ImageType(data["image_type"])
    data["kvm_accel"] = Accel(data["kvm_accel"])
    data["kvm_engine"] = Engine(data["kvm_engine"])
    data["compression"] = Compression(data["compression"])
    data["kvm_arch"] = Arch(data.get("kvm_arch", Arch.X86_64))
    data["firmware"] = Firmware(data.get("firmware", Firmware.BIOS))
    data["kvm_net"] = tuple(data["kvm_net"])
    data["kvm_extra_args"] = tuple(data["kvm_extra_args"])
    data["kvm_redir"] = tuple(Redirect(**item) for item in data["kvm_redir"])
    data["setup"] = tuple(_step(item) for item in data.get("setup", ()))
    data["shares"] = tuple(Share(**{**item, "carrier": Carrier(item["carrier"]),
                                    "excludes": tuple(item["excludes"])})
                           for item in data.get("shares", ()))
    data["networks"] = tuple(NetworkRequest(**item) for item in data.get("networks", ()))
    data["links"] = tuple(
        NetworkLink(**{**item, "peers": tuple(Member(**peer) for peer in item["peers"])})
        for item in data.get("links", ()))
    return Part(**data)
