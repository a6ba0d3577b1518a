"""The ``gpu`` resource as the API shows it (cluster administrators): one per GPU of every node."""

from __future__ import annotations

import msgspec

from minicloud.model import Resource


class GpuMig(msgspec.Struct, kw_only=True):
    index: int
    uuid: str
    name: str
    memory_mib: int


class Gpu(Resource, kw_only=True):
    """A GPU a node found: facts from NVML where the NVIDIA driver sees it, else from sysfs (a GPU bound to
    ``vfio-pci``), the IOMMU judgement, and the instance that holds it. Live figures (temperature, utilisation,
    power) are metrics (``minicloud_gpu_*``), not fields here."""

    node: str
    pci_address: str
    #: ``10de:2330``.
    pci_id: str
    model: str
    memory_mib: int = 0
    uuid: str = ""
    #: NVML's index ("None" while NVML cannot see it).
    index: int | None = None
    #: The kernel driver bound now: ``nvidia``, ``vfio-pci`` or "".
    driver: str = ""
    driver_version: str = ""
    cuda_version: str = ""
    mig_mode: str = "unsupported"
    mig_devices: list[GpuMig] = []
    power_limit_w: float | None = None
    iommu_group: str = ""
    #: Every PCI function that goes to a guest with it (the GPU first).
    functions: list[str] = []
    #: Passthrough-capable (IOMMU on, a group of its own functions and bridges); ``reason`` says why not.
    capable: bool = False
    reason: str = ""
    #: ``nvml`` or ``sysfs``.
    source: str = "sysfs"
    #: False once the node no longer finds it (kept while an instance holds it).
    present: bool = True
    #: The instance holding it ("" when free) and its name.
    instance: str = ""
    instance_name: str = ""
