"""Metering: usage to the second, derived from the change log, closed into hourly usage records.

Source. Every committed transition of a metered record (instance, volume, snapshot, floating IP, bucket) is in the
store's change log with its revision (:meth:`Store.changes`). The ``billing:meter`` leader loop folds the log, from
the revision in the ``metercursor`` record, into one ``meterstate`` per resource: its rates per meter (vCPUs while
running, GiB of a volume, …) and since when. A transition at time *t* (the change's stamp, or an instance's own
``launched_at``/``stopped_at``, which a node that reported late sets earlier) ends the current segment: its
unit-seconds are added to the hours it spans. The cursor, the states and anything charged move in **one
transaction** with a compare-and-swap on the cursor, so a fold is applied exactly once whoever leads.

Closing. The ``billing:close`` loop closes every hour that ended ``billing.close_delay`` seconds before the
watermark (the wall-clock time of a fold cycle that had read every committed change): the hour's usage record per
(resource, meter) gets an id derived from that key (``use-`` + sha256), is created with its state's update (CAS) and
its ledger charge in one transaction, so running twice, or a new leader after a SIGKILL mid-hour, makes exactly the
same records and never a second one. Both steps are pure functions of the state and the log
(:func:`fold`, :func:`close`).

Late data. A transition whose time falls in an hour already closed (a node that was offline reports its guest
stopped an hour ago) is not a rewrite: it makes a **correction** record per (meter, closed hour) with the difference
(negative when usage is taken back), keyed by the change's revision, charged at that hour's price.

Log retention. The change log keeps the last ``api.retain_changes`` revisions (≥ 1000, default 100,000), compacted
once a minute by every node, and is held back at the meter's cursor (:func:`compaction_hold`), at most ten times that. The meter reads ``billing.batch`` changes per cycle every ``billing.interval`` seconds
and again after one second while behind, so it drains ~``batch`` revisions a second. Should the log still have been
compacted past the cursor (a replica reset from an etcd snapshot, or a meter held back beyond the bound), the meter
**resynchronises**: it folds every metered record's current state at its own stamp and ends the states of records
that are gone at the log's clock, counts it in ``resyncs`` and logs a warning: usage between two transitions lost
in the gap is attributed to the state that follows it, nothing is counted twice.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from minicloud import ids
from minicloud.billing import ledger
from minicloud.billing.kinds import (
    CURSOR_ID,
    METER_CURSOR,
    METER_STATE,
    USAGE,
    MeterCursorSpec,
    MeterStateSpec,
    UsageSpec,
)
from minicloud.billing.meters import (
    HOUR,
    METERED_KINDS,
    consumption,
    counter_meter,
    effective_time,
    hour_floor,
    seconds,
)
from minicloud.cluster.leader import LeaderLoop, Outcome
from minicloud.core.kinds import Obj
from minicloud.state import Change, Compacted, Create, Delete, Op, Record, Store, Txn, TxnFailed, Update, list_all

log = logging.getLogger("minicloud.billing")

#: Kinds the billing loops write: a cycle that saw only these has nothing to record.
OWN_KINDS = frozenset({"metercursor", "meterstate", "usage", "ledgerentry", "ledgerhead", "invoice", "price"})
#: (meter, hour, quantity)
Quantity = tuple[str, int, int]


# -- pure accounting -----------------------------------------------------------------------------------------------
def spread(rates: dict[str, int], start: int, end: int) -> dict[int, dict[str, int]]:
    """Unit-seconds of ``rates`` over [start, end), by hour."""
    out: dict[int, dict[str, int]] = {}
    if end <= start or not rates:
        return out
    hour = hour_floor(start)
    while hour < end:
        secs = min(end, hour + HOUR) - max(start, hour)
        out[hour] = {m: r * secs for m, r in rates.items()}
        hour += HOUR
    return out


def _add(pending: dict[str, dict[str, int]], by_hour: dict[int, dict[str, int]]) -> dict[str, dict[str, int]]:
    out = {h: dict(q) for h, q in pending.items()}
    for hour, quantities in by_hour.items():
        slot = out.setdefault(str(hour), {})
        for meter, q in quantities.items():
            slot[meter] = slot.get(meter, 0) + q
    return out


def new_state(record: Record, t: int, closed_floor: int) -> MeterStateSpec:
    return MeterStateSpec(
        resource_kind=record.kind,
        resource_id=record.id,
        resource_name=record.name,
        since=t,
        closed_until=max(hour_floor(t), closed_floor),
    )


def fold(
    state: MeterStateSpec, t: int, rates: dict[str, int], attrs: dict[str, str], name: str, gone: bool
) -> tuple[MeterStateSpec, list[Quantity]]:
    """Pure: ``state`` after its resource changed to ``rates`` at ``t``, and the corrections of closed hours.

    The segment [since, t) at the old rates is added to the pending hours it spans; if ``t`` falls in an hour
    already closed (which assumed the old rates went on), each closed hour from ``t`` gets a correction of
    (new - old) x the seconds of that hour after ``t``."""
    t = max(t, state.since)
    old = state.rates
    corrections: list[Quantity] = []
    if t >= state.closed_until:
        pending = _add(state.pending, spread(old, max(state.since, state.closed_until), t))
        since = t
    else:
        pending = state.pending
        delta = {m: rates.get(m, 0) - old.get(m, 0) for m in sorted({*old, *rates})}
        delta = {m: d for m, d in delta.items() if d}
        for hour, quantities in sorted(spread(delta, t, state.closed_until).items()):
            corrections += [(m, hour, q) for m, q in quantities.items() if q]
        since = state.closed_until
    return (
        msgspec.structs.replace(
            state, rates=dict(rates), attrs=dict(attrs), resource_name=name, since=since, pending=pending, gone=gone
        ),
        corrections,
    )


def count(state: MeterStateSpec, counters: dict[str, int], t: int) -> tuple[MeterStateSpec, list[Quantity]]:
    """Pure: ``state`` after its counters (cumulative counts) were observed at ``t``: each increase since the last
    observation is usage of the hour of ``t`` (a correction if that hour is closed already). A counter that went
    down restarted: its whole value is the increase. A key ``meter@node@since`` (a router's egress per node) counts
    for ``meter``; a new ``since`` for a node is a restarted counter, counted from 0, and drops that node's older
    keys."""
    seen = dict(state.counters)
    added: dict[str, int] = {}
    for key, value in sorted(counters.items()):
        if "@" in key and key not in seen:  # a node's counter started again: its older keys are done
            node = key.rsplit("@", 1)[0] + "@"
            seen = {k: v for k, v in seen.items() if not k.startswith(node)}
        before = seen.get(key, 0)
        delta = value - before if value >= before else value
        seen[key] = value
        if delta:
            meter = counter_meter(key)
            added[meter] = added.get(meter, 0) + delta
    if seen == state.counters and not added:
        return state, []
    hour = hour_floor(t)
    if not added or hour >= state.closed_until:
        pending = _add(state.pending, {hour: added}) if added else state.pending
        return msgspec.structs.replace(state, counters=seen, pending=pending), []
    return msgspec.structs.replace(state, counters=seen), [(m, hour, q) for m, q in added.items()]


def close(state: MeterStateSpec, until: int) -> tuple[MeterStateSpec, list[Quantity], bool]:
    """Pure: close ``state``'s hours before ``until`` (an hour boundary): each hour's quantity per meter is its
    pending usage plus the open segment's share. Returns the new state, the hours' quantities (non-zero only) and
    whether the state can go (its resource is gone and nothing is pending)."""
    out: list[Quantity] = []
    pending = {h: dict(q) for h, q in state.pending.items()}
    hour = state.closed_until
    while hour < until:
        quantities = pending.pop(str(hour), {})
        start = max(state.since, hour)
        for meter, rate in state.rates.items():
            if start < hour + HOUR:
                quantities[meter] = quantities.get(meter, 0) + rate * (hour + HOUR - start)
        out += [(m, hour, q) for m, q in sorted(quantities.items()) if q]
        hour += HOUR
    new = msgspec.structs.replace(state, pending=pending, closed_until=max(state.closed_until, until))
    return new, out, new.gone and not new.rates and not new.pending


def usage_id(resource_id: str, meter: str, hour: int, correction_of: int = 0) -> str:
    key = f"{resource_id}|{meter}|{hour}" + (f"|c{correction_of}" if correction_of else "")
    return "use-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def usage_obj(
    project: str, labels: dict[str, str], state: MeterStateSpec, q: Quantity, stamp: str, correction_of: int = 0
) -> Obj[UsageSpec, Any]:
    meter, hour, quantity = q
    uid = usage_id(state.resource_id, meter, hour, correction_of)
    return USAGE.new(
        project=project,
        name=uid,
        id=uid,
        labels=labels,
        spec=UsageSpec(
            resource_kind=state.resource_kind,
            resource_id=state.resource_id,
            resource_name=state.resource_name,
            meter=meter,
            hour=hour,
            quantity=quantity,
            attrs=dict(state.attrs),
            correction_of=correction_of,
        ),
        stamp=stamp,
    )


def state_id(resource_id: str) -> str:
    return f"mst-{resource_id}"


# -- the fold loop ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldSnapshot:
    cursor: Obj[MeterCursorSpec, Any] | None
    changes: tuple[Change, ...]
    #: The log was compacted past the cursor: ``resync`` holds every metered record instead.
    compacted: bool
    caught_up: bool
    #: Meter states of the resources concerned, by resource id.
    states: dict[str, Obj[MeterStateSpec, Any]]
    resync: tuple[Record, ...] = ()
    #: The store's revision read before a resync's listing (the cursor moves there).
    resync_revision: int = 0


@dataclass
class FoldPlan:
    cursor: MeterCursorSpec
    cursor_revision: int | None
    #: (new state object, expected revision or None to create, delete?)
    states: list[tuple[Obj[MeterStateSpec, Any], int | None, bool]] = field(default_factory=list)
    usage: list[Obj[UsageSpec, Any]] = field(default_factory=list)
    changes: int = 0
    resync: bool = False
    #: More changes wait beyond this batch.
    behind: bool = False

    def __bool__(self) -> bool:
        return True


def _stamps(changes: Sequence[Change], clock: int) -> dict[int, int]:
    """The time of each revision: the latest stamp its writes carry, else the log's clock so far (a revision that only
    deletes carries none of its own)."""
    latest: dict[int, int] = {}
    for ch in changes:
        if ch.type != "deleted":
            t = seconds(ch.record.updated_at) or 0
            latest[ch.revision] = max(latest.get(ch.revision, 0), t)
    out: dict[int, int] = {}
    for rev in sorted({ch.revision for ch in changes}):
        clock = max(clock, latest.get(rev, 0))
        out[rev] = clock
    return out


def decide_fold(snap: FoldSnapshot, now: _dt.datetime, *, close_delay: int, stamp: str) -> FoldPlan | None:
    """Pure: fold ``snap``'s changes (or its resync) into the meter states."""
    cur = snap.cursor.spec if snap.cursor is not None else MeterCursorSpec()
    states = {rid: s.spec for rid, s in snap.states.items()}
    meta = {rid: s for rid, s in snap.states.items()}
    touched: dict[str, tuple[Record, bool]] = {}
    usage: list[Obj[UsageSpec, Any]] = []
    clock = cur.clock
    revision = cur.revision

    def apply(record: Record, t: int, deleted: bool, rev: int) -> None:
        c = consumption(record)
        rates = {} if deleted else c.rates
        state = states.get(record.id)
        if state is None:
            if not rates and not c.counters:
                return
            state = new_state(record, effective_time(record, {}, rates, t), cur.closed_until)
        counted, late = count(state, c.counters, t)
        if late or counted != state:
            states[record.id] = state = counted
            touched[record.id] = (record, deleted)
            usage.extend(usage_obj(record.project, record.labels, state, q, stamp, correction_of=rev) for q in late)
        if state.rates == rates and state.attrs == c.attrs and state.resource_name == record.name and not deleted:
            touched[record.id] = (record, False)  # its labels may have changed
            return
        when = effective_time(record, state.rates, rates, t)
        t = when if when >= state.since else t  # a launched_at/stopped_at older than what we know is stale
        new, corrections = fold(state, t, rates, c.attrs, record.name, deleted)
        states[record.id] = new
        touched[record.id] = (record, deleted)
        usage.extend(usage_obj(record.project, record.labels, new, q, stamp, correction_of=rev) for q in corrections)

    if snap.compacted:
        clock = max(clock, *(seconds(r.updated_at) or 0 for r in snap.resync), 0)
        present = {r.id for r in snap.resync}
        for record in snap.resync:
            apply(record, seconds(record.updated_at) or clock, False, snap.resync_revision)
        for rid, obj in snap.states.items():
            if rid not in present and not obj.spec.gone:
                gone = Record(
                    kind=obj.spec.resource_kind, id=rid, project=obj.project, name=obj.spec.resource_name,
                    labels=obj.labels, created_at=obj.created_at, updated_at=obj.updated_at,
                )  # fmt: skip
                apply(gone, clock, True, snap.resync_revision)
        revision = snap.resync_revision
    else:
        stamps = _stamps(snap.changes, clock)
        for ch in snap.changes:
            clock = stamps[ch.revision]
            revision = ch.revision
            if ch.kind in METERED_KINDS:
                apply(ch.record, stamps[ch.revision], ch.type == "deleted", ch.revision)
    watermark = cur.watermark
    now_s = int(now.timestamp())
    if snap.caught_up and hour_floor(now_s - close_delay) > hour_floor(cur.watermark - close_delay):
        watermark = now_s
    new_cursor = msgspec.structs.replace(
        cur, revision=revision, clock=clock, watermark=watermark, resyncs=cur.resyncs + (1 if snap.compacted else 0)
    )
    foreign = any(ch.kind not in OWN_KINDS for ch in snap.changes)
    idle = not touched and not snap.compacted and watermark == cur.watermark and not foreign
    if idle and snap.caught_up and snap.cursor is not None:
        return None  # only the meter's own writes since: moving the cursor over them would be one more of them
    plan = FoldPlan(
        new_cursor, snap.cursor.revision if snap.cursor is not None else None, changes=len(snap.changes),
        resync=snap.compacted, behind=not snap.caught_up,
    )  # fmt: skip
    for rid, (record, _deleted) in touched.items():
        state = states[rid]
        old = meta.get(rid)
        labels = dict(record.labels)
        if old is not None and old.spec == state and old.labels == labels:
            continue
        obj = (
            old.replace(spec=state, labels=labels, updated_at=stamp)
            if old is not None
            else METER_STATE.new(
                project=record.project, name=rid, id=state_id(rid), labels=labels, spec=state, stamp=stamp
            )
        )
        plan.states.append((obj, old.revision if old is not None else None, False))
    plan.usage = usage
    return plan


async def charge_ops(
    store: Store, usage: Sequence[Obj[UsageSpec, Any]], prices: Sequence[Obj[Any, Any]], stamp: str
) -> list[Op]:
    """The usage records' creates and their charges appended to each project's ledger (CAS on its head)."""
    ops: list[Op] = [Create(USAGE.dump(u)) for u in usage]
    by_project: dict[str, list[Obj[UsageSpec, Any]]] = {}
    for u in usage:
        by_project.setdefault(u.project, []).append(u)
    for project in sorted(by_project):
        head = await ledger.head_of(store, project)
        ops += ledger.append_ops(project, head, [ledger.charge_of(u, prices) for u in by_project[project]], stamp)
    return ops


def state_ops(states: Sequence[tuple[Obj[MeterStateSpec, Any], int | None, bool]]) -> list[Op]:
    ops: list[Op] = []
    for obj, expect, delete in states:
        if delete:
            ops.append(Delete(kind=METER_STATE.name, id=obj.id, expect_revision=expect))
        elif expect is None:
            ops.append(Create(METER_STATE.dump(obj)))
        else:
            ops.append(Update(METER_STATE.dump(obj), expect_revision=expect))
    return ops


#: Up to this many resources, a fold reads their meter states one get each; beyond, one paged range read.
GET_EACH = 16


async def load_states(store: Store, resource_ids: set[str]) -> dict[str, Obj[MeterStateSpec, Any]]:
    """The meter states of ``resource_ids``, by resource id. A state is named by its resource id, and listings are
    ordered by name, so many are read as pages of the name range from the smallest id to the largest (a page of 1000
    per query) rather than a get per resource."""
    wanted = sorted(resource_ids)
    out: dict[str, Obj[MeterStateSpec, Any]] = {}
    if len(wanted) <= GET_EACH:
        for rid in wanted:
            rec = await store.get(METER_STATE.name, state_id(rid))
            if rec is not None:
                out[rid] = METER_STATE.load(rec)
        return out
    want = set(wanted)
    after = (wanted[0], "")
    while True:
        page = await store.list(METER_STATE.name, after=after, limit=1000)
        for rec in page:
            if rec.name in want:
                state = METER_STATE.load(rec)
                out[state.spec.resource_id] = state
        if len(page) < 1000 or page[-1].name >= wanted[-1]:
            return out
        after = (page[-1].name, page[-1].id)


class MeterLoop(LeaderLoop[FoldSnapshot, FoldPlan | None]):
    """``billing:meter``: folds the change log into the meter states (see the module docstring)."""

    name = "billing:meter"

    def __init__(self, store: Store, *, interval: float = 30.0, batch: int = 2000, close_delay: int = 300) -> None:
        self.store = store
        self.interval = interval
        self.batch = batch
        self.close_delay = close_delay
        self.clock = ids.now

    async def snapshot(self) -> FoldSnapshot:
        record = await self.store.get(METER_CURSOR.name, CURSOR_ID)
        cursor = METER_CURSOR.load(record) if record is not None else None
        since = cursor.spec.revision if cursor is not None else 0
        head = self.store.revision
        try:
            changes = await self.store.changes(since, until=head, limit=self.batch)
        except Compacted:
            revision = self.store.revision
            resync: list[Record] = []
            for kind in sorted(METERED_KINDS):
                resync += await list_all(self.store, kind)
            states = {
                s.spec.resource_id: s for s in map(METER_STATE.load, await list_all(self.store, METER_STATE.name))
            }
            log.warning("the change log was compacted past the meter's cursor; resynchronising from the records",
                        extra={"cursor": since, "revision": revision})  # fmt: skip
            return FoldSnapshot(cursor, (), True, True, states, tuple(resync), revision)
        caught_up = len(changes) < self.batch or (bool(changes) and changes[-1].revision >= head)
        if len(changes) == self.batch and changes[-1].revision < head:
            # A cut inside one revision would split its transaction: end at the last whole revision.
            last = changes[-1].revision
            whole = [c for c in changes if c.revision < last]
            changes = whole or changes
        states = await load_states(self.store, {c.id for c in changes if c.kind in METERED_KINDS})
        return FoldSnapshot(cursor, tuple(changes), False, caught_up, states)

    def decide(self, snapshot: FoldSnapshot, now: _dt.datetime) -> FoldPlan | None:
        return decide_fold(snapshot, now, close_delay=self.close_delay, stamp=self.clock())

    def describe(self, plan: FoldPlan | None) -> str:
        assert plan is not None
        what = "resynchronise from the records" if plan.resync else f"fold {plan.changes} changes"
        return f"{what} into {len(plan.states)} meter states, {len(plan.usage)} corrections"

    async def act(self, plan: FoldPlan | None) -> Outcome:
        assert plan is not None
        stamp = self.clock()
        if plan.cursor_revision is None:
            cursor = METER_CURSOR.new(project="", name="meter", id=CURSOR_ID, spec=plan.cursor, stamp=stamp)
            cursor_op: Op = Create(METER_CURSOR.dump(cursor))
        else:
            record = await self.store.get(METER_CURSOR.name, CURSOR_ID)
            assert record is not None
            cursor = METER_CURSOR.load(record).replace(spec=plan.cursor, updated_at=stamp)
            cursor_op = Update(METER_CURSOR.dump(cursor), expect_revision=plan.cursor_revision)
        prices = await ledger.load_prices(self.store) if plan.usage else []
        ops = [cursor_op, *state_ops(plan.states), *await charge_ops(self.store, plan.usage, prices, stamp)]
        try:
            await self.store.commit(Txn(ops))
        except TxnFailed as exc:
            return Outcome(f"not folded: {exc.reason} (changed meanwhile); again next cycle", more=True)
        return Outcome(
            f"folded up to revision {plan.cursor.revision}: {len(plan.states)} states, {len(plan.usage)} corrections",
            more=plan.behind,
        )


# -- the close loop --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CloseSnapshot:
    cursor: Obj[MeterCursorSpec, Any] | None
    until: int
    states: tuple[Obj[MeterStateSpec, Any], ...]
    #: No state below ``until`` is left beyond these (the scan reached the end).
    complete: bool
    prices: tuple[Obj[Any, Any], ...] = ()


@dataclass
class ClosePlan:
    until: int
    cursor: Obj[MeterCursorSpec, Any] | None
    states: list[tuple[Obj[MeterStateSpec, Any], int | None, bool]] = field(default_factory=list)
    usage: list[Obj[UsageSpec, Any]] = field(default_factory=list)
    complete: bool = False
    prices: tuple[Obj[Any, Any], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.states) or self.complete


def decide_close(snap: CloseSnapshot, stamp: str) -> ClosePlan | None:
    """Pure: close each state's hours before ``snap.until``."""
    if snap.cursor is None or snap.cursor.spec.closed_until >= snap.until:
        return None
    plan = ClosePlan(snap.until, snap.cursor, complete=snap.complete, prices=snap.prices)
    for obj in snap.states:
        new, quantities, done = close(obj.spec, snap.until)
        plan.usage += [usage_obj(obj.project, obj.labels, new, q, stamp) for q in quantities]
        plan.states.append((obj.replace(spec=new, updated_at=stamp), obj.revision, done))
    return plan if plan else None


class CloseLoop(LeaderLoop[CloseSnapshot, ClosePlan | None]):
    """``billing:close``: closes the hours the watermark passed into usage records and their charges."""

    name = "billing:close"

    def __init__(self, store: Store, *, interval: float = 30.0, batch: int = 500, close_delay: int = 300) -> None:
        self.store = store
        self.interval = interval
        self.batch = batch
        self.close_delay = close_delay
        self.clock = ids.now

    async def snapshot(self) -> CloseSnapshot:
        record = await self.store.get(METER_CURSOR.name, CURSOR_ID)
        if record is None:
            return CloseSnapshot(None, 0, (), False)
        cursor = METER_CURSOR.load(record)
        until = hour_floor(cursor.spec.watermark - self.close_delay)
        if cursor.spec.closed_until >= until:
            return CloseSnapshot(cursor, until, (), False)
        found: list[Obj[MeterStateSpec, Any]] = []
        after = None
        complete = False
        while len(found) < self.batch:
            page = await self.store.list(METER_STATE.name, after=after, limit=1000)
            found += [s for s in map(METER_STATE.load, page) if s.spec.closed_until < until]
            if len(page) < 1000:
                complete = len(found) <= self.batch
                break
            after = (page[-1].name, page[-1].id)
        prices = tuple(await ledger.load_prices(self.store))
        return CloseSnapshot(cursor, until, tuple(found[: self.batch]), complete, prices)

    def decide(self, snapshot: CloseSnapshot, now: _dt.datetime) -> ClosePlan | None:
        return decide_close(snapshot, self.clock())

    def describe(self, plan: ClosePlan | None) -> str:
        assert plan is not None
        return f"close {len(plan.states)} meter states up to {_dt.datetime.fromtimestamp(plan.until, _dt.UTC):%Y-%m-%d %H:00}Z"

    async def act(self, plan: ClosePlan | None) -> Outcome:
        assert plan is not None and plan.cursor is not None
        stamp = self.clock()
        by_project: dict[str, list[tuple[Obj[MeterStateSpec, Any], int | None, bool]]] = {}
        for item in plan.states:
            by_project.setdefault(item[0].project, []).append(item)
        usage_of: dict[str, list[Obj[UsageSpec, Any]]] = {}
        for u in plan.usage:
            usage_of.setdefault(u.spec.resource_id, []).append(u)
        records = failed = 0
        for project in sorted(by_project):
            items = by_project[project]
            for start in range(0, len(items), 200):
                chunk = items[start : start + 200]
                usage = [u for obj, _, _ in chunk for u in usage_of.get(obj.spec.resource_id, [])]
                ops = [*state_ops(chunk), *await charge_ops(self.store, usage, plan.prices, stamp)]
                try:
                    await self.store.commit(Txn(ops))
                    records += len(usage)
                except TxnFailed:
                    failed += len(chunk)  # changed meanwhile (a fold): closed again next cycle from a fresh read
        if plan.complete and not failed:
            cursor = plan.cursor.replace(
                spec=msgspec.structs.replace(plan.cursor.spec, closed_until=plan.until), updated_at=stamp
            )
            try:
                await self.store.commit(Txn([Update(METER_CURSOR.dump(cursor), expect_revision=plan.cursor.revision)]))
            except TxnFailed:
                failed += 1
        return Outcome(
            f"closed {len(plan.states) - failed} meter states, {records} usage records"
            + (f", {failed} changed meanwhile" if failed else ""),
            more=bool(failed) or not plan.complete,
        )


async def compaction_hold(store: Store, config: Any) -> int | None:
    """The revision the change log should be kept after for the meter (its cursor), None when billing is off or the
    meter has not started."""
    if not config.billing.enabled:
        return None
    record = await store.get(METER_CURSOR.name, CURSOR_ID)
    return METER_CURSOR.load(record).spec.revision if record is not None else None


def billing_loops(store: Store, config: Any, query: Any = None) -> list[LeaderLoop[Any, Any]]:
    """The metering loops, configured from ``[billing]`` (registered in ``minicloud.api.app.leader_loops``);
    ``query``: the node's metrics query service or None (auto-stop policies measure idleness with it)."""
    b = config.billing
    if not b.enabled:
        return []
    from minicloud.billing.budgets import BudgetLoop
    from minicloud.billing.policies import PolicyLoop
    from minicloud.billing.retention import retention_loops

    return [
        MeterLoop(store, interval=b.interval, batch=b.batch, close_delay=b.close_delay),
        CloseLoop(store, interval=b.interval, batch=b.close_batch, close_delay=b.close_delay),
        BudgetLoop(store, interval=b.interval),
        PolicyLoop(
            store,
            query or (lambda: None),
            interval=max(b.interval, 60.0),
            scrape_interval=config.metrics.scrape_interval,
        ),
        *retention_loops(store, config),
    ]
