"""The SQLite store's write path under faults: failing hooks and subscribers, compaction racing a reader, a replica
reset, and indexed lookups on spec fields (issue 9 §2.7 and §2.9)."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import msgspec
import pytest

from minicloud import ids
from minicloud.state import Compacted, Create, Delete, Record, SQLiteStore, Txn, TxnFailed, Update


def rec(name: str, kind: str = "thing", project: str = "p", **spec: object) -> Record:
    stamp = ids.now()
    return Record(
        kind=kind, id=ids.new_id("th"), project=project, name=name, spec=dict(spec), created_at=stamp, updated_at=stamp
    )


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


# -- §2.7 (b): a failing commit hook or subscriber ---------------------------------------------------------------
async def test_a_failing_commit_hook_neither_blocks_the_commit_nor_stops_the_writer(store):
    calls: list[int] = []

    def broken(changes):
        calls.append(len(changes or []))
        raise RuntimeError("hook bug")

    seen: list[int] = []
    store.add_commit_hook(broken)
    store.add_commit_hook(lambda changes: seen.extend(c.revision for c in changes or []))
    async with asyncio.timeout(5):
        first, _ = await store.commit(Txn([Create(rec("a"))]))
        second, _ = await store.commit(Txn([Create(rec("b"))]))
    assert (first, second) == (1, 2)
    assert seen == [1, 2]  # the hooks after the broken one still ran
    assert len(calls) == 2
    assert store.writable and store.alive
    assert (await store.get_by_name("thing", "p", "b")).revision == 2


async def test_a_failing_subscriber_does_not_stop_the_writer_or_other_subscribers(store):
    bad = store.subscribe()
    bad._push = lambda changes: (_ for _ in ()).throw(RuntimeError("subscriber bug"))  # type: ignore[method-assign]
    good = store.subscribe()
    async with asyncio.timeout(5):
        await store.commit(Txn([Create(rec("a"))]))
        await store.commit(Txn([Create(rec("b"))]))
        got = [(await anext(aiter(good))).revision for _ in range(2)]
    assert got == [1, 2]
    assert store.alive
    good.close()
    bad.close()


async def test_a_dead_writer_is_reported_and_fails_commits_instead_of_hanging(tmp_path):
    """If the writer task ends for any reason other than close(), ``alive`` and ``writable`` say so (readiness and the
    systemd watchdog follow ``alive``), and queued and later commits fail instead of waiting forever."""
    s = SQLiteStore(tmp_path / "s.db")
    await s.open()
    assert s.alive
    queued = s.submit_at(Txn([Create(rec("a"))]), None)
    s._writer.cancel()  # the writer dies (a bug, a fault): simulated by ending its task
    with pytest.raises((RuntimeError, asyncio.CancelledError)):
        async with asyncio.timeout(5):
            await queued
    assert not s.alive and not s.writable
    with pytest.raises(RuntimeError, match="writer stopped"):
        async with asyncio.timeout(5):
            await s.commit(Txn([Create(rec("b"))]))
    await s.close()


# -- §2.7 (c): compaction between the check and the query -------------------------------------------------------
async def test_changes_reports_a_compaction_that_committed_before_its_query(tmp_path):
    """The compaction's commit is visible to the reader before the store's in-memory floor moves (another connection
    here, the compacting task in production): ``changes`` must raise ``Compacted``, not return a silent gap."""
    s = SQLiteStore(tmp_path / "s.db")
    await s.open()
    r = rec("a")
    await s.commit(Txn([Create(r)]))
    for i in range(9):
        cur = await s.get("thing", r.id)
        await s.commit(Txn([Update(msgspec.structs.replace(cur, spec={"i": i}))]))
    other = sqlite3.connect(s.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("DELETE FROM changes WHERE revision <= 6")
    other.execute("UPDATE meta SET value = 6 WHERE key = 'compacted'")
    other.execute("COMMIT")
    other.close()
    with pytest.raises(Compacted) as exc:
        await s.changes(2)
    assert exc.value.compacted == 6
    assert [c.revision for c in await s.changes(6)] == [7, 8, 9, 10]
    await s.close()


async def test_changes_after_compact_still_raises_and_serves_the_rest(tmp_path):
    s = SQLiteStore(tmp_path / "s.db", retain_changes=3)
    await s.open()
    for i in range(6):
        await s.commit(Txn([Create(rec(f"n{i}"))]))
    assert await s.compact() == 3
    with pytest.raises(Compacted):
        await s.changes(1)
    assert [c.revision for c in await s.changes(3)] == [4, 5, 6]
    assert await s.changes(6) == []
    await s.close()


# -- §2.7 (d): a replica reset ----------------------------------------------------------------------------------------
async def test_reset_signals_hooks_and_ends_subscriptions_for_a_relist(store):
    signals: list[object] = []
    store.add_commit_hook(lambda changes: signals.append(changes))
    await store.commit(Txn([Create(rec("a"))]))
    sub = store.subscribe()
    snapshot = [msgspec.structs.replace(rec("b"), revision=40)]
    await store.reset(snapshot, 42)
    assert signals[-1] is None  # None: anything may have changed; drop cached state wholesale
    async with asyncio.timeout(5):
        remaining = [c async for c in sub]
    assert remaining == [] and sub.overflowed  # the subscriber re-lists, as after an overflow
    assert store.revision == 42 and [r.name for r in await store.list("thing")] == ["b"]
    # A subscription made after the reset works as usual.
    after = store.subscribe()
    await store.commit(Txn([Create(rec("c"))]))
    async with asyncio.timeout(5):
        assert (await anext(aiter(after))).revision == 43
    after.close()


async def test_iam_directory_drops_its_grants_on_reset(store):
    from minicloud.iam.directory import Directory

    directory = Directory(store)
    stamp = ids.now()
    binding = Record(
        kind="rolebinding", id=ids.new_id("rb"), project="", name="b1",
        spec={"principal": "user:u1", "role": "admin", "project": None}, created_at=stamp, updated_at=stamp,
    )  # fmt: skip
    await store.commit(Txn([Create(binding)]))
    assert (await directory.decide("user:u1", "compute:instances:list", "p")).allowed
    # The cluster revoked the binding while this replica was cut off; it reloads a snapshot without it.
    await store.reset([], store.revision + 5)
    assert not (await directory.decide("user:u1", "compute:instances:list", "p")).allowed


# -- §2.9: indexed lookups on spec fields ----------------------------------------------------------------------------
async def test_list_where_finds_records_by_an_indexed_spec_field(store):
    await store.commit(Txn([Create(rec(f"i{i}", kind="instance", node=f"n{i % 3}", image_id=f"img{i % 2}"))
                            for i in range(9)]))  # fmt: skip
    await store.commit(Txn([Create(rec("other", kind="hypervisor", node="n0"))]))
    on_n0 = await store.list("instance", where={"node": "n0"})
    assert [r.name for r in on_n0] == ["i0", "i3", "i6"]
    assert [r.name for r in await store.list("instance", where={"image_id": "img1"}, limit=2)] == ["i1", "i3"]
    assert await store.list("instance", where={"node": "n0", "image_id": "img1"}) == [on_n0[1]]
    assert await store.list("instance", where={"node": "nowhere"}) == []
    page = await store.list("instance", where={"node": "n1"}, after=("i1", "~"))
    assert [r.name for r in page] == ["i4", "i7"]


async def test_list_where_refuses_a_field_without_an_index(store):
    with pytest.raises(ValueError, match="index"):
        await store.list("instance", where={"vcpus": "2"})


async def test_list_where_uses_the_expression_indexes(store):
    from minicloud.state.sqlite import list_query

    db = sqlite3.connect(store.path)
    for kind, field in (
        ("instance", "node"),
        ("instance", "image_id"),
        ("port", "network"),
        ("floatingip", "port_network"),
    ):
        sql, params = list_query(kind, where={field: "x"}, limit=10)
        plan = " ".join(str(row) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        assert f"records_spec_{field}" in plan and "SCAN" not in plan, plan
    db.close()


async def test_list_where_follows_updates_and_deletes(store):
    r = rec("i", kind="instance", node="n1")
    await store.commit(Txn([Create(r)]))
    cur = await store.get("instance", r.id)
    await store.commit(Txn([Update(msgspec.structs.replace(cur, spec={"node": "n2"}))]))
    assert await store.list("instance", where={"node": "n1"}) == []
    assert [x.id for x in await store.list("instance", where={"node": "n2"})] == [r.id]
    await store.commit(Txn([Delete(kind="instance", id=r.id)]))
    assert await store.list("instance", where={"node": "n2"}) == []


# -- range reads (migration 4) and bulk creates -------------------------------------------------------------------
def entry(project: str, seq: int, hour: str | None, charge: str | None = None) -> Record:
    text = charge if charge is not None else json.dumps({"hour": hour, "seq": seq}, sort_keys=True)
    r = rec(f"{seq:012d}", kind="ledgerentry", project=project, seq=seq, charge=text)
    return msgspec.structs.replace(r, id=f"led-{project}-{seq}")


async def test_a_span_read_returns_exactly_the_records_in_range_page_by_page(store):
    from minicloud.state import list_span

    hours = [f"2026-10-{d:02d}T{h:02d}:00:00Z" for d in (1, 2, 3) for h in (0, 5, 23)]
    made = [entry(p, i, hours[(i * 7) % len(hours)]) for p in ("p1", "p2") for i in range(1, 28)]
    made += [entry("p1", 90, None, charge="not json (tampered)"), rec("i", kind="instance", project="p1", charge="x")]
    await store.commit(Txn([Create(r) for r in made]))
    low, high = "2026-10-02T00:00:00Z", "2026-10-03T00:00:00Z"
    for page in (1, 4, 1000):
        got = await list_span(store, "ledgerentry", "charge_hour", low, high, project="p1", page=page)
        want = [r for r in made if r.project == "p1" and r.kind == "ledgerentry" and r.spec["charge"][0] == "{"]
        want = [r for r in want if low <= json.loads(r.spec["charge"])["hour"] < high]
        assert [r.id for r in got] == [
            r.id for r in sorted(want, key=lambda r: (json.loads(r.spec["charge"])["hour"], r.name, r.id))
        ]
        assert len(got) == 9
    assert await list_span(store, "ledgerentry", "charge_hour", "2027", "2028", project="p1") == []
    with pytest.raises(ValueError, match="range index"):
        await store.list("ledgerentry", span=("seq", "1", "2"))


async def test_a_span_read_with_a_project_uses_the_range_index(store):
    from minicloud.state.sqlite import list_query

    db = sqlite3.connect(store.path)
    for after in (None, ("2026-10-01T00:00:00Z", "000000000001", "led-1")):
        sql, params = list_query("ledgerentry", project="p", span=("charge_hour", "a", "b"), after=after, limit=10)
        plan = " ".join(str(row) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        assert "records_span_charge_hour" in plan and "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    db.close()


async def test_the_migration_indexes_ledger_entries_written_before_it(tmp_path):
    from minicloud.state import list_span, migrations
    from minicloud.state.sqlite import INSERT_RECORD, record_params

    db = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    for step in range(3):  # the schema before the range index
        migrations.MIGRATIONS[step](db)
    db.execute("PRAGMA user_version = 3")
    old = entry("p", 1, "2026-10-01T05:00:00Z")
    db.execute(INSERT_RECORD, record_params(old, 1))
    db.execute("UPDATE meta SET value = 1 WHERE key = 'revision'")
    db.close()
    s = SQLiteStore(tmp_path / "state.db")
    await s.open()
    try:
        assert [
            r.id for r in await list_span(s, "ledgerentry", "charge_hour", "2026-10-01", "2026-10-02", project="p")
        ] == [old.id]
    finally:
        await s.close()


@pytest.mark.parametrize("bulk", [True, False])
async def test_many_creates_in_one_transaction_write_what_one_at_a_time_writes(store, monkeypatch, bulk):
    from minicloud.state import sqlite as backend

    monkeypatch.setattr(backend, "BULK_CREATES", 8 if bulk else 10**9)
    first = rec("first")
    await store.commit(Txn([Create(first)]))
    made = [rec(f"r{i:02d}") for i in range(20)]
    revision, changes = await store.commit(Txn([Create(r) for r in made]))
    assert [(c.type, c.id, c.record.revision) for c in changes] == [("created", r.id, revision) for r in made]
    assert [r.id for r in await store.list("thing", after=("first", first.id))] == [r.id for r in made]
    assert [c.id for c in await store.changes(revision - 1)] == [r.id for r in made]
    # one taken id (then one taken name) in the run: the transaction fails at that op, and nothing of it is written
    for clash, reason in ((msgspec.structs.replace(rec("other"), id=first.id), "exists"), (rec("first"), "name-taken")):
        ops = [Create(rec(f"s{i:02d}")) for i in range(12)]
        ops.insert(9, Create(clash))
        current = await store.get("thing", first.id)
        assert current is not None
        with pytest.raises(TxnFailed) as failed:
            await store.commit(Txn([Update(msgspec.structs.replace(current, spec={"x": 1})), *ops]))
        assert (failed.value.index, failed.value.reason) == (10, reason)
        assert await store.list("thing", name="s00") == [] and store.revision == revision
