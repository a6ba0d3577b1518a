"""Observability's kinds: ``alarm`` (public, per project) and two internal ones, its history entries and its
notification outbox. Declarations import msgspec alone (the SDK and CLI read them).

Growth: alarms are bounded per project (``alarms.quota_per_project``); history entries are deleted by retention after
``alarms.history_days`` (each alarm writes one per state change and one per delivery attempt); outbox entries live
until their delivery succeeds or runs out of attempts (``alarms.webhook_attempts``), at most one per action per
transition.
"""

from __future__ import annotations

import msgspec

from minicloud.core.kinds import Column, Kind, Obj, declare
from minicloud.model.alarms import (
    Alarm,
    AlarmAction,
    AlarmState,
    AlarmUpdate,
    Comparison,
    MissingData,
    Notification,
    Statistic,
)


class AlarmSpec(msgspec.Struct, kw_only=True):
    comparison: Comparison
    threshold: float
    query: str | None = None
    metric: str | None = None
    dimensions: dict[str, str] = {}
    statistic: Statistic = "avg"
    period: int = 60
    evaluation_periods: int = 1
    datapoints_to_alarm: int = 1
    missing_data: MissingData = "missing"
    actions: list[AlarmAction] = []
    #: The PromQL the leader evaluates.
    expression: str = ""
    #: The id of the project (queries are enforced on it; a project re-created under the name is another id).
    project_id: str = ""
    #: The webhook HMAC key, sealed with the key store (the alarm id as associated data).
    sealed_secret: str = ""
    description: str = ""


class AlarmStatus(msgspec.Struct, kw_only=True):
    state: AlarmState = "INSUFFICIENT_DATA"
    state_reason: str = "new alarm: not evaluated yet"
    state_updated_at: str = ""
    #: The id of the latest transition (its history entry and its deliveries carry it).
    transition: str = ""
    notifications: list[Notification] = []


def _render(obj: Obj[AlarmSpec, AlarmStatus]) -> Alarm:
    s, st = obj.spec, obj.status
    return Alarm(
        **obj.common_fields(),
        comparison=s.comparison,
        threshold=s.threshold,
        query=s.query,
        metric=s.metric,
        dimensions=s.dimensions,
        statistic=s.statistic,
        period=s.period,
        evaluation_periods=s.evaluation_periods,
        datapoints_to_alarm=s.datapoints_to_alarm,
        missing_data=s.missing_data,
        actions=s.actions,
        expression=s.expression,
        description=s.description,
        state=st.state,
        state_reason=st.state_reason,
        state_updated_at=st.state_updated_at,
        notifications=st.notifications,
    )


ALARM = declare(
    Kind(
        name="alarm",
        plural="alarms",
        prefix="alm",
        spec=AlarmSpec,
        status=AlarmStatus,
        action="metrics:alarms",
        view=Alarm,
        render=_render,
        noun="alarm",
        title="alarm",
        columns=(
            Column("name", "name"),
            Column("state", "state"),
            Column("expression", "expression"),
            Column("comparison", "comparison"),
            Column("threshold", "threshold"),
            Column("id", "id"),
        ),
        patch=AlarmUpdate,
    )
)


class AlarmHistorySpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One history entry (``minicloud.model.alarms.AlarmHistoryEntry`` plus the alarm it belongs to)."""

    alarm_id: str
    at: str
    type: str
    summary: str
    from_state: str | None = None
    to_state: str | None = None
    reason: str = ""
    datapoints: list[float | None] | None = None
    transition: str = ""
    delivery_id: str = ""
    url: str = ""
    attempt: int = 0
    outcome: str = ""
    status_code: int = 0
    error: str = ""


#: Internal: read through ``GET /v1/alarms/{ref}/history``. Named ``<alarm id>.<inverted time>``, so one alarm's
#: entries are one range of the name index, newest first.
ALARM_HISTORY = declare(Kind(name="alarmhistory", plural="alarmhistory", prefix="alh", spec=AlarmHistorySpec))


class AlarmDeliverySpec(msgspec.Struct, kw_only=True):
    """One notification to send (the outbox): committed with the transition it announces, deleted once it is
    delivered or has failed for good. Its id is the ``X-Minicloud-Delivery`` header (the same on every attempt)."""

    alarm_id: str
    transition: str
    action: int
    url: str
    to: str
    #: The exact JSON body (every attempt sends the same bytes).
    body: str
    attempts: int = 0
    #: Unix seconds of the next attempt.
    next_at: float = 0.0
    last_error: str = ""


ALARM_DELIVERY = declare(Kind(name="alarmdelivery", plural="alarmdeliveries", prefix="adl", spec=AlarmDeliverySpec))
