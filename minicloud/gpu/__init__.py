"""GPUs in the control plane: the ``gpu`` kind (:mod:`.kinds`), the node's publication of its inventory and the
scheduler's holding and release of GPUs (:mod:`.service`)."""
