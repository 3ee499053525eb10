"""ssh key pairs kvmtasks makes for a part: made once, kept private, never logged."""

from __future__ import annotations

import os
from pathlib import Path

from kvmtasks import command
from kvmtasks.errors import ProvisionError


def public_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def ensure_pair(private: Path, comment: str) -> None:
    """An ed25519 pair at private and private.pub, made by ssh-keygen unless both exist."""
    public = public_path(private)
    if private.is_file() and public.is_file():
        return
    private.parent.mkdir(parents=True, exist_ok=True)
    # ssh-keygen writes the pair beside a temporary name: a crash never leaves half a pair.
    temporary = private.with_name(f".{private.name}.new")
    for path in (temporary, public_path(temporary)):
        path.unlink(missing_ok=True)
    command.checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(temporary)],
                    timeout=60, doing=f"making the key pair {private}")
    temporary.chmod(0o600)
    os.replace(public_path(temporary), public)
    os.replace(temporary, private)


def read_public(private: Path) -> str:
    """The public key line of a pair, from its .pub file."""
    public = public_path(private)
    try:
        text = public.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ProvisionError(f"cannot read the public key {public}: {error}") from None
    if not text or "\n" in text:
        raise ProvisionError(f"{public} does not hold one public key line")
    return text
