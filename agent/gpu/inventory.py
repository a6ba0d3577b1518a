"""This node's GPUs: NVML and sysfs joined, judged for passthrough, as the node publishes them.

:func:`discover` starts from sysfs (every NVIDIA display controller, whatever driver holds it) and adds what NVML
knows of the ones the NVIDIA driver drives (UUID, name, memory, MIG, power limit, live figures). A GPU bound to
``vfio-pci`` is named from pci.ids (NVML cannot see it). A node without NVIDIA hardware, or without
``libnvidia-ml.so.1``, gets an inventory with no GPUs (or sysfs-only ones) and a ``reason``; nothing raises.

:meth:`Inventory.mismatches` lists disagreements between the two sources (``scripts/gpu-check`` exits non-zero on
them): a GPU NVML reports that sysfs does not show as an NVIDIA display controller, or a GPU bound to ``nvidia`` that
NVML does not report.

Blocking (file reads, NVML calls): run it in an executor from async code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.gpu.nvml import NvmlDevice, NvmlReading, NvmlSource, NvmlUnavailable
from agent.gpu.sysfs import Sysfs
from minicloud.gpu.spec import GpuMigSpec, GpuSpec
from minicloud.model import NodeGpus


@dataclass(frozen=True)
class GpuFound:
    """One GPU: what the node publishes (``spec``) and the live figures it reports as metrics (None: unknown)."""

    spec: GpuSpec
    temperature_c: float | None = None
    utilization_pct: float | None = None
    memory_used_mib: int | None = None
    power_w: float | None = None


@dataclass(frozen=True)
class Inventory:
    node: str
    gpus: tuple[GpuFound, ...]
    #: Why NVML could not be used ("" when it could).
    nvml_reason: str = ""
    iommu_enabled: bool = False
    #: NVML GPUs with no NVIDIA display controller at their sysfs address.
    nvml_only: tuple[str, ...] = field(default=())

    @property
    def reason(self) -> str:
        """Why this node has no GPUs ("" when it has some)."""
        if self.gpus:
            return ""
        why = "no NVIDIA GPU on this node (no PCI device of vendor 0x10de, class 0x03xx in /sys/bus/pci/devices)"
        return f"{why}; NVML: {self.nvml_reason}" if self.nvml_reason else why

    def mismatches(self) -> list[str]:
        out = [f"NVML reports a GPU at {a}, but sysfs has no NVIDIA display controller there" for a in self.nvml_only]
        for g in self.gpus:
            if g.spec.driver == "nvidia" and g.spec.source != "nvml" and not self.nvml_reason:
                out.append(f"{g.spec.pci_address} is bound to the nvidia driver, but NVML does not report it")
        return out

    def specs(self) -> list[GpuSpec]:
        return [g.spec for g in self.gpus]


def _model(name: str) -> str:
    return name.removeprefix("NVIDIA ").strip() or name


def discover(node: str, nvml: NvmlSource, sysfs: Sysfs) -> Inventory:
    """The inventory of ``node`` now (see the module docstring). Never raises for missing NVML or hardware."""
    reading: NvmlReading | None
    nvml_reason = ""
    try:
        reading = nvml.read()
    except NvmlUnavailable as exc:
        reading, nvml_reason = None, str(exc)
    by_address: dict[str, NvmlDevice] = {d.pci_address: d for d in reading.devices} if reading else {}
    found: list[GpuFound] = []
    seen: set[str] = set()
    for fn in sysfs.gpus():
        seen.add(fn.address)
        judged = sysfs.judge(fn)
        dev = by_address.get(fn.address)
        common = {
            "node": node,
            "pci_address": fn.address,
            "pci_id": f"{fn.vendor.removeprefix('0x')}:{fn.device.removeprefix('0x')}",
            "driver": fn.driver,
            "iommu_group": fn.iommu_group,
            "functions": list(judged.functions),
            "capable": judged.capable,
            "reason": judged.reason,
        }
        if dev is None or reading is None:
            found.append(GpuFound(spec=GpuSpec(model=sysfs.model_name(fn.device), source="sysfs", **common)))
            continue
        spec = GpuSpec(
            model=_model(dev.name),
            memory_mib=dev.memory_mib,
            uuid=dev.uuid,
            index=dev.index,
            driver_version=reading.driver_version,
            cuda_version=reading.cuda_version,
            mig_mode=dev.mig_mode,
            mig_devices=[
                GpuMigSpec(index=m.index, uuid=m.uuid, name=m.name, memory_mib=m.memory_mib) for m in dev.mig_devices
            ],
            power_limit_w=dev.power_limit_w,
            source="nvml",
            **common,
        )
        found.append(
            GpuFound(
                spec=spec,
                temperature_c=dev.temperature_c,
                utilization_pct=dev.utilization_pct,
                memory_used_mib=dev.memory_used_mib,
                power_w=dev.power_w,
            )
        )
    return Inventory(
        node=node,
        gpus=tuple(found),
        nvml_reason=nvml_reason,
        iommu_enabled=sysfs.iommu_enabled(),
        nvml_only=tuple(sorted(a for a in by_address if a not in seen)),
    )


def summary(inv: Inventory) -> NodeGpus:
    """``node show``'s line: the count, how many are capable, the models, and why none (or why no NVML)."""
    counts: dict[str, int] = {}
    for g in inv.gpus:
        counts[g.spec.model] = counts.get(g.spec.model, 0) + 1
    driver = next((g.spec.driver_version for g in inv.gpus if g.spec.driver_version), "")
    return NodeGpus(
        count=len(inv.gpus),
        capable=sum(1 for g in inv.gpus if g.spec.capable),
        models=[f"{n} x {model}" for model, n in sorted(counts.items())],
        reason=inv.reason or inv.nvml_reason,
        driver_version=driver,
    )
