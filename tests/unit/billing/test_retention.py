"""Retention of usage records and of settled ledger entries: the chain keeps a checkpoint, verify still holds."""

from __future__ import annotations

import datetime as _dt

from minicloud.billing import invoices, ledger
from minicloud.billing.kinds import LEDGER_ENTRY, USAGE
from minicloud.billing.retention import LedgerRetentionLoop, month_start, usage_expired
from minicloud.core.context import Context
from minicloud.state import Delete, Txn, list_all
from tests.unit.billing.test_metering import Meter, _month_of_usage, instance, put, store  # noqa: F401


async def _prune(s, now: _dt.datetime, months: int = 24) -> str:
    loop = LedgerRetentionLoop(s, months=months)
    loop.now = lambda: now
    loop.clock = lambda: "2029-01-15T00:00:00.000Z"
    plan = loop.decide(await loop.snapshot(), now)
    return (await loop.act(plan)).summary if plan else "idle"


async def test_settled_ledger_entries_are_pruned_behind_a_checkpoint_and_verify_still_holds(store):  # noqa: F811
    clock = await _month_of_usage(store)  # November's usage, charged
    written = await invoices.close_invoice(Context.system("t"), store, "2026-11", clock.now)
    through = written.body.through_seq
    dec1 = _dt.datetime(2026, 12, 1, 1, tzinfo=_dt.UTC)
    await put(store, instance("running", dec1, launched=dec1))
    clock.now = _dt.datetime(2026, 12, 1, 3, 10, tzinfo=_dt.UTC)
    await Meter(store, clock).run()  # December's first hours, after November's entries
    total = len(await ledger.entries(store, "default"))
    assert total > through
    # not old enough yet: nothing pruned
    assert await _prune(store, _dt.datetime(2027, 6, 1, tzinfo=_dt.UTC)) == "idle"
    assert await _prune(store, _dt.datetime(2029, 1, 15, tzinfo=_dt.UTC)) == f"pruned {through} settled ledger entries"
    kept = await ledger.entries(store, "default")
    assert len(kept) == total - through and kept[0].spec.seq == through + 1
    head = await ledger.head_of(store, "default")
    assert head is not None and head.spec.base_seq == through
    assert (await ledger.verify(store, "default")).ok
    assert await _prune(store, _dt.datetime(2029, 1, 15, tzinfo=_dt.UTC)) == "idle"  # December is not closed
    # the chain grows on from the checkpoint and still verifies
    clock.now = _dt.datetime(2026, 12, 1, 5, 10, tzinfo=_dt.UTC)
    await Meter(store, clock).run()
    head = await ledger.head_of(store, "default")
    assert head is not None and head.spec.base_seq == through and head.spec.seq > total
    assert (await ledger.verify(store, "default")).ok
    # removing the first kept entry is still caught
    first = (await ledger.entries(store, "default"))[0]
    await store.commit(Txn([Delete(kind=LEDGER_ENTRY.name, id=first.id)]))
    result = await ledger.verify(store, "default")
    assert not result.ok and result.first_bad_seq == through + 2
    # the closed invoice keeps its document
    shown, _document = await invoices.show(store, "default", "2026-11")
    assert shown.state == "closed" and shown.sha256 == written.body.sha256


async def test_usage_records_expire_after_usage_days(store):  # noqa: F811
    await _month_of_usage(store)
    records = await list_all(store, USAGE.name)
    assert records
    hour = max(int(r.spec["hour"]) for r in records)
    last = _dt.datetime.fromtimestamp(hour + 3600, _dt.UTC)
    newest = next(r for r in records if int(r.spec["hour"]) == hour)
    assert not usage_expired(newest, last + _dt.timedelta(days=399), 400)
    assert all(usage_expired(r, last + _dt.timedelta(days=400), 400) for r in records)
    assert month_start(_dt.datetime(2029, 1, 15, tzinfo=_dt.UTC), 24) == int(
        _dt.datetime(2027, 1, 1, tzinfo=_dt.UTC).timestamp()
    )
    assert month_start(_dt.datetime(2029, 3, 2, tzinfo=_dt.UTC), 14) == int(
        _dt.datetime(2028, 1, 1, tzinfo=_dt.UTC).timestamp()
    )
