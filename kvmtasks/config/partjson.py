"""A part saved as JSON, so the generated scripts run exactly what was rendered."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kvmtasks.config.options import Accel, Arch, Compression, Engine, Firmware, ImageType, Redirect
from kvmtasks.config.part import Buildout, Part

_PATHS = {"config_file", "file", "location", "kvm_bin_directory", "kvm_run_directory", "ssh_key_path",
          "cloud_init_user_data", "cloud_init_network_config"}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Redirect | Buildout):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


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
    return Part(**data)
