"""GPU series on the node's ``/metrics``: live NVML figures for the GPUs NVML sees, only the info series for a GPU
bound to vfio-pci, and a failed collection counted."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.gpu.inventory import discover
from agent.gpu.nvml import PynvmlSource
from agent.gpu.sysfs import Sysfs
from agent.metrics import NodeMetrics
from agent.metrics.node import NodeSnapshot
from tests.unit.gpu.fakes import FakeGpu, FakePynvml, FakeSysfs


def _snapshot() -> NodeSnapshot:
    return NodeSnapshot(cpu_times={"user": 1.0}, cpu_count=2, load=(0.0, 0.0, 0.0), memory_total=1, memory_available=1)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_gpu_series_are_collected_off_the_loop_and_rendered(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:3b:00.0", group="7")
    fs.add("0000:af:00.0", driver="vfio-pci", group="9")
    nv = FakePynvml([FakeGpu(uuid="GPU-a", name="NVIDIA H100 80GB HBM3", bus_id="00000000:3B:00.0")])
    registry = CollectorRegistry(auto_describe=False)
    metrics = NodeMetrics(
        registry, "n1", read_node=_snapshot, gpus=lambda: discover("n1", PynvmlSource(nv), Sysfs(fs.root, pci_ids=()))
    )
    try:
        await metrics.refresh()
        samples = _samples(generate_latest(registry).decode())
        a = (("gpu", "GPU-a"), ("model", "H100 80GB HBM3"), ("node", "n1"), ("pci_address", "0000:3b:00.0"))
        assert samples[("minicloud_gpu_utilization_ratio", a)] == 0.12
        assert samples[("minicloud_gpu_temperature_celsius", a)] == 41.0
        assert samples[("minicloud_gpu_memory_used_bytes", a)] == 1024 << 20
        assert samples[("minicloud_gpu_power_watts", a)] == 85.0
        assert samples[("minicloud_gpu_power_limit_watts", a)] == 700.0
        vfio = tuple(sorted({"gpu": "0000:af:00.0", "model": "NVIDIA device 10de:2330", "node": "n1",
                             "pci_address": "0000:af:00.0", "driver": "vfio-pci", "capable": "true"}.items()))  # fmt: skip
        assert samples[("minicloud_gpu_info", vfio)] == 1
        assert not any(name == "minicloud_gpu_temperature_celsius" and ("gpu", "0000:af:00.0") in labels
                       for name, labels in samples)  # fmt: skip

        def broken():
            raise RuntimeError("sysfs went away")

        metrics.gpus = broken
        await metrics.refresh()
        text = generate_latest(registry).decode()
        assert 'minicloud_metrics_collect_errors_total{node="n1",source="gpus"} 1.0' in text
        assert "minicloud_gpu_info{" not in text
    finally:
        metrics.close()
