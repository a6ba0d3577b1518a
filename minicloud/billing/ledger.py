"""The ledger: per project, an append-only chain of charges, each entry carrying the hash of the previous one.

An entry is ``{seq, prev, charge, hash}``: ``charge`` is the canonical JSON text of the charge (sorted keys, no
spaces, UTF-8), ``hash = sha256(prev + charge)``. Entries are named by their zero-padded sequence number, so the
store's name uniqueness refuses two entries with one number; the project's ``ledgerhead`` (compare-and-swap in the
same transaction) holds the last number and hash. :func:`verify` walks the chain and names the first entry whose
hash, link or number does not hold.

A charge is usage x the price in force at the usage's hour, in :class:`decimal.Decimal` (never float), kept to 10
decimal places (ROUND_HALF_EVEN); an hour without a price is charged 0 with ``price: null`` (visible, reproducible).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

import msgspec

from minicloud import ids
from minicloud.billing.kinds import LEDGER_ENTRY, LEDGER_HEAD, PRICE, USAGE, LedgerEntrySpec, LedgerHeadSpec
from minicloud.billing.meters import METERS, hour_text
from minicloud.core.kinds import Obj
from minicloud.state import Create, Op, Store, Update, list_all, list_span

PLACES = Decimal("0.0000000001")
_DECIMAL = Context(prec=60)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev: str, charge: str) -> str:
    return hashlib.sha256((prev + charge).encode()).hexdigest()


def entry_name(seq: int) -> str:
    return f"{seq:012d}"


def price_at(prices: Sequence[Obj[Any, Any]], meter: str, hour: int) -> Obj[Any, Any] | None:
    """The version of ``meter``'s price in force at ``hour``: the latest that started at or before it, unless its
    explicit ``until`` has passed."""
    best = None
    for p in prices:
        if (
            p.spec.meter == meter
            and p.spec.effective <= hour
            and (best is None or p.spec.effective > best.spec.effective)
        ):
            best = p
    if best is not None and best.spec.until is not None and hour >= best.spec.until:
        return None
    return best


def amount(quantity: int, meter: str, price: str | None) -> str:
    if price is None:
        return "0"
    value = _DECIMAL.multiply(_DECIMAL.divide(Decimal(quantity), Decimal(METERS[meter].divisor)), Decimal(price))
    return str(value.quantize(PLACES, rounding=ROUND_HALF_EVEN, context=_DECIMAL))


def charge_of(usage: Obj[Any, Any], prices: Sequence[Obj[Any, Any]]) -> dict[str, Any]:
    """The charge of one usage record (without its ``seq``, which the append gives)."""
    u = usage.spec
    price = price_at(prices, u.meter, u.hour)
    return {
        "usage_id": usage.id,
        "project": usage.project,
        "resource_kind": u.resource_kind,
        "resource_id": u.resource_id,
        "resource_name": u.resource_name,
        "meter": u.meter,
        "service": METERS[u.meter].service,
        "hour": hour_text(u.hour),
        "quantity": u.quantity,
        "unit": METERS[u.meter].unit,
        "pricing_unit": METERS[u.meter].pricing_unit,
        "price": price.spec.amount if price is not None else None,
        "price_id": price.id if price is not None else None,
        "currency": price.spec.currency if price is not None else None,
        "amount": amount(u.quantity, u.meter, price.spec.amount if price is not None else None),
        "labels": dict(sorted(usage.labels.items())),
        "attrs": dict(sorted(u.attrs.items())),
        "correction_of": u.correction_of,
    }


async def head_of(store: Store, project: str) -> Obj[LedgerHeadSpec, Any] | None:
    record = await store.get_by_name(LEDGER_HEAD.name, project, "head")
    return LEDGER_HEAD.load(record) if record is not None else None


def append_ops(
    project: str, head: Obj[LedgerHeadSpec, Any] | None, charges: Sequence[dict[str, Any]], stamp: str
) -> list[Op]:
    """The ops that append ``charges`` to ``project``'s chain after ``head`` (compare-and-swap on it)."""
    if not charges:
        return []
    seq, prev = (head.spec.seq, head.spec.hash) if head is not None else (0, "")
    ops: list[Op] = []
    for charge in charges:
        seq += 1
        text = canonical({**charge, "seq": seq})
        digest = chain_hash(prev, text)
        entry = LEDGER_ENTRY.new(
            project=project,
            name=entry_name(seq),
            id=f"led-{hashlib.sha256(f'{project}/{seq}'.encode()).hexdigest()[:24]}",
            spec=LedgerEntrySpec(seq=seq, prev=prev, charge=text, hash=digest),
            stamp=stamp,
        )
        ops.append(Create(LEDGER_ENTRY.dump(entry)))
        prev = digest
    new_head = LedgerHeadSpec(seq=seq, hash=prev)
    if head is not None:  # keep a pruned chain's checkpoint
        new_head = msgspec.structs.replace(head.spec, seq=seq, hash=prev)
    if head is None:
        obj = LEDGER_HEAD.new(project=project, name="head", id=f"lhd-{project}", spec=new_head, stamp=stamp)
        ops.append(Create(LEDGER_HEAD.dump(obj)))
    else:
        obj = head.replace(spec=new_head, updated_at=stamp)
        ops.append(Update(LEDGER_HEAD.dump(obj), expect_revision=head.revision))
    return ops


async def load_prices(store: Store) -> list[Obj[Any, Any]]:
    return [PRICE.load(r) for r in await list_all(store, PRICE.name)]


async def entries(store: Store, project: str) -> list[Obj[LedgerEntrySpec, Any]]:
    """The project's entries in sequence order (names are zero-padded numbers)."""
    return [LEDGER_ENTRY.load(r) for r in await list_all(store, LEDGER_ENTRY.name, project=project)]


async def entries_in(store: Store, project: str, since: int, until: int) -> list[Obj[LedgerEntrySpec, Any]]:
    """The project's entries whose charge's hour is in [since, until) (epoch seconds), in (hour, seq) order, read
    through the ``charge_hour`` range index: what a range costs, not the whole chain. An entry whose charge is not
    valid JSON (tampered) has no hour and is not among them (``verify`` names it)."""
    low, high = hour_text(max(since, 0)), hour_text(min(until, _MAX_TIME))
    records = await list_span(store, LEDGER_ENTRY.name, "charge_hour", low, high, project=project)
    return [LEDGER_ENTRY.load(r) for r in records]


#: 9999-12-31T23:00:00Z: the last hour ``hour_text`` writes with a four-digit year (text order is time order).
_MAX_TIME = 253402297200


@dataclass
class Verification:
    project: str
    entries: int
    ok: bool
    #: The first entry that does not hold (its sequence number and id) and why.
    first_bad_seq: int | None = None
    first_bad_id: str | None = None
    reason: str = ""


def verify_chain(project: str, chain: Sequence[Obj[LedgerEntrySpec, Any]], head: LedgerHeadSpec | None) -> Verification:
    """Pure: recompute every hash and link of ``chain`` (in sequence order), from the head's checkpoint when
    retention pruned the chain's start."""
    base = head.base_seq if head is not None else 0
    prev = head.base_hash if head is not None else ""
    for index, entry in enumerate(chain, start=base + 1):
        s = entry.spec
        problem = ""
        try:
            charge = json.loads(s.charge)
        except ValueError:
            charge = None
        if s.seq != index or entry.name != entry_name(index):
            problem = f"sequence number {s.seq} where {index} was expected (an entry was removed or renumbered)"
        elif s.prev != prev:
            problem = "its link to the previous entry does not match that entry's hash"
        elif charge is None or canonical(charge) != s.charge or charge.get("seq") != s.seq:
            problem = "its charge is not the canonical text that was hashed"
        elif chain_hash(prev, s.charge) != s.hash:
            problem = "its hash does not match its contents (the charge was altered)"
        if problem:
            return Verification(project, len(chain), False, s.seq, entry.id, problem)
        prev = s.hash
    if head is not None and (head.seq != base + len(chain) or head.hash != prev):
        return Verification(
            project, len(chain), False, base + len(chain) + 1, None,
            f"the head says {head.seq} entries ending in {head.hash[:12]}…; the chain has {base + len(chain)} "
            "(entries were removed)",
        )  # fmt: skip
    return Verification(project, len(chain), True)


async def verify(store: Store, project: str) -> Verification:
    head = await head_of(store, project)
    return verify_chain(project, await entries(store, project), head.spec if head is not None else None)


async def ledger_projects(store: Store) -> list[str]:
    return sorted({r.project for r in await list_all(store, LEDGER_HEAD.name)})


def now_stamp() -> str:
    return ids.now()


__all__ = ["USAGE", "Verification", "append_ops", "canonical", "charge_of", "price_at", "verify", "verify_chain"]
