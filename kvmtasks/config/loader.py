"""Read buildout-style config files into immutable Part objects."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kvmtasks.config import archrules, bounded, extends, networks, seedrules, setupsteps, sshvalue
from kvmtasks.config.buildout import Config, Key, references
from kvmtasks.config.cfgfile import DEPENDENCIES
from kvmtasks.config.options import DIGEST_LENGTHS, OPTIONS, OPTIONS_BY_NAME, Compression, Engine, closest
from kvmtasks.config.part import Buildout, Part, path_is_block_device
from kvmtasks.config.remote import remote_host
from kvmtasks.config.shares import problem as share_problem
from kvmtasks.config.shares import resolved
from kvmtasks.errors import ConfigError

CONFIG_ENV = "KVMTASKS_CONFIG"
RECIPES = frozenset({"erp5.recipe.kvm", "kvmtasks"})
PART_NAME = re.compile(r"[^\W_][\w.+-]*")


def config_paths(dodo_directory: Path, invoked_from: Path | None = None) -> list[Path]:
    """Config files to read: KVMTASKS_CONFIG, else configs/*.cfg next to dodo.py. A relative
    path in KVMTASKS_CONFIG is the user's: from the folder doit was run in (doit itself moves
    to dodo.py's folder before loading it)."""
    listed = os.environ.get(CONFIG_ENV)
    if listed:
        start = invoked_from or Path.cwd()
        return [start / p for p in listed.split(os.pathsep) if p]
    return sorted((dodo_directory / "configs").glob("*.cfg"))


def load_parts(paths: Iterable[Path], cwd: Path | None = None) -> list[Part]:
    """Parse every file; part names must be unique across all of them."""
    parts: list[Part] = []
    seen: dict[str, Path] = {}
    owners: dict[Path, Part] = {}
    for path in paths:
        for part in load_file(path, cwd or Path.cwd()):
            if part.name in seen:
                raise ConfigError(
                    f"{path}: [{part.name}] part name already defined in {seen[part.name]}"
                )
            seen[part.name] = path
            _one_owner(part, owners)
            parts.append(part)
    return networks.join(parts)


def _one_owner(part: Part, owners: dict[Path, Part]) -> None:
    """Two parts never download to, nor boot, one file (say, a location copied with <=)."""
    if part.image is None:
        return
    for file in dict.fromkeys((part.download_path, part.image_path)):
        other = owners.setdefault(file, part)
        if other is not part:
            raise ConfigError(
                f"{part.config_file}: [{part.name}] location = {str(part.location)!r}: "
                f"part {other.name} uses {file} too; give each part a location of its own"
            )


def load_file(path: Path, cwd: Path) -> list[Part]:
    config = read_config(path, cwd)
    buildout = _buildout(config, path)
    return [_part(config, path, section, buildout) for section in _part_sections(config, path)]


# [buildout]'s folders as buildout makes them absolute (var-directory is kvmtasks' own).
FOLDERS = ("bin-directory", "parts-directory", "var-directory")


def read_config(path: Path, cwd: Path) -> Config:
    """The merged sections of path and what it extends; [buildout] read, its folders absolute."""
    defaults = {"directory": Key.set(str(cwd), "COMPUTED_VALUE", "buildout")}
    for option in FOLDERS:
        name = option.split("-")[0]
        defaults[option] = Key.set(name, "DEFAULT_VALUE", "buildout")
    sections = extends.read(path, defaults)
    buildout = sections["buildout"]
    for option in FOLDERS:  # before substitution, as buildout does, unless a value has a ${}
        if "${" not in buildout[option].value:
            joined = os.path.join(buildout["directory"].value, buildout[option].value)
            buildout[option] = Key(joined, buildout[option].history)
    config = Config(str(path), sections)
    options = config.section("buildout")
    for option in FOLDERS:  # and again once substituted
        config.override("buildout", option, os.path.join(options["directory"], options[option]))
    return config


def _get(config: Config, section: str, option: str) -> str:
    return config.section(section)[option]


def _buildout(config: Config, path: Path) -> Buildout:
    def folder(option: str, base: Path | None) -> Path:
        value = _get(config, "buildout", option)
        folder_path = _expand_user(value, f"{path}: [buildout] {option}")
        return folder_path if base is None or folder_path.is_absolute() else base / folder_path

    directory = folder("directory", None).absolute()
    return Buildout(
        directory=directory,
        bin_directory=folder("bin-directory", directory),
        parts_directory=folder("parts-directory", directory),
        var_directory=folder("var-directory", directory),
        download_cache=_download_cache(config, path, directory),
    )


def _download_cache(config: Config, path: Path, directory: Path) -> Path | None:
    """[buildout] download-cache: empty turns it off; default ${XDG_CACHE_HOME:-~/.cache}/kvmtasks."""
    value = config.section("buildout").get("download-cache")
    if value is None:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # The XDG spec: a relative XDG_CACHE_HOME is invalid and ignored.
        base = Path(xdg) if os.path.isabs(xdg) else _expand_user("~/.cache", "HOME")
        return base / "kvmtasks"
    if not value.strip():
        return None
    if "\n" in value.strip() or "\0" in value:
        raise ConfigError(f"{path}: [buildout] download-cache = {value!r}: must be a single path")
    cache = _expand_user(value.strip(), f"{path}: [buildout] download-cache")
    return cache if cache.is_absolute() else directory / cache


def _expand_user(value: str, where: str) -> Path:
    """~ and ~user expanded; an unknown user is a config error, not a RuntimeError."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        user = value.split("/", 1)[0]
        raise ConfigError(f"{where} = {value!r}: cannot expand {user!r} (no such user)") from None


def _part_sections(config: Config, path: Path) -> list[str]:
    """[buildout] parts when set (buildout's rule), else every section that looks like a VM."""
    listed = config.section("buildout").get("parts")
    if listed is None:
        return [section for section in config.sections() if _is_part(config, section)]
    names = list(dict.fromkeys(listed.split()))
    for name in names:
        if name == "buildout" or not config.has_section(name):
            raw = config.raw("buildout", "parts")
            raise ConfigError(f"{path}: [buildout] parts = {raw!r}: no section [{name}]")
    # A listed section with another recipe is that recipe's business, not a VM.
    return [name for name in names if _recipe(config, name) in (None, *RECIPES)]


def _recipe(config: Config, section: str) -> str | None:
    recipe = config.extended(section).get("recipe")
    return None if recipe is None else recipe.value.strip()


def _is_part(config: Config, section: str) -> bool:
    if section == "buildout":
        return False
    recipe = _recipe(config, section)
    if recipe is not None:
        return recipe in RECIPES
    options = config.extended(section)
    return "image" in options or "file" in options


def _part(config: Config, path: Path, section: str, buildout: Buildout) -> Part:
    if not PART_NAME.fullmatch(section):
        shown = section if section.isprintable() else repr(section)[1:-1]  # no control characters
        raise ConfigError(
            f"{path}: [{shown}] part name must be letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit"
        )
    values: dict[str, Any] = {}
    resolved = config.section(section)
    used = _substituted_options(config, section)
    for option, raw in resolved.items():
        known = OPTIONS_BY_NAME.get(option)
        if known is None:
            if option in used or option == DEPENDENCIES:
                continue  # a value of the user's own, for substitutions (buildout's idiom)
            close = closest(option)
            hint = f"; did you mean `{close}`?" if close else ""
            raise ConfigError(f"{path}: [{section}] unknown option {option!r}{hint} "
                              f"(an option of your own is accepted when a ${{:{option}}} uses it)")
        try:
            values[option] = known.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{path}: [{section}] {option} = {raw!r}: {error}") from None
    for declared in OPTIONS:
        if declared.name not in values and declared.default is not None:
            values[declared.name] = declared.parse(declared.default)
    part = _build(values, path, section, buildout)
    if not values.get("setup"):
        return part
    return _with_setup(part, setupsteps.parse(config, path, section, values["setup"], buildout.directory))


def _with_setup(part: Part, steps: tuple[setupsteps.SetupStep, ...]) -> Part:
    """The steps on the part; what cannot boot over setup layers refused, saying why."""
    where = f"{part.config_file}: [{part.name}] setup"
    if part.kvm_snapshot:
        raise ConfigError(f"{where} needs kvm_snapshot = false: the steps' results are captured as disk "
                          "layers, and with -snapshot no write reaches a disk")
    if part.is_block_device:
        raise ConfigError(f"{where} cannot set up a block device (file = {str(part.file)!r}): layers "
                          "are qcow2 files over an image file; use an image file")
    if not part.overlay:
        raise ConfigError(f"{where} needs overlay = true: the part boots its own overlay over the "
                          "last setup layer, which is never written")
    return dataclasses.replace(part, setup=steps)


def _substituted_options(config: Config, section: str) -> set[str]:
    """The options of section that a substitution uses: ${section:option} anywhere, ${:option} in
    the section itself (its <= sections' values included) or in a section that copies it with <=."""
    used: set[str] = set()
    for name in config.sections():
        own = name == section or section in _bases(config, name, ())
        for key in config.annotated[name].values():
            used.update(option for target, option in references(key.value)
                        if target == section or (own and not target))
    used.update(option for key in config.extended(section).values()
                for target, option in references(key.value) if not target)
    return used


def _bases(config: Config, name: str, seen: tuple[str, ...]) -> set[str]:
    """The sections name copies with <=, and theirs (a loop is refused when the section is read)."""
    macro = config.raw(name, "<")
    if macro is None or name in seen:
        return set()
    bases = {base for base in macro.split() if config.has_section(base)}
    for base in list(bases):
        bases |= _bases(config, base, (*seen, name))
    return bases


def _build(values: dict[str, Any], path: Path, section: str, buildout: Buildout) -> Part:
    where = f"{path}: [{section}]"

    def local_path(option: str) -> Path | None:
        value = values.get(option)
        if value is None:
            return None
        resolved = _expand_user(value, f"{where} {option}")
        return resolved if resolved.is_absolute() else buildout.directory / resolved

    image, file = values.get("image"), local_path("file")
    if image is not None and file is not None:
        raise ConfigError(
            f"{where} set either image or file, not both (image = {image!r}, file = {str(file)!r})"
        )
    if image is None and file is None:
        raise ConfigError(f"{where} needs an image URL or a file")
    download = _digests(values, "download")
    image_digests = _digests(values, "image")
    if file is not None:
        if download:
            name = next(f"{a}_download" for a in download)
            raise ConfigError(f"{where} {name} needs an image URL; with file there is no download")
        if values.get("gzip"):
            raise ConfigError(f"{where} gzip = true needs an image URL; a file is used as it is")
        if values["compression"] not in (Compression.AUTO, Compression.NONE):
            raise ConfigError(f"{where} compression = {values['compression'].value} needs an image URL; "
                              "a file is used as it is")
        if image_digests and path_is_block_device(file):
            name = next(f"{a}_image" for a in image_digests)
            raise ConfigError(
                f"{where} {name} = {image_digests[name[:-6]]!r}: not allowed with a block device "
                f"(file = {str(file)!r})"
            )
    if values.get("ssh_port") is not None:
        ports = [r.host_port for r in values.get("kvm_redir", ())]
        if values["ssh_port"] in ports:
            raise ConfigError(
                f"{where} ssh_port = {values['ssh_port']}: host port also used in kvm_redir"
            )
    try:
        remote_host(values["libvirt_uri"])  # its user, host and port reach ssh's config
    except ConfigError as error:
        raise ConfigError(f"{where} {error}") from None
    if values["kvm_engine"] is Engine.LIBVIRT and file is not None and path_is_block_device(file):
        raise ConfigError(f"{where} file = {str(file)!r}: a block device cannot be copied into a "
                          "libvirt storage pool; use kvm_engine = qemu")
    if values["kvm_engine"] is Engine.LIBVIRT and values.get("networks") \
            and remote_host(values["libvirt_uri"]) is not None:
        raise ConfigError(f"{where} networks = {values['networks'][0].line!r}: private networks "
                          f"join parts on this machine only, not on {values['libvirt_uri']}")
    compression = _compression(values, where)
    overlay = values.get("overlay", image is not None)
    if values.get("disk_size") is not None and not overlay:
        raise ConfigError(
            f"{where} disk_size = {values['disk_size']!r}: needs overlay = true "
            "(kvmtasks never resizes a file or device of yours)"
        )
    key = local_path("ssh_key_path")
    run_directory = local_path("kvm_run_directory") or buildout.var_directory
    _check_ssh_paths(where, {"ssh_key_path": key, "kvm_run_directory": run_directory})
    user_data, network_config = local_path("cloud_init_user_data"), local_path("cloud_init_network_config")
    _check_cloud_init(values, where, key, user_data, network_config)
    try:
        shares = resolved(values.get("share", ()), buildout.directory)
    except ValueError as error:
        raise ConfigError(f"{where} share: {error}") from None
    for share in shares:
        remote = values["kvm_engine"] is Engine.LIBVIRT and remote_host(values["libvirt_uri"]) is not None
        why = share_problem(share, engine=values["kvm_engine"].value, remote=remote,
                            has_ssh=values.get("ssh_port") is not None)
        if why is not None:
            raise ConfigError(f"{where} share: {why}")
    arch, firmware = archrules.check(values, where)
    return Part(
        name=section,
        config_file=path,
        buildout=buildout,
        image=image,
        file=file,
        location=local_path("location") or buildout.parts_directory / section,
        image_type=values["image_type"],
        compression=compression,
        overlay=overlay,
        disk_size=values.get("disk_size"),
        download_digests=download,
        image_digests=image_digests,
        kvm_binary=values.get("kvm_binary") or archrules.default_binary(arch),
        kvm_memory=values["kvm_memory"],
        kvm_smp=values["kvm_smp"],
        kvm_accel=values["kvm_accel"],
        kvm_boot_timeout=values["kvm_boot_timeout"],
        kvm_shutdown_timeout=values["kvm_shutdown_timeout"],
        kvm_vnc=values.get("kvm_vnc"),
        kvm_graphic=values.get("kvm_graphic"),
        kvm_net=values.get("kvm_net", ()),
        kvm_redir=values.get("kvm_redir", ()),
        kvm_snapshot=values["kvm_snapshot"],
        kvm_extra_args=values.get("kvm_extra_args", ()),
        kvm_bin_directory=local_path("kvm_bin_directory") or buildout.bin_directory,
        kvm_run_directory=run_directory,
        ssh_port=values.get("ssh_port"),
        ssh_hostname=values["ssh_hostname"],
        ssh_key_path=key,
        ssh_user=values["ssh_user"],
        kvm_engine=values["kvm_engine"],
        libvirt_uri=values["libvirt_uri"],
        libvirt_pool=values["libvirt_pool"],
        cloud_init=values["cloud_init"],
        cloud_init_hostname=values.get("cloud_init_hostname") or seedrules.default_hostname(section),
        cloud_init_user_data=user_data,
        cloud_init_network_config=network_config,
        shares=shares,
        networks=values.get("networks", ()),
        kvm_arch=arch,
        firmware=firmware,
    )


def _check_ssh_paths(where: str, paths: Mapping[str, Path | None]) -> None:
    """Paths the part's ssh_config names (its key; its known_hosts under the run directory)."""
    for option, path in paths.items():
        reason = None if path is None else sshvalue.problem(path)
        if reason is not None:
            raise ConfigError(f"{where} {option} = {str(path)!r}: {reason}")


def _compression(values: Mapping[str, Any], where: str) -> Compression:
    """compression, with the recipe's gzip = true meaning compression = gzip."""
    compression: Compression = values["compression"]
    if not values.get("gzip"):
        return compression
    if compression not in (Compression.AUTO, Compression.GZIP):
        raise ConfigError(f"{where} gzip = true contradicts compression = {compression.value}")
    return Compression.GZIP


def _check_cloud_init(values: Mapping[str, Any], where: str, key: Path | None,
                      user_data: Path | None, network_config: Path | None) -> None:
    """What cloud-init would refuse at first boot, refused now, in one line."""
    if not values["cloud_init"]:
        for name in ("cloud_init_hostname", "cloud_init_user_data", "cloud_init_network_config"):
            if values.get(name) is not None:
                raise ConfigError(f"{where} {name} = {values[name]!r}: needs cloud_init = true")
        return
    user = values["ssh_user"]
    if user in seedrules.RESERVED_GROUPS:
        raise ConfigError(f"{where} ssh_user = {user!r}: a group of that name exists on common "
                          "images and cloud-init cannot create the user; choose another name")
    if user_data is not None:
        text = _read_user_file(where, "cloud_init_user_data", values, user_data,
                               limit=bounded.USER_DATA_LIMIT)
        if seedrules.user_data_kind(text) is None:
            first = text.split("\n", 1)[0][:40]
            raise ConfigError(f"{where} cloud_init_user_data = {values['cloud_init_user_data']!r}: "
                              f"cloud-init would ignore it: the first line ({first!r}) must be "
                              "#cloud-config, a #! script or a MIME header")
    if network_config is not None:
        _read_user_file(where, "cloud_init_network_config", values, network_config,
                        limit=bounded.NETWORK_CONFIG_LIMIT)
    if key is not None:
        _read_user_file(where, "ssh_key_path", values, key.with_name(key.name + ".pub"),
                        "its public key ", limit=bounded.KEY_LIMIT)


def _read_user_file(where: str, option: str, values: Mapping[str, Any], path: Path,
                    what: str = "", *, limit: int) -> str:
    """A text file the seed carries; it must be readable UTF-8 now, not fail later in the guest,
    and a regular file of a bounded size (a device or a FIFO would never end)."""
    try:
        return bounded.read_text(path, limit)
    except bounded.NotReadable as error:
        problem = str(error)
    except FileNotFoundError:
        problem = "not found"
    except IsADirectoryError:
        problem = "is a folder"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as error:
        problem = f"cannot be read ({error.strerror or error})"
    raise ConfigError(f"{where} {option} = {values[option]!r}: {what}{path} {problem}")


def _digests(values: Mapping[str, Any], what: str) -> dict[str, str]:
    return {
        algorithm: values[f"{algorithm}_{what}"]
        for algorithm in DIGEST_LENGTHS
        if values.get(f"{algorithm}_{what}") is not None
    }
