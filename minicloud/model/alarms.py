"""Alarm request and response types (shared by server, SDK and CLI): CloudWatch's model over the project's series.

An alarm watches either a PromQL expression (``query``) or a named metric with a statistic over a ``period``
(``metric``, ``dimensions``, ``statistic``), compares each period's value with ``threshold``, and is in ALARM when
``datapoints_to_alarm`` (M) of the last ``evaluation_periods`` (N) periods breach. ``missing_data`` says what a period
without data counts as. On entering a state listed in an action's ``on``, the action runs (a signed webhook).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from minicloud.model import Description, Labels, Name, Resource
from minicloud.model.metrics import PromQL

Comparison = Literal[">", ">=", "<", "<="]
Statistic = Literal["avg", "min", "max", "sum"]
MissingData = Literal["missing", "notBreaching", "breaching", "ignore"]
AlarmState = Literal["OK", "ALARM", "INSUFFICIENT_DATA"]
STATES: tuple[AlarmState, ...] = ("OK", "ALARM", "INSUFFICIENT_DATA")
#: A Prometheus metric name / label name.
MetricName = Annotated[str, Meta(pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]{0,199}$")]
LabelName = Annotated[str, Meta(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,99}$")]
DimensionValue = Annotated[str, Meta(max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")]
WebhookUrl = Annotated[str, Meta(min_length=1, max_length=2048, description="an http:// or https:// URL")]


class AlarmAction(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What runs when the alarm enters one of the ``on`` states. ``webhook``: a POST of the transition as JSON,
    signed with the alarm's secret (``X-Minicloud-Signature: sha256=<hex HMAC-SHA256 of the body>``). More action
    types (autoscaling policies) come later; the list is the extension point."""

    url: WebhookUrl
    type: Literal["webhook"] = "webhook"
    on: Annotated[list[AlarmState], Meta(min_length=1, max_length=3)] = msgspec.field(
        default_factory=lambda: ["ALARM", "OK"]
    )


class AlarmCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/alarms``: exactly one of ``query`` or ``metric``."""

    name: Name
    comparison: Comparison
    threshold: float
    #: A PromQL (MetricsQL) expression over the project's series, checked by the TSDB's parser.
    query: PromQL | None = None
    #: A metric name (``minicloud_instance_cpu_seconds_total``); counters are read as per-second rates.
    metric: MetricName | None = None
    #: Label matchers (equality) that pick the metric's series (``{"name": "vm1"}``).
    dimensions: Annotated[dict[LabelName, DimensionValue], Meta(max_length=16)] = {}
    #: How the metric's samples over a period (and its series) make one value.
    statistic: Statistic = "avg"
    #: Seconds per evaluation period (one datapoint each).
    period: Annotated[int, Meta(ge=1, le=86400)] = 60
    #: N: how many recent periods are evaluated.
    evaluation_periods: Annotated[int, Meta(ge=1, le=100)] = 1
    #: M: how many of them must breach for ALARM (default N).
    datapoints_to_alarm: Annotated[int, Meta(ge=1, le=100)] | None = None
    missing_data: MissingData = "missing"
    actions: Annotated[list[AlarmAction], Meta(max_length=5)] = []
    description: Description = ""
    labels: Labels = {}


class AlarmUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """JSON merge patch of an alarm: only the given fields change."""

    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


class Notification(msgspec.Struct, kw_only=True):
    """One action's delivery of the latest transition: ``pending`` (being sent, or waiting for a retry),
    ``delivered`` (a 2xx answer) or ``failed`` (every attempt failed, or the alarm went away)."""

    delivery_id: str
    url: str
    to: AlarmState
    state: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    last_error: str = ""
    updated_at: str = ""


class Alarm(Resource, kw_only=True):
    """An alarm over the project's series; ``state`` is OK, ALARM or INSUFFICIENT_DATA (where a new alarm starts)."""

    comparison: Comparison
    threshold: float
    query: str | None = None
    metric: str | None = None
    dimensions: dict[str, str] = {}
    statistic: Statistic = "avg"
    period: int
    evaluation_periods: int
    datapoints_to_alarm: int
    missing_data: MissingData
    actions: list[AlarmAction] = []
    #: The PromQL evaluated (``query``, or the one made from ``metric``).
    expression: str
    description: str = ""
    state: AlarmState = "INSUFFICIENT_DATA"
    state_reason: str = ""
    state_updated_at: str = ""
    #: The latest transition's notifications, one per action that runs on it.
    notifications: list[Notification] = []


class AlarmCreated(Alarm, kw_only=True):
    """Returned once, at creation: ``webhook_secret`` is the HMAC key webhook bodies are signed with; it is kept only
    sealed with the cluster's key store and never shown again."""

    webhook_secret: str


class AlarmHistoryEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of an alarm's history: a state change (``type=state``) or one delivery attempt (``type=delivery``)."""

    at: str
    type: Literal["state", "delivery"]
    summary: str
    from_state: AlarmState | None = None
    to_state: AlarmState | None = None
    reason: str = ""
    #: The evaluated periods' values, oldest first (null: no data).
    datapoints: list[float | None] | None = None
    delivery_id: str = ""
    url: str = ""
    attempt: int = 0
    #: ``delivered``, ``retrying`` (a retry is scheduled), ``failed`` (no more retries) or ``dropped``.
    outcome: str = ""
    status_code: int = 0
    error: str = ""


class AlarmHistoryQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``GET /v1/alarms/{ref}/history``: newest first, paged."""

    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    cursor: Annotated[str, Meta(max_length=512)] | None = None


class AlarmHistoryPage(msgspec.Struct, kw_only=True):
    items: list[AlarmHistoryEntry]
    next_cursor: str | None = None
