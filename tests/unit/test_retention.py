"""Retention: pure decisions per kind, and the retention loops against a real store (bounded, CAS, audit allowed)."""

from __future__ import annotations

import asyncio
import datetime as _dt

import msgspec
import pytest

from minicloud import ids
from minicloud.cluster.leader import LeaderLoops
from minicloud.config import Config, RetentionConfig
from minicloud.core.write import IDEMPOTENCY, IdempotencySpec
from minicloud.iam import audit, sessions
from minicloud.operations import finished_before
from minicloud.retention import (
    IDEMPOTENCY_KIND,
    ExpiryPlan,
    RetentionLoop,
    Scan,
    idempotency_expired,
    plan_expiry,
    retention_loops,
)
from minicloud.state import Create, Delete, Record, SQLiteStore, Txn, TxnFailed, Update

NOW = _dt.datetime(2026, 6, 1, 12, 0, tzinfo=_dt.UTC)
DAY = _dt.timedelta(days=1)


def stamp(moment: _dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rec(kind: str, name: str, *, created: _dt.datetime = NOW, updated=None, spec=None, status=None, id_=None) -> Record:
    return Record(
        kind=kind,
        id=id_ or name,
        project="",
        name=name,
        spec=spec or {},
        status=status or {},
        revision=1,
        created_at=stamp(created),
        updated_at=stamp(updated or created),
    )


def audit_rec(age: _dt.timedelta) -> Record:
    moment = NOW - age
    audit_id = audit.new_id(int(moment.timestamp() * 1000))
    return rec(audit.KIND, audit_id, created=moment)


# -- pure decisions ------------------------------------------------------------------------------------------------


def test_audit_entries_expire_after_the_retention():
    keep = _dt.timedelta(days=90)
    assert audit.expired(audit_rec(91 * DAY), NOW, keep)
    assert audit.expired(audit_rec(90 * DAY), NOW, keep)
    assert not audit.expired(audit_rec(89 * DAY), NOW, keep)


@pytest.mark.parametrize(
    ("expires", "expected"),
    [
        (NOW - _dt.timedelta(seconds=sessions.DEFAULT_LEEWAY + 1), True),
        (NOW - _dt.timedelta(seconds=sessions.DEFAULT_LEEWAY - 1), False),  # still accepted by verify()
        (NOW + DAY, False),
    ],
)
def test_sessions_expire_once_their_token_cannot_verify(expires, expected):
    assert sessions.expired(rec(sessions.KIND, "ses-1", spec={"expires_at": stamp(expires)}), NOW) is expected


@pytest.mark.parametrize("spec", [{}, {"expires_at": 5}, {"expires_at": "soon"}])
def test_a_session_without_a_readable_expiry_is_kept(spec):
    assert not sessions.expired(rec(sessions.KIND, "ses-1", spec=spec), NOW)


@pytest.mark.parametrize(
    ("state", "age", "expected"),
    [("succeeded", 8, True), ("failed", 8, True), ("succeeded", 6, False), ("running", 400, False)],
)
def test_finished_operations_expire_after_the_retention(state, age, expected):
    op = rec("operation", "op-1", created=NOW - 500 * DAY, updated=NOW - age * DAY, status={"state": state})
    assert finished_before(op, NOW, 7 * DAY) is expected


def idem_rec(name: str, *, created: _dt.datetime, **spec) -> Record:
    """An idempotency record as the write layer stores it (:class:`minicloud.core.write.IdempotencySpec`)."""
    key = IDEMPOTENCY.new(
        project="",
        id=name,
        name=name,
        spec=IdempotencySpec(fingerprint="f" * 64, status=201, sealed_body="sealed", **spec),
        stamp=stamp(created),
    )
    return IDEMPOTENCY.dump(key)


def test_idempotency_records_expire_after_their_own_ttl():
    assert idempotency_expired(idem_rec("i", created=NOW - DAY, expires=3600), NOW)
    assert not idempotency_expired(idem_rec("i", created=NOW - DAY, expires=2 * 86400), NOW)
    # Records written before ``expires`` was stored (or by an older version) are kept for the default TTL: a day.
    legacy = rec(IDEMPOTENCY_KIND, "i", created=NOW - 2 * DAY, spec={"fingerprint": "f", "status": 201, "body": {}})
    assert idempotency_expired(legacy, NOW)
    assert not idempotency_expired(msgspec.structs.replace(legacy, created_at=stamp(NOW - DAY / 2)), NOW)


def test_a_plan_is_bounded_and_resumes_after_the_last_record_it_took():
    records = tuple(rec("k", f"n{i}", spec={"old": i % 2 == 0}) for i in range(10))
    scan = Scan(records, end=("n9", "n9"))
    plan = plan_expiry("k", scan, lambda r: r.spec["old"], batch=3)
    assert [d for d, _ in plan.deletes] == ["n0", "n2", "n4"] and plan.more and plan.resume == ("n4", "n4")
    whole = plan_expiry("k", scan, lambda r: r.spec["old"], batch=10)
    assert len(whole.deletes) == 5 and not whole.more and whole.resume == ("n9", "n9")
    nothing = plan_expiry("k", scan, lambda r: False, batch=10)
    assert not nothing and nothing.resume == ("n9", "n9")


def test_the_audit_loop_decides_without_a_store():
    loops = {loop.kind: loop for loop in retention_loops(None, Config())}  # type: ignore[arg-type]
    old, new = audit_rec(100 * DAY), audit_rec(DAY)
    plan = loops["audit"].decide(Scan((old, new), None), NOW)
    assert plan == ExpiryPlan("audit", ((old.id, 1),), None, False)


def test_defaults():
    r = RetentionConfig()
    assert (r.audit_days, r.operations_days, r.backups_keep) == (90, 7, 10)


# -- the loops against a store -------------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


def real_audit(age: _dt.timedelta) -> Record:
    record = audit.entry(
        principal="user:a", project="p", action="x", method="POST", path="/", target={}, result="allowed",
        status=201, request_id="r", source="unix",
    )  # fmt: skip
    moment = NOW - age
    audit_id = audit.new_id(int(moment.timestamp() * 1000))
    return msgspec.structs.replace(
        record, id=audit_id, name=audit_id, created_at=stamp(moment), updated_at=stamp(moment)
    )


async def test_audit_records_can_be_deleted_only_by_a_retention_transaction(store):
    entry = real_audit(100 * DAY)
    await store.commit(Txn([Create(entry)]))
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Delete(kind="audit", id=entry.id)]))
    assert exc.value.reason == "append-only"
    with pytest.raises(TxnFailed):  # retention may remove an entry, never change one
        await store.commit(Txn([Update(entry)], retention=True))
    await store.commit(Txn([Delete(kind="audit", id=entry.id)], retention=True))
    assert await store.get("audit", entry.id) is None


def loop_for(store, kind: str, **settings) -> RetentionLoop:
    cfg = Config(retention=RetentionConfig(**{"interval": 60.0, **settings}))
    return next(loop for loop in retention_loops(store, cfg) if loop.kind == kind)


async def cycle(loop: RetentionLoop):
    """One cycle on a single node (always the leader)."""
    loops = LeaderLoops(lambda: True, clock=lambda: NOW, settle=3600.0, poll=0.001)
    loops.register(loop)
    await loops.start()
    try:
        for _ in range(10_000):
            if loops.leading:
                break
            await asyncio.sleep(0.001)
        return await loops.run_cycle(loop)
    finally:
        await loops.close()


async def test_the_audit_loop_deletes_old_entries_in_bounded_batches_and_keeps_recent_ones(store):
    old = [real_audit(_dt.timedelta(days=100, minutes=i)) for i in range(5)]
    recent = [real_audit(_dt.timedelta(days=1, minutes=i)) for i in range(3)]
    await store.commit(Txn([Create(r) for r in old + recent]))
    loop = loop_for(store, "audit", batch=2)
    first = await cycle(loop)
    assert first is not None and first.more  # a full batch: the framework runs the next cycle soon
    assert await store.count("audit") == 6
    while (outcome := await cycle(loop)) is not None and outcome.more:
        pass
    assert sorted(r.id for r in await store.list("audit")) == sorted(r.id for r in recent)
    assert await cycle(loop) is None  # nothing left to do


async def test_the_session_loop_deletes_expired_sessions_scanning_a_bounded_slice_per_cycle(store):
    expired = [rec(sessions.KIND, f"ses-{i:03d}", spec={"expires_at": stamp(NOW - DAY)}) for i in range(0, 300, 2)]
    live = [rec(sessions.KIND, f"ses-{i:03d}", spec={"expires_at": stamp(NOW + DAY)}) for i in range(1, 300, 2)]
    await store.commit(Txn([Create(r) for r in expired + live]))
    loop = loop_for(store, sessions.KIND, scan=100, batch=1000)
    reads = []
    original = store.list

    async def counting_list(kind, **kw):
        page = await original(kind, **kw)
        reads.append(len(page))
        return page

    store.list = counting_list  # type: ignore[method-assign]
    outcome = await cycle(loop)
    assert outcome is not None and sum(reads) <= 100  # one cycle reads at most `scan` records
    assert await store.count(sessions.KIND) == 300 - 50
    for _ in range(3):  # the scan goes on where it stopped and wraps at the end
        await cycle(loop)
    assert sorted(r.id for r in await original(sessions.KIND)) == sorted(r.id for r in live)


async def test_the_operation_loop_keeps_running_and_recent_operations(store):
    ops = [
        rec("operation", "op-old", updated=NOW - 8 * DAY, status={"state": "succeeded"}),
        rec("operation", "op-failed", updated=NOW - 30 * DAY, status={"state": "failed"}),
        rec("operation", "op-new", updated=NOW - DAY, status={"state": "succeeded"}),
        rec("operation", "op-run", updated=NOW - 30 * DAY, status={"state": "running"}),
    ]
    await store.commit(Txn([Create(r) for r in ops]))
    await cycle(loop_for(store, "operation"))
    assert sorted(r.id for r in await store.list("operation")) == ["op-new", "op-run"]


async def test_the_idempotency_loop_skips_a_record_changed_meanwhile(store):
    old = [idem_rec(f"idem-{i}", created=NOW - 2 * DAY, expires=3600) for i in range(3)]
    await store.commit(Txn([Create(r) for r in old]))
    loop = loop_for(store, IDEMPOTENCY_KIND)
    snapshot = await loop.snapshot()
    plan = loop.decide(snapshot, NOW)
    stored = await store.get(IDEMPOTENCY_KIND, "idem-1")
    await store.commit(Txn([Update(stored)]))  # its revision moves on: the CAS delete must leave it
    outcome = await loop.act(plan)
    assert "deleted 2" in outcome.summary and "1 changed meanwhile" in outcome.summary
    assert [r.id for r in await store.list(IDEMPOTENCY_KIND)] == ["idem-1"]


def test_stamp_matches_the_id_clock():
    assert ids.parse_time(stamp(NOW)) == NOW
