"""Billing request and response types (shared by server, SDK and CLI): meters, prices, ledger verification,
invoices. Amounts are decimal strings, never floats."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

#: A non-negative decimal with at most 12 places (``0.004``).
DecimalText = Annotated[str, Meta(pattern=r"^-?[0-9]{1,15}(\.[0-9]{1,12})?$", description="a decimal such as 0.004")]
Currency = Annotated[str, Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217, e.g. EUR")]
#: ``2026-12-01`` or ``2026-12-01T10:00:00Z`` (an hour boundary, UTC).
DateText = Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:00(:00)?(\.0+)?Z)?$")]
Period = Annotated[str, Meta(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$", description="a month, YYYY-MM")]
MeterName = Annotated[str, Meta(min_length=1, max_length=64)]


class MeterInfo(msgspec.Struct, kw_only=True):
    name: str
    service: str
    unit: str
    pricing_unit: str
    description: str


class PriceSet(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A new version of a meter's price, per hour of its pricing unit, in force from ``effective`` (default: the
    next hour) until the next version (or ``until``)."""

    meter: MeterName
    amount: DecimalText
    currency: Currency | None = None
    effective: DateText | None = None
    until: DateText | None = None
    description: Annotated[str, Meta(max_length=255)] = ""


class Price(msgspec.Struct, kw_only=True):
    id: str
    meter: str
    amount: str
    currency: str
    pricing_unit: str
    effective: str
    until: str | None = None
    description: str = ""
    created_at: str = ""


class PriceQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    meter: str | None = None


class VerifyQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Every project the caller may read when true (admins), else the request's project.
    all: bool = False


class LedgerVerification(msgspec.Struct, kw_only=True):
    project: str
    entries: int
    ok: bool
    first_bad_seq: int | None = None
    first_bad_id: str | None = None
    reason: str = ""


class Verifications(msgspec.Struct, kw_only=True):
    ok: bool
    projects: list[LedgerVerification]


class InvoiceLine(msgspec.Struct, kw_only=True):
    meter: str
    resource_kind: str
    resource_id: str
    resource_name: str
    quantity: int
    unit: str
    price: str | None
    currency: str | None
    amount: str
    #: Usage of an earlier period charged late (corrections, or a period closed before it was billed).
    earlier: bool = False


class Invoice(msgspec.Struct, kw_only=True):
    project: str
    period: str
    state: Literal["open", "closed"]
    start: str
    end: str
    through_seq: int
    lines: list[InvoiceLine]
    totals: dict[str, str]
    sha256: str
    closed_at: str | None = None
    #: The canonical JSON document (byte-for-byte what ``close`` stored).
    document: Any = None


class InvoiceSummary(msgspec.Struct, kw_only=True):
    project: str
    period: str
    state: Literal["open", "closed"]
    totals: dict[str, str]
    sha256: str
    closed_at: str | None = None


class InvoiceQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    format: Literal["json", "csv"] = "json"
