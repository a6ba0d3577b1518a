"""Invoices: per project and month, rendered from the ledger.

Which entries an invoice holds is a rule over the ledger alone, so a closed invoice can be rendered again,
byte for byte, whatever was appended since: the entries with ``seq <= through`` and an hour before the period's
end, less those the previous closed invoice held (``seq <= previous_through`` and an hour before its end). Late
charges of a period already closed (corrections) therefore land on the next invoice, marked ``earlier``; so does
usage of an earlier period that was never closed on its own. Invoices close in order: a period before the latest
closed one is refused.

Closing (admin) stores the canonical JSON document and its sha256; a closed invoice is never changed. Refused: a
period that has not ended (422), one whose hours the meter has not closed yet (409, retry after
``billing.close_delay``), one already closed or before the latest closed (409).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from minicloud import errors, ids
from minicloud.billing import ledger
from minicloud.billing.kinds import CURSOR_ID, INVOICE, METER_CURSOR, InvoiceSpec, LedgerEntrySpec
from minicloud.billing.meters import hour_text, seconds
from minicloud.core import write
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.model.billing import Invoice, InvoiceLine, InvoiceSummary
from minicloud.state import Check, Create, Store, list_all


def bounds(period: str) -> tuple[int, int]:
    """A ``YYYY-MM`` period as [start, end) epoch seconds (UTC)."""
    try:
        start = _dt.datetime.strptime(period + "-01", "%Y-%m-%d").replace(tzinfo=_dt.UTC)
    except ValueError:
        raise errors.ValidationFailed(f"period {period!r} is not a month (YYYY-MM)") from None
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return int(start.timestamp()), int(end.timestamp())


def period_of(t: int) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m")


def select(
    chain: Sequence[Obj[LedgerEntrySpec, Any]], end: int, through: int, previous_end: int, previous_through: int
) -> list[dict[str, Any]]:
    """Pure: the charges of an invoice (see the module docstring)."""
    out = []
    for entry in chain:
        if entry.spec.seq > through:
            break
        charge = json.loads(entry.spec.charge)
        hour = seconds(charge["hour"]) or 0
        if hour >= end or (entry.spec.seq <= previous_through and hour < previous_end):
            continue
        out.append(charge)
    return out


def render(
    project: str, period: str, charges: Sequence[dict[str, Any]], through: int, previous: dict[str, Any] | None
) -> str:
    """Pure: the invoice document as canonical JSON text. Lines group charges by (meter, resource, price,
    currency, earlier); amounts are exact decimals, ``due`` is each total rounded to cents (half-even)."""
    start, end = bounds(period)
    lines: dict[tuple[Any, ...], dict[str, Any]] = {}
    totals: dict[str, Decimal] = {}
    for c in charges:
        earlier = (seconds(c["hour"]) or 0) < start
        key = (c["meter"], c["resource_kind"], c["resource_id"], c["price"], c["currency"], earlier)
        line = lines.get(key)
        if line is None:
            line = lines[key] = {
                "meter": c["meter"], "resource_kind": c["resource_kind"], "resource_id": c["resource_id"],
                "resource_name": c["resource_name"], "quantity": 0, "unit": c["unit"], "price": c["price"],
                "currency": c["currency"], "amount": Decimal(0), "earlier": earlier,
            }  # fmt: skip
        line["quantity"] += c["quantity"]
        line["amount"] += Decimal(c["amount"])
        if c["currency"]:
            totals[c["currency"]] = totals.get(c["currency"], Decimal(0)) + Decimal(c["amount"])
    ordered = [
        {**line, "amount": str(line["amount"])}
        for _, line in sorted(lines.items(), key=lambda kv: tuple("" if v is None else str(v) for v in kv[0]))
    ]
    document = {
        "project": project,
        "period": period,
        "start": hour_text(start),
        "end": hour_text(end),
        "through_seq": through,
        "previous": previous,
        "charges": len(charges),
        "lines": ordered,
        "totals": {cur: str(v) for cur, v in sorted(totals.items())},
        "due": {cur: str(v.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)) for cur, v in sorted(totals.items())},
    }
    return ledger.canonical(document)


async def closed_invoices(store: Store, project: str) -> list[Obj[InvoiceSpec, Any]]:
    return [INVOICE.load(r) for r in await list_all(store, INVOICE.name, project=project)]


def _previous(closed: Sequence[Obj[InvoiceSpec, Any]], period: str) -> Obj[InvoiceSpec, Any] | None:
    earlier = [i for i in closed if i.spec.period < period]
    return max(earlier, key=lambda i: i.spec.period) if earlier else None


async def build(
    store: Store, project: str, period: str, *, through: int | None = None
) -> tuple[str, int, Obj[InvoiceSpec, Any] | None]:
    """The document of ``project``'s invoice for ``period`` over the ledger up to ``through`` (default: now)."""
    _, end = bounds(period)
    chain = await ledger.entries(store, project)
    previous = _previous(await closed_invoices(store, project), period)
    if through is None:
        through = chain[-1].spec.seq if chain else 0
    prev_end = bounds(previous.spec.period)[1] if previous is not None else 0
    prev_through = previous.spec.through if previous is not None else 0
    charges = select(chain, end, through, prev_end, prev_through)
    prev_ref = {"period": previous.spec.period, "through_seq": prev_through} if previous is not None else None
    return render(project, period, charges, through, prev_ref), through, previous


def _view(project: str, period: str, document: str, *, closed_at: str | None) -> Invoice:
    doc = json.loads(document)
    return Invoice(
        project=project,
        period=period,
        state="closed" if closed_at else "open",
        start=doc["start"],
        end=doc["end"],
        through_seq=doc["through_seq"],
        lines=[InvoiceLine(**line) for line in doc["lines"]],
        totals=doc["totals"],
        sha256=hashlib.sha256(document.encode()).hexdigest(),
        closed_at=closed_at,
        document=doc,
    )


async def show(store: Store, project: str, period: str) -> tuple[Invoice, str]:
    """The closed invoice as stored, or the open one as it stands; with its document text."""
    bounds(period)
    record = await store.get_by_name(INVOICE.name, project, period)
    if record is not None:
        inv = INVOICE.load(record)
        return _view(project, period, inv.spec.document, closed_at=inv.spec.closed_at), inv.spec.document
    document, _, _ = await build(store, project, period)
    return _view(project, period, document, closed_at=None), document


async def regenerate(store: Store, project: str, period: str) -> tuple[str, str]:
    """(stored document, the same rendered again from the ledger) of a closed invoice."""
    record = await store.get_by_name(INVOICE.name, project, period)
    if record is None:
        raise errors.NotFound(f"no closed invoice for {period} in project '{project}'; see `minicloud invoice list`")
    inv = INVOICE.load(record)
    document, _, _ = await build(store, project, period, through=inv.spec.through)
    return inv.spec.document, document


async def list_invoices(store: Store, project: str, now: _dt.datetime) -> list[InvoiceSummary]:
    out = []
    for inv in await closed_invoices(store, project):
        doc = json.loads(inv.spec.document)
        out.append(InvoiceSummary(project=project, period=inv.spec.period, state="closed", totals=doc["totals"],
                                  sha256=inv.spec.sha256, closed_at=inv.spec.closed_at))  # fmt: skip
    current = period_of(int(now.timestamp()))
    if not any(i.period == current for i in out):
        document, _, _ = await build(store, project, current)
        out.append(InvoiceSummary(project=project, period=current, state="open", totals=json.loads(document)["totals"],
                                  sha256=hashlib.sha256(document.encode()).hexdigest()))  # fmt: skip
    return sorted(out, key=lambda i: i.period)


async def close_invoice(ctx: Context, store: Store, period: str, now: _dt.datetime) -> Written:
    project = ctx.project
    _, end = bounds(period)
    if end > int(now.timestamp()):
        raise errors.ValidationFailed(
            f"the period {period} has not ended (it ends {hour_text(end)}); only a past month can be closed",
            invalid_params=[{"name": "period", "reason": "not ended"}],
        )
    cursor = await store.get(METER_CURSOR.name, CURSOR_ID)
    closed_until = METER_CURSOR.load(cursor).spec.closed_until if cursor is not None else 0
    if closed_until < end:
        raise errors.Conflict(
            f"the meter has closed usage only up to {hour_text(closed_until)}; the invoice for {period} can be closed "
            f"once it reaches {hour_text(end)} (billing.close_delay after the hour ends); retry then"
        )
    existing = await closed_invoices(store, project)
    if any(i.spec.period == period for i in existing):
        raise errors.Conflict(f"the invoice for {period} is already closed; closed invoices never change")
    later = [i.spec.period for i in existing if i.spec.period > period]
    if later:
        raise errors.Conflict(
            f"the invoice for {max(later)} is closed already; invoices close in order (late usage of {period} is on "
            "the next open invoice)"
        )
    document, through, previous = await build(store, project, period)
    stamp = ctx.clock()
    obj = INVOICE.new(
        project=project,
        name=period,
        id="inv-" + hashlib.sha256(f"{project}/{period}".encode()).hexdigest()[:20],
        spec=InvoiceSpec(
            period=period,
            through=through,
            previous_period=previous.spec.period if previous is not None else "",
            previous_through=previous.spec.through if previous is not None else 0,
            document=document,
            sha256=hashlib.sha256(document.encode()).hexdigest(),
            closed_at=stamp,
        ),
        stamp=stamp,
    )
    head = await ledger.head_of(store, project)
    ops: list[Any] = [Create(INVOICE.dump(obj))]
    if head is not None:  # the ledger did not move between the read and the close
        ops.append(Check(kind=head.kind, id=head.id, expect_revision=head.revision))
    return await write.commit(
        ctx, store, ops, status=201, label="invoice",
        respond=lambda rev: _view(project, period, document, closed_at=stamp),
    )  # fmt: skip


def to_csv(invoice: Invoice) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["project", "period", "meter", "resource_kind", "resource_id", "resource_name", "quantity", "unit",
                "price", "currency", "amount", "earlier"])  # fmt: skip
    for line in invoice.lines:
        w.writerow([invoice.project, invoice.period, line.meter, line.resource_kind, line.resource_id,
                    line.resource_name, line.quantity, line.unit, line.price or "", line.currency or "", line.amount,
                    "yes" if line.earlier else ""])  # fmt: skip
    return out.getvalue()


def now_utc() -> _dt.datetime:
    return ids.parse_time(ids.now())
