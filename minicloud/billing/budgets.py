"""Budgets: an amount per calendar month (UTC) per project, thresholds on actual and forecast spend, notifications
through an alarm's webhooks, and optional enforcement.

The ``billing:budgets`` leader loop reads, for each project with budgets, the ledger entries appended since the
budgets' ``through_seq`` (entries are named by their zero-padded sequence number: one range of the name index), adds
the charges of the current month in the budget's currency to ``spent``, projects the month's end like the cost
report (:func:`minicloud.billing.costs.forecast`), and marks each threshold crossed once per month:
``actual:P`` when spent >= P % of the amount, ``forecast:P`` when the forecast is. A crossing is **one transaction**:
the budget's new status (compare-and-swap on its revision) and one outbox entry per webhook action of the budget's
alarm (``alarmdelivery``, delivered, signed and retried by the alarm loop like an alarm's own notifications, with
``type: budget`` in the body). So a crossing notifies once, whoever leads, and never twice.

A new month starts from zero (``spent`` and the crossings reset). Enforcement: with ``enforce``, once the month's
spend reaches the amount, requests that create billable resources (instances, volumes, snapshots, floating IPs,
buckets) in the project are refused with 409 saying so; existing resources keep running unless the operator chose
``stop_instances`` (``--stop-instances``, implies ``enforce``): then the loop also stops the project's running instances,
through the instance service as the system caller ``budget:<name>`` (audited like any stop), records each in the
budget's status (the last :data:`KEEP_STOPPED`) and stops again, on the next cycle, one started later that month. It
lifts with the next month, or when an administrator deletes or replaces the budget.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

import msgspec

from minicloud import errors, ids
from minicloud.billing import costs, invoices, ledger
from minicloud.billing.kinds import BUDGET, LEDGER_ENTRY, BudgetSpec, BudgetStatus
from minicloud.billing.meters import seconds
from minicloud.cluster.leader import LeaderLoop, Outcome
from minicloud.core import crud, write
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.model.billing import Budget, BudgetCreate, BudgetNotification
from minicloud.observe.kinds import ALARM, ALARM_DELIVERY, AlarmDeliverySpec
from minicloud.state import Create, Op, Record, Store, Txn, TxnFailed, Update, list_all

log = logging.getLogger("minicloud.billing")

#: Budgets a project may have: all of them are read on every billable create (enforcement).
MAX_PER_PROJECT = 100
#: The create actions a budget with ``enforce`` refuses once exhausted.
BILLABLE_CREATES = frozenset({
    "compute:instances:create", "storage:volumes:create", "storage:snapshots:create", "network:floatingips:create",
    "storage:buckets:create",
})  # fmt: skip
#: Ledger entries read per project per cycle.
ENTRIES_PER_CYCLE = 20_000
#: Instances stopped by a budget that its status keeps.
KEEP_STOPPED = 50


def view(obj: Obj[BudgetSpec, BudgetStatus]) -> Budget:
    s, st = obj.spec, obj.status
    return Budget(
        id=obj.id, name=obj.name, project=obj.project, amount=s.amount, currency=s.currency,
        thresholds=list(s.thresholds), forecast=s.forecast, alarm=s.alarm, enforce=s.enforce,
        stop_instances=s.stop_instances, description=s.description, period=st.period, spent=st.spent, forecast_spend=st.forecast,
        crossed=list(st.crossed), exhausted=st.exhausted,
        notifications=[msgspec.convert(n, BudgetNotification) for n in st.notifications], checked_at=st.checked_at,
        created_at=obj.created_at, stopped=list(st.stopped),
    )  # fmt: skip


def _invalid(name: str, reason: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(f"{name}: {reason}", invalid_params=[{"name": name, "reason": reason}])


async def create(ctx: Context, store: Store, body: BudgetCreate, *, currency: str) -> Written:
    try:
        amount = Decimal(body.amount)
    except InvalidOperation:
        raise _invalid("amount", f"{body.amount!r} is not a decimal number") from None
    if amount <= 0:
        raise _invalid("amount", "a budget is more than zero")
    alarm_id = ""
    if body.alarm:
        record = await store.get_by_name(ALARM.name, ctx.project, body.alarm)
        if record is None:
            record = await store.get(ALARM.name, body.alarm)
            if record is not None and record.project != ctx.project:
                record = None
        if record is None:
            raise _invalid("alarm", f"no alarm {body.alarm!r} in project '{ctx.project}' (see `minicloud alarm list`)")
        alarm_id = record.id
    if await store.get_by_name(BUDGET.name, ctx.project, body.name) is not None:
        raise errors.Conflict(f"a budget named '{body.name}' exists in project '{ctx.project}'")
    await crud.refuse_beyond(store, BUDGET, ctx.project, MAX_PER_PROJECT)
    spec = BudgetSpec(
        amount=body.amount, currency=body.currency or currency, thresholds=sorted(set(body.thresholds)),
        forecast=body.forecast, alarm=alarm_id, enforce=body.enforce or body.stop_instances,
        stop_instances=body.stop_instances, description=body.description,
    )  # fmt: skip
    obj = BUDGET.new(project=ctx.project, name=body.name, spec=spec, status=BudgetStatus(), stamp=ctx.clock())
    return await write.commit(
        ctx, store, [Create(BUDGET.dump(obj))], status=201, label="budget", respond=lambda rev: view(obj)
    )


async def get(store: Store, project: str, name: str) -> Obj[BudgetSpec, BudgetStatus]:
    record = await store.get_by_name(BUDGET.name, project, name)
    if record is None:
        raise errors.NotFound(f"no budget named '{name}' in project '{project}'; see `minicloud budget list`")
    return BUDGET.load(record)


async def list_budgets(store: Store, project: str) -> list[Budget]:
    return [view(BUDGET.load(r)) for r in await list_all(store, BUDGET.name, project=project)]


async def delete(ctx: Context, store: Store, name: str) -> Written:
    return await crud.delete_read(ctx, store, BUDGET, lambda: get(store, ctx.project, name))


async def refuse_if_exhausted(store: Store, project: str, action: str, now: _dt.datetime) -> None:
    """409 when ``action`` creates a billable resource and an enforced budget of ``project`` is spent this month."""
    if action not in BILLABLE_CREATES:
        return
    period = invoices.period_of(int(now.timestamp()))
    for record in await store.list(BUDGET.name, project=project, limit=MAX_PER_PROJECT):
        b = BUDGET.load(record)
        if b.spec.enforce and b.status.exhausted and b.status.period == period:
            raise errors.Conflict(
                f"the budget '{b.name}' of project '{project}' is exhausted: {b.status.spent} of {b.spec.amount} "
                f"{b.spec.currency} spent in {period}; new billable resources are refused until the month ends or an "
                "administrator raises the budget (existing resources keep running)"
            )


# -- evaluation (pure) -------------------------------------------------------------------------------------------------
def evaluate(
    spec: BudgetSpec, status: BudgetStatus, charges: Sequence[dict[str, Any]], *, through: int, closed_until: int,
    now: int, stamp: str,
) -> tuple[BudgetStatus, list[str]]:  # fmt: skip
    """Pure: the budget's status after ``charges`` (ledger charges with ``seq`` > its ``through_seq``) and the
    threshold keys crossed now for the first time this month."""
    period = invoices.period_of(now)
    start, end = invoices.bounds(period)
    fresh = status.period != period
    spent = Decimal(0) if fresh else Decimal(status.spent)
    crossed = [] if fresh else list(status.crossed)
    for c in charges:
        hour = seconds(c["hour"]) or 0
        if c.get("currency") == spec.currency and start <= hour < end:
            spent += Decimal(c["amount"])
    projected = costs.project_month(spent, closed_until=closed_until, now=now)
    amount = Decimal(spec.amount)
    new: list[str] = []
    for p in spec.thresholds:
        limit = amount * p / 100
        if spent >= limit and f"actual:{p}" not in crossed:
            new.append(f"actual:{p}")
        if spec.forecast and projected >= limit and f"forecast:{p}" not in crossed:
            new.append(f"forecast:{p}")
    notifications = [] if fresh else list(status.notifications)
    shown = str(projected.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))
    notifications += [{"key": k, "at": stamp, "spent": costs.decimal_text(spent), "forecast": shown,
                       "deliveries": 0} for k in new]  # fmt: skip
    return BudgetStatus(
        period=period, spent=costs.decimal_text(spent), forecast=shown, through_seq=through,
        crossed=crossed + new, exhausted=spent >= amount, notifications=notifications, checked_at=stamp,
        stopped=[] if fresh else list(status.stopped),
    ), new  # fmt: skip


def notification_body(budget: Obj[BudgetSpec, Any], status: BudgetStatus, key: str) -> str:
    kind, _, pct = key.partition(":")
    return ledger.canonical({
        "type": "budget", "budget": budget.name, "budget_id": budget.id, "project": budget.project,
        "period": status.period, "on": kind, "threshold_percent": int(pct), "amount": budget.spec.amount,
        "currency": budget.spec.currency, "spent": status.spent, "forecast": status.forecast, "at": status.checked_at,
        "summary": f"budget '{budget.name}' of project '{budget.project}': {kind} spend "
        f"{status.spent if kind == 'actual' else status.forecast} {budget.spec.currency} reached {pct} % of "
        f"{budget.spec.amount} in {status.period}",
    })  # fmt: skip


def deliveries(
    budget: Obj[BudgetSpec, Any], status: BudgetStatus, keys: Sequence[str], alarm: Obj[Any, Any] | None, now: float
) -> list[Obj[AlarmDeliverySpec, Any]]:
    """Pure: one outbox entry per (crossed key, webhook action of the alarm); ids derived from the crossing, so the
    same crossing can never queue twice."""
    if alarm is None:
        return []
    out = []
    for key in keys:
        transition = f"budget:{budget.id}:{status.period}:{key}"
        for index, action in enumerate(alarm.spec.actions):
            did = "adl-" + hashlib.sha256(f"{transition}:{index}".encode()).hexdigest()[:24]
            spec = AlarmDeliverySpec(
                alarm_id=alarm.id, transition=transition, action=index, url=action.url, to="ALARM",
                body=notification_body(budget, status, key), next_at=now,
            )  # fmt: skip
            out.append(ALARM_DELIVERY.new(project=budget.project, name=did, id=did, spec=spec, stamp=status.checked_at))
    return out


# -- the loop ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetSnapshot:
    budgets: tuple[Obj[BudgetSpec, BudgetStatus], ...]
    #: Per project: the charges after the smallest ``through_seq`` of its budgets, and the last sequence read.
    charges: dict[str, tuple[tuple[dict[str, Any], ...], int]]
    alarms: dict[str, Obj[Any, Any]]
    closed_until: int
    #: Per project with a ``stop_instances`` budget: its instances.
    instances: dict[str, tuple[Record, ...]] = field(default_factory=dict)


@dataclass
class BudgetPlan:
    #: (budget with its new status, deliveries)
    updates: list[tuple[Obj[BudgetSpec, BudgetStatus], list[Obj[AlarmDeliverySpec, Any]]]] = field(default_factory=list)
    #: (budget id, instance) to stop: an exhausted ``stop_instances`` budget's running instances.
    stops: list[tuple[str, Record]] = field(default_factory=list)
    more: bool = False

    def __bool__(self) -> bool:
        return bool(self.updates or self.stops)


def running(instances: Sequence[Record]) -> list[Record]:
    """The instances meant to run (powered on, not being deleted), whatever their state now."""
    return [i for i in instances if not i.spec.get("deleted") and i.spec.get("power", "running") != "stopped"]


def decide_budgets(snap: BudgetSnapshot, now: _dt.datetime, stamp: str) -> BudgetPlan:
    plan = BudgetPlan()
    now_s = int(now.timestamp())
    for b in snap.budgets:
        charges, through = snap.charges.get(b.project, ((), b.status.through_seq))
        mine = [c for c in charges if c.get("seq", 0) > b.status.through_seq]
        status, new = evaluate(b.spec, b.status, mine, through=max(through, b.status.through_seq),
                               closed_until=snap.closed_until, now=now_s, stamp=stamp)  # fmt: skip
        if b.spec.stop_instances and status.exhausted:
            plan.stops += [(b.id, inst) for inst in running(snap.instances.get(b.project, ()))]
        same = msgspec.structs.replace(status, checked_at=b.status.checked_at) == b.status
        if same:
            continue
        alarm = snap.alarms.get(b.spec.alarm)
        outbox = deliveries(b, status, new, alarm, now.timestamp())
        if outbox:
            for n in status.notifications:
                if n["key"] in new:
                    n["deliveries"] = len(outbox) // max(len(new), 1)
        plan.updates.append((b.replace(status=status, updated_at=stamp), outbox))
    return plan


class BudgetLoop(LeaderLoop[BudgetSnapshot, BudgetPlan]):
    """``billing:budgets``: measures each budget's month and notifies thresholds crossed (module docstring)."""

    name = "billing:budgets"

    def __init__(self, store: Store, *, interval: float = 60.0) -> None:
        self.store = store
        self.interval = interval
        self.clock = ids.now

    async def snapshot(self) -> BudgetSnapshot:
        budgets = tuple(BUDGET.load(r) for r in await list_all(self.store, BUDGET.name))
        charges: dict[str, tuple[tuple[dict[str, Any], ...], int]] = {}
        for project in sorted({b.project for b in budgets}):
            since = min(b.status.through_seq for b in budgets if b.project == project)
            got: list[dict[str, Any]] = []
            last = since
            after = (ledger.entry_name(since), "~")  # past every id of the entry named ``since``
            while len(got) < ENTRIES_PER_CYCLE:
                page = await self.store.list(LEDGER_ENTRY.name, project=project, after=after, limit=1000)
                for rec in page:
                    entry = LEDGER_ENTRY.load(rec)
                    got.append(json.loads(entry.spec.charge))
                    last = max(last, entry.spec.seq)
                if len(page) < 1000:
                    break
                after = (page[-1].name, page[-1].id)
            charges[project] = (tuple(got), last)
        alarms = {}
        for alarm_id in sorted({b.spec.alarm for b in budgets if b.spec.alarm}):
            record = await self.store.get(ALARM.name, alarm_id)
            if record is not None:
                alarms[alarm_id] = ALARM.load(record)
        instances = {
            project: tuple(await list_all(self.store, "instance", project=project))
            for project in sorted({b.project for b in budgets if b.spec.stop_instances})
        }
        return BudgetSnapshot(budgets, charges, alarms, await costs.closed_until(self.store), instances)

    def decide(self, snapshot: BudgetSnapshot, now: _dt.datetime) -> BudgetPlan:
        return decide_budgets(snapshot, now, self.clock())

    def describe(self, plan: BudgetPlan) -> str:
        return f"update {len(plan.updates)} budgets" + (f", stop {len(plan.stops)} instances" if plan.stops else "")

    async def act(self, plan: BudgetPlan) -> Outcome:
        done = raced = notified = 0
        for budget, outbox in plan.updates:
            ops: list[Op] = [Update(BUDGET.dump(budget), expect_revision=budget.revision)]
            ops += [Create(ALARM_DELIVERY.dump(d)) for d in outbox]
            try:
                await self.store.commit(Txn(ops))
            except TxnFailed:
                raced += 1  # changed or deleted meanwhile: measured again next cycle from a fresh read
                continue
            done += 1
            notified += len(outbox)
            new = [n["key"] for n in budget.status.notifications if n["at"] == budget.status.checked_at]
            if new:
                log.info("budget threshold crossed", extra={"budget": budget.id, "project": budget.project,
                                                            "crossed": new, "spent": budget.status.spent})  # fmt: skip
        stopped = 0
        for budget_id, inst in plan.stops:
            stopped += await self._stop(budget_id, inst)
        return Outcome(f"updated {done} budgets, {notified} notifications queued"
                       + (f", {stopped} instances stopped" if stopped else "") + (f", {raced} raced" if raced else ""),
                       more=bool(raced))  # fmt: skip

    async def _stop(self, budget_id: str, inst: Record) -> int:
        """Stop ``inst`` for the budget (still enforcing and exhausted when read again), recorded in its status."""
        from minicloud.compute.instances import stop_instance

        current = await self.store.get(BUDGET.name, budget_id)
        if current is None:
            return 0
        b = BUDGET.load(current)
        if not (b.spec.stop_instances and b.status.exhausted):
            return 0
        try:
            await stop_instance(Context.system(f"budget:{b.name}", project=b.project), self.store, inst.id)
        except errors.MinicloudError as exc:  # deleted or stopped meanwhile
            log.info("budget: instance not stopped", extra={"instance": inst.id, "why": str(exc)})
            return 0
        at = self.clock()
        entry = {"instance_id": inst.id, "name": inst.name, "at": at}
        status = msgspec.structs.replace(b.status, stopped=[*b.status.stopped, entry][-KEEP_STOPPED:])
        with contextlib.suppress(TxnFailed):  # changed meanwhile: the stop is audited all the same
            await self.store.commit(Txn([Update(BUDGET.dump(b.replace(status=status)), expect_revision=b.revision)]))
        log.warning("budget exhausted: instance stopped", extra={"budget": b.id, "project": b.project,
                                                                 "instance": inst.id})  # fmt: skip
        return 1
