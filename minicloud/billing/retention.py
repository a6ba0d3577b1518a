"""Retention of billing's accumulating records (``[billing] usage_days``, ``ledger_months``).

- **Usage records** (one per resource, meter and hour) are deleted once their hour is ``usage_days`` old: each one's
  figures stay in its ledger charge (quantity, unit, resource, labels, attributes, hour).
- **Ledger entries** are pruned once settled: an entry is settled when the latest closed invoice that ended
  ``ledger_months`` months before the current month holds it or an earlier invoice did (its sequence number is at or
  below that invoice's ``through`` and its hour before that invoice's end; invoices close in order, so every earlier
  one is closed). Only a prefix of the chain is pruned, in one transaction with the head's checkpoint
  (``base_seq``/``base_hash``: the last pruned entry's number and hash), so ``billing verify`` still checks every kept
  entry and its link to what was pruned. The closed invoices keep their stored documents and hashes; rendering one
  again from the ledger is possible only while its entries are kept.
- Closed invoices (one per project and month) and budgets are kept; a budget's notifications restart each month;
  the notifications it queued are the alarm outbox's, deleted once delivered or failed.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from minicloud.billing import invoices, ledger
from minicloud.billing.kinds import INVOICE, LEDGER_ENTRY, LEDGER_HEAD, USAGE, LedgerEntrySpec, LedgerHeadSpec
from minicloud.billing.meters import HOUR, seconds
from minicloud.cluster.leader import LeaderLoop, Outcome
from minicloud.core.kinds import Obj
from minicloud.retention import RetentionLoop
from minicloud.state import Delete, Op, Record, Store, Txn, TxnFailed, Update, list_all

#: Ledger entries pruned per project per cycle.
PRUNE_BATCH = 2000


def usage_expired(record: Record, now: _dt.datetime, keep_days: float) -> bool:
    """Pure: a usage record whose hour is older than ``keep_days``."""
    hour = int(record.spec.get("hour", 0))
    return hour + HOUR <= now.timestamp() - keep_days * 86400


def month_start(now: _dt.datetime, months_back: int) -> int:
    """The start (epoch seconds) of the month ``months_back`` months before ``now``'s."""
    index = now.year * 12 + (now.month - 1) - months_back
    return int(_dt.datetime(index // 12, index % 12 + 1, 1, tzinfo=_dt.UTC).timestamp())


def settled_prefix(chain: list[Obj[LedgerEntrySpec, Any]], through: int, end: int, limit: int) -> int:
    """Pure: how many entries from the start of ``chain`` (in order) are settled by an invoice holding entries up to
    ``through`` with hours before ``end``; at most ``limit``."""
    n = 0
    for entry in chain[:limit]:
        hour = seconds(json.loads(entry.spec.charge)["hour"]) or 0
        if entry.spec.seq > through or hour >= end:
            break
        n += 1
    return n


@dataclass(frozen=True)
class PruneSnapshot:
    #: Per project: its head, the settling invoice's (through, end), and the oldest kept entries.
    projects: tuple[tuple[Obj[LedgerHeadSpec, Any], int, int, tuple[Obj[LedgerEntrySpec, Any], ...]], ...]


@dataclass
class PrunePlan:
    #: (head with the new checkpoint, entries to delete)
    prunes: list[tuple[Obj[LedgerHeadSpec, Any], list[Obj[LedgerEntrySpec, Any]]]] = field(default_factory=list)
    more: bool = False

    def __bool__(self) -> bool:
        return bool(self.prunes)


def decide_prune(snap: PruneSnapshot, stamp: str) -> PrunePlan:
    plan = PrunePlan()
    for head, through, end, chain in snap.projects:
        n = settled_prefix(list(chain), through, end, PRUNE_BATCH)
        if not n:
            continue
        last = chain[n - 1]
        if last.spec.seq != head.spec.base_seq + n:
            continue  # a gap: leave it to `billing verify` to report, never move the checkpoint over it
        spec = msgspec.structs.replace(head.spec, base_seq=last.spec.seq, base_hash=last.spec.hash)
        plan.prunes.append((head.replace(spec=spec, updated_at=stamp), list(chain[:n])))
        plan.more = plan.more or n == PRUNE_BATCH
    return plan


class LedgerRetentionLoop(LeaderLoop[PruneSnapshot, PrunePlan]):
    """``billing:ledger-retention``: prunes each project's settled ledger prefix (module docstring)."""

    name = "billing:ledger-retention"

    def __init__(self, store: Store, *, months: int, interval: float = 3600.0) -> None:
        self.store = store
        self.months = months
        self.interval = interval
        self.clock: Any = None
        self.now: Any = None

    async def snapshot(self) -> PruneSnapshot:
        now = self.now() if self.now is not None else _dt.datetime.now(_dt.UTC)
        cutoff = month_start(now, self.months)
        out = []
        for record in await list_all(self.store, LEDGER_HEAD.name):
            head = LEDGER_HEAD.load(record)
            closed = [INVOICE.load(r) for r in await list_all(self.store, INVOICE.name, project=head.project)]
            old = [i for i in closed if invoices.bounds(i.spec.period)[1] <= cutoff]
            if not old:
                continue
            latest = max(old, key=lambda i: i.spec.period)
            if latest.spec.through <= head.spec.base_seq:
                continue
            page = await self.store.list(
                LEDGER_ENTRY.name, project=head.project, after=(ledger.entry_name(head.spec.base_seq), "~"),
                limit=PRUNE_BATCH,
            )  # fmt: skip
            chain = tuple(LEDGER_ENTRY.load(r) for r in page)
            out.append((head, latest.spec.through, invoices.bounds(latest.spec.period)[1], chain))
        return PruneSnapshot(tuple(out))

    def decide(self, snapshot: PruneSnapshot, now: _dt.datetime) -> PrunePlan:
        return decide_prune(snapshot, self.clock() if self.clock is not None else ledger.now_stamp())

    def describe(self, plan: PrunePlan) -> str:
        return f"prune {sum(len(e) for _, e in plan.prunes)} settled ledger entries of {len(plan.prunes)} projects"

    async def act(self, plan: PrunePlan) -> Outcome:
        pruned = raced = 0
        for head, entries in plan.prunes:
            ops: list[Op] = [Delete(kind=LEDGER_ENTRY.name, id=e.id, expect_revision=e.revision) for e in entries]
            ops.append(Update(LEDGER_HEAD.dump(head), expect_revision=head.revision))
            try:
                await self.store.commit(Txn(ops, retention=True))
                pruned += len(entries)
            except TxnFailed:
                raced += 1  # the chain grew meanwhile (head moved): again next cycle
        return Outcome(f"pruned {pruned} settled ledger entries" + (f", {raced} raced" if raced else ""),
                       more=plan.more or bool(raced))  # fmt: skip


def retention_loops(store: Store, config: Any) -> list[LeaderLoop[Any, Any]]:
    b, r = config.billing, config.retention
    keep = b.usage_days
    return [
        RetentionLoop(
            store,
            USAGE.name,
            lambda rec, now: usage_expired(rec, now, keep),
            interval=r.interval,
            batch=r.batch,
            scan=r.scan,
        ),
        LedgerRetentionLoop(store, months=b.ledger_months, interval=max(r.interval, 60.0)),
    ]
