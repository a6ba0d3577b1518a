"""The node daemon (``minicloud agent``) and its drivers for the real host: libvirt, netlink, GPUs, host metrics."""
