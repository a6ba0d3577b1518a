"""Metrics query request and response types (shared by server, SDK and CLI). The answer keeps the Prometheus HTTP
API's ``data`` shape (``resultType`` + ``result``), so PromQL tools and users' scripts read it unchanged."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

#: A PromQL/MetricsQL expression.
PromQL = Annotated[str, Meta(min_length=1, max_length=8192)]
#: A time: Unix seconds, RFC 3339, ``now`` or ``now-1h`` / ``-1h``.
TimeParam = Annotated[str, Meta(min_length=1, max_length=64, description="Unix seconds, RFC 3339, 'now', '-1h'")]
#: A duration: seconds, or a number with a unit (``15s``, ``5m``, ``1h``, ``2d``, ``1w``).
DurationParam = Annotated[str, Meta(min_length=1, max_length=32, description="seconds or 15s, 5m, 1h, 2d, 1w")]
Scope = Literal["project", "cluster"]


class MetricsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``GET /v1/metrics/query``: an instant query."""

    query: PromQL
    #: Evaluation time (default: now).
    time: TimeParam | None = None
    #: ``project`` (default): series of ``?project=`` only. ``cluster``: every series (nodes, API; an admin action).
    scope: Scope = "project"


class MetricsRangeQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``GET /v1/metrics/query_range``: a range query; ``end - start`` and ``step`` are bounded
    (``metrics.query_max_range_days``, ``metrics.query_max_points``)."""

    query: PromQL
    #: Default: one hour before ``end``.
    start: TimeParam | None = None
    #: Default: now.
    end: TimeParam | None = None
    #: Default: the range / 240, at least ``metrics.query_min_step`` seconds.
    step: DurationParam | None = None
    scope: Scope = "project"


class NodeMetricsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``GET /v1/metrics/node/query[_range]``: a query another node of the cluster forwards (a learner runs no TSDB),
    with the scope it has already decided for its caller: ``project_id`` and ``project_name``, or neither (cluster
    scope, for an administrator). Answered only to a cluster node's certificate."""

    query: PromQL
    time: TimeParam | None = None
    start: TimeParam | None = None
    end: TimeParam | None = None
    step: DurationParam | None = None
    project_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    project_name: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


class MetricsResult(msgspec.Struct, kw_only=True, omit_defaults=True, rename={"result_type": "resultType"}):
    """The Prometheus API's ``data``: ``resultType`` is ``vector``, ``matrix``, ``scalar`` or ``string``; ``result``
    its series (``{"metric": {labels}, "value": [t, "v"]}`` or ``"values": [[t, "v"], …]``)."""

    result_type: str
    result: Any
    #: Start, end and step actually used (range queries), in Unix seconds.
    start: float | None = None
    end: float | None = None
    step: float | None = None
