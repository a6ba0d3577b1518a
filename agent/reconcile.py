"""The node agent's reconciler framework, in controller-runtime's shape (``pkg/reconcile``, ``pkg/internal/controller``).

A **reconciler** is one level-triggered function, ``reconcile(key) -> Result``, plus two declarations: the record kinds
it watches and ``keys_for(change)``, which maps a committed change to the keys to reconcile. It reads the desired
state, observes the host through its drivers, converges, and writes status (``merge_status``). It never sees an event
stream: it is told only *which* key may be out of date, and looks at the world afresh each time.

The :class:`Controller` owns everything else:

- **Watching**: one store subscription; each change of a watched kind becomes keys on the work queue. A subscription
  that ends (its consumer fell ``max_pending`` changes behind, or the store replaced it) is replaced by a new one
  followed by a full resync, so no change is ever silently missed and the watch never ends.
- **The work queue** (:class:`WorkQueue`): keyed with de-duplication (a key queued twice before a worker takes it is
  reconciled once) and **one worker per key** (a key queued while it is being reconciled is reconciled again after,
  never concurrently). Different keys run concurrently, up to ``workers``.
- **Requeue**: ``Result(requeue_after=s)`` reconciles the key again after ``s`` seconds (polling for something the
  store will not announce, e.g. a guest powering off). An exception requeues with exponential backoff and jitter
  (:class:`Backoff`, capped); success resets the key's backoff.
- **Resync**: every ``resync_interval`` seconds every key the reconciler lists (``all_keys``) is queued, which repairs
  drift nobody announced (a domain killed behind our back) and whatever a lost event would have missed.
- **Shutdown**: ``close()`` stops the watch and the resync timer, cancels the workers (a reconcile in progress is
  cancelled) and waits for every task it started; then the reconciler's own ``close()`` runs.

Adding a reconciler: see docs/ARCHITECTURE.md, "Node reconcilers".
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from minicloud import ids
from minicloud.state import Change, Record, Store, Txn, TxnFailed, Update

log = logging.getLogger("minicloud.reconcile")


@dataclass(frozen=True)
class Result:
    """What a successful reconcile asks for next. ``requeue_after`` (seconds): look at this key again then, even if
    nothing changes; None: only on the next change, event or resync."""

    requeue_after: float | None = None


class Reconciler(Protocol):
    """One reconciler (see the module docstring). ``reconcile`` must be idempotent and is never called concurrently
    for the same key; raising an exception means "try again later" (with backoff)."""

    #: Names the reconciler in logs and task names.
    name: str
    #: The record kinds whose changes ``keys_for`` is called for.
    kinds: frozenset[str]

    def keys_for(self, change: Change) -> Iterable[str]:
        """The keys a committed change of a watched kind may have put out of date (often ``[change.id]``; none for
        records that are not this node's). Must be quick and must not block: it runs on the watch task."""
        ...

    async def all_keys(self) -> Iterable[str]:
        """Every key that exists now, for a resync."""
        ...

    async def reconcile(self, key: str) -> Result: ...

    async def start(self, enqueue: Callable[[str], None]) -> None:
        """Called once before the first reconcile. ``enqueue(key)`` queues a key from outside the store (a driver
        event, for instance); it may be called from the event loop at any time until ``close``."""
        ...

    async def close(self) -> None:
        """Called once after the last reconcile has finished or been cancelled: release drivers."""
        ...


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter for a key whose reconcile keeps failing: the n-th consecutive failure waits
    between half and all of ``min(cap, base * 2**(n-1))`` seconds ("equal jitter": retries of many keys that failed
    together spread out, and the wait never exceeds ``cap``)."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, failures: int, rand: float) -> float:
        """The wait before retry number ``failures`` (1 for the first failure); ``rand`` in [0, 1)."""
        full = min(self.cap, self.base * 2.0 ** min(max(failures - 1, 0), 64))
        return full / 2 + full / 2 * rand


class WorkQueue:
    """Keys waiting to be reconciled. De-duplicating: a key already waiting is not added twice. Exclusive: a key
    handed to a worker (``get``) is not handed out again until that worker calls ``done``; if it was added meanwhile
    it goes back on the queue then. ``add_after`` keeps only the earliest pending timer per key."""

    def __init__(self) -> None:
        self._queue: collections.deque[str] = collections.deque()
        self._dirty: set[str] = set()  # waiting (in _queue, or to be re-queued when done)
        self._processing: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._shut = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def processing(self) -> frozenset[str]:
        return frozenset(self._processing)

    def add(self, key: str) -> None:
        if self._shut or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._wake()

    def add_after(self, key: str, delay: float) -> None:
        if self._shut:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> str | None:
        """The next key (now marked as being processed), or None once the queue is shut down."""
        while not self._queue:
            if self._shut:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty and not self._shut:
            self._queue.append(key)
            self._wake()

    def shutdown(self) -> None:
        """Refuse new keys, drop timers and wake every waiting ``get`` (which then returns None)."""
        self._shut = True
        self._queue.clear()
        self._dirty.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._wake()

    def _wake(self) -> None:
        # Every waiter: one woken waiter may be cancelled before it runs, and the others re-check the queue anyway.
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


class Controller:
    """Runs one reconciler: watch → keyed queue → workers, with requeue, backoff and resync (module docstring)."""

    def __init__(
        self,
        store: Store,
        reconciler: Reconciler,
        *,
        workers: int = 4,
        resync_interval: float = 30.0,
        backoff: Backoff = Backoff(),
        max_pending: int = 10_000,
        rand: Callable[[], float] = random.random,
        observe: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a controller needs at least one worker")
        self.store = store
        self.reconciler = reconciler
        self.name = reconciler.name
        self.workers = workers
        self.resync_interval = resync_interval
        self.backoff = backoff
        self.max_pending = max_pending
        self.queue = WorkQueue()
        self._rand = rand
        #: Told of every reconcile pass: ``observe(reconciler name, seconds, succeeded)`` (the node's metrics).
        self._observe = observe
        self._failures: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Any = None
        self._closing = False
        #: How many full resyncs have run (start-up, timer, watch restarts); for logs and tests.
        self.resyncs = 0

    def enqueue(self, key: str) -> None:
        """Queue ``key`` for a reconcile (de-duplicated)."""
        self.queue.add(key)

    async def start(self) -> None:
        """Start the reconciler, subscribe, queue every key, and start the workers and the resync timer. The
        subscription is taken before the first listing, so no change between the two is missed. If the first listing
        fails, the subscription and the reconciler are closed again and the error is raised."""
        await self.reconciler.start(self.enqueue)
        self._sub = self.store.subscribe(max_pending=self.max_pending)
        try:
            await self.resync()
        except BaseException:  # nothing started: leave nothing behind
            self._sub.close()
            await self.reconciler.close()
            raise
        self._tasks = [
            asyncio.create_task(self._watch(), name=f"{self.name}-watch"),
            asyncio.create_task(self._resync_timer(), name=f"{self.name}-resync"),
            *(asyncio.create_task(self._worker(), name=f"{self.name}-worker-{i}") for i in range(self.workers)),
        ]
        log.info("reconciler started", extra={"reconciler": self.name, "workers": self.workers})

    async def close(self) -> None:
        """Stop watching, cancel the workers and wait for every task; then close the reconciler. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._sub is not None:
            self._sub.close()
        self.queue.shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.reconciler.close()

    async def resync(self) -> None:
        """Queue every key the reconciler lists."""
        self.resyncs += 1
        for key in await self.reconciler.all_keys():
            self.queue.add(key)

    # -- tasks -------------------------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        quiet_ends = 0
        while True:
            sub = self._sub
            delivered = False
            async for change in sub:
                delivered = True
                if change.kind not in self.reconciler.kinds:
                    continue
                try:
                    for key in self.reconciler.keys_for(change):
                        self.queue.add(key)
                except Exception:
                    log.exception("mapping a change to keys failed", extra={"reconciler": self.name, "id": change.id})
            if self._closing:
                return
            # The subscription ended: we fell too far behind, or the store replaced its feed. Take a new one and
            # look at everything (a resync is what a missed change would have asked for, and more).
            overflowed = bool(getattr(sub, "overflowed", False))
            quiet_ends = 0 if delivered or overflowed else quiet_ends + 1
            log.warning(
                "watch ended; resubscribing and resyncing",
                extra={"reconciler": self.name, "overflowed": overflowed},
            )
            if quiet_ends:  # ended at once again: do not spin
                await asyncio.sleep(self.backoff.delay(quiet_ends, self._rand()))
            self._sub = self.store.subscribe(max_pending=self.max_pending)
            try:
                await self.resync()
            except Exception:
                log.exception("resync failed; the timer will retry", extra={"reconciler": self.name})

    async def _resync_timer(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            try:
                await self.resync()
            except Exception:
                log.exception("resync failed; will retry", extra={"reconciler": self.name})

    def _observed(self, started: float, *, ok: bool) -> None:
        if self._observe is not None:
            try:
                self._observe(self.name, time.perf_counter() - started, ok)
            except Exception:
                log.exception("reconcile observer failed", extra={"reconciler": self.name})

    async def _worker(self) -> None:
        while (key := await self.queue.get()) is not None:
            started = time.perf_counter()
            try:
                result = await self.reconciler.reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._observed(started, ok=False)
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                delay = self.backoff.delay(failures, self._rand())
                log.warning(
                    "reconcile failed; will retry",
                    exc_info=True,
                    extra={
                        "reconciler": self.name,
                        "key": key,
                        "failures": failures,
                        "retry_in": round(delay, 2),
                        "error": str(exc),
                    },
                )
                self.queue.add_after(key, delay)
            else:
                self._observed(started, ok=True)
                self._failures.pop(key, None)
                if result.requeue_after is not None:
                    self.queue.add_after(key, result.requeue_after)
            finally:
                self.queue.done(key)


# -- status writes -------------------------------------------------------------------------------------------------
async def update_record(
    store: Store, kind: str, id_: str, mutate: Callable[[Record], Record | None], *, attempts: int = 10
) -> Record | None:
    """Read the record, let ``mutate`` return its new version (None: nothing to write), and commit that with
    compare-and-swap on the revision read. When someone else wrote in between, read and ``mutate`` again (so
    ``mutate`` must be a pure function of the record it is given). Returns the record as written (or as read when
    nothing changed), or None if there is no such record (or it was deleted meanwhile). Raises the last
    :class:`TxnFailed` if every attempt lost the race, so the caller's reconcile is retried with backoff."""
    last: TxnFailed | None = None
    for _ in range(attempts):
        record = await store.get(kind, id_)
        if record is None:
            return None
        new = mutate(record)
        if new is None or new == record:
            return record
        new = msgspec.structs.replace(new, updated_at=ids.now())
        try:
            _, changes = await store.commit(Txn([Update(new, expect_revision=record.revision)]))
        except TxnFailed as exc:
            if exc.reason == "not-found":
                return None
            if exc.reason != "revision-mismatch":
                raise
            last = exc
            continue
        return changes[0].record if changes else new
    assert last is not None
    raise last


async def merge_status(
    store: Store,
    kind: str,
    id_: str,
    status: Mapping[str, Any],
    *,
    spec: Mapping[str, Any] | None = None,
    attempts: int = 10,
) -> Record | None:
    """Merge ``status`` fields (and ``spec`` fields, for the few a reconciler owns) into the record with
    compare-and-swap, retrying on a concurrent write; no write when nothing would change. See :func:`update_record`."""

    def merge(record: Record) -> Record:
        return msgspec.structs.replace(
            record, status={**(record.status or {}), **status}, spec={**record.spec, **(spec or {})}
        )

    return await update_record(store, kind, id_, merge, attempts=attempts)
