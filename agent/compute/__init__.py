"""Compute on a node: libvirt domain XML, guest design, NoCloud seeds, the libvirt driver and its reconciler."""
