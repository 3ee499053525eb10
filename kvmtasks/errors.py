"""The exception hierarchy: one root, caught once at each boundary."""


class KvmTasksError(Exception):
    """An expected failure; its message is one line meant for the user."""


class ConfigError(KvmTasksError):
    """A config file, section, option or value is wrong."""


class FetchError(KvmTasksError):
    """Downloading or copying the image failed."""


class VerifyError(KvmTasksError):
    """A checksum did not match, or an image is corrupt."""


class VmError(KvmTasksError):
    """Starting, stopping or talking to a virtual machine failed.

    ``details`` holds what helps to see why (console log, qemu's stderr);
    it is printed after the one-line message.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class CommandError(KvmTasksError):
    """An external program is missing or failed."""
