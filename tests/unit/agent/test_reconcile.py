"""The reconciler framework (agent/reconcile.py): queue, workers, watch, requeue, backoff, resync, status CAS.

A recording reconciler runs on a real SQLite store; tests wait for what they expect (never for a fixed time)."""

from __future__ import annotations

import asyncio
import collections
import itertools

import msgspec
import pytest

from agent.reconcile import Backoff, Controller, Result, WorkQueue, merge_status, update_record
from minicloud import ids
from minicloud.state import Create, Record, Txn, TxnFailed, Update
from minicloud.state.sqlite import SQLiteStore

KIND = "thing"


def _record(id_: str, **status) -> Record:
    stamp = ids.now()
    return Record(kind=KIND, id=id_, project="default", name=id_, spec={}, status=status, created_at=stamp, updated_at=stamp)  # fmt: skip


async def wait_until(check, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - a plain predicate over what the reconciler recorded
            await asyncio.sleep(0.005)


class Recording:
    """A reconciler that records its calls. ``gates[key]`` holds a reconcile of that key until set; ``fail[key]``
    makes that many reconciles of the key raise; ``requeue[key]`` is returned as ``requeue_after``."""

    name = "test"
    kinds = frozenset({KIND})

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.calls: list[str] = []
        self.active: collections.Counter[str] = collections.Counter()
        self.max_active_per_key: collections.Counter[str] = collections.Counter()
        self.max_active_total = 0
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: dict[str, int] = {}
        self.requeue: dict[str, float] = {}
        self.cancelled: list[str] = []
        self.started = False
        self.closed = False
        self.bad_mapping = False

    def keys_for(self, change):
        if self.bad_mapping:
            raise ValueError("mapping bug")
        return [change.id]

    async def all_keys(self):
        return list(self.keys)

    async def start(self, enqueue) -> None:
        self.enqueue = enqueue
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def count(self, key: str) -> int:
        return self.calls.count(key)

    async def reconcile(self, key: str) -> Result:
        self.calls.append(key)
        self.active[key] += 1
        self.max_active_per_key[key] = max(self.max_active_per_key[key], self.active[key])
        self.max_active_total = max(self.max_active_total, sum(self.active.values()))
        try:
            if key in self.gates:
                await self.gates[key].wait()
            if self.fail.get(key, 0) > 0:
                self.fail[key] -= 1
                raise RuntimeError(f"{key} is not ready")
            return Result(requeue_after=self.requeue.get(key))
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        finally:
            self.active[key] -= 1


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def run(store):
    """``await run(reconciler, **controller_options)`` starts a controller that is closed after the test."""
    controllers = []

    async def start(reconciler, **kw) -> Controller:
        c = Controller(store, reconciler, **kw)
        controllers.append(c)
        await c.start()
        return c

    yield start
    for c in controllers:
        await c.close()


# -- the work queue ------------------------------------------------------------------------------------------------
async def test_a_key_queued_twice_is_handed_out_once():
    q = WorkQueue()
    q.add("a")
    q.add("b")
    q.add("a")
    assert [await q.get(), await q.get()] == ["a", "b"] and len(q) == 0


async def test_a_key_added_while_processing_waits_for_done():
    q = WorkQueue()
    q.add("a")
    assert await q.get() == "a"
    q.add("a")
    q.add("a")
    assert len(q) == 0  # not handed to a second worker while the first has it
    q.done("a")
    assert len(q) == 1 and await q.get() == "a"  # once more after, and only once
    q.done("a")
    assert len(q) == 0


async def test_add_after_keeps_the_earliest_timer():
    q = WorkQueue()
    q.add_after("a", 3600)
    q.add_after("a", 0.01)
    q.add_after("a", 7200)
    async with asyncio.timeout(10):
        assert await q.get() == "a"


async def test_shutdown_wakes_waiting_workers():
    q = WorkQueue()
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.shutdown()
    assert await waiter is None
    q.add("a")
    assert len(q) == 0


# -- backoff -------------------------------------------------------------------------------------------------------
def test_backoff_grows_exponentially_and_is_capped():
    b = Backoff(base=0.5, cap=30.0)
    highs = [b.delay(n, 0.999999) for n in range(1, 12)]
    lows = [b.delay(n, 0.0) for n in range(1, 12)]
    assert highs[:4] == pytest.approx([0.5, 1.0, 2.0, 4.0], rel=1e-5)
    assert all(a <= b for a, b in itertools.pairwise(highs))
    assert max(highs) <= 30.0 and highs[-1] == pytest.approx(30.0, rel=1e-5)
    assert all(lo == pytest.approx(hi / 2, rel=1e-5) for lo, hi in zip(lows, highs, strict=True))  # the jitter
    assert b.delay(10_000, 0.5) <= 30.0  # no overflow after a very long outage


async def test_a_failing_key_is_retried_with_growing_delays_and_success_resets_it(run):
    delays = []

    class Recorded(Backoff):
        def delay(self, failures, rand):
            d = super().delay(failures, rand)
            delays.append((failures, d))
            return d

    r = Recording()
    r.fail["k"] = 4
    await run(r, backoff=Recorded(base=0.001, cap=0.004), rand=lambda: 0.5)
    r.enqueue("k")
    await wait_until(lambda: r.count("k") == 5)
    assert [f for f, _ in delays] == [1, 2, 3, 4]
    assert [d for _, d in delays] == pytest.approx([0.00075, 0.0015, 0.003, 0.003])  # doubled, then capped
    r.fail["k"] = 1
    r.enqueue("k")
    await wait_until(lambda: r.count("k") == 7)
    assert delays[-1][0] == 1  # the success in between reset the count


# -- the controller ------------------------------------------------------------------------------------------------
async def test_changes_of_watched_kinds_are_reconciled_by_key(run, store):
    r = Recording()
    await run(r)
    await store.commit(Txn([Create(_record("t1")), Create(_record("t2"))]))
    other = Record(kind="other", id="o1", project="default", name="o1", spec={}, created_at=ids.now(), updated_at=ids.now())  # fmt: skip
    await store.commit(Txn([Create(other)]))
    await wait_until(lambda: {"t1", "t2"} <= set(r.calls))
    assert "o1" not in r.calls and r.started


async def test_a_key_queued_many_times_while_waiting_is_reconciled_once(run):
    r = Recording()
    r.gates["busy"] = asyncio.Event()
    await run(r, workers=1)
    r.enqueue("busy")
    await wait_until(lambda: r.active["busy"] == 1)  # the only worker is taken
    for _ in range(5):
        r.enqueue("a")
    r.gates["busy"].set()
    await wait_until(lambda: r.count("a") == 1)
    r.enqueue("z")
    await wait_until(lambda: r.count("z") == 1)  # the queue has moved on past everything queued before
    assert r.count("a") == 1


async def test_one_key_is_never_reconciled_concurrently_but_different_keys_are(run, store):
    r = Recording()
    for key in ("a", "b", "c"):
        r.gates[key] = asyncio.Event()
    await run(r, workers=2)
    for key in ("a", "b", "c"):
        r.enqueue(key)
    await wait_until(lambda: r.active["a"] == 1 and r.active["b"] == 1)
    for _ in range(3):
        r.enqueue("a")  # changes while "a" is being reconciled
    await store.commit(Txn([Create(_record("a"))]))
    await asyncio.sleep(0.05)
    assert r.active["c"] == 0  # bounded by the two workers
    for key in ("a", "b", "c"):
        r.gates[key].set()
    await wait_until(lambda: r.count("a") == 2 and r.count("c") == 1)
    assert r.max_active_per_key["a"] == 1 and r.max_active_total == 2
    assert r.count("a") == 2  # once for everything that arrived while it ran


async def test_requeue_after_reconciles_the_key_again(run):
    r = Recording()
    r.requeue["poll"] = 0.01
    await run(r)
    r.enqueue("poll")
    await wait_until(lambda: r.count("poll") >= 3)


async def test_every_key_is_resynced_periodically(run):
    r = Recording()
    r.keys = ["x", "y"]
    c = await run(r, resync_interval=0.02)
    await wait_until(lambda: r.count("x") >= 3 and r.count("y") >= 3)
    assert c.resyncs >= 3


async def test_a_subscription_that_overflows_triggers_a_resync_and_the_watch_goes_on(run, store):
    r = Recording()
    r.keys = ["listed"]
    c = await run(r, max_pending=3, resync_interval=3600)
    await wait_until(lambda: r.count("listed") == 1)
    assert c.resyncs == 1
    # One transaction of ten changes overflows a subscription that may hold three.
    await store.commit(Txn([Create(_record(f"burst{i}")) for i in range(10)]))
    await wait_until(lambda: c.resyncs == 2 and r.count("listed") == 2)
    await store.commit(Txn([Create(_record("later"))]))
    await wait_until(lambda: "later" in r.calls)  # still watching


async def test_a_mapping_error_does_not_end_the_watch(run, store):
    r = Recording()
    await run(r)
    r.bad_mapping = True
    await store.commit(Txn([Create(_record("lost"))]))
    r.bad_mapping = False
    await store.commit(Txn([Create(_record("seen"))]))
    await wait_until(lambda: "seen" in r.calls)


async def test_close_cancels_reconciles_in_progress_and_leaves_no_task(store):
    r = Recording()
    r.gates["slow"] = asyncio.Event()
    c = Controller(store, r, workers=3)
    await c.start()
    r.enqueue("slow")
    r.requeue["soon"] = 3600
    r.enqueue("soon")
    await wait_until(lambda: r.active["slow"] == 1 and r.count("soon") == 1)
    await c.close()
    assert r.cancelled == ["slow"] and r.closed
    leftover = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("test-") and not t.done()]
    assert leftover == []
    await store.commit(Txn([Create(_record("after-close"))]))
    await asyncio.sleep(0.02)
    assert "after-close" not in r.calls
    await c.close()  # idempotent


# -- status writes -------------------------------------------------------------------------------------------------
class RacingStore:
    """A store whose first ``n`` commits lose a race: someone else updates the record just before."""

    def __init__(self, inner: SQLiteStore, n: int) -> None:
        self.inner, self.races, self.commits = inner, n, 0

    async def get(self, kind, id_):
        return await self.inner.get(kind, id_)

    async def commit(self, txn):
        self.commits += 1
        if self.races > 0:
            self.races -= 1
            cur = await self.inner.get(KIND, txn.ops[0].record.id)
            theirs = {**cur.status, f"other{self.races}": True}
            await self.inner.commit(Txn([Update(msgspec.structs.replace(cur, status=theirs), expect_revision=cur.revision)]))  # fmt: skip
        return await self.inner.commit(txn)


async def test_merge_status_retries_a_lost_race_and_keeps_the_other_writers_fields(store):
    await store.commit(Txn([Create(_record("m", state="pending", kept=1))]))
    racing = RacingStore(store, 2)
    written = await merge_status(racing, KIND, "m", {"state": "running"})
    assert racing.commits == 3
    final = await store.get(KIND, "m")
    assert final.status == {"state": "running", "kept": 1, "other1": True, "other0": True}
    assert written.revision == final.revision


async def test_merge_status_writes_nothing_when_nothing_changes(store):
    await store.commit(Txn([Create(_record("same", state="running"))]))
    before = await store.get(KIND, "same")
    racing = RacingStore(store, 0)
    assert (await merge_status(racing, KIND, "same", {"state": "running"})).revision == before.revision
    assert racing.commits == 0


async def test_merge_status_of_a_missing_record_is_none(store):
    assert await merge_status(store, KIND, "nope", {"state": "x"}) is None


async def test_update_record_gives_up_after_its_attempts_with_the_conflict(store):
    await store.commit(Txn([Create(_record("busy"))]))
    racing = RacingStore(store, 100)
    with pytest.raises(TxnFailed) as info:
        await update_record(racing, KIND, "busy", lambda r: msgspec.structs.replace(r, status={"a": 1}), attempts=3)
    assert info.value.reason == "revision-mismatch" and racing.commits == 3


async def test_a_start_whose_first_listing_fails_leaves_nothing_running(store):
    class Unlistable(Recording):
        async def all_keys(self):
            raise RuntimeError("store unavailable")

    subs = []

    class Watched:
        def subscribe(self, **kw):
            subs.append(store.subscribe(**kw))
            return subs[-1]

    r = Unlistable()
    c = Controller(Watched(), r)
    with pytest.raises(RuntimeError):
        await c.start()
    assert r.closed and not [t for t in asyncio.all_tasks() if t.get_name().startswith("test-")]
    assert len(subs) == 1
    async with asyncio.timeout(5):
        assert [change async for change in subs[0]] == []  # closed: iterating it ends at once
