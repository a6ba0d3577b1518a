"""The node's collectors behind ``GET /metrics`` (names and labels: ``minicloud.observe.names``).

:class:`NodeMetrics` is one prometheus-client collector registered in the application's registry. Every
``metrics.scrape_interval`` its :meth:`~NodeMetrics.refresh` takes a psutil snapshot (``node.py``) and makes **one**
libvirt bulk stats call (``instances.py``), off the event loop, and keeps the result; a scrape renders the last
snapshots, so scraping costs no host calls and three TSDBs scraping a node cost the same as one. Reconcile passes
are counted as they happen (``Controller(observe=…)``), API requests by ``minicloud.api.metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.gpu.inventory import Inventory
from agent.metrics.gpu import gpu_families
from agent.metrics.instances import InstanceLabels, LibvirtStats, instance_families
from agent.metrics.node import NodeSnapshot, node_families, read_node
from minicloud.observe import names as n

log = logging.getLogger("minicloud.metrics")

__all__ = ["InstanceLabels", "LibvirtStats", "NodeMetrics"]


class NodeMetrics:
    """The node's collectors. ``instances`` reads which domains are instances (uuid → labels; from the store);
    ``stats`` is the libvirt bulk stats source (None without a hypervisor); ``operations`` counts the operations this
    node runs now."""

    def __init__(
        self,
        registry: CollectorRegistry,
        node: str,
        *,
        stats: LibvirtStats | None = None,
        instances: Callable[[], Awaitable[Mapping[str, InstanceLabels]]] | None = None,
        operations: Callable[[], int] | None = None,
        read_node: Callable[[], NodeSnapshot] = read_node,
        gpus: Callable[[], Inventory] | None = None,
    ) -> None:
        self.node = node
        self.stats = stats
        self.instances = instances
        self.operations = operations
        self._read_node = read_node
        #: A fresh GPU inventory (blocking: NVML and sysfs), or None without GPU discovery.
        self.gpus = gpus
        self.gpu_inventory: Inventory | None = None
        self.node_snapshot: NodeSnapshot | None = None
        self.instance_stats: list[tuple[str, Mapping[str, Any]]] = []
        self.instance_labels: Mapping[str, InstanceLabels] = {}
        self.durations: dict[str, float] = {}
        self.errors: dict[str, int] = {"node": 0, "instances": 0}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self.reconcile_passes = Counter(
            n.RECONCILE_PASSES.family, n.RECONCILE_PASSES.help, list(n.RECONCILE_PASSES.labels), registry=registry
        )
        self.reconcile_duration = Histogram(
            n.RECONCILE_DURATION.name,
            n.RECONCILE_DURATION.help,
            list(n.RECONCILE_DURATION.labels),
            buckets=n.BUCKETS,
            registry=registry,
        )
        registry.register(self)  # type: ignore[arg-type]

    # -- reconcile passes (Controller(observe=...)) -----------------------------------------------------------------
    def observe_reconcile(self, reconciler: str, seconds: float, ok: bool) -> None:
        self.reconcile_passes.labels(self.node, reconciler, "ok" if ok else "error").inc()
        self.reconcile_duration.labels(self.node, reconciler).observe(seconds)

    # -- collection ------------------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Take a new node snapshot and one bulk stats list (each failure is counted and logged; the last good
        figures stay until the next success, except instances, which are dropped so a dead libvirt shows)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            self.node_snapshot = await loop.run_in_executor(self._pool, self._read_node)
        except Exception:
            self.errors["node"] += 1
            log.warning("collecting node figures failed", exc_info=True)
        self.durations["node"] = time.perf_counter() - started
        if self.gpus is not None:
            started = time.perf_counter()
            try:
                self.gpu_inventory = await loop.run_in_executor(self._pool, self.gpus)
            except Exception as exc:
                self.errors["gpus"] = self.errors.get("gpus", 0) + 1
                self.gpu_inventory = None
                log.warning("collecting GPU figures failed", extra={"error": str(exc)})
            self.durations["gpus"] = time.perf_counter() - started
        if self.stats is None:
            return
        started = time.perf_counter()
        try:
            labels = await self.instances() if self.instances is not None else {}
            stats = await loop.run_in_executor(self._pool, self.stats.read)
        except Exception as exc:
            self.errors["instances"] += 1
            self.instance_stats = []
            log.warning("collecting instance figures failed", extra={"error": str(exc)})
        else:
            self.instance_labels = {k.lower(): v for k, v in labels.items()}
            self.instance_stats = stats
        self.durations["instances"] = time.perf_counter() - started

    async def run(self, interval: float) -> None:
        """Refresh every ``interval`` seconds until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self.stats is not None:
            with contextlib.suppress(Exception):
                self._pool.submit(self.stats.close).result(timeout=5)
        self._pool.shutdown(wait=False)

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's collector protocol: the last snapshots as families."""
        if self.node_snapshot is not None:
            yield from node_families(self.node_snapshot, self.node)
        if self.stats is not None:
            yield from instance_families(self.instance_stats, self.instance_labels, self.node)
        if self.gpu_inventory is not None:
            yield from gpu_families(self.gpu_inventory)
        if self.operations is not None:
            ops = GaugeMetricFamily(n.OPERATIONS.family, n.OPERATIONS.help, labels=list(n.OPERATIONS.labels))
            ops.add_metric([self.node, "running"], self.operations())
            yield ops
        took = GaugeMetricFamily(n.COLLECT_DURATION.family, n.COLLECT_DURATION.help, labels=["node", "source"])
        for source, seconds in sorted(self.durations.items()):
            took.add_metric([self.node, source], seconds)
        yield took
        failed = CounterMetricFamily(n.COLLECT_ERRORS.family, n.COLLECT_ERRORS.help, labels=["node", "source"])
        for source, count in sorted(self.errors.items()):
            failed.add_metric([self.node, source], count)
        yield failed
