"""SDK for billing: ``client.billing.meters()``, ``prices()``, ``set_price(...)``, ``verify()``, ``invoices()``,
``invoice(period)``, ``invoice_csv(period)``, ``close_invoice(period)``, ``cost_report(...)``, ``focus(period)``, ``recommendations()``,
``create_budget(...)``, ``budgets()``, ``budget(name)``, ``delete_budget(name)``
(docs/billing.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minicloud.client.collection import quote
from minicloud.model.billing import (
    Budget,
    CostReport,
    Invoice,
    InvoiceSummary,
    MeterInfo,
    Policy,
    Price,
    Recommendations,
    Verifications,
)

if TYPE_CHECKING:
    from minicloud.client import Client


class Billing:
    def __init__(self, client: Client) -> None:
        self._c = client

    def meters(self) -> list[MeterInfo]:
        return self._c.call("GET", "/v1/billing/meters", list[MeterInfo])

    def prices(self, meter: str | None = None) -> list[Price]:
        return self._c.call("GET", "/v1/prices", list[Price], query={"meter": meter})

    def set_price(
        self, meter: str, amount: str, *, currency: str | None = None, effective: str | None = None,
        until: str | None = None, description: str = "",
    ) -> Price:  # fmt: skip
        """A new version of ``meter``'s price (a decimal string per hour of its pricing unit)."""
        body: dict[str, Any] = {"meter": meter, "amount": amount, "description": description}
        body.update({k: v for k, v in {"currency": currency, "effective": effective, "until": until}.items() if v})
        return self._c.call("POST", "/v1/prices", Price, json=body)

    def verify(self, *, all_projects: bool = False) -> Verifications:
        return self._c.call("GET", "/v1/billing/verify", Verifications, query={"all": "true" if all_projects else None})

    def invoices(self) -> list[InvoiceSummary]:
        return self._c.call("GET", "/v1/invoices", list[InvoiceSummary])

    def invoice(self, period: str) -> Invoice:
        return self._c.call("GET", f"/v1/invoices/{quote(period)}", Invoice)

    def invoice_csv(self, period: str) -> str:
        return self._text(f"/v1/invoices/{quote(period)}", {"format": "csv"})

    def cost_report(
        self, *, group_by: str = "service", since: str = "30d", granularity: str = "day", all_projects: bool = False
    ) -> CostReport:
        query = {"group_by": group_by, "since": since, "granularity": granularity}
        return self._c.call("GET", "/v1/costs", CostReport, query={**query, "all": "true" if all_projects else None})

    def focus(self, period: str, *, all_projects: bool = False) -> str:
        """The period's charges as a FOCUS 1.2 CSV."""
        return self._text("/v1/costs/focus", {"period": period, "all": "true" if all_projects else None})

    def recommendations(self, *, days: int = 7, snapshot_days: int = 30, idle_cpu: float = 5.0) -> Recommendations:
        query = {"days": days, "snapshot_days": snapshot_days, "idle_cpu": idle_cpu}
        return self._c.call("GET", "/v1/costs/recommendations", Recommendations, query=query)

    def _text(self, path: str, query: dict[str, Any]) -> str:
        resp = self._c.raw("GET", path, query=query)
        if resp.status >= 400:
            from minicloud.client import ApiError, _problem

            raise ApiError(_problem(resp))
        return resp.body.decode()

    def close_invoice(self, period: str) -> Invoice:
        return self._c.call("POST", f"/v1/invoices/{quote(period)}/close", Invoice)

    def create_budget(
        self, name: str, amount: str, *, currency: str | None = None, thresholds: list[int] | None = None,
        forecast: bool = True, alarm: str | None = None, enforce: bool = False, stop_instances: bool = False,
        description: str = "",
    ) -> Budget:  # fmt: skip
        body: dict[str, Any] = {"name": name, "amount": amount, "forecast": forecast, "enforce": enforce,
                                "stop_instances": stop_instances, "description": description}  # fmt: skip
        body.update({k: v for k, v in {"currency": currency, "thresholds": thresholds, "alarm": alarm}.items() if v})
        return self._c.call("POST", "/v1/budgets", Budget, json=body)

    def budgets(self) -> list[Budget]:
        return self._c.call("GET", "/v1/budgets", list[Budget])

    def budget(self, name: str) -> Budget:
        return self._c.call("GET", f"/v1/budgets/{quote(name)}", Budget)

    def delete_budget(self, name: str) -> None:
        self._c.call("DELETE", f"/v1/budgets/{quote(name)}")

    def create_policy(
        self, name: str, *, selector: str, idle: int, cpu_percent: float = 5.0, alarm: str | None = None,
        description: str = "", dry_run: bool = False,
    ) -> Policy:  # fmt: skip
        """An auto-stop policy (``selector``: ``label:key=value``; ``idle`` in seconds)."""
        body: dict[str, Any] = {"type": "auto-stop", "name": name, "selector": selector, "idle": idle,
                                "cpu_percent": cpu_percent, "description": description, "dry_run": dry_run}  # fmt: skip
        if alarm:
            body["alarm"] = alarm
        return self._c.call("POST", "/v1/policies", Policy, json=body)

    def policies(self) -> list[Policy]:
        return self._c.call("GET", "/v1/policies", list[Policy])

    def policy(self, name: str) -> Policy:
        return self._c.call("GET", f"/v1/policies/{quote(name)}", Policy)

    def delete_policy(self, name: str) -> None:
        self._c.call("DELETE", f"/v1/policies/{quote(name)}")
