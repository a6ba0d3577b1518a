"""The price catalogue: versions per meter with effective dates, decimal amounts.

A version is in force from ``effective`` (an hour boundary) until the next version of its meter or its own
``until``. Versions never change the past: ``effective`` must be at or after the start of the next hour (charged
hours keep the price they were charged at, so every figure can be recomputed). Refused with 422: an unknown meter
(the answer lists the meters), a negative amount, a version starting at or before an existing one of the meter, or
one starting inside an existing version's explicit ``until``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from decimal import Decimal, InvalidOperation
from typing import Any

from minicloud import errors, ids
from minicloud.billing.kinds import PRICE, PriceSpec
from minicloud.billing.ledger import load_prices
from minicloud.billing.meters import HOUR, METERS, hour_floor, hour_text, unknown_meter
from minicloud.core import write
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.model.billing import Price, PriceSet
from minicloud.state import Create, Store


def parse_when(text: str, field: str) -> int:
    """``2026-12-01`` or ``2026-12-01T10:00:00Z`` as epoch seconds; it must be an hour boundary."""
    try:
        value = ids.parse_time(text if "T" in text else text + "T00:00:00Z")
    except ValueError:
        raise _invalid(field, f"{text!r} is not a date (YYYY-MM-DD) or an hour (YYYY-MM-DDTHH:00:00Z)") from None
    t = int(value.timestamp())
    if t % HOUR:
        raise _invalid(field, f"{text!r} is not on an hour boundary")
    return t


def _invalid(name: str, reason: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(f"{name}: {reason}", invalid_params=[{"name": name, "reason": reason}])


def view(obj: Obj[PriceSpec, Any]) -> Price:
    s = obj.spec
    return Price(
        id=obj.id,
        meter=s.meter,
        amount=s.amount,
        currency=s.currency,
        pricing_unit=METERS[s.meter].pricing_unit if s.meter in METERS else "",
        effective=hour_text(s.effective),
        until=hour_text(s.until) if s.until is not None else None,
        description=s.description,
        created_at=obj.created_at,
    )


def check_version(existing: list[PriceSpec], new: PriceSpec) -> None:
    """Pure: refuse a version that would overlap or reprice one of ``existing`` (same meter)."""
    for p in existing:
        if p.meter != new.meter:
            continue
        if p.effective >= new.effective:
            raise _invalid(
                "effective",
                f"{new.meter} already has a version from {hour_text(p.effective)}; a new version must start after "
                "every existing one (versions may not overlap)",
            )
        if p.until is not None and p.until > new.effective:
            raise _invalid(
                "effective",
                f"{new.meter}'s version from {hour_text(p.effective)} lasts until {hour_text(p.until)}: versions may "
                "not overlap",
            )


async def set_price(ctx: Context, store: Store, body: PriceSet, *, currency: str, now: _dt.datetime) -> Written:
    if body.meter not in METERS:
        raise _invalid("meter", unknown_meter(body.meter))
    try:
        amount = Decimal(body.amount)
    except InvalidOperation:
        raise _invalid("amount", f"{body.amount!r} is not a decimal number") from None
    if amount < 0 or not amount.is_finite():
        raise _invalid("amount", f"{body.amount} is negative: a price is zero or more")
    next_hour = hour_floor(int(now.timestamp())) + HOUR
    effective = parse_when(body.effective, "effective") if body.effective else next_hour
    if effective < next_hour:
        raise _invalid(
            "effective",
            f"{hour_text(effective)} is in the past or the current hour; prices apply from {hour_text(next_hour)} on "
            "(charged hours keep their price)",
        )
    until = parse_when(body.until, "until") if body.until else None
    if until is not None and until <= effective:
        raise _invalid("until", "it must be after effective")
    spec = PriceSpec(
        meter=body.meter, amount=body.amount, currency=body.currency or currency, effective=effective, until=until,
        description=body.description,
    )  # fmt: skip
    existing = [p.spec for p in await load_prices(store)]
    check_version(existing, spec)
    name = f"{body.meter}@{effective}"
    obj = PRICE.new(
        project="",
        name=name,
        id="price-" + hashlib.sha256(name.encode()).hexdigest()[:20],
        spec=spec,
        stamp=ctx.clock(),
    )
    return await write.commit(
        ctx, store, [Create(PRICE.dump(obj))], status=201, label="price", respond=lambda rev: view(obj)
    )


async def list_prices(store: Store, meter: str | None = None) -> list[Price]:
    prices = sorted(await load_prices(store), key=lambda p: (p.spec.meter, p.spec.effective))
    return [view(p) for p in prices if meter is None or p.spec.meter == meter]
