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
    """Starting, stopping or talking to a virtual machine failed."""


class CommandError(KvmTasksError):
    """An external program is missing or failed."""
