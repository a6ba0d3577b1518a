"""The SQLite store: migrations, revisions, the write path's conditions, atomicity and determinism of apply."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import msgspec
import pytest

from minicloud import ids
from minicloud.state import Compacted, Create, Delete, Record, SQLiteStore, Txn, TxnFailed, Update
from minicloud.state.migrations import SCHEMA_VERSION, migrate


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


def test_migrations_run_once_and_set_the_schema_version(tmp_path):
    db = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    assert migrate(db) == SCHEMA_VERSION
    assert migrate(db) == 0
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"records", "changes", "meta"} <= tables


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="upgrade minicloud"):
        migrate(db)


def test_a_failing_migration_leaves_the_old_schema(tmp_path, monkeypatch):
    from minicloud.state import migrations

    def broken(db):
        db.execute("CREATE TABLE half (x)")
        raise ValueError("boom")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, broken])
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", len(migrations.MIGRATIONS))
    db = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    with pytest.raises(ValueError):
        migrations.migrate(db)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half'").fetchone()[0] == 0


async def test_every_commit_bumps_the_store_revision(store):
    r1, _ = await store.commit(Txn([Create(rec("a"))]))
    r2, _ = await store.commit(Txn([Create(rec("b"))]))
    assert (r1, r2) == (1, 2)
    assert store.revision == 2
    assert (await store.get_by_name("thing", "p", "b")).revision == 2


async def test_revision_survives_reopen(tmp_path):
    s = SQLiteStore(tmp_path / "s.db")
    await s.open()
    await s.commit(Txn([Create(rec("a"))]))
    await s.close()
    s2 = SQLiteStore(tmp_path / "s.db")
    await s2.open()
    assert s2.revision == 1
    assert (await s2.commit(Txn([Create(rec("b"))])))[0] == 2
    await s2.close()


async def test_names_are_unique_per_kind_and_project(store):
    await store.commit(Txn([Create(rec("a"))]))
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Create(rec("a"))]))
    assert exc.value.reason == "name-taken"
    await store.commit(Txn([Create(rec("a", project="other"))]))
    await store.commit(Txn([Create(rec("a", kind="other-kind"))]))
    assert store.revision == 3


async def test_compare_and_swap_update(store):
    r = rec("a", size=1)
    rev, _ = await store.commit(Txn([Create(r)]))
    current = await store.get("thing", r.id)
    changed = msgspec.structs.replace(current, spec={"size": 2})
    await store.commit(Txn([Update(changed, expect_revision=rev)]))
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Update(msgspec.structs.replace(current, spec={"size": 3}), expect_revision=rev)]))
    assert exc.value.reason == "revision-mismatch"
    assert (await store.get("thing", r.id)).spec == {"size": 2}


async def test_update_and_delete_of_a_missing_record_fail_with_not_found(store):
    ghost = rec("ghost")
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Update(ghost)]))
    assert exc.value.reason == "not-found"
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Delete(kind="thing", id=ghost.id)]))
    assert exc.value.reason == "not-found"
    assert store.revision == 0


async def test_a_multi_record_transaction_is_all_or_nothing(store):
    taken = rec("taken")
    await store.commit(Txn([Create(taken)]))
    first = rec("first")
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Create(first), Create(rec("taken"))]))
    assert exc.value.index == 1
    assert await store.get("thing", first.id) is None
    assert store.revision == 1
    rev, changes = await store.commit(Txn([Create(first), Delete(kind="thing", id=taken.id)]))
    assert rev == 2 and [c.type for c in changes] == ["created", "deleted"]
    assert all(c.revision == 2 for c in changes)


async def test_concurrent_writers_are_group_committed_without_losing_any(store):
    records = [rec(f"n{i}") for i in range(300)]
    results = await asyncio.gather(*(store.commit(Txn([Create(r)])) for r in records))
    revisions = sorted(rev for rev, _ in results)
    assert revisions == list(range(1, 301))
    assert len(await store.list("thing", limit=1000)) == 300


async def test_a_failed_transaction_in_a_batch_does_not_affect_the_others(store):
    dupes = [rec("same") for _ in range(5)]
    others = [rec(f"o{i}") for i in range(5)]
    results = await asyncio.gather(*(store.commit(Txn([Create(r)])) for r in dupes + others), return_exceptions=True)
    failures = [r for r in results if isinstance(r, TxnFailed)]
    assert len(failures) == 4
    assert store.revision == 6
    assert len(await store.list("thing", limit=100)) == 6


async def test_list_orders_filters_and_continues_after_a_cursor(store):
    for name, env in [("c", "prod"), ("a", "dev"), ("b", "prod")]:
        r = msgspec.structs.replace(rec(name), labels={"env": env})
        await store.commit(Txn([Create(r)]))
    assert [r.name for r in await store.list("thing")] == ["a", "b", "c"]
    assert [r.name for r in await store.list("thing", labels={"env": "prod"})] == ["b", "c"]
    first = (await store.list("thing", limit=1))[0]
    assert [r.name for r in await store.list("thing", after=(first.name, first.id))] == ["b", "c"]
    assert [r.name for r in await store.list("thing", name="b")] == ["b"]


async def test_label_filter_keys_cannot_inject_sql_or_json_paths(store):
    await store.commit(Txn([Create(msgspec.structs.replace(rec("a"), labels={"k": "v"}))]))
    assert await store.list("thing", labels={"k' OR 1=1 --": "v"}) == []
    assert await store.list("thing", labels={'k"].x': "v"}) == []


async def test_changes_replay_in_order_and_compaction_is_reported(tmp_path):
    s = SQLiteStore(tmp_path / "s.db", retain_changes=5)
    await s.open()
    r = rec("a")
    await s.commit(Txn([Create(r)]))
    for i in range(9):
        cur = await s.get("thing", r.id)
        await s.commit(Txn([Update(msgspec.structs.replace(cur, spec={"i": i}))]))
    changes = await s.changes(0)
    assert [c.revision for c in changes] == list(range(1, 11))
    assert changes[0].type == "created" and changes[-1].record.spec == {"i": 8}
    assert await s.compact() == 5
    with pytest.raises(Compacted):
        await s.changes(2)
    assert [c.revision for c in await s.changes(5)] == [6, 7, 8, 9, 10]
    await s.close()


async def test_subscribers_see_every_committed_change_in_order(store):
    sub = store.subscribe()
    recs = [rec(f"s{i}") for i in range(20)]
    await asyncio.gather(*(store.commit(Txn([Create(r)])) for r in recs))
    seen = []
    async for change in sub:
        seen.append(change.revision)
        if len(seen) == 20:
            break
    sub.close()
    assert seen == list(range(1, 21))


async def _dump(store: SQLiteStore) -> list[tuple]:
    rows = await (await store._db.execute("SELECT * FROM records ORDER BY id")).fetchall()
    changes = await (await store._db.execute("SELECT * FROM changes ORDER BY revision, seq")).fetchall()
    return [tuple(r) for r in rows] + [tuple(c) for c in changes]


async def test_apply_is_deterministic_given_the_same_transactions(tmp_path):
    """Two replicas fed the same stamped transactions end byte-for-byte identical (what etcd replay relies on)."""
    a = rec("a", size=1)
    b = rec("b")
    txns = [
        Txn([Create(a), Create(b)]),
        Txn([Update(msgspec.structs.replace(a, spec={"size": 2}, updated_at="2030-01-01T00:00:00.000Z"))]),
        Txn([Create(rec("a"))]),  # fails: name taken
        Txn([Delete(kind="thing", id=b.id)]),
    ]
    dumps = []
    for n in range(2):
        s = SQLiteStore(tmp_path / f"replica{n}.db")
        await s.open()
        for t in txns:
            with contextlib.suppress(TxnFailed):
                await s.commit(t)
        dumps.append(await _dump(s))
        await s.close()
    assert dumps[0] == dumps[1]
    assert len(dumps[0]) == 1 + 4  # one record left, four change entries


async def test_closed_store_refuses_writes_but_finishes_queued_ones(tmp_path):
    s = SQLiteStore(tmp_path / "s.db")
    await s.open()
    pending = [asyncio.ensure_future(s.commit(Txn([Create(rec(f"q{i}"))]))) for i in range(10)]
    await asyncio.sleep(0)
    await s.close()
    assert all(p.done() and not p.exception() for p in pending)
    with pytest.raises(RuntimeError):
        await s.commit(Txn([Create(rec("late"))]))


async def test_point_reads_never_return_a_record_older_than_an_acknowledged_write(store):
    r = rec("cached", size=1)
    await store.commit(Txn([Create(r)]))
    assert (await store.get("thing", r.id)).spec == {"size": 1}  # now cached
    current = await store.get_by_name("thing", "p", "cached")
    renamed = msgspec.structs.replace(current, name="renamed", spec={"size": 2})
    await store.commit(Txn([Update(renamed)]))
    assert (await store.get("thing", r.id)).spec == {"size": 2}
    assert await store.get_by_name("thing", "p", "cached") is None
    assert (await store.get_by_name("thing", "p", "renamed")).spec == {"size": 2}
    assert await store.get("other-kind", r.id) is None
    await store.commit(Txn([Delete(kind="thing", id=r.id)]))
    assert await store.get("thing", r.id) is None
    assert await store.get_by_name("thing", "p", "renamed") is None


def test_record_cache_evicts_least_recently_used():
    from minicloud.state.cache import RecordCache

    cache = RecordCache(max_entries=2)
    a, b, c = rec("a"), rec("b"), rec("c")
    cache.put(a)
    cache.put(b)
    assert cache.by_id(a.id) is a  # a is now the most recent
    cache.put(c)
    assert cache.by_id(b.id) is None and cache.by_name("thing", "p", "b") is None
    assert cache.by_id(a.id) is a and cache.by_id(c.id) is c and len(cache) == 2
