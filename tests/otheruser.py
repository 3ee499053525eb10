"""Running a check as another user (nobody) in a child forked from the test.

The child needs nothing from the filesystem (neither the checkout nor the
interpreter): it works from a checkout in a folder only its owner can enter.
"""

from __future__ import annotations

import os
import pwd
import traceback
from collections.abc import Callable


def run_as(user: str, check: Callable[[], str]) -> str:
    """check's result, computed as user (its uid and group, no other groups)."""
    account = pwd.getpwnam(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            os.write(write_end, check().encode())
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        result = reader.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the check as {user} failed (its traceback is above)"
    return result
