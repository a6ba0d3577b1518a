"""GPUs on this node: discovery (NVML through ``nvidia-ml-py`` and the PCI tree in sysfs), IOMMU judgement, VFIO
binding, and the ``gpu`` records the node publishes.

- :mod:`agent.gpu.nvml` — the NVML driver behind the :class:`~agent.gpu.nvml.NvmlSource` protocol (the real one
  wraps ``pynvml``; a node without ``libnvidia-ml.so.1`` or without the driver gets ``NvmlUnavailable`` and a reason);
- :mod:`agent.gpu.sysfs` — NVIDIA display controllers (vendor 0x10de, class 0x03xx) in ``/sys/bus/pci/devices`` and
  their IOMMU groups, so GPUs bound to ``vfio-pci`` (invisible to NVML) are still found;
- :mod:`agent.gpu.inventory` — the two joined into one :class:`~agent.gpu.inventory.Inventory` (what
  ``scripts/gpu-check`` prints and the node publishes), with the NVML/sysfs mismatches;
- :mod:`agent.gpu.vfio` — binding a GPU's functions to ``vfio-pci`` and giving them back (``gpu.manage_binding``);
- :mod:`agent.gpu.check` — ``scripts/gpu-check``.

These are drivers: they never touch the store. The reconciler that publishes the ``gpu`` records and the steps of a
GPU instance on its node are in :mod:`agent.reconcilers.gpu`.
"""
