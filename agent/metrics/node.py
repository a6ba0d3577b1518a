"""Node figures from psutil: CPU by mode, load, memory, filesystems, disk I/O and network interfaces.

:func:`read_node` takes one snapshot (blocking: run it off the event loop); :func:`node_families` renders a snapshot
as metric families (pure, so it is tested with psutil's shapes and no host)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from minicloud.observe import names as n

#: Interfaces not reported per node: guests' taps and veths (the instance series count their traffic).
SKIPPED_INTERFACES = ("tap", "vnet", "veth")


@dataclass
class NodeSnapshot:
    cpu_times: dict[str, float]
    cpu_count: int
    load: tuple[float, float, float]
    memory_total: int
    memory_available: int
    #: mountpoint -> (device, size, free)
    filesystems: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    #: device -> psutil ``sdiskio`` (read_bytes, write_bytes, read_count, write_count)
    disks: dict[str, Any] = field(default_factory=dict)
    #: interface -> psutil ``snetio`` (bytes_recv, bytes_sent, packets_recv, packets_sent, dropin, dropout)
    nics: dict[str, Any] = field(default_factory=dict)


def read_node() -> NodeSnapshot:
    """One psutil snapshot of this host. Blocking (reads /proc and statfs)."""
    import psutil

    vm = psutil.virtual_memory()
    filesystems: dict[str, tuple[str, int, int]] = {}
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=False):
        if part.device in seen:  # bind mounts of the same device: report it once
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        seen.add(part.device)
        filesystems[part.mountpoint] = (part.device, usage.total, usage.free)
    return NodeSnapshot(
        cpu_times=psutil.cpu_times()._asdict(),
        cpu_count=psutil.cpu_count() or 1,
        load=os.getloadavg(),
        memory_total=vm.total,
        memory_available=vm.available,
        filesystems=filesystems,
        disks=dict(psutil.disk_io_counters(perdisk=True, nowrap=True) or {}),
        nics={
            k: v
            for k, v in psutil.net_io_counters(pernic=True, nowrap=True).items()
            if not k.startswith(SKIPPED_INTERFACES)
        },
    )


def _family(metric: n.Metric, labels: tuple[str, ...] | None = None) -> Any:
    cls = CounterMetricFamily if metric.type == "counter" else GaugeMetricFamily
    return cls(metric.family, metric.help, labels=list(labels or metric.labels))


def node_families(snap: NodeSnapshot, node: str) -> Iterator[Metric]:
    """The node's metric families for one snapshot (pure)."""
    cpu = _family(n.NODE_CPU_SECONDS)
    for mode, seconds in snap.cpu_times.items():
        cpu.add_metric([node, mode], seconds)
    yield cpu
    for metric, value in (
        (n.NODE_CPUS, snap.cpu_count),
        (n.NODE_LOAD1, snap.load[0]),
        (n.NODE_LOAD5, snap.load[1]),
        (n.NODE_LOAD15, snap.load[2]),
        (n.NODE_MEMORY_TOTAL, snap.memory_total),
        (n.NODE_MEMORY_AVAILABLE, snap.memory_available),
        (n.NODE_MEMORY_USED, snap.memory_total - snap.memory_available),
    ):
        fam = _family(metric)
        fam.add_metric([node], value)
        yield fam
    size, free = _family(n.NODE_FS_SIZE), _family(n.NODE_FS_FREE)
    for mountpoint, (device, total, available) in sorted(snap.filesystems.items()):
        size.add_metric([node, mountpoint, device], total)
        free.add_metric([node, mountpoint, device], available)
    yield size
    yield free
    for metric, attr in (
        (n.NODE_DISK_READ_BYTES, "read_bytes"),
        (n.NODE_DISK_WRITTEN_BYTES, "write_bytes"),
        (n.NODE_DISK_READS, "read_count"),
        (n.NODE_DISK_WRITES, "write_count"),
    ):
        fam = _family(metric)
        for device, io in sorted(snap.disks.items()):
            fam.add_metric([node, device], getattr(io, attr))
        yield fam
    for metric, attr in (
        (n.NODE_NET_RX_BYTES, "bytes_recv"),
        (n.NODE_NET_TX_BYTES, "bytes_sent"),
        (n.NODE_NET_RX_PACKETS, "packets_recv"),
        (n.NODE_NET_TX_PACKETS, "packets_sent"),
        (n.NODE_NET_RX_DROP, "dropin"),
        (n.NODE_NET_TX_DROP, "dropout"),
    ):
        fam = _family(metric)
        for nic, io in sorted(snap.nics.items()):
            fam.add_metric([node, nic], getattr(io, attr))
        yield fam
