"""Auto-stop policies: stop running instances that match a label selector once they have been idle for a while.

``minicloud policy create auto-stop --selector label:env=dev --idle 2h`` stores a ``policy`` in the project. The
services leader's ``billing:policies`` loop (every ``billing.interval`` seconds) finds, per policy, the project's
running instances whose labels match and that have run at least ``idle`` seconds, and asks the project's metrics
(project-scoped, like every metrics query) for each one's **highest** CPU over the window (percent of its vCPUs,
5-minute rate, 1-minute steps) and how many samples the window holds. An instance is idle when that highest value
stayed under ``cpu_percent`` (5) and the window holds at least half the samples the scrape interval gives (a window
the metrics do not cover is never taken for idleness). Each idle instance is:

1. recorded in the policy's status (compare-and-swap) together with one notification per webhook action of the
   policy's ``alarm`` (queued in the alarm outbox, delivered and signed by the alarm loop; ids derived from the
   policy, the instance and its launch, so a repeat never notifies twice), then
2. stopped through the instance service, as the system caller ``policy:<name>``: the stop is audited like any other.

A leader that dies between the two steps stops the instance on the next cycle (still running, still idle) without a
second notification. ``--dry-run`` stores nothing and answers which instances the policy would stop now, with the
figures. Instances that do not match, have run less than the window, or have no metrics are left alone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from minicloud import errors, ids
from minicloud.billing import ledger
from minicloud.billing.kinds import POLICY, PolicySpec, PolicyStatus
from minicloud.billing.meters import seconds
from minicloud.cluster.leader import LeaderLoop, Outcome
from minicloud.core import crud, write
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.model.billing import Policy, PolicyAction, PolicyCreate
from minicloud.observe.kinds import ALARM, ALARM_DELIVERY, AlarmDeliverySpec
from minicloud.state import Create, Record, Store, Txn, TxnFailed, Update, list_all

log = logging.getLogger("minicloud.billing")
#: Policies a project may have (the leader's loop evaluates every one each pass).
MAX_PER_PROJECT = 100
KEEP_ACTIONS = 100

MAX_CPU = "max_over_time((100 * rate(minicloud_instance_cpu_seconds_total[5m]) / minicloud_instance_vcpus)[{w}s:1m])"
SAMPLES = "count_over_time(minicloud_instance_vcpus[{w}s])"


def parse_selector(text: str) -> dict[str, str]:
    terms = text.removeprefix("label:").split(",")
    return dict(t.split("=", 1) for t in terms)


def view(obj: Obj[PolicySpec, PolicyStatus], *, dry_run: bool = False) -> Policy:
    s, st = obj.spec, obj.status
    return Policy(
        id=obj.id, name=obj.name, project=obj.project, type=s.type, selector=dict(s.selector), idle=s.idle,
        cpu_percent=s.cpu_percent, alarm=s.alarm, description=s.description,
        actions=[msgspec.convert(a, PolicyAction) for a in st.actions], checked_at=st.checked_at,
        last_error=st.last_error, created_at=obj.created_at, dry_run=dry_run,
    )  # fmt: skip


# -- evaluation (pure) ---------------------------------------------------------------------------------------------------
def candidates(spec: PolicySpec, instances: Sequence[Record], now: int) -> list[Record]:
    """Running instances whose labels match the selector and that have run at least the idle window."""
    out = []
    for inst in instances:
        if inst.status.get("state") != "running" or inst.spec.get("deleted") or inst.spec.get("power") == "stopped":
            continue
        if any(inst.labels.get(k) != v for k, v in spec.selector.items()):
            continue
        launched = seconds(inst.status.get("launched_at")) or now
        if launched > now - spec.idle:
            continue
        out.append(inst)
    return out


def idle_ones(
    spec: PolicySpec, instances: Sequence[Record], figures: dict[str, dict[str, float]], *, now: int,
    scrape_interval: float,
) -> list[tuple[Record, float]]:  # fmt: skip
    """Pure: (instance, its highest CPU %) of the candidates idle over the whole window."""
    need = spec.idle / max(scrape_interval, 1.0) / 2
    out = []
    for inst in candidates(spec, instances, now):
        f = figures.get(inst.id, {})
        if "max_cpu" in f and f.get("samples", 0) >= need and f["max_cpu"] < spec.cpu_percent:
            out.append((inst, f["max_cpu"]))
    return out


def delivery_objs(
    policy: Obj[PolicySpec, Any], inst: Record, max_cpu: float, alarm: Obj[Any, Any] | None, at: str, now: float
) -> list[Obj[AlarmDeliverySpec, Any]]:
    if alarm is None:
        return []
    transition = f"policy:{policy.id}:{inst.id}:{inst.status.get('launched_at', '')}"
    body = ledger.canonical({
        "type": "auto-stop", "policy": policy.name, "policy_id": policy.id, "project": policy.project,
        "instance": inst.name, "instance_id": inst.id, "idle_seconds": policy.spec.idle,
        "max_cpu_percent": round(max_cpu, 3), "cpu_percent": policy.spec.cpu_percent, "at": at,
        "summary": f"policy '{policy.name}' stops instance '{inst.name}': CPU stayed under "
        f"{policy.spec.cpu_percent} % for {policy.spec.idle} s (highest {max_cpu:.2f} %)",
    })  # fmt: skip
    out = []
    for index, action in enumerate(alarm.spec.actions):
        did = "adl-" + hashlib.sha256(f"{transition}:{index}".encode()).hexdigest()[:24]
        spec = AlarmDeliverySpec(alarm_id=alarm.id, transition=transition, action=index, url=action.url, to="ALARM",
                                 body=body, next_at=now)  # fmt: skip
        out.append(ALARM_DELIVERY.new(project=policy.project, name=did, id=did, spec=spec, stamp=at))
    return out


# -- metrics ---------------------------------------------------------------------------------------------------------------
async def figures_of(query: Any, store: Store, project: str, window: int) -> dict[str, dict[str, float]]:
    """Per instance id: ``max_cpu`` and ``samples`` over the window, from the project's metrics."""
    from minicloud.observe.scope import project_scope

    scope = await project_scope(store, project)
    out: dict[str, dict[str, float]] = {}
    for figure, promql in (("max_cpu", MAX_CPU), ("samples", SAMPLES)):
        result = await query.query(promql.format(w=window), project=scope)
        for series in result.result or []:
            iid = series.get("metric", {}).get("instance_id")
            value = series.get("value", [None, None])[1]
            if iid and value not in (None, "NaN"):
                slot = out.setdefault(iid, {})
                slot[figure] = max(slot.get(figure, 0.0), float(value))
    return out


# -- service ---------------------------------------------------------------------------------------------------------------
async def _alarm_id(store: Store, project: str, ref: str | None) -> str:
    if not ref:
        return ""
    record = await store.get_by_name(ALARM.name, project, ref)
    if record is None:
        record = await store.get(ALARM.name, ref)
        if record is not None and record.project != project:
            record = None
    if record is None:
        raise errors.ValidationFailed(f"alarm: no alarm {ref!r} in project '{project}' (see `minicloud alarm list`)",
                                      invalid_params=[{"name": "alarm", "reason": "not found"}])  # fmt: skip
    return record.id


async def create(
    ctx: Context, store: Store, body: PolicyCreate, *, query: Any, scrape_interval: float, now: _dt.datetime
) -> Written | Policy:
    spec = PolicySpec(
        type=body.type, selector=parse_selector(body.selector), idle=body.idle, cpu_percent=body.cpu_percent,
        alarm=await _alarm_id(store, ctx.project, body.alarm), description=body.description,
    )  # fmt: skip
    obj = POLICY.new(project=ctx.project, name=body.name, spec=spec, status=PolicyStatus(), stamp=ctx.clock())
    if body.dry_run:
        if query is None:
            raise errors.Unavailable("no metrics database answers on this node: a dry run needs the metrics")
        instances = await list_all(store, "instance", project=ctx.project)
        t = int(now.timestamp())
        figures = await figures_of(query, store, ctx.project, spec.idle) if candidates(spec, instances, t) else {}
        found = idle_ones(spec, instances, figures, now=t, scrape_interval=scrape_interval)
        status = PolicyStatus(actions=[{"instance_id": i.id, "name": i.name, "at": ctx.clock(), "max_cpu_percent": c,
                                        "outcome": "would-stop"} for i, c in found], checked_at=ctx.clock())  # fmt: skip
        return view(obj.replace(status=status), dry_run=True)
    await crud.refuse_beyond(store, POLICY, ctx.project, MAX_PER_PROJECT)
    if await store.get_by_name(POLICY.name, ctx.project, body.name) is not None:
        raise errors.Conflict(f"a policy named '{body.name}' exists in project '{ctx.project}'")
    return await write.commit(
        ctx, store, [Create(POLICY.dump(obj))], status=201, label="policy", respond=lambda rev: view(obj)
    )


async def get(store: Store, project: str, name: str) -> Obj[PolicySpec, PolicyStatus]:
    record = await store.get_by_name(POLICY.name, project, name)
    if record is None:
        raise errors.NotFound(f"no policy named '{name}' in project '{project}'; see `minicloud policy list`")
    return POLICY.load(record)


async def list_policies(store: Store, project: str) -> list[Policy]:
    return [view(POLICY.load(r)) for r in await list_all(store, POLICY.name, project=project)]


async def delete(ctx: Context, store: Store, name: str) -> Written:
    return await crud.delete_read(ctx, store, POLICY, lambda: get(store, ctx.project, name))


# -- the loop --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicySnapshot:
    #: (policy, its project's instances, their figures, its alarm or None, error)
    items: tuple[tuple[Obj[PolicySpec, PolicyStatus], tuple[Record, ...], dict[str, dict[str, float]],
                       Obj[Any, Any] | None, str], ...]  # fmt: skip


@dataclass
class PolicyPlan:
    #: (policy, instance, highest CPU %)
    stops: list[tuple[Obj[PolicySpec, PolicyStatus], Record, float, Obj[Any, Any] | None]] = field(default_factory=list)
    errors: list[tuple[Obj[PolicySpec, PolicyStatus], str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stops or self.errors)


def decide_policies(snap: PolicySnapshot, now: _dt.datetime, scrape_interval: float) -> PolicyPlan:
    plan = PolicyPlan()
    for policy, instances, figures, alarm, error in snap.items:
        if error:
            if error != policy.status.last_error:
                plan.errors.append((policy, error))
            continue
        for inst, cpu in idle_ones(policy.spec, instances, figures, now=int(now.timestamp()),
                                   scrape_interval=scrape_interval):  # fmt: skip
            plan.stops.append((policy, inst, cpu, alarm))
    return plan


class PolicyLoop(LeaderLoop[PolicySnapshot, PolicyPlan]):
    """``billing:policies``: stops idle instances of each auto-stop policy (module docstring)."""

    name = "billing:policies"

    def __init__(
        self, store: Store, query: Callable[[], Any], *, interval: float = 60.0, scrape_interval: float = 10.0
    ) -> None:
        self.store = store
        self.query = query
        self.interval = interval
        self.scrape_interval = scrape_interval
        self.clock = ids.now
        self.wall: Callable[[], _dt.datetime] = lambda: _dt.datetime.now(_dt.UTC)

    async def snapshot(self) -> PolicySnapshot:
        items = []
        now = int(self.wall().timestamp())
        for record in await list_all(self.store, POLICY.name):
            policy = POLICY.load(record)
            instances = tuple(await list_all(self.store, "instance", project=policy.project))
            figures: dict[str, dict[str, float]] = {}
            error = ""
            if candidates(policy.spec, instances, now):
                service = self.query()
                if service is None:
                    error = "no metrics database on the leader: idleness cannot be measured"
                else:
                    try:
                        figures = await figures_of(service, self.store, policy.project, policy.spec.idle)
                    except errors.MinicloudError as exc:
                        error = f"metrics: {exc}"[:300]
            alarm = None
            if policy.spec.alarm:
                rec = await self.store.get(ALARM.name, policy.spec.alarm)
                alarm = ALARM.load(rec) if rec is not None else None
            items.append((policy, instances, figures, alarm, error))
        return PolicySnapshot(tuple(items))

    def decide(self, snapshot: PolicySnapshot, now: _dt.datetime) -> PolicyPlan:
        return decide_policies(snapshot, self.wall(), self.scrape_interval)

    def describe(self, plan: PolicyPlan) -> str:
        return f"stop {len(plan.stops)} idle instances"

    async def act(self, plan: PolicyPlan) -> Outcome:
        from minicloud.compute.instances import stop_instance

        stopped = 0
        for policy, error in plan.errors:
            status = msgspec.structs.replace(policy.status, last_error=error, checked_at=self.clock())
            with contextlib.suppress(TxnFailed):  # changed meanwhile: said again next cycle
                await self.store.commit(Txn([Update(POLICY.dump(policy.replace(status=status)),
                                                    expect_revision=policy.revision)]))  # fmt: skip
        for policy, inst, cpu, alarm in plan.stops:
            current = await self.store.get(POLICY.name, policy.id)
            if current is None:
                continue
            pol = POLICY.load(current)
            at = self.clock()
            entry = {"instance_id": inst.id, "name": inst.name, "at": at, "max_cpu_percent": round(cpu, 3),
                     "outcome": "stopped"}  # fmt: skip
            status = msgspec.structs.replace(pol.status, actions=[*pol.status.actions, entry][-KEEP_ACTIONS:],
                                             checked_at=at, last_error="")  # fmt: skip
            update = Update(POLICY.dump(pol.replace(status=status, updated_at=at)), expect_revision=pol.revision)
            outbox = [Create(ALARM_DELIVERY.dump(d)) for d in delivery_objs(pol, inst, cpu, alarm, at, time_now())]
            try:
                await self.store.commit(Txn([update, *outbox]))
            except TxnFailed as exc:
                if exc.reason != "exists":
                    continue  # the policy changed meanwhile: again next cycle
                await self.store.commit(Txn([update]))  # notified by an earlier attempt: not twice
            try:
                await stop_instance(Context.system(f"policy:{pol.name}", project=pol.project), self.store, inst.id)
            except errors.MinicloudError as exc:  # deleted or stopped meanwhile
                log.info("auto-stop: not stopped", extra={"instance": inst.id, "why": str(exc)})
                continue
            stopped += 1
            log.info("auto-stop: idle instance stopped", extra={"policy": pol.id, "instance": inst.id, "cpu": cpu})
        return Outcome(f"stopped {stopped} idle instances")


def time_now() -> float:
    import time

    return time.time()
