"""The libvirt engine: the part's VM as a libvirt domain, local or remote."""
