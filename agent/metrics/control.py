"""The control plane's own series: the state store (commit latency as callers see it, transactions per SQLite write,
revision, a stale replica) and, on a cluster node, etcd (this node's member answering, leading Raft, the leader
changes this agent has seen, the database size) and the services leadership.

The store keeps its figures itself (``minicloud.state.stats.Distribution``: no metrics library in the store);
etcd's are read once per interval (one ``maintenance/status`` call to this node's own member) by :meth:`refresh`,
off the scrape path like the node's other collectors. Names: ``minicloud.observe.names``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from minicloud.observe import names as n
from minicloud.state.stats import Distribution

log = logging.getLogger("minicloud.metrics")


def _histogram(metric: n.Metric, node: str, dist: Distribution) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(metric.name, metric.help, labels=["node"])
    fam.add_metric([node], dist.cumulative(), dist.sum)
    return fam


class ControlPlaneMetrics:
    """``store`` is the node's ``StoreHandle``; ``cluster`` its ``ClusterNode`` (None: a single node)."""

    def __init__(self, node: str, store: Any, cluster: Any = None) -> None:
        self.node = node
        self.store = store
        self.cluster = cluster
        self.etcd: dict[str, Any] | None = None  # the last status of this node's member; None: did not answer
        self.leader_id: str | None = None
        self.leader_changes = 0

    async def refresh(self) -> None:
        cluster = self.cluster
        if cluster is None or not cluster.enabled or cluster.client is None or cluster.state is None:
            self.etcd = None
            return
        if cluster.state.role != "voter":
            self.etcd = None  # a learner's member is not asked (it follows; its health is the voters')
            return
        try:
            status = await cluster.client.status(cluster.state.client_url)
        except Exception as exc:  # an unreachable member is what this series reports
            log.debug("etcd status failed", extra={"error": str(exc)})
            self.etcd = None
            return
        leader = str(status.get("leader", "")) or None
        if leader is not None and self.leader_id is not None and leader != self.leader_id:
            self.leader_changes += 1
        if leader is not None:
            self.leader_id = leader
        self.etcd = status

    def collect(self) -> Iterator[Metric]:
        node = self.node
        store = self.store
        if hasattr(store, "commit_seconds"):
            yield _histogram(n.STORE_COMMIT_DURATION, node, store.commit_seconds)
        local = getattr(store, "local", store)
        if hasattr(local, "batch_sizes"):
            yield _histogram(n.STORE_COMMIT_BATCH, node, local.batch_sizes)
        rev = GaugeMetricFamily(n.STORE_REVISION.family, n.STORE_REVISION.help, labels=["node"])
        rev.add_metric([node], float(store.revision))
        yield rev
        stale = GaugeMetricFamily(n.STORE_STALE.family, n.STORE_STALE.help, labels=["node"])
        stale.add_metric([node], 1.0 if getattr(store, "stale", False) else 0.0)
        yield stale
        cluster = self.cluster
        if cluster is None or not cluster.enabled or cluster.state is None:
            return
        leading = GaugeMetricFamily(n.SERVICES_LEADER.family, n.SERVICES_LEADER.help, labels=["node"])
        leading.add_metric([node], 1.0 if cluster.is_leader else 0.0)
        yield leading
        if cluster.state.role != "voter":
            return
        status = self.etcd
        up = GaugeMetricFamily(n.ETCD_UP.family, n.ETCD_UP.help, labels=["node"])
        up.add_metric([node], 0.0 if status is None else 1.0)
        yield up
        changes = CounterMetricFamily(n.ETCD_LEADER_CHANGES.family, n.ETCD_LEADER_CHANGES.help, labels=["node"])
        changes.add_metric([node], float(self.leader_changes))
        yield changes
        if status is None:
            return
        member = str((status.get("header") or {}).get("member_id", ""))
        is_leader = GaugeMetricFamily(n.ETCD_IS_LEADER.family, n.ETCD_IS_LEADER.help, labels=["node"])
        is_leader.add_metric([node], 1.0 if member and member == str(status.get("leader", "")) else 0.0)
        yield is_leader
        has_leader = GaugeMetricFamily(n.ETCD_HAS_LEADER.family, n.ETCD_HAS_LEADER.help, labels=["node"])
        has_leader.add_metric([node], 1.0 if str(status.get("leader", "0")) not in ("", "0") else 0.0)
        yield has_leader
        size = GaugeMetricFamily(n.ETCD_DB_SIZE.family, n.ETCD_DB_SIZE.help, labels=["node"])
        size.add_metric([node], float(status.get("dbSize", 0) or 0))
        yield size
