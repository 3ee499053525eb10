"""kvmtasks: doit task graphs that provision and run QEMU/KVM virtual machines."""
