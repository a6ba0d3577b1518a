"""SDK for billing: ``client.billing.meters()``, ``prices()``, ``set_price(...)``, ``verify()``, ``invoices()``,
``invoice(period)``, ``invoice_csv(period)``, ``close_invoice(period)`` (docs/billing.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minicloud.client.collection import quote
from minicloud.model.billing import Invoice, InvoiceSummary, MeterInfo, Price, Verifications

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
        resp = self._c.raw("GET", f"/v1/invoices/{quote(period)}", query={"format": "csv"})
        if resp.status >= 400:
            from minicloud.client import ApiError, _problem

            raise ApiError(_problem(resp))
        return resp.body.decode()

    def close_invoice(self, period: str) -> Invoice:
        return self._c.call("POST", f"/v1/invoices/{quote(period)}/close", Invoice)
