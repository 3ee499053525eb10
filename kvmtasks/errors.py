"""The exception hierarchy: one root, one class per layer, caught once at each boundary.

The root is never raised itself: config raises ConfigError, provisioning ProvisionError (or
its FetchError and VerifyError), the engines and the guest VmError, command.py CommandError's
kinds, the demo DemoError. tests/test_errors.py keeps it so.
"""


class KvmTasksError(Exception):
    """An expected failure; its message is one line meant for the user.

    ``details`` holds what helps to see why (console log, qemu's stderr); both boundaries
    (graph/actions.py, scripts/cli.py) print it after the one-line message.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details

    def report(self, who: str) -> str:
        """What a boundary prints: ``who: message``, then the details on the lines below."""
        return f"{who}: {self}" + (f"\n{self.details}" if self.details else "")


class ConfigError(KvmTasksError):
    """A config file, section, option or value is wrong."""


class ProvisionError(KvmTasksError):
    """Getting the part's image, overlay, seed or keys failed."""


class FetchError(ProvisionError):
    """Downloading or copying the image failed."""


class VerifyError(ProvisionError):
    """A checksum did not match, or an image is corrupt."""


class VmError(KvmTasksError):
    """Starting, stopping or talking to a virtual machine failed."""


class CommandError(KvmTasksError):
    """An external program could not be run to a good end: one of the three kinds below."""


class CommandNotFound(CommandError):
    """The program is not installed (the message says which package has it)."""


class CommandTimedOut(CommandError):
    """The program was still running at its timeout, and was killed."""


class CommandFailed(CommandError):
    """The program exited with a non-zero status; ``reason`` is its last error line."""

    def __init__(self, message: str, exit_code: int, stderr: str, reason: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr = stderr
        self.reason = reason


class DemoError(KvmTasksError):
    """The demo could not show what it shows."""
