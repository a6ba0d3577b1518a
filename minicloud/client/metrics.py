"""SDK for metrics: ``client.metrics.query(promql)`` and ``client.metrics.query_range(promql, start=…, step=…)``,
answered for the client's project (``?project=``); ``scope="cluster"`` for administrators."""

from __future__ import annotations

from typing import TYPE_CHECKING

from minicloud.model.metrics import MetricsResult

if TYPE_CHECKING:
    from minicloud.client import Client


class Metrics:
    def __init__(self, client: Client) -> None:
        self._c = client

    def query(self, promql: str, *, time: str | None = None, scope: str | None = None) -> MetricsResult:
        """An instant query (``time``: Unix seconds, RFC 3339, ``now`` or ``-5m``; default now)."""
        query = {"query": promql, "time": time, "scope": scope}
        return self._c.call("GET", "/v1/metrics/query", MetricsResult, query=query)

    def query_range(
        self,
        promql: str,
        *,
        start: str | None = None,
        end: str | None = None,
        step: str | None = None,
        scope: str | None = None,
    ) -> MetricsResult:
        """A range query (default: the last hour at ~240 points; ``step`` like ``30s``, ``5m``)."""
        query = {"query": promql, "start": start, "end": end, "step": step, "scope": scope}
        return self._c.call("GET", "/v1/metrics/query_range", MetricsResult, query=query)
