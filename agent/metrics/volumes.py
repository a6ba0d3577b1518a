"""Volume series: every volume this node manages (the ``node`` its record names: a local volume's host, a Ceph
volume's attached instance's node or the node chosen at create), so each volume is exported by exactly one node:
its size and its state, labelled like instance series (``volume_id``, ``name``, ``project_id``, ``project``) plus
its ``pool``. Read from the store once per interval (one indexed list), rendered at scrape. A volume's I/O is in the
instance disk series (``volume_id`` there too)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric

from minicloud.observe import names as n

STATES = ("creating", "available", "attaching", "in-use", "detaching", "extending", "reverting", "deleting", "error")


@dataclass(frozen=True)
class VolumeRow:
    volume_id: str
    name: str
    project: str
    project_id: str
    pool: str
    size_bytes: int
    state: str


class VolumeMetrics:
    def __init__(self, node: str, read: Callable[[], Awaitable[list[VolumeRow]]]) -> None:
        self.node = node
        self.read = read
        self.rows: list[VolumeRow] = []

    async def refresh(self) -> None:
        self.rows = await self.read()

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily(n.VOLUME_SIZE.family, n.VOLUME_SIZE.help, labels=list(n.VOLUME_SIZE.labels))
        state = GaugeMetricFamily(n.VOLUME_STATE.family, n.VOLUME_STATE.help, labels=list(n.VOLUME_STATE.labels))
        for r in self.rows:
            base = [r.volume_id, r.name, r.project_id, r.project, r.pool, self.node]
            size.add_metric(base, float(r.size_bytes))
            for name in STATES:
                state.add_metric([*base, name], 1.0 if r.state == name else 0.0)
        yield size
        yield state
