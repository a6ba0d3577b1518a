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


GroupBy = Annotated[
    str,
    Meta(
        pattern=r"^(service|resource|project|node|label:[a-z0-9]([a-z0-9._/-]{0,62}))$",
        description="service, resource, project, node or label:KEY",
    ),
]


class CostQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    group_by: GroupBy = "service"
    #: ``30d``, ``12h`` or a date ``YYYY-MM-DD`` (at most 400 days back).
    since: Annotated[str, Meta(max_length=10)] = "30d"
    granularity: Literal["day", "month"] = "day"
    #: Every project (administrators), else the request's project.
    all: bool = False


class CostRow(msgspec.Struct, kw_only=True):
    #: ``YYYY-MM-DD`` (day) or ``YYYY-MM`` (month), UTC.
    period: str
    group: str
    currency: str
    amount: str
    #: Ledger charges (hourly usage records) summed.
    charges: int


class CostForecast(msgspec.Struct, kw_only=True):
    #: The current month.
    period: str
    #: Usage is charged up to here (the meter's closed hours).
    closed_until: str
    #: Charged so far in the month, by currency (exact).
    actual: dict[str, str]
    #: Projected to the month's end at the month's hourly run rate, rounded to cents.
    forecast: dict[str, str]


class CostReport(msgspec.Struct, kw_only=True):
    projects: list[str]
    since: str
    group_by: str
    granularity: str
    rows: list[CostRow]
    totals: dict[str, str]
    #: Charges of hours without a price (charged 0): left out of the amounts.
    unpriced: int
    forecast: CostForecast


class FocusQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    period: Period
    format: Literal["focus"] = "focus"
    all: bool = False


class BudgetCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A monthly budget of the project: notifications at ``thresholds`` percent of ``amount`` on actual spend (and
    on the forecast), through the webhooks of ``alarm``; ``enforce`` refuses new billable resources once spent."""

    name: Annotated[str, Meta(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    amount: DecimalText
    currency: Currency | None = None
    thresholds: Annotated[list[Annotated[int, Meta(ge=1, le=1000)]], Meta(min_length=1, max_length=10)] = msgspec.field(
        default_factory=lambda: [50, 80, 100]
    )
    forecast: bool = True
    #: An alarm of the project (name or id) whose webhook actions receive the notifications.
    alarm: Annotated[str, Meta(max_length=64)] | None = None
    enforce: bool = False
    #: Also stop the project's running instances once the budget is spent (implies ``enforce``).
    stop_instances: bool = False
    description: Annotated[str, Meta(max_length=255)] = ""


class BudgetNotification(msgspec.Struct, kw_only=True):
    key: str
    at: str
    spent: str
    forecast: str
    deliveries: int = 0


class Budget(msgspec.Struct, kw_only=True):
    id: str
    name: str
    project: str
    amount: str
    currency: str
    thresholds: list[int]
    forecast: bool
    alarm: str
    enforce: bool
    stop_instances: bool
    description: str
    period: str
    spent: str
    forecast_spend: str
    crossed: list[str]
    exhausted: bool
    notifications: list[BudgetNotification]
    checked_at: str
    created_at: str
    #: Instances the budget stopped (``stop_instances``), the last few: {instance_id, name, at}.
    stopped: list[dict[str, Any]] = []


class RecommendationQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Days of metrics the instance recommendations look at.
    days: Annotated[int, Meta(ge=1, le=90)] = 7
    #: A snapshot older than this is reported.
    snapshot_days: Annotated[int, Meta(ge=1, le=3650)] = 30
    #: An instance whose average CPU stays under this (percent of its vCPUs) is idle.
    idle_cpu: Annotated[float, Meta(ge=0, le=100)] = 5.0


class Recommendation(msgspec.Struct, kw_only=True):
    #: idle | rightsize | unattached-volume | old-snapshot | unassociated-floating-ip
    kind: str
    resource_kind: str
    resource_id: str
    resource_name: str
    action: str
    #: The figures it is based on (metric values, sizes, ages).
    evidence: dict[str, Any]
    #: Per month (730 hours) at the prices in force now; "0" where the meter has no price.
    monthly_saving: str
    currency: str | None = None


class Recommendations(msgspec.Struct, kw_only=True):
    project: str
    days: int
    #: "ok", or why the instance recommendations are missing (no metrics).
    metrics: str
    items: list[Recommendation]
    #: Per currency.
    total_monthly_saving: dict[str, str]


class PolicyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/policies``: an auto-stop policy (``dry_run``: answer what it would stop now, store nothing)."""

    type: Literal["auto-stop"] = "auto-stop"
    name: Annotated[str, Meta(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    #: ``label:key=value[,key=value]``.
    selector: Annotated[
        str, Meta(pattern=r"^label:[a-z0-9][a-z0-9._/-]{0,62}=[^,]{0,63}(,[a-z0-9][a-z0-9._/-]{0,62}=[^,]{0,63}){0,9}$")
    ]
    #: Seconds of idleness before a stop (at least 10 minutes, at most 30 days).
    idle: Annotated[int, Meta(ge=600, le=30 * 86400)]
    cpu_percent: Annotated[float, Meta(gt=0, le=100)] = 5.0
    alarm: Annotated[str, Meta(max_length=64)] | None = None
    description: Annotated[str, Meta(max_length=255)] = ""
    dry_run: bool = False


class PolicyAction(msgspec.Struct, kw_only=True):
    instance_id: str
    name: str
    at: str
    max_cpu_percent: float
    #: stopped | would-stop
    outcome: str = "stopped"


class Policy(msgspec.Struct, kw_only=True):
    id: str
    name: str
    project: str
    type: str
    selector: dict[str, str]
    idle: int
    cpu_percent: float
    alarm: str
    description: str
    actions: list[PolicyAction]
    checked_at: str
    last_error: str
    created_at: str
    #: A dry run's answer: what the policy would stop now (nothing is stored).
    dry_run: bool = False
