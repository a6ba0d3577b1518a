"""One conformance suite for the store interface, run against both backends: SQLite alone and etcd + replica.

Only the etcd half skips where etcd is not installed.

What a caller may rely on whichever backend serves it: atomic multi-record transactions, compare-and-swap,
unique names, strictly increasing revisions, durable read-your-writes, change feed in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import msgspec
import pytest

from minicloud import ids
from minicloud.state import Check, Create, Delete, Record, SQLiteStore, Txn, TxnFailed, Update
from minicloud.state.etcd import EtcdStore, migrate_to_etcd
from minicloud.state.etcd_client import EtcdClient
from tests.integration.etcd_server import start_etcd


def rec(name: str, kind: str = "thing", project: str = "p", **spec: object) -> Record:
    stamp = ids.now()
    return Record(kind=kind, id=ids.new_id("th"), project=project, name=name, spec=dict(spec), created_at=stamp, updated_at=stamp)  # fmt: skip


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """A test etcd; only the etcd half skips without it (the SQLite half runs everywhere)."""
    if not shutil.which("etcd"):
        pytest.skip("needs etcd (Debian package etcd-server)")
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


async def _wipe(client: EtcdClient) -> None:
    await client.call("kv/deleterange", {"key": "AA==", "range_end": "AA=="})  # every key


@pytest.fixture(params=["sqlite", "etcd"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "state.db")
        await s.open()
        yield s
        await s.close()
        return
    server = request.getfixturevalue("etcd")
    client = EtcdClient([server.endpoint], server.ssl_context())
    await _wipe(client)
    seed = SQLiteStore(tmp_path / "seed.db")
    await seed.open()
    await migrate_to_etcd(seed, client)
    await seed.close()
    s = EtcdStore(SQLiteStore(tmp_path / "replica.db"), client)
    await s.open()
    yield s
    await s.close()


async def test_revisions_increase_and_reads_see_acknowledged_writes(store):
    seen = []
    for name in ("a", "b", "c"):
        r = rec(name)
        rev, changes = await store.commit(Txn([Create(r)]))
        seen.append(rev)
        got = await store.get("thing", r.id)
        assert got is not None and got.revision == rev and got.name == name
        assert [c.type for c in changes] == ["created"] and changes[0].revision == rev
    assert seen == sorted(seen) and len(set(seen)) == 3
    assert store.revision == seen[-1]


async def test_unique_names_per_kind_and_project(store):
    await store.commit(Txn([Create(rec("a"))]))
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Create(rec("a"))]))
    assert exc.value.reason == "name-taken"
    await store.commit(Txn([Create(rec("a", project="q"))]))
    await store.commit(Txn([Create(rec("a", kind="other"))]))
    assert len(await store.list("thing")) == 2


async def test_duplicate_id_is_refused(store):
    r = rec("x")
    await store.commit(Txn([Create(r)]))
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Create(msgspec.structs.replace(r, name="y"))]))
    assert exc.value.reason == "exists"


async def test_compare_and_swap(store):
    r = rec("cas", v=1)
    rev, _ = await store.commit(Txn([Create(r)]))
    cur = await store.get("thing", r.id)
    rev2, _ = await store.commit(Txn([Update(msgspec.structs.replace(cur, spec={"v": 2}), expect_revision=rev)]))
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Update(msgspec.structs.replace(cur, spec={"v": 3}), expect_revision=rev)]))
    assert exc.value.reason == "revision-mismatch"
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Delete(kind="thing", id=r.id, expect_revision=rev)]))
    assert exc.value.reason == "revision-mismatch"
    assert (await store.get("thing", r.id)).spec == {"v": 2}
    await store.commit(Txn([Delete(kind="thing", id=r.id, expect_revision=rev2)]))
    assert await store.get("thing", r.id) is None


async def test_missing_records_are_not_found(store):
    ghost = rec("ghost")
    for op in (Update(ghost), Delete(kind="thing", id=ghost.id)):
        with pytest.raises(TxnFailed) as exc:
            await store.commit(Txn([op]))
        assert exc.value.reason == "not-found"


async def test_check_guards_a_write_on_another_records_revision(store):
    guard = rec("guard")
    rev, _ = await store.commit(Txn([Create(guard)]))
    ok = rec("ok")
    _, changes = await store.commit(Txn([Create(ok), Check(kind="thing", id=guard.id, expect_revision=rev)]))
    assert [c.id for c in changes] == [ok.id]  # a Check writes nothing and is not a change
    assert (await store.get("thing", guard.id)).revision == rev
    moved, _ = await store.commit(Txn([Update(msgspec.structs.replace(guard, spec={"v": 2}), expect_revision=rev)]))
    late = rec("late")
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Create(late), Check(kind="thing", id=guard.id, expect_revision=rev)]))
    assert exc.value.reason == "revision-mismatch" and exc.value.index == 1
    assert await store.get("thing", late.id) is None
    await store.commit(Txn([Delete(kind="thing", id=guard.id)]))
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Create(late), Check(kind="thing", id=guard.id, expect_revision=moved)]))
    assert exc.value.reason == "not-found"
    assert await store.get("thing", late.id) is None


async def test_multi_record_transactions_are_atomic(store):
    taken = rec("taken")
    await store.commit(Txn([Create(taken)]))
    first = rec("first")
    with pytest.raises(TxnFailed):
        await store.commit(Txn([Create(first), Create(rec("taken"))]))
    assert await store.get("thing", first.id) is None
    rev, changes = await store.commit(Txn([Create(first), Delete(kind="thing", id=taken.id)]))
    assert sorted(c.type for c in changes) == ["created", "deleted"]
    assert (await store.get("thing", first.id)).revision == rev


async def test_rename_moves_the_name(store):
    r = rec("old")
    await store.commit(Txn([Create(r)]))
    cur = await store.get("thing", r.id)
    await store.commit(Txn([Update(msgspec.structs.replace(cur, name="new"))]))
    await store.commit(Txn([Create(rec("old"))]))  # the old name is free again
    other = rec("other")
    await store.commit(Txn([Create(other)]))
    cur = await store.get("thing", other.id)
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Update(msgspec.structs.replace(cur, name="new"))]))
    assert exc.value.reason == "name-taken"


async def test_concurrent_writers_lose_nothing(store):
    records = [rec(f"n{i}") for i in range(100)]
    results = await asyncio.gather(*(store.commit(Txn([Create(r)])) for r in records))
    assert len({rev for rev, _ in results}) == 100
    assert len(await store.list("thing", limit=1000)) == 100


async def test_change_feed_is_in_revision_order(store):
    sub = store.subscribe()
    start = store.revision
    r = rec("feed")
    await store.commit(Txn([Create(r)]))
    cur = await store.get("thing", r.id)
    await store.commit(Txn([Update(msgspec.structs.replace(cur, spec={"x": 1}))]))
    await store.commit(Txn([Delete(kind="thing", id=r.id)]))
    seen = []
    async with asyncio.timeout(10):
        async for change in sub:
            seen.append((change.type, change.revision))
            if len(seen) == 3:
                break
    sub.close()
    assert [t for t, _ in seen] == ["created", "updated", "deleted"]
    assert [rv for _, rv in seen] == sorted(rv for _, rv in seen)
    replay = await store.changes(start)
    assert [(c.type, c.revision) for c in replay] == seen


async def test_migration_to_etcd_keeps_every_record_and_revision(etcd, tmp_path):
    client = EtcdClient([etcd.endpoint], etcd.ssl_context())
    await _wipe(client)
    single = SQLiteStore(tmp_path / "single.db")
    await single.open()
    made = [rec(f"m{i}", i=i) for i in range(30)]
    for r in made:
        await single.commit(Txn([Create(r)]))
    first = await single.get("thing", made[0].id)
    await single.commit(Txn([Update(msgspec.structs.replace(first, spec={"i": "changed"}))]))
    before = {r.id: r for r in await single.list("thing", limit=1000)}
    last_single = single.revision
    await single.close()

    seed = SQLiteStore(tmp_path / "single.db")
    await seed.open()
    meta = await migrate_to_etcd(seed, client)
    await seed.close()
    assert meta.offset == last_single

    store = EtcdStore(SQLiteStore(tmp_path / "replica.db"), client)
    await store.open()
    try:
        after = {r.id: r for r in await store.list("thing", limit=1000)}
        assert after == before
        victim = after[made[5].id]
        rev, _ = await store.commit(
            Txn([Update(msgspec.structs.replace(victim, spec={"i": 5.5}), expect_revision=victim.revision)])
        )
        assert rev > last_single
        with pytest.raises(TxnFailed):
            await store.commit(Txn([Update(victim, expect_revision=victim.revision)]))
    finally:
        await store.close()


async def test_indexed_spec_lookups(store):
    await store.commit(Txn([Create(rec(f"i{i}", kind="instance", node=f"n{i % 2}", image_id="img")) for i in range(6)]))
    assert [r.name for r in await store.list("instance", where={"node": "n1"})] == ["i1", "i3", "i5"]
    assert len(await store.list("instance", where={"image_id": "img"}, limit=100)) == 6
    first = (await store.list("instance", where={"node": "n0"}))[0]
    await store.commit(Txn([Update(msgspec.structs.replace(first, spec={**first.spec, "node": "n1"}))]))
    assert [r.name for r in await store.list("instance", where={"node": "n0"})] == ["i2", "i4"]


class DropOneReply:
    """A TCP proxy in front of etcd that, once armed, forwards the next request but never delivers its reply: the
    write commits, the client times out and sends it again to the next endpoint."""

    def __init__(self, target: str) -> None:
        self.host, port = target.removeprefix("https://").rsplit(":", 1)
        self.port = int(port)
        self.armed = False
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        victim = False

        async def upstream() -> None:
            nonlocal victim
            while data := await reader.read(65536):
                if self.armed:
                    self.armed, victim = False, True
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if victim:
                    self.dropped += 1
                    continue
                writer.write(data)
                await writer.drain()

        with contextlib.suppress(Exception):
            await asyncio.gather(upstream(), downstream())
        writer.close()
        up_writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_retried_write_that_committed_the_first_time_is_reported_as_success(etcd, tmp_path):
    """Issue 9 §2.7 (a): the first endpoint commits the transaction but its reply is lost; the client sends it again
    to the next endpoint, where its conditions now fail. That must be reported as the success it was, not 409."""
    proxy = DropOneReply(etcd.endpoint)
    front = await proxy.start()
    client = EtcdClient([front, etcd.endpoint], etcd.ssl_context(), timeout=1.0)
    await _wipe(client)
    seed = SQLiteStore(tmp_path / "seed.db")
    await seed.open()
    await migrate_to_etcd(seed, client)
    await seed.close()
    store = EtcdStore(SQLiteStore(tmp_path / "replica.db"), client)
    await store.open()
    try:
        await store.commit(Txn([Create(rec("warm"))]))  # connections and any per-store setup are in place
        r = rec("once")
        proxy.armed = True
        rev, changes = await store.commit(Txn([Create(r)]))
        assert proxy.dropped > 0  # the reply really was lost and the write re-sent
        assert [c.type for c in changes] == ["created"] and changes[0].id == r.id
        got = await store.get("thing", r.id)
        assert got is not None and got.revision == rev
        cur = await store.get("thing", r.id)
        proxy.armed = True
        rev2, _ = await store.commit(Txn([Delete(kind="thing", id=r.id, expect_revision=cur.revision)]))
        assert rev2 > rev and await store.get("thing", r.id) is None
    finally:
        await store.close()
        proxy.close()
