"""GPU figures for ``/metrics``: utilisation, memory, temperature and power of the GPUs NVML still sees (a GPU bound
to ``vfio-pci`` for a guest is invisible to it: the guest's own tools report it), and one info series per GPU found.

:func:`gpu_families` renders an :class:`~agent.gpu.inventory.Inventory` (pure). The node's collector
(:class:`agent.metrics.NodeMetrics`) takes a fresh one each ``metrics.scrape_interval`` off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from agent.gpu.inventory import Inventory
from minicloud.observe import names as n

GPU_METRICS = (
    n.GPU_UTILIZATION,
    n.GPU_MEMORY_USED,
    n.GPU_MEMORY_TOTAL,
    n.GPU_TEMPERATURE,
    n.GPU_POWER,
    n.GPU_POWER_LIMIT,
    n.GPU_INFO,
)


def gpu_families(inv: Inventory) -> Iterator[Metric]:
    """The GPU families of one inventory (an absent figure is left out rather than reported as 0)."""
    fams = {m.name: GaugeMetricFamily(m.family, m.help, labels=list(m.labels)) for m in GPU_METRICS}
    for g in inv.gpus:
        s = g.spec
        labels = [inv.node, s.uuid or s.pci_address, s.pci_address, s.model]
        fams[n.GPU_INFO.name].add_metric([*labels, s.driver, "true" if s.capable else "false"], 1)
        if s.source != "nvml":
            continue  # NVML cannot see it: no live figures
        for metric, value in (
            (n.GPU_UTILIZATION, None if g.utilization_pct is None else g.utilization_pct / 100),
            (n.GPU_MEMORY_USED, None if g.memory_used_mib is None else g.memory_used_mib << 20),
            (n.GPU_MEMORY_TOTAL, s.memory_mib << 20),
            (n.GPU_TEMPERATURE, g.temperature_c),
            (n.GPU_POWER, g.power_w),
            (n.GPU_POWER_LIMIT, s.power_limit_w),
        ):
            if value is not None:
                fams[metric.name].add_metric(labels, value)
    yield from fams.values()
