"""Option share: parsing, the config-time checks, the part's JSON and what status says (no VM)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kvmtasks.config import partjson
from kvmtasks.config.loader import load_file, load_parts
from kvmtasks.config.shares import Carrier, Share, parse_shares
from kvmtasks.engines.statusreport import Facts, ShareFact, State, as_json, describe
from kvmtasks.errors import ConfigError

IMAGE = "http://127.0.0.1:9/images/disk.img"


def test_a_share_line_gives_its_folders_flags_and_excludes() -> None:
    shares = parse_shares("\n  src /srv/src\n  'my docs' /home/u/docs/ ro 9p\n"
                          "  out /out rsync exclude=*.o exclude=.git\n")

    assert shares == (
        Share("src", "/srv/src"),
        Share("my docs", "/home/u/docs", read_only=True, carrier=Carrier.NINEP),
        Share("out", "/out", carrier=Carrier.RSYNC, excludes=("*.o", ".git")),
    )
    assert shares[1].line() == "'my docs' /home/u/docs ro 9p"


@pytest.mark.parametrize(("value", "needle"), [
    ("src", "is not HOSTDIR GUESTDIR"),
    ("src srv/src", "GUESTDIR 'srv/src' must be an absolute path"),
    ("src /srv/../etc", "plain absolute path"),
    ("src /", "cannot be /"),
    ("src /srv rw", "unknown flag 'rw'"),
    ("src /srv exclude=", "unknown flag 'exclude='"),
    ("src /srv 9p rsync", "not 9p and rsync"),
    ("src /srv 9p exclude=*.o", "exclude= applies to copied folders"),
    ("a /srv\nb /srv/", "GUESTDIR /srv is already shared"),
    ("'src /srv", "No closing quotation"),
])
def test_a_bad_share_line_is_refused(value: str, needle: str) -> None:
    with pytest.raises(ValueError, match=None) as error:
        parse_shares(value)
    assert needle in str(error.value)


def _config_error(tmp_path: Path, share: str) -> str:
    path = tmp_path / "bad.cfg"
    path.write_text(f"[buildout]\ndirectory = {tmp_path}\n[vm]\nimage = {IMAGE}\nssh_port = 2222\n"
                    f"share =\n  {share}\n")
    with pytest.raises(ConfigError) as error:
        load_parts([path], cwd=tmp_path)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(path) in message and "[vm] share" in message
    return message


@pytest.mark.parametrize(("share", "needle"), [
    ("missing /srv", "does not exist"),
    ("file.txt /srv", "is not a folder"),
    ("src relative/dir", "must be an absolute path"),
    ("src /a\n  other /a", "GUESTDIR /a is already shared"),
    ("src /a sync", "unknown flag 'sync'"),
])
def test_bad_shares_are_one_line_naming_file_section_option_and_line(
    tmp_path: Path, share: str, needle: str,
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "file.txt").write_text("x")

    assert needle in _config_error(tmp_path, share)


def test_host_folders_are_relative_to_the_buildout_directory_and_survive_the_json(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    config = tmp_path / "kvm.cfg"
    config.write_text(f"[buildout]\ndirectory = {tmp_path}\n[vm]\nimage = {IMAGE}\n"
                      "ssh_port = 2222\nshare =\n  src /srv ro rsync exclude=*.tmp\n")

    (part,) = load_file(config, Path("/nonexistent-cwd"))

    assert part.shares == (Share(str(tmp_path / "src"), "/srv", True, Carrier.RSYNC, ("*.tmp",)),)
    assert partjson.from_json(partjson.to_json(part)) == part
    old = json.loads(partjson.to_json(part))
    del old["shares"]  # a part.json written before the option existed still loads
    assert partjson.from_json(json.dumps(old)).shares == ()


FACTS = Facts(part="web", state=State.RUNNING, engine="qemu", libvirt_uri=None, pid=42, accelerator="tcg",
              forwards=(), vnc=None, ssh_command=None, console_log=None, disks={},
              shares=(ShareFact("/h/src", "/srv", False, "auto", "9p"),
                      ShareFact("/h/doc", "/doc", True, "rsync", "tar")))


def test_status_lists_each_share_and_how_it_is_carried() -> None:
    assert describe(FACTS)[-2:] == ["  share /h/src -> /srv (read-write, auto: 9p)",
                                    "  share /h/doc -> /doc (read-only, rsync: tar)"]
    assert json.loads(as_json(FACTS))["shares"] == [
        {"host": "/h/src", "guest": "/srv", "read_only": False, "carrier": "auto", "carried_by": "9p"},
        {"host": "/h/doc", "guest": "/doc", "read_only": True, "carrier": "rsync", "carried_by": "tar"},
    ]
    stopped = replace(FACTS, state=State.STOPPED)
    assert json.loads(as_json(stopped))["shares"][0]["host"] == "/h/src"
