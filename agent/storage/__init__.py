"""Storage on the node: the Ceph cluster minicloud runs (``ceph``) and the volume drivers (RBD, local qcow2)."""
