"""Running a part's VM: the QEMU command line, QMP, start, stop and status."""
