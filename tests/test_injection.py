"""Injection: hostile paths, names and words are carried as data, never run, never split.

Pure properties of the argv builders (hypothesis), ssh's own option parser as the judge of
the quoting (`ssh -G`), the generated scripts run from hostile folders, and a real guest
receiving files with hostile names over SFTP and over the legacy scp protocol.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmtasks.config.loader import PART_NAME, load_file
from kvmtasks.config.options import NET_TYPES, VGA_TYPES, ImageType, Redirect
from kvmtasks.config.part import Part, forwards
from kvmtasks.config.runfiles import RunFiles
from kvmtasks.engines.qemu.argv import qemu_argv
from kvmtasks.errors import VmError
from kvmtasks.guest import ssh, sshconfig
from tests.conftest import Project
from tests.reliability import Recorder
from tests.test_provision_pipeline import assert_ok
from tests.vmfixtures import Guest, free_port, needs_qemu, qemu_pids_under

# Private-use characters mark each generated value, so its elements can be found in the argv.
FILE, RUN, BINARY, EXTRA = "\ue000", "\ue001", "\ue002", "\ue003"
free_text = st.text(st.characters(exclude_characters=f"\x00\n\r{FILE}{RUN}{BINARY}{EXTRA}",
                                  exclude_categories=("Cs",)), max_size=20)


def qemu_options(text: str) -> list[str]:
    """QEMU's reading of an option string: items split at single commas, ``,,`` is a comma."""
    items, current, index = [], "", 0
    while index < len(text):
        if text.startswith(",,", index):
            current, index = current + ",", index + 2
        elif text[index] == ",":
            items.append(current)
            current, index = "", index + 1
        else:
            current, index = current + text[index], index + 1
    return [*items, current]


def expected_length(part: Part) -> int:
    """The argv's length from the options alone: 2 per option with a value, 1 per flag."""
    kinds = [line.split(",", 1)[0] for line in part.kvm_net]
    nets = len(kinds) + (("user" not in kinds) + ("nic" not in kinds) if forwards(part) else 0)
    return (1 + 2 * 6  # binary, -name -accel -m -smp -drive -device
            + part.kvm_snapshot + 2 + 2 * (part.kvm_graphic is not None)  # -display or -vnc
            + 2 * nets + 2 * 6 + 1  # -chardev -serial -chardev -mon -monitor -pidfile, -daemonize
            + len(part.kvm_extra_args))


@pytest.fixture(scope="module")
def base_part(tmp_path_factory: pytest.TempPathFactory) -> Part:
    folder = tmp_path_factory.mktemp("argv")
    (folder / "kvm.cfg").write_text(f"[buildout]\ndirectory = {folder}\n\n[vm]\nfile = /dev/null\n")
    return load_file(folder / "kvm.cfg", folder)[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.from_regex(PART_NAME, fullmatch=True).filter(lambda n: len(n) < 20),
    file=free_text, run=free_text, binary=free_text.filter(lambda b: not b.startswith("-")),
    memory=st.from_regex(r"[1-9][0-9]{0,4}[KMGT]?", fullmatch=True), smp=st.integers(1, 1024),
    snapshot=st.booleans(), image_type=st.sampled_from(ImageType),
    vnc=st.none() | st.just("127.0.0.1:1"), graphic=st.none() | st.sampled_from(VGA_TYPES),
    net=st.lists(st.tuples(st.sampled_from(sorted(NET_TYPES)), free_text), max_size=3),
    redirects=st.lists(st.builds(Redirect, st.sampled_from(["tcp", "udp"]), st.integers(1, 65535),
                                 st.just(""), st.integers(1, 65535)), max_size=3),
    ssh_port=st.none() | st.integers(1, 65535), extra=st.lists(free_text, max_size=4),
)
@example(name="vm", file="a,b,,c,", run=" ,", binary="q", memory="1G", smp=1, snapshot=True,
         image_type=ImageType.HDA, vnc=None, graphic=None, net=[("user", "hostname=a,b")], redirects=[],
         ssh_port=22, extra=["-o ProxyCommand=x", "$(id)", ""])
def test_every_value_lands_in_its_own_argv_elements(
    base_part: Part, reliability: Recorder, name: str, file: str, run: str, binary: str, memory: str,
    smp: int, snapshot: bool, image_type: ImageType, vnc: str | None, graphic: str | None,
    net: list[tuple[str, str]], redirects: list[Redirect], ssh_port: int | None, extra: list[str],
) -> None:
    reliability.bad_input("qemu-argv")
    part = dataclasses.replace(
        base_part, name=name, file=Path(f"/{FILE}{file}"), kvm_run_directory=Path(f"/{RUN}{run}"),
        kvm_binary=BINARY + binary, kvm_memory=memory, kvm_smp=smp, kvm_snapshot=snapshot,
        image_type=image_type, kvm_vnc=vnc, kvm_graphic=graphic,
        kvm_net=tuple(f"{kind},{rest}" for kind, rest in net), kvm_redir=tuple(redirects),
        ssh_port=ssh_port if ssh_port not in {r.host_port for r in redirects} else None,
        kvm_extra_args=tuple(f"{EXTRA}{index}{arg}" for index, arg in enumerate(extra)),
    )
    files = RunFiles.of(part)

    argv = qemu_argv(part, accel="tcg", disk_format="raw", listen_address="127.0.0.1")

    assert len(argv) == expected_length(part)
    assert [arg for arg in argv if BINARY in arg] == [argv[0]] == [part.kvm_binary]
    (drive,) = [arg for arg in argv if FILE in arg]
    assert qemu_options(drive)[0] == f"file={part.file}"
    chardev, qmp, pidfile = [arg for arg in argv if RUN in arg]
    assert qemu_options(chardev) == ["file", "id=console", f"path={files.console_log}"]
    assert qemu_options(qmp) == ["socket", "id=qmp", f"path={files.qmp_socket}", "server=on", "wait=off"]
    assert pidfile == str(files.pidfile)  # -pidfile takes a plain file name
    assert argv[argv.index("-name") + 1] == name
    for arg in part.kvm_extra_args:
        assert [a for a in argv if a == arg] == [arg]
        assert [a for a in argv if a.startswith(arg[:2])] == [arg]


# -- ssh: its own parser judges the quoting of paths in -o values ---------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_characters="\x00\n\r", exclude_categories=("Cs",)),
                    max_size=40))
@example(text="my vms/a  b\t%h%%d ~x 'q' \"d\" \\ \\\" #c $HOME ${HOME")
@example(text="${HOME}/x")
def test_a_path_reaches_ssh_as_one_file_whatever_its_characters(
    reliability: Recorder, text: str
) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("ssh is not installed")
    reliability.bad_input("ssh-path")
    path = Path("/" + text)
    if "${" in str(path) or any(c in str(path) for c in "\n\r\0"):
        with pytest.raises(VmError, match=r"ssh would read the \$\{\.\.\.\}|cannot hold a line break"):
            sshconfig.quoted(path)
        return

    shown = subprocess.run(["ssh", "-G", "-o", f"UserKnownHostsFile={sshconfig.quoted(path)}", "localhost"],
                           capture_output=True, check=False).stdout.decode(errors="surrogateescape")

    assert [line for line in shown.split("\n") if line.startswith("userknownhostsfile ")] == [
        f"userknownhostsfile {path}"
    ]


def scp_remote_path(argv: list[str], upload: bool) -> str:
    spec = argv[-1] if upload else argv[-2]
    return spec.split(":", 1)[1]


@pytest.mark.parametrize("name", ["x;touch c", "$(touch c)`touch c`", "a b'c\"d", "-rf", "~root/x",
                                  "*", "a[1]?{a,b}\\", "é日\u202e", "%h", "host:path"])
def test_scp_argv_names_exactly_one_file(
    base_part: Part, reliability: Recorder, tmp_path: Path, name: str
) -> None:
    reliability.bad_input("names")
    part = dataclasses.replace(base_part, ssh_port=2222)
    local = Path("rel:ative name")

    for upload in (True, False):
        sftp = ssh.copy_argv(part, name, local, upload=upload, legacy=False)
        legacy = ssh.copy_argv(part, name, local, upload=upload, legacy=True)
        for argv in (sftp, legacy):
            near = argv[-2] if upload else argv[-1]
            assert near == str(Path.cwd() / local)  # absolute: the colon cannot read as host:path
            assert argv[-3] == "--"
        expected = ("./" + name) if name.startswith(("-", "~")) else name
        sftp_path = scp_remote_path(sftp, upload)
        if upload:
            assert sftp_path == expected
        else:
            assert sftp_path.replace("\\", "") == expected.replace("\\", "")
            assert all(f"\\{c}" in sftp_path for c in expected if c in "*?[]{}")
        # The guest's shell reads the legacy path back as exactly the name, one word.
        loop = f'for w in {scp_remote_path(legacy, upload)}; do printf "%s\\0" "$w"; done'
        words = subprocess.run(["sh", "-c", loop], capture_output=True, text=True, check=True,
                               cwd=tmp_path).stdout
        assert words.split("\0")[:-1] == [expected]
    assert list(tmp_path.iterdir()) == []


def test_ssh_words_follow_a_double_dash(base_part: Part) -> None:
    part = dataclasses.replace(base_part, ssh_port=2222)
    words = ["-oProxyCommand=x", "$(id)", "a b"]

    argv = ssh.ssh_argv(part, words)

    assert argv[argv.index("--"):] == ["--", "vm", *words]
    assert "-oProxyCommand=x" not in argv[:argv.index("--")]


# -- the generated scripts, run from hostile folders -----------------------------------------------------

HOSTILE_FOLDER = "-o P=x;$(touch {c})`touch {c}` a,b'c\"d é%h"


@pytest.fixture
def hostile_root() -> Iterator[tuple[Path, Path]]:
    """A hostile folder under a short one (unix socket paths are short), and a canary that no
    command may ever create."""
    base = Path(tempfile.mkdtemp(prefix="k", dir="/tmp"))
    canary = base / "C"
    root = base / HOSTILE_FOLDER.format(c=canary)
    root.mkdir(parents=True)
    try:
        yield root, canary
        assert not canary.exists(), "a hostile path was run as a command"
    finally:
        # The folder is outside tmp_path, where no_vm_left looks: stop its VMs here.
        for pid in qemu_pids_under(base):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def hostile_part(root: Path, source: str, key: Path, ssh_port: int, extra: str = "") -> str:
    """A [vm] part whose bin and run folders and key live in root (a $ not before { is text)."""
    def written(path: Path) -> str:
        assert "${" not in str(path), "buildout has no way to write a literal ${"
        return str(path)

    return (f"[vm]\n{source}\nssh_port = {ssh_port}\nssh_key_path = {written(key)}\n"
            f"kvm_bin_directory = {written(root / 'bin')}\nkvm_run_directory = {written(root / 'var')}\n"
            f"{extra}")


def run_script(root: Path, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(root / "home")}
    return subprocess.run([str(root / "bin" / name), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=root, env=env)


def test_scripts_in_hostile_folders_run_and_fail_in_one_line(
    project: Project, hostile_root: tuple[Path, Path], reliability: Recorder
) -> None:
    root, canary = hostile_root
    disk, key = root / "disk,1.img", root / "key 50%h"
    disk.write_bytes(bytes(4096))
    key.write_text("not a key\n")
    port = free_port()  # nothing listens there
    body = hostile_part(root, f"file = {disk}", key, port)
    project.write(body)
    reliability.bad_input("names", 6)

    assert_ok(project.run("provision:vm"))
    status = run_script(root, "vm-ctl", "status")
    send = run_script(root, "vm-sendfile", "--", f"x;touch {canary}", str(disk))
    get = run_script(root, "vm-getfile", "--", f"$(touch {canary})", "-local")
    words = run_script(root, "vm-runscript", f"touch {canary};", f"$(touch {canary})")

    assert (status.returncode, status.stdout) == (3, "vm is stopped\n")
    # sendfile first asks the guest where the file goes (into a folder, through a link).
    for failed, said in ((send, f"vm-sendfile: looking up x;touch {canary} in the guest failed: "),
                         (get, "vm-getfile: scp ")):
        assert failed.returncode == 1, failed
        (line,) = failed.stderr.splitlines()
        assert line.startswith(said) and "Connection refused" in line, line
    assert words.returncode == 255 and "Connection refused" in words.stderr
    assert not (root / "-local").exists()
    assert sorted(p.name for p in (root / "bin").iterdir()) == [
        "vm-ctl", "vm-getfile", "vm-runscript", "vm-sendfile", "vm-ssh", "vm-sync"]


# -- a real guest receives and returns files with hostile names ----------------------------------------

REMOTE_NAMES = [
    " x;touch gc1&&touch gc2|touch gc3>gc4 $(touch gc5)`touch gc6` 'q\"\t%h #!é日\u202e ",
    "-rf", "~x", "*", "a[1]?{a,b}b\\c",
]


def send_and_get_back(root: Path, folder: Path, reliability: Recorder, round_: str) -> None:
    """Every remote name in and out of the guest, byte for byte, and nothing else in its home."""
    for index, name in enumerate(REMOTE_NAMES):
        reliability.bad_input("names")
        sent, back = folder / f"{round_}-sent-{index}", folder / f"{round_}-back-{index}"
        sent.write_bytes(os.urandom(1000 + index))
        # No "--" needed: the remote name is always a name, "-rf" too.
        sending = run_script(root, "vm-sendfile", name, str(sent))
        assert sending.returncode == 0, (round_, name, sending.stderr)
        getting = run_script(root, "vm-getfile", name, str(back))
        assert getting.returncode == 0, (round_, name, getting.stderr)
        assert back.read_bytes() == sent.read_bytes(), (round_, name)
    each_file = "for f in /root/* /root/.[!.]*; do [ -e \"$f\" ] && printf '%s\\0' \"${f#/root/}\"; done"
    listing = run_script(root, "vm-runscript", each_file)
    assert sorted(set(listing.stdout.split("\0")[:-1]) - {".ssh"}) == sorted(REMOTE_NAMES), round_


@needs_qemu
@pytest.mark.vm
@pytest.mark.usefixtures("no_vm_left")
def test_hostile_names_against_a_real_guest_over_sftp_then_legacy_scp(
    project: Project, guest: Guest, hostile_root: tuple[Path, Path], reliability: Recorder, tmp_path: Path,
) -> None:
    root, canary = hostile_root
    disk, key = root / "disk,1.img", root / "key 50%h"
    shutil.copyfile(guest.image.path, disk)
    shutil.copyfile(guest.key, key)
    key.chmod(0o600)
    port = free_port()
    project.write(hostile_part(root, f"file = {disk}", key, port,
                               "kvm_memory = 256M\nkvm_accel = tcg\nkvm_boot_timeout = 120\n"
                               "kvm_shutdown_timeout = 3\nkvm_snapshot = true\n"))
    started = project.run("start:vm", timeout=300)
    assert started.returncode == 0, started.describe()
    known_hosts = root / "var" / "vm" / "known_hosts"
    assert known_hosts.stat().st_size > 0  # one file, where it belongs: the path was not split
    assert sorted(p.name for p in root.iterdir()) == ["bin", disk.name, key.name, "var"]
    assert [p.name for p in canary.parent.iterdir()] == [root.relative_to(canary.parent).parts[0]]

    send_and_get_back(root, tmp_path, reliability, "sftp")
    # Without its SFTP server the guest speaks only the legacy protocol, which uses its shell.
    assert run_script(root, "vm-runscript", "rm /usr/lib/sftp-server").returncode == 0
    sftp_only = subprocess.run(["scp", *ssh.common_options(load_file(project.configs[0], root)[0]),
                                "--", "vm:-rf", str(tmp_path / "x")],
                               capture_output=True, text=True, check=False)
    assert sftp_only.returncode != 0 and any(m in sftp_only.stderr for m in ssh.NO_SFTP_MARKERS)
    send_and_get_back(root, tmp_path, reliability, "legacy")

    # runscript hands its words to the guest's shell, as ssh does; the host runs none of them.
    guest_side = run_script(root, "vm-runscript", "touch /tmp/ran-in-guest;", f"touch {canary}")
    assert guest_side.returncode != 0  # the canary's folder exists on the host only
    assert run_script(root, "vm-runscript", "test -e /tmp/ran-in-guest").returncode == 0
    assert run_script(root, "vm-ctl", "stop").returncode == 0
    assert qemu_pids_under(root) == []
