"""The ``gpu`` record's spec (:data:`minicloud.gpu.kinds.GPU`), apart from the kind's declaration so that the
node's GPU drivers (:mod:`agent.gpu`) can build it without reaching the store's modules."""

from __future__ import annotations

import msgspec


class GpuMigSpec(msgspec.Struct, kw_only=True):
    index: int
    uuid: str
    name: str
    memory_mib: int


class GpuSpec(msgspec.Struct, kw_only=True):
    node: str
    pci_address: str
    pci_id: str
    model: str
    memory_mib: int = 0
    uuid: str = ""
    index: int | None = None
    driver: str = ""
    driver_version: str = ""
    cuda_version: str = ""
    mig_mode: str = "unsupported"
    mig_devices: list[GpuMigSpec] = []
    power_limit_w: float | None = None
    iommu_group: str = ""
    functions: list[str] = []
    capable: bool = False
    reason: str = ""
    source: str = "sysfs"
    present: bool = True
    #: Written by placement (the holder), never by the node.
    instance: str = ""
    instance_name: str = ""

    def facts(self) -> GpuSpec:
        """The node-owned part (holder fields cleared): what a publication compares."""
        return msgspec.structs.replace(self, instance="", instance_name="")
