"""The direct QEMU engine: QEMU started by kvmtasks itself."""
