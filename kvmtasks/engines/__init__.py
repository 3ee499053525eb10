"""Running a part's VM: directly with QEMU (argv, QMP, start/stop/status) or as a libvirt domain."""
