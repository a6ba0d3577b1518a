"""SDK for alarms: ``client.alarms.create(name=…, query=… | metric=…, comparison=">", threshold=…)``, ``list``,
``get``, ``update``, ``delete`` and ``history``; ``create`` returns the one-time ``webhook_secret``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minicloud.client.collection import Collection, quote
from minicloud.model.alarms import Alarm, AlarmCreated, AlarmHistoryEntry, AlarmHistoryPage
from minicloud.observe.kinds import ALARM

if TYPE_CHECKING:
    from minicloud.client import Client


class Alarms(Collection[Alarm]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, ALARM)

    def create(
        self,
        *,
        name: str,
        comparison: str,
        threshold: float,
        query: str | None = None,
        metric: str | None = None,
        dimensions: dict[str, str] | None = None,
        statistic: str | None = None,
        period: int | None = None,
        evaluation_periods: int | None = None,
        datapoints_to_alarm: int | None = None,
        missing_data: str | None = None,
        actions: list[dict[str, Any]] | None = None,
        description: str = "",
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> AlarmCreated:
        """Create an alarm (exactly one of ``query`` or ``metric``); ``actions``: ``[{"url": …, "on": [...]}]``."""
        body: dict[str, Any] = {"name": name, "comparison": comparison, "threshold": threshold}
        optional = {
            "query": query, "metric": metric, "dimensions": dimensions, "statistic": statistic, "period": period,
            "evaluation_periods": evaluation_periods, "datapoints_to_alarm": datapoints_to_alarm,
            "missing_data": missing_data, "actions": actions, "labels": labels,
        }  # fmt: skip
        body.update({k: v for k, v in optional.items() if v is not None})
        if description:
            body["description"] = description
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._c.call("POST", self.path, AlarmCreated, json=body, headers=headers)

    def history(self, ref: str, *, limit: int | None = None) -> list[AlarmHistoryEntry]:
        """The alarm's state changes and delivery attempts, newest first (``limit``: at most that many)."""
        out: list[AlarmHistoryEntry] = []
        cursor = None
        while True:
            page_size = min(1000, limit - len(out)) if limit is not None else 1000
            page = self._c.call(
                "GET", f"{self.path}/{quote(ref)}/history", AlarmHistoryPage,
                query={"limit": page_size, "cursor": cursor},
            )  # fmt: skip
            out += page.items
            if not page.next_cursor or (limit is not None and len(out) >= limit):
                return out
            cursor = page.next_cursor
