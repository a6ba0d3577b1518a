"""Instance figures from libvirt's bulk domain statistics: **one** ``virConnect.getAllDomainStats`` call per interval
for every domain of the node (not one call per domain), rendered with the instance's id, name, project id and project
name (the query API enforces the id; the name is for display).

:class:`LibvirtStats` makes the call (blocking, on its own read-only connection and thread); :func:`instance_families`
renders a list of ``(uuid, stats)`` pairs (pure: tested with a fake stats list). Stats keys are libvirt's
(``virDomainListGetStats``): ``state.state``, ``cpu.time`` (ns), ``vcpu.current``, ``balloon.current`` /
``.available`` / ``.unused`` / ``.rss`` (KiB), ``block.<i>.name`` / ``.rd.bytes`` / ``.wr.bytes`` / ``.rd.reqs`` /
``.wr.reqs``, ``net.<i>.name`` / ``.rx.bytes`` / ``.tx.bytes`` / ``.rx.pkts`` / ``.tx.pkts`` / ``.rx.drop`` /
``.tx.drop``. A stopped domain reports only its state, so its usage series stop. A disk that is an attached volume
carries the volume's id (``volume_id``; empty for the root disk), so a volume's I/O is queryable by the volume.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from minicloud.observe import names as n

#: libvirt ``virDomainState`` → the state label (blocked and shutting down are still running; pmsuspended paused).
STATES = {0: "other", 1: "running", 2: "running", 3: "paused", 4: "running", 5: "shutoff", 6: "crashed", 7: "paused"}
STATE_NAMES = ("running", "paused", "shutoff", "crashed", "other")


@dataclass(frozen=True)
class InstanceLabels:
    instance_id: str
    name: str
    #: The project's name (display) and id (what the query API enforces).
    project: str
    project_id: str
    #: Guest disk (``vdb`` …) → the attached volume's id (the ``diskslots`` record): the disk series' ``volume_id``.
    volumes: Mapping[str, str] = field(default_factory=dict)


class LibvirtStats:
    """``read()`` → ``[(uuid, stats), …]`` for every domain, from one ``getAllDomainStats`` call on a read-only
    connection opened on first use and reopened after an error. Blocking: call it from a worker thread."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        self._lock = threading.Lock()

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        import libvirt

        flags = (
            libvirt.VIR_DOMAIN_STATS_STATE
            | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_BALLOON
            | libvirt.VIR_DOMAIN_STATS_VCPU
            | libvirt.VIR_DOMAIN_STATS_INTERFACE
            | libvirt.VIR_DOMAIN_STATS_BLOCK
        )
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = libvirt.openReadOnly(self.uri)
                return [(dom.UUIDString(), stats) for dom, stats in self._conn.getAllDomainStats(flags, 0)]
            except libvirt.libvirtError:
                self.close()
                raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def _family(metric: n.Metric) -> Any:
    cls = CounterMetricFamily if metric.type == "counter" else GaugeMetricFamily
    return cls(metric.family, metric.help, labels=list(metric.labels))


_BLOCK = (
    (n.INSTANCE_DISK_READ_BYTES, "rd.bytes"),
    (n.INSTANCE_DISK_WRITTEN_BYTES, "wr.bytes"),
    (n.INSTANCE_DISK_READS, "rd.reqs"),
    (n.INSTANCE_DISK_WRITES, "wr.reqs"),
)
_NET = (
    (n.INSTANCE_NET_RX_BYTES, "rx.bytes"),
    (n.INSTANCE_NET_TX_BYTES, "tx.bytes"),
    (n.INSTANCE_NET_RX_PACKETS, "rx.pkts"),
    (n.INSTANCE_NET_TX_PACKETS, "tx.pkts"),
    (n.INSTANCE_NET_RX_DROP, "rx.drop"),
    (n.INSTANCE_NET_TX_DROP, "tx.drop"),
)
_BALLOON = (
    (n.INSTANCE_MEMORY, "balloon.current"),
    (n.INSTANCE_MEMORY_AVAILABLE, "balloon.available"),
    (n.INSTANCE_MEMORY_UNUSED, "balloon.unused"),
    (n.INSTANCE_MEMORY_RSS, "balloon.rss"),
)


def instance_families(
    stats: list[tuple[str, Mapping[str, Any]]], instances: Mapping[str, InstanceLabels], node: str
) -> Iterator[Metric]:
    """Metric families for one bulk stats list (pure). Domains that are not instances in ``instances`` (keyed by
    the domain uuid) are skipped."""
    fams = {m.name: _family(m) for m in (n.INSTANCE_STATE, n.INSTANCE_CPU_SECONDS, n.INSTANCE_VCPUS)}
    fams.update({m.name: _family(m) for m, _ in (*_BLOCK, *_NET, *_BALLOON)})
    for uuid, s in stats:
        inst = instances.get(uuid.lower())
        if inst is None:
            continue
        base = [inst.instance_id, inst.name, inst.project_id, inst.project, node]
        state = STATES.get(int(s.get("state.state", 0)), "other")
        for name in STATE_NAMES:
            fams[n.INSTANCE_STATE.name].add_metric([*base, name], 1.0 if name == state else 0.0)
        if state not in ("running", "paused"):
            continue  # a stopped guest's usage series stop
        if "cpu.time" in s:
            fams[n.INSTANCE_CPU_SECONDS.name].add_metric(base, s["cpu.time"] / 1e9)
        if "vcpu.current" in s:
            fams[n.INSTANCE_VCPUS.name].add_metric(base, s["vcpu.current"])
        for metric, key in _BALLOON:
            if key in s:
                fams[metric.name].add_metric(base, s[key] * 1024.0)
        for i in range(int(s.get("block.count", 0))):
            device = s.get(f"block.{i}.name")
            if not device:
                continue
            volume = inst.volumes.get(device, "")
            for metric, key in _BLOCK:
                if (value := s.get(f"block.{i}.{key}")) is not None:
                    fams[metric.name].add_metric([*base, device, volume], value)
        for i in range(int(s.get("net.count", 0))):
            nic = s.get(f"net.{i}.name")
            if not nic:
                continue
            for metric, key in _NET:
                if (value := s.get(f"net.{i}.{key}")) is not None:
                    fams[metric.name].add_metric([*base, nic], value)
    yield from fams.values()
