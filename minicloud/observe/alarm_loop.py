"""The services leader's alarm loop: evaluate every alarm, commit transitions with their notifications, deliver them.

One cycle (every ``alarms.interval`` seconds; see :mod:`minicloud.cluster.leader`):

1. ``snapshot``: up to ``alarms.batch`` alarms (from where the previous cycle stopped, wrapping), each with its
   datapoints from a range query through the node's enforced query service, and the outbox (pending deliveries).
2. ``decide`` (pure): which alarms change state (:func:`minicloud.observe.alarms.evaluate`) and which deliveries are
   due.
3. ``act``: each transition is **one transaction**: a compare-and-swap on the alarm's revision (its new state), its
   history entry and one outbox entry per action that runs on the new state. So a transition and its notifications
   exist together or not at all, and a second evaluation of the same data (this leader's next cycle, or the next
   leader's after a failover) sees the new state and makes no second transition. Then the due deliveries are sent;
   each attempt is one more transaction (compare-and-swap on the outbox entry, plus a history entry): the entry is
   deleted when delivered or out of attempts, else rescheduled after a backoff.

Delivery is **at least once**: a leader that dies after a receiver got a webhook but before recording the attempt
leaves the outbox entry pending, and the next leader sends it again, with the same ``X-Minicloud-Delivery`` id, so
receivers dedupe on it. Transitions are exactly once.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from yarl import URL

from minicloud import errors, ids
from minicloud.cluster.leader import LeaderLoop, Outcome
from minicloud.compute.image_download import guarded_connector
from minicloud.compute.url_policy import UrlPolicy, normal_host
from minicloud.config import Config
from minicloud.core.context import Sealer
from minicloud.core.kinds import Obj
from minicloud.model.alarms import Notification
from minicloud.observe import alarms as A
from minicloud.observe.kinds import ALARM, ALARM_DELIVERY, ALARM_HISTORY, AlarmDeliverySpec, AlarmHistorySpec
from minicloud.observe.query import ProjectScope, QueryService
from minicloud.retention import RetentionLoop
from minicloud.state import Create, Delete, Op, Record, Store, Txn, TxnFailed, Update

log = logging.getLogger("minicloud.alarms")
_PAGE = 500
#: Queries run at once during a snapshot, and deliveries at once during an act.
CONCURRENCY = 8
#: The most of an answer's error text kept in a history entry.
_ERROR_CHARS = 300

#: ``send(url, headers, body) -> (HTTP status or 0, error words or "")``.
Sender = Callable[[str, dict[str, str], bytes], Awaitable[tuple[int, str]]]


@dataclass(frozen=True)
class Settings:
    batch: int = 500
    attempts: int = 6
    backoff: float = 10.0
    backoff_max: float = 600.0
    timeout: float = 10.0
    #: The most deliveries attempted per cycle.
    deliveries: int = 200
    #: Seconds behind now that evaluation ends: the TSDB shows no sample newer than its latency offset (one scrape
    #: interval), so the newest period ends there (plus a second of slack).
    lag: float = 0.0


@dataclass(frozen=True)
class Evaluated:
    alarm: Obj[Any, Any]
    #: Oldest first; None: the query failed (the alarm is left as it is this cycle).
    points: tuple[float | None, ...] | None
    error: str = ""


@dataclass(frozen=True)
class Snapshot:
    evaluated: tuple[Evaluated, ...]
    outbox: tuple[Obj[Any, Any], ...]


@dataclass(frozen=True)
class Transition:
    alarm: Obj[Any, Any]
    to: str
    reason: str
    points: tuple[float | None, ...]


@dataclass(frozen=True)
class Plan:
    transitions: tuple[Transition, ...]
    sends: tuple[Obj[Any, Any], ...]

    def __bool__(self) -> bool:
        return bool(self.transitions or self.sends)


def plan_cycle(snapshot: Snapshot, now: float, max_sends: int) -> Plan:
    """Pure: the transitions the datapoints make, and the deliveries due at ``now`` (at most ``max_sends``)."""
    transitions = []
    for ev in snapshot.evaluated:
        if ev.points is None:
            continue
        s, current = ev.alarm.spec, ev.alarm.status.state
        state, reason = A.evaluate(
            ev.points,
            comparison=s.comparison,
            threshold=s.threshold,
            m=s.datapoints_to_alarm,
            missing=s.missing_data,
            current=current,
        )
        if state != current:
            transitions.append(Transition(ev.alarm, state, reason, ev.points))
    due = tuple(d for d in snapshot.outbox if d.spec.next_at <= now)[:max_sends]
    return Plan(tuple(transitions), due)


class WebhookSender:
    """POSTs a body under the URL policy, checked at connect time (as image downloads are: every resolved address and
    the socket's address), no redirects followed, no proxy from the environment."""

    def __init__(self, policy: UrlPolicy, timeout: float) -> None:
        self.policy = policy
        self.timeout = timeout

    async def __call__(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        connector, guard = guarded_connector(self.policy)
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False
            ) as http:
                guard.host = normal_host(URL(url).host or "")
                async with http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                    await resp.read()
                    return resp.status, "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except errors.MinicloudError as exc:  # the policy refused the address it resolved to
            return 0, A._policy_words(exc.detail)[:_ERROR_CHARS]
        except TimeoutError:
            return 0, f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return 0, f"could not send ({type(exc).__name__})"


class AlarmLoop(LeaderLoop[Snapshot, Plan]):
    name = "alarms"

    def __init__(
        self,
        store: Store,
        query: Callable[[], QueryService | None],
        sealer: Sealer,
        send: Sender,
        *,
        interval: float = 10.0,
        settings: Settings = Settings(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.query = query
        self.sealer = sealer
        self.send = send
        self.interval = interval
        self.settings = settings
        self.clock = clock
        self.cursor: tuple[str, str] | None = None

    # -- snapshot ------------------------------------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        alarms = await self._alarms()
        service = self.query()
        evaluated: tuple[Evaluated, ...] = ()
        if service is None:
            if alarms:
                log.warning("alarms not evaluated: this node runs no metrics database", extra={"alarms": len(alarms)})
        else:
            end = self.clock() - self.settings.lag
            limit = asyncio.Semaphore(CONCURRENCY)

            async def one(alarm: Obj[Any, Any]) -> Evaluated:
                async with limit:
                    return await self._evaluate(service, alarm, end)

            evaluated = tuple(await asyncio.gather(*(one(a) for a in alarms)))
        outbox = await self.store.list(ALARM_DELIVERY.name, limit=self.settings.deliveries * 4)
        return Snapshot(evaluated, tuple(ALARM_DELIVERY.load(r) for r in outbox))

    async def _alarms(self) -> list[Obj[Any, Any]]:
        """Up to ``batch`` alarms from the cursor, wrapping to the start at the end."""
        out: list[Obj[Any, Any]] = []
        after = self.cursor
        while len(out) < self.settings.batch:
            want = min(_PAGE, self.settings.batch - len(out))
            page = await self.store.list(ALARM.name, after=after, limit=want)
            out += [ALARM.load(r) for r in page]
            if len(page) < want:
                after = None
                break
            after = (page[-1].name, page[-1].id)
        self.cursor = after
        return out

    async def _evaluate(self, service: QueryService, alarm: Obj[Any, Any], end: float) -> Evaluated:
        s = alarm.spec
        start = end - (s.evaluation_periods - 1) * s.period
        scope = ProjectScope(id=s.project_id, name=alarm.project)
        try:
            answer = await service.query_range(
                s.expression, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{s.period}s", project=scope, exact=True
            )
        except errors.MinicloudError as exc:
            log.warning("alarm not evaluated: its query failed", extra={"alarm": alarm.id, "error": exc.detail})
            return Evaluated(alarm, None, exc.detail)
        result = answer.result if isinstance(answer.result, list) else []
        points = A.datapoints(result, end=end, period=s.period, n=s.evaluation_periods, comparison=s.comparison)
        return Evaluated(alarm, tuple(points))

    # -- decide --------------------------------------------------------------------------------------------------
    def decide(self, snapshot: Snapshot, now: _dt.datetime) -> Plan:
        return plan_cycle(snapshot, now.timestamp(), self.settings.deliveries)

    def describe(self, plan: Plan) -> str:
        return f"{len(plan.transitions)} transitions, {len(plan.sends)} deliveries due"

    # -- act -----------------------------------------------------------------------------------------------------
    async def act(self, plan: Plan) -> Outcome:
        committed: list[Obj[Any, Any]] = []
        changed = skipped = 0
        for t in plan.transitions:
            deliveries = await self._commit_transition(t)
            if deliveries is None:
                skipped += 1
                continue
            changed += 1
            committed += deliveries
        sends = {d.id: d for d in (*plan.sends, *committed)}
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(d: Obj[Any, Any]) -> str:
            async with limit:
                return await self.deliver(d)

        outcomes = await asyncio.gather(*(one(d) for d in sends.values()))
        counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
        summary = f"{changed} transitions" + (f" ({skipped} alarms changed meanwhile)" if skipped else "")
        if counts:
            summary += ", deliveries: " + ", ".join(f"{n} {o}" for o, n in counts.items())
        return Outcome(summary)

    async def _commit_transition(self, t: Transition) -> list[Obj[Any, Any]] | None:
        """The transition, its history entry and its outbox entries in one transaction; None if the alarm changed."""
        alarm = t.alarm
        now = self.clock()
        at = ids.format_time(now)
        transition = ids.new_id("atr")
        deliveries = []
        for index, action in enumerate(alarm.spec.actions):
            if t.to not in action.on:
                continue
            delivery_id = ids.new_id(ALARM_DELIVERY.prefix)
            body = A.payload(
                alarm, delivery_id=delivery_id, transition=transition, from_state=alarm.status.state, to_state=t.to,
                reason=t.reason, points=t.points, at=at,
            )  # fmt: skip
            spec = AlarmDeliverySpec(
                alarm_id=alarm.id, transition=transition, action=index, url=action.url, to=t.to, body=body, next_at=now
            )
            deliveries.append(ALARM_DELIVERY.new(project=alarm.project, name=delivery_id, id=delivery_id, spec=spec,
                                                 stamp=at))  # fmt: skip
        status = msgspec.structs.replace(
            alarm.status,
            state=t.to,
            state_reason=t.reason,
            state_updated_at=at,
            transition=transition,
            notifications=[Notification(delivery_id=d.id, url=d.spec.url, to=t.to, updated_at=at) for d in deliveries],
        )
        updated = alarm.replace(status=status, updated_at=at)
        entry = AlarmHistorySpec(
            alarm_id=alarm.id, at=at, type="state", transition=transition, from_state=alarm.status.state, to_state=t.to,
            reason=t.reason, datapoints=list(t.points),
            summary=f"{alarm.status.state} -> {t.to}: {t.reason}",
        )  # fmt: skip
        ops: list[Op] = [
            Update(ALARM.dump(updated), expect_revision=alarm.revision),
            Create(A.history_record(alarm.project, entry, now)),
            *(Create(ALARM_DELIVERY.dump(d)) for d in deliveries),
        ]
        try:
            revision, _ = await self.store.commit(Txn(ops))
        except TxnFailed as exc:
            if exc.reason in ("not-found", "revision-mismatch"):
                return None  # changed or deleted since the snapshot: the next cycle evaluates it afresh
            raise
        log.info("alarm state changed", extra={"alarm": alarm.id, "from": alarm.status.state, "to": t.to})
        return [d.replace(revision=revision) for d in deliveries]

    async def deliver(self, d: Obj[Any, Any]) -> str:
        """One attempt of one outbox entry; returns the outcome (delivered, retrying, failed, dropped, raced)."""
        record = await self.store.get(ALARM.name, d.spec.alarm_id)
        now = self.clock()
        at = ids.format_time(now)
        if record is None:
            return await self._finish(d, [], "dropped")  # the alarm was deleted: nothing to sign with, no one to tell
        alarm = ALARM.load(record)
        body = d.spec.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "minicloud-alarms",
            A.DELIVERY_HEADER: d.id,
            "X-Minicloud-Alarm": alarm.id,
            "X-Minicloud-Attempt": str(d.spec.attempts + 1),
            A.SIGNATURE_HEADER: A.sign(A.secret_of(alarm, self.sealer), body),
        }
        status, error = await self.send(d.spec.url, headers, body)
        attempt = d.spec.attempts + 1
        s = self.settings
        if 200 <= status < 300:
            outcome = "delivered"
        elif attempt >= s.attempts:
            outcome = "failed"
        else:
            outcome = "retrying"
        error = error[:_ERROR_CHARS]
        retry_in = A.backoff(attempt, s.backoff, s.backoff_max)
        words = {
            "delivered": f"delivered to {d.spec.url} (HTTP {status}) on attempt {attempt}",
            "failed": f"not delivered to {d.spec.url} after {attempt} attempts: {error}",
            "retrying": f"attempt {attempt} to {d.spec.url} failed ({error}); retry in {retry_in:g} s",
        }[outcome]
        entry = AlarmHistorySpec(
            alarm_id=alarm.id, at=at, type="delivery", transition=d.spec.transition, delivery_id=d.id, url=d.spec.url,
            attempt=attempt, outcome=outcome, status_code=status, error=error, summary=words, to_state=d.spec.to,
        )  # fmt: skip
        history = [Create(A.history_record(alarm.project, entry, now))]
        if outcome == "retrying":
            spec = msgspec.structs.replace(d.spec, attempts=attempt, next_at=now + retry_in, last_error=error)
            ops: list[Op] = [
                Update(ALARM_DELIVERY.dump(d.replace(spec=spec, updated_at=at)), expect_revision=d.revision)
            ]
            try:
                await self.store.commit(Txn([*ops, *history]))
            except TxnFailed as exc:
                if exc.reason not in ("not-found", "revision-mismatch"):
                    raise
                return "raced"
        else:
            result = await self._finish(d, history, outcome)
            if result == "raced":
                return result
        await self._note(alarm.id, d, outcome, attempt, error, at)
        return outcome

    async def _finish(self, d: Obj[Any, Any], history: list[Op], outcome: str) -> str:
        try:
            await self.store.commit(
                Txn([Delete(kind=ALARM_DELIVERY.name, id=d.id, expect_revision=d.revision), *history])
            )
        except TxnFailed as exc:
            if exc.reason not in ("not-found", "revision-mismatch"):
                raise
            return "raced"  # another cycle (an earlier term) handled it
        return outcome

    async def _note(self, alarm_id: str, d: Obj[Any, Any], outcome: str, attempt: int, error: str, at: str) -> None:
        """Show the outcome in the alarm's ``notifications`` (its latest transition only; best effort)."""
        state = {"delivered": "delivered", "failed": "failed"}.get(outcome, "pending")
        for _ in range(3):
            record = await self.store.get(ALARM.name, alarm_id)
            if record is None:
                return
            alarm = ALARM.load(record)
            if alarm.status.transition != d.spec.transition:
                return  # a newer transition: its own notifications are shown
            notes = [
                msgspec.structs.replace(n, state=state, attempts=attempt, last_error=error, updated_at=at)
                if n.delivery_id == d.id
                else n
                for n in alarm.status.notifications
            ]
            updated = alarm.replace(status=msgspec.structs.replace(alarm.status, notifications=notes))
            try:
                await self.store.commit(Txn([Update(ALARM.dump(updated), expect_revision=alarm.revision)]))
                return
            except TxnFailed as exc:
                if exc.reason not in ("not-found", "revision-mismatch"):
                    raise


def alarm_loops(
    store: Store, config: Config, query: Callable[[], QueryService | None], sealer: Sealer
) -> list[LeaderLoop[Any, Any]]:
    """The alarm loop and the retention of alarm history (``[alarms]``), for ``leader_loops`` in the app."""
    a = config.alarms
    settings = Settings(
        batch=a.batch,
        attempts=a.webhook_attempts,
        backoff=a.webhook_backoff,
        backoff_max=a.webhook_backoff_max,
        timeout=a.webhook_timeout,
        lag=config.metrics.scrape_interval + 1.0,
    )
    sender = WebhookSender(UrlPolicy.from_config(a.webhook_allow), a.webhook_timeout)
    keep = _dt.timedelta(days=a.history_days)

    def expired(record: Record, now: _dt.datetime) -> bool:
        return ids.parse_time(record.created_at) + keep <= now

    r = config.retention
    return [
        AlarmLoop(store, query, sealer, sender, interval=a.interval, settings=settings),
        RetentionLoop(store, ALARM_HISTORY.name, expired, interval=r.interval, batch=r.batch, scan=r.scan),
    ]
