"""Cost reports, the forecast to the end of the month, and the FOCUS 1.2 export, all computed from the ledger.

Every figure here is a sum of ledger charges (usage x the price in force at its hour), so a report can be recomputed
from the same ledger and gives the same numbers. A report reads only the hours it needs (its range and the month
so far, for the forecast) through the index of ledger entries by (project, charge hour), not the whole ledger. The pure functions take the charges (the ledger entries' canonical
JSON, decoded) and return rows; the ``load_*`` helpers read them from the store.

Report. ``group_by`` is ``service`` (the meter's service), ``resource`` (kind/name), ``project``, ``node`` (an
instance's node; other resources have none) or ``label:KEY`` (the resource's label value; ``(none)`` without it).
Rows are per (period, group, currency), ``granularity`` a UTC day or month. Unpriced hours (charged 0, no currency)
are counted in ``unpriced`` and left out of the amounts.

Forecast. For the current month: what was charged in it so far, plus the hourly run rate since the month began
(charged so far / hours closed so far) times the hours left; closed hours are the meter's ``closed_until``.

FOCUS. One row per ledger charge on the period's invoice (the same selection as ``invoice show``: usage of the
month, plus late charges of months already invoiced). Columns, values and formats follow FOCUS 1.2; see
:data:`FOCUS_COLUMNS` and docs/billing.md for what each holds.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from minicloud import errors
from minicloud.billing import invoices, ledger
from minicloud.billing.kinds import CURSOR_ID, INVOICE, METER_CURSOR
from minicloud.billing.meters import HOUR, METERS, hour_text, seconds
from minicloud.model.billing import CostForecast, CostReport, CostRow
from minicloud.state import Store, list_all

DAY = 24 * HOUR
#: The longest ``since`` a report accepts (bounded work per request).
MAX_SINCE_DAYS = 400

GROUPS = ("service", "resource", "project", "node")
_LABEL = re.compile(r"^label:[a-z0-9]([a-z0-9._/-]{0,62})$")


def parse_since(text: str, now: int) -> int:
    """``30d``, ``12h`` or a date ``2026-11-01`` as epoch seconds (at most :data:`MAX_SINCE_DAYS` back)."""
    m = re.fullmatch(r"([0-9]{1,4})([dh])", text)
    if m:
        n = int(m.group(1)) * (DAY if m.group(2) == "d" else HOUR)
        start = now - n
    else:
        try:
            start = int(_dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=_dt.UTC).timestamp())
        except ValueError:
            raise _invalid("since", f"{text!r} is not a duration (30d, 12h) or a date (YYYY-MM-DD)") from None
    if start < now - MAX_SINCE_DAYS * DAY:
        raise _invalid("since", f"at most {MAX_SINCE_DAYS} days back")
    return start


def _invalid(name: str, reason: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(f"{name}: {reason}", invalid_params=[{"name": name, "reason": reason}])


def check_group(group_by: str) -> None:
    if group_by not in GROUPS and not _LABEL.match(group_by):
        raise _invalid("group_by", f"{group_by!r}: one of {', '.join(GROUPS)} or label:KEY")


def group_of(charge: dict[str, Any], group_by: str) -> str:
    if group_by == "service":
        return str(charge["service"])
    if group_by == "project":
        return str(charge["project"])
    if group_by == "resource":
        return f"{charge['resource_kind']}/{charge['resource_name'] or charge['resource_id']}"
    if group_by == "node":
        return str(charge.get("attrs", {}).get("node") or "(none)")
    key = group_by.removeprefix("label:")
    return str(charge.get("labels", {}).get(key, "(none)"))


def bucket_of(hour: int, granularity: str) -> str:
    text = hour_text(hour)
    return text[:10] if granularity == "day" else text[:7]


def report(
    charges: Iterable[dict[str, Any]], *, projects: Sequence[str], since: int, until: int, group_by: str,
    granularity: str,
) -> tuple[list[CostRow], dict[str, str], int]:  # fmt: skip
    """Pure: the rows (period, group, currency → amount, charges), totals per currency and the unpriced count of the
    charges whose hour is in [since, until)."""
    sums: dict[tuple[str, str, str], list[Any]] = {}
    totals: dict[str, Decimal] = {}
    unpriced = 0
    for c in charges:
        hour = seconds(c["hour"]) or 0
        if not since <= hour < until:
            continue
        if not c.get("currency"):
            unpriced += 1
            continue
        key = (bucket_of(hour, granularity), group_of(c, group_by), c["currency"])
        slot = sums.setdefault(key, [Decimal(0), 0])
        slot[0] += Decimal(c["amount"])
        slot[1] += 1
        totals[c["currency"]] = totals.get(c["currency"], Decimal(0)) + Decimal(c["amount"])
    rows = [
        CostRow(period=p, group=g, currency=cur, amount=decimal_text(v[0]), charges=v[1])
        for (p, g, cur), v in sorted(sums.items())
    ]
    return rows, {cur: decimal_text(v) for cur, v in sorted(totals.items())}, unpriced


def forecast(charges: Iterable[dict[str, Any]], *, closed_until: int, now: int) -> CostForecast:
    """Pure: the current month's charges so far and their projection to its end at the month's run rate."""
    period = invoices.period_of(now)
    start, end = invoices.bounds(period)
    upto = min(max(closed_until, start), end)
    actual: dict[str, Decimal] = {}
    for c in charges:
        hour = seconds(c["hour"]) or 0
        if c.get("currency") and start <= hour < end:
            actual[c["currency"]] = actual.get(c["currency"], Decimal(0)) + Decimal(c["amount"])
    projected = {cur: project_month(v, closed_until=closed_until, now=now) for cur, v in sorted(actual.items())}
    return CostForecast(
        period=period,
        closed_until=hour_text(upto),
        actual={cur: decimal_text(v) for cur, v in sorted(actual.items())},
        forecast={cur: str(v.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)) for cur, v in projected.items()},
    )


def project_month(actual: Decimal, *, closed_until: int, now: int) -> Decimal:
    """Pure: ``actual`` (charged in ``now``'s month up to ``closed_until``) plus that run rate per second times the
    rest of the month."""
    start, end = invoices.bounds(invoices.period_of(now))
    upto = min(max(closed_until, start), end)
    elapsed = upto - start
    return actual + actual * Decimal(end - upto) / Decimal(elapsed) if elapsed else actual


def decimal_text(value: Decimal | str) -> str:
    """A decimal in plain notation (never ``0E-10``), trailing zeros after the point dropped."""
    text = format(Decimal(value), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


async def load_charges(
    store: Store, projects: Sequence[str], *, since: int | None = None, until: int | None = None
) -> list[dict[str, Any]]:
    """The charges of ``projects``' ledgers; with ``since``/``until`` only those whose hour is in [since, until),
    read through the ledger entries' hour index (a day of a month reads that day, not the month)."""
    out: list[dict[str, Any]] = []
    for project in projects:
        if since is None and until is None:
            entries = await ledger.entries(store, project)
        else:
            entries = await ledger.entries_in(store, project, since or 0, until if until is not None else 2**40)
        out += [json.loads(e.spec.charge) for e in entries]
    return out


async def closed_until(store: Store) -> int:
    record = await store.get(METER_CURSOR.name, CURSOR_ID)
    return METER_CURSOR.load(record).spec.closed_until if record is not None else 0


async def cost_report(
    store: Store, projects: Sequence[str], *, since: str, group_by: str, granularity: str, now: _dt.datetime
) -> CostReport:
    check_group(group_by)
    now_s = int(now.timestamp())
    start = parse_since(since, now_s)
    until = now_s + HOUR
    # The rows need [start, until); the forecast needs the month so far.
    charges = await load_charges(store, projects, since=min(start, invoices.bounds(invoices.period_of(now_s))[0]),
                                 until=until)  # fmt: skip
    rows, totals, unpriced = report(
        charges, projects=projects, since=start, until=until, group_by=group_by, granularity=granularity
    )
    return CostReport(
        projects=list(projects),
        since=hour_text(start),
        group_by=group_by,
        granularity=granularity,
        rows=rows,
        totals=totals,
        unpriced=unpriced,
        forecast=forecast(charges, closed_until=await closed_until(store), now=now_s),
    )


# -- FOCUS 1.2 -------------------------------------------------------------------------------------------------------
PROVIDER = "minicloud"
#: The FOCUS ServiceCategory and ServiceName of each meter service.
SERVICES = {
    "compute": ("Compute", "minicloud Compute"),
    "storage": ("Storage", "minicloud Block Storage"),
    "objects": ("Storage", "minicloud Object Storage"),
    "network": ("Networking", "minicloud Networking"),
}
#: Pricing units in the FOCUS unit format (``<unit>-Hours``).
FOCUS_UNITS = {
    "vCPU-hour": "vCPU-Hours",
    "GiB-hour": "GiB-Hours",
    "address-hour": "IP Address-Hours",
    "GPU-hour": "GPU-Hours",
    "GiB": "GiB",
    "1000 requests": "1000 Requests",
}
RESOURCE_TYPES = {
    "instance": "Virtual Machine",
    "volume": "Volume",
    "snapshot": "Snapshot",
    "floatingip": "Floating IP",
    "bucket": "Bucket",
    "router": "Router",
}

#: The columns written, in order: the 21 mandatory columns of FOCUS 1.2, then the conditional and recommended ones
#: this provider fills.
MANDATORY = (
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd",
    "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargePeriodEnd",
    "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity",
    "PricingUnit", "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
)  # fmt: skip
CONDITIONAL = (
    "AvailabilityZone", "BillingAccountType", "ChargeFrequency", "ConsumedQuantity", "ConsumedUnit", "ContractedUnitPrice",
    "InvoiceId", "ListUnitPrice", "PricingCategory", "ResourceId", "ResourceName", "ResourceType", "SkuId",
    "SkuPriceId", "Tags", "x_Meter", "x_Quantity", "x_LedgerSeq",
)  # fmt: skip
FOCUS_COLUMNS = MANDATORY + CONDITIONAL


def focus_time(t: int) -> str:
    return hour_text(t)


def focus_rows(
    project: str, period: str, charges: Sequence[dict[str, Any]], *, currency: str, invoice_id: str | None,
    zones: dict[str, str] | None = None,
) -> list[dict[str, str | None]]:  # fmt: skip
    """Pure: one FOCUS row per charge (None is a null); ``zones``: node name -> its zone (AvailabilityZone of the
    resources placed on a node)."""
    zones = zones or {}
    start, end = invoices.bounds(period)
    rows: list[dict[str, str | None]] = []
    for c in charges:
        meter = METERS.get(c["meter"])
        hour = seconds(c["hour"]) or 0
        divisor = meter.divisor if meter is not None else 1
        pricing_unit = meter.pricing_unit if meter is not None else c.get("pricing_unit", "")
        unit = FOCUS_UNITS.get(pricing_unit, pricing_unit)
        category, service = SERVICES.get(c["service"], ("Other", f"minicloud {c['service']}"))
        amount = decimal_text(c["amount"])
        price = decimal_text(c["price"]) if c.get("price") is not None else "0"
        quantity = decimal_text(Decimal(c["quantity"]) / Decimal(divisor))
        what = meter.description if meter is not None else c["meter"]
        correction = bool(c.get("correction_of"))
        rows.append({
            "BilledCost": amount,
            "BillingAccountId": project,
            "BillingAccountName": project,
            "BillingCurrency": c.get("currency") or currency,
            "BillingPeriodEnd": focus_time(end),
            "BillingPeriodStart": focus_time(start),
            "ChargeCategory": "Usage",
            "ChargeClass": "Correction" if correction else None,
            "ChargeDescription": f"{c['meter']}: {what}" + (" (correction of a closed hour)" if correction else ""),
            "ChargePeriodEnd": focus_time(hour + HOUR),
            "ChargePeriodStart": focus_time(hour),
            "ContractedCost": amount,
            "EffectiveCost": amount,
            "InvoiceIssuerName": PROVIDER,
            "ListCost": amount,
            "PricingQuantity": quantity,
            "PricingUnit": unit,
            "ProviderName": PROVIDER,
            "PublisherName": PROVIDER,
            "ServiceCategory": category,
            "ServiceName": service,
            "AvailabilityZone": zones.get(c.get("attrs", {}).get("node", "")) or None,
            "BillingAccountType": "Project",
            "ChargeFrequency": "Usage-Based",
            "ConsumedQuantity": quantity,
            "ConsumedUnit": unit,
            "ContractedUnitPrice": price,
            "InvoiceId": invoice_id,
            "ListUnitPrice": price,
            "PricingCategory": "Standard",
            "ResourceId": c["resource_id"],
            "ResourceName": c["resource_name"] or None,
            "ResourceType": RESOURCE_TYPES.get(c["resource_kind"], c["resource_kind"]),
            "SkuId": c["meter"],
            "SkuPriceId": c.get("price_id"),
            "Tags": ledger.canonical(dict(sorted(c.get("labels", {}).items()))),
            "x_Meter": c["meter"],
            "x_Quantity": str(c["quantity"]),
            "x_LedgerSeq": str(c.get("seq", "")),
        })  # fmt: skip
    return rows


def focus_csv(rows: Iterable[dict[str, str | None]], *, header: bool = True) -> str:
    """CSV (RFC 4180, ``\\n`` line ends); a null is an empty field."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    if header:
        w.writerow(FOCUS_COLUMNS)
    for row in rows:
        w.writerow(["" if row[col] is None else row[col] for col in FOCUS_COLUMNS])
    return out.getvalue()


#: FOCUS rows rendered per chunk of the streamed export.
CHUNK_ROWS = 5000


async def focus_chunks(store: Store, projects: Sequence[str], period: str, *, currency: str) -> AsyncIterator[str]:
    """The FOCUS CSV of ``projects``' invoices for ``period`` (closed: the charges it holds; open: as it stands), in
    chunks: the header, then up to :data:`CHUNK_ROWS` rows at a time, one project's charges in memory at most."""
    invoices.bounds(period)
    zones = {r.name: r.labels["zone"] for r in await list_all(store, "node") if r.labels.get("zone")}
    yield focus_csv([], header=True)
    for project in projects:
        charges, invoice_id = await invoice_charges(store, project, period)
        for start in range(0, len(charges), CHUNK_ROWS):
            part = charges[start : start + CHUNK_ROWS]
            rows = focus_rows(project, period, part, currency=currency, invoice_id=invoice_id, zones=zones)
            yield focus_csv(rows, header=False)


async def focus_export(store: Store, projects: Sequence[str], period: str, *, currency: str) -> str:
    """The whole FOCUS CSV as one text (tests, the bench); the API streams :func:`focus_chunks`."""
    return "".join([chunk async for chunk in focus_chunks(store, projects, period, currency=currency)])


async def invoice_charges(store: Store, project: str, period: str) -> tuple[list[dict[str, Any]], str | None]:
    """The charges on ``project``'s invoice for ``period``, and the invoice's id if it is closed."""
    _, end = invoices.bounds(period)
    record = await store.get_by_name(INVOICE.name, project, period)
    closed = INVOICE.load(record) if record is not None else None
    chain = await ledger.entries(store, project)
    if closed is not None:
        through, prev_period, prev_through = (
            closed.spec.through,
            closed.spec.previous_period,
            closed.spec.previous_through,
        )
    else:
        previous = invoices._previous(await invoices.closed_invoices(store, project), period)
        through = chain[-1].spec.seq if chain else 0
        prev_period = previous.spec.period if previous is not None else ""
        prev_through = previous.spec.through if previous is not None else 0
    prev_end = invoices.bounds(prev_period)[1] if prev_period else 0
    return invoices.select(chain, end, through, prev_end, prev_through), closed.id if closed is not None else None
