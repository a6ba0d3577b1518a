"""Growing from one node to a cluster: join tokens, node certificates and (later) etcd membership."""
