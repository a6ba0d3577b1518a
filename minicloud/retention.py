"""Retention: the leader loops that keep every accumulating record kind bounded (the first users of
:mod:`minicloud.cluster.leader`).

One :class:`RetentionLoop` per kind; each cycle reads a bounded slice of the kind (paged reads over the store's
``(kind, name, id)`` index), decides with a pure predicate which records expired, and deletes at most
``retention.batch`` of them with compare-and-swap deletes (a record changed meanwhile is skipped, not clobbered).

- ``audit``: entries older than ``retention.audit_days`` (ids are time-ordered, so a cycle reads only the oldest
  ``batch`` entries); deleted by a ``Txn(retention=True)``, the one way past the audit log's append-only rule.
- ``session``: sessions whose token has expired (:func:`minicloud.iam.sessions.expired`).
- ``operation``: finished operations older than ``retention.operations_days``.
- ``idempotency``: keys older than their TTL (``api.idempotency_ttl`` when they were stored).

Kinds whose ids are random are scanned ``retention.scan`` records per cycle from where the previous cycle stopped,
wrapping at the end, so a full pass over N records takes about N / scan cycles and no cycle reads a whole kind.

Backup files are node-local and pruned by the backup operation itself (:mod:`minicloud.backups`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass

from minicloud import ids
from minicloud.cluster.leader import LeaderLoop, Outcome, chunks
from minicloud.config import Config
from minicloud.core.write import DEFAULT_IDEMPOTENCY_TTL, IDEMPOTENCY
from minicloud.iam import audit, sessions
from minicloud.operations import KIND as OPERATION_KIND
from minicloud.operations import finished_before
from minicloud.state import Delete, Record, Store, Txn, TxnFailed

IDEMPOTENCY_KIND = IDEMPOTENCY.name
__all__ = ["DEFAULT_IDEMPOTENCY_TTL", "IDEMPOTENCY_KIND"]
#: Deletes per store transaction (a cycle deletes up to ``retention.batch`` in several).
TXN_SIZE = 250
_PAGE = 1000
Cursor = tuple[str, str]


@dataclass(frozen=True)
class Scan:
    """A snapshot: records of one kind in (name, id) order, and where the next scan starts (None: from the start)."""

    records: tuple[Record, ...]
    end: Cursor | None


@dataclass(frozen=True)
class ExpiryPlan:
    """What a retention cycle deletes: ``(id, revision)`` pairs. ``resume``: where the next scan starts when the
    batch bound cut the plan short (``more``), else the scan's end. Falsy when nothing expired."""

    kind: str
    deletes: tuple[tuple[str, int], ...]
    resume: Cursor | None
    more: bool

    def __bool__(self) -> bool:
        return bool(self.deletes)


def plan_expiry(kind: str, scan: Scan, expired: Callable[[Record], bool], batch: int) -> ExpiryPlan:
    """Pure: the first ``batch`` records of ``scan`` for which ``expired`` holds. When more expired than ``batch``,
    ``resume`` is the last one taken, so the next cycle continues right after it and nothing is skipped."""
    candidates = [r for r in scan.records if expired(r)]
    taken = candidates[:batch]
    more = len(candidates) > batch
    resume = (taken[-1].name, taken[-1].id) if more else scan.end
    return ExpiryPlan(kind, tuple((r.id, r.revision) for r in taken), resume, more)


def idempotency_expired(record: Record, now: _dt.datetime) -> bool:
    """Pure: True once an idempotency record is older than the TTL stored in it."""
    ttl = IDEMPOTENCY.load(record).spec.expires  # DEFAULT_IDEMPOTENCY_TTL for a record without one
    return ids.parse_time(record.created_at) + _dt.timedelta(seconds=ttl) <= now


class RetentionLoop(LeaderLoop[Scan, ExpiryPlan]):
    """Deletes expired records of one kind; ``expired(record, now)`` must be pure.

    ``time_ordered``: the kind's names sort oldest first (audit), so each cycle reads only the first ``batch + 1``
    records instead of scanning on from a cursor."""

    def __init__(
        self,
        store: Store,
        kind: str,
        expired: Callable[[Record, _dt.datetime], bool],
        *,
        interval: float,
        batch: int,
        scan: int,
        time_ordered: bool = False,
        retention_txn: bool = False,
    ) -> None:
        self.store = store
        self.kind = kind
        self.name = f"retention:{kind}"
        self.interval = interval
        self.expired = expired
        self.batch = batch
        self.scan = batch + 1 if time_ordered else scan  # one more than a batch tells whether more expired
        self.time_ordered = time_ordered
        self.retention_txn = retention_txn
        self.cursor: Cursor | None = None

    async def snapshot(self) -> Scan:
        """Up to ``scan`` records in (name, id) order, from the cursor (or the start), in pages of the index."""
        after = None if self.time_ordered else self.cursor
        records: list[Record] = []
        reached_end = False
        while len(records) < self.scan:
            want = min(_PAGE, self.scan - len(records))
            page = await self.store.list(self.kind, after=after, limit=want)
            records += page
            if len(page) < want:
                reached_end = True  # the next scan starts over from the first record
                break
            after = (page[-1].name, page[-1].id)
        end = None if reached_end or self.time_ordered else after
        if not self.time_ordered:
            self.cursor = end  # where the next cycle reads on; a plan cut short by ``batch`` moves it back (act)
        return Scan(tuple(records), end)

    def decide(self, snapshot: Scan, now: _dt.datetime) -> ExpiryPlan:
        return plan_expiry(self.kind, snapshot, lambda r: self.expired(r, now), self.batch)

    def describe(self, plan: ExpiryPlan) -> str:
        return f"delete {len(plan.deletes)} expired {self.kind} records" + (" (more to do)" if plan.more else "")

    async def act(self, plan: ExpiryPlan) -> Outcome:
        if not self.time_ordered:
            self.cursor = plan.resume
        deleted = skipped = 0
        for chunk in chunks(plan.deletes, TXN_SIZE):
            ops = [Delete(kind=self.kind, id=id_, expect_revision=rev) for id_, rev in chunk]
            while ops:
                try:
                    await self.store.commit(Txn(ops, retention=self.retention_txn))
                    deleted += len(ops)
                    break
                except TxnFailed as exc:  # changed or deleted meanwhile: leave that one, delete the rest
                    if exc.reason not in ("not-found", "revision-mismatch"):
                        raise
                    del ops[exc.index]
                    skipped += 1
        summary = f"deleted {deleted} {self.kind} records" + (f", {skipped} changed meanwhile" if skipped else "")
        return Outcome(summary, more=plan.more)


def retention_loops(store: Store, config: Config) -> list[RetentionLoop]:
    """The retention loops of every accumulating record kind, configured from ``[retention]``."""
    r = config.retention
    audit_keep = _dt.timedelta(days=r.audit_days)
    operations_keep = _dt.timedelta(days=r.operations_days)
    common = {"interval": r.interval, "batch": r.batch, "scan": r.scan}
    return [
        RetentionLoop(
            store,
            audit.KIND,
            lambda rec, now: audit.expired(rec, now, audit_keep),
            time_ordered=True,
            retention_txn=True,
            **common,  # type: ignore[arg-type]
        ),
        RetentionLoop(store, sessions.KIND, lambda rec, now: sessions.expired(rec, now), **common),  # type: ignore[arg-type]
        RetentionLoop(
            store,
            OPERATION_KIND,
            lambda rec, now: finished_before(rec, now, operations_keep),
            **common,  # type: ignore[arg-type]
        ),
        RetentionLoop(store, IDEMPOTENCY_KIND, idempotency_expired, **common),  # type: ignore[arg-type]
    ]
