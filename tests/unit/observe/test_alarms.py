"""Alarms without HTTP: the state machine (M of N, each missing-data treatment), datapoints from a range answer, the
webhook signature, and the leader loop against a real store with a fake TSDB, a fake receiver and a fake clock
(transition + outbox in one compare-and-swap transaction, retries with backoff, a leader killed between the commit and
the delivery)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import json

import msgspec
import pytest

from minicloud.cluster.leader import LeaderLoops
from minicloud.compute.url_policy import UrlPolicy
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.iam.keystore import KeyStore
from minicloud.model.alarms import AlarmCreate, AlarmUpdate
from minicloud.model.metrics import MetricsResult
from minicloud.observe import alarms as A
from minicloud.observe.alarm_loop import AlarmLoop, Settings, Snapshot, plan_cycle
from minicloud.observe.kinds import ALARM, ALARM_DELIVERY, ALARM_HISTORY
from minicloud.state import SQLiteStore

T0 = 1_800_000_000.0


# -- the state machine -------------------------------------------------------------------------------------------
def _eval(points, m=2, missing="missing", current="OK", comparison=">", threshold=10.0):
    return A.evaluate(points, comparison=comparison, threshold=threshold, m=m, missing=missing, current=current)[0]


@pytest.mark.parametrize(
    ("points", "m", "state"),
    [
        ([1, 1, 1], 2, "OK"),
        ([11, 1, 1], 2, "OK"),
        ([11, 1, 11], 2, "ALARM"),  # 2 of 3, not consecutive
        ([11, 11, 11], 3, "ALARM"),
        ([1, 11, 11], 3, "OK"),
        ([10, 10, 10], 1, "OK"),  # > is strict
    ],
)
def test_m_of_n(points, m, state):
    assert _eval(points, m=m) == state


def test_comparisons():
    assert _eval([10], m=1, comparison=">=") == "ALARM"
    assert _eval([9], m=1, comparison="<") == "ALARM"
    assert _eval([10], m=1, comparison="<=") == "ALARM"
    assert _eval([11], m=1, comparison="<=") == "OK"


@pytest.mark.parametrize(
    ("missing", "points", "current", "state"),
    [
        # no data at all
        ("missing", [None, None, None], "OK", "INSUFFICIENT_DATA"),
        ("ignore", [None, None, None], "ALARM", "ALARM"),
        ("ignore", [None, None, None], "OK", "OK"),
        ("breaching", [None, None, None], "OK", "ALARM"),
        ("notBreaching", [None, None, None], "ALARM", "OK"),
        # one breaching, one missing (M = 2)
        ("breaching", [11, None, 1], "OK", "ALARM"),
        ("notBreaching", [11, None, 1], "ALARM", "OK"),
        ("missing", [11, None, 1], "OK", "OK"),  # undecided: stays
        ("missing", [11, None, 1], "ALARM", "ALARM"),
        ("ignore", [11, None, 1], "INSUFFICIENT_DATA", "INSUFFICIENT_DATA"),
        # enough to decide despite the gap
        ("missing", [11, None, 11], "OK", "ALARM"),
        ("ignore", [1, None, 1], "ALARM", "OK"),  # even a breaching gap would not make 2
        ("missing", [None, None, 1], "ALARM", "ALARM"),  # 2 gaps could still make 2: stays
    ],
)
def test_missing_data_treatments(missing, points, current, state):
    assert _eval(points, m=2, missing=missing, current=current) == state


def test_the_reason_says_what_was_counted():
    state, reason = A.evaluate([11, None, 11], comparison=">", threshold=10, m=2, missing="missing", current="OK")
    assert state == "ALARM"
    assert reason == "2 of the 2 periods with data breached > 10 (1 of 3 without data); 2 make an alarm"


def test_datapoints_take_one_value_per_period_and_the_worst_series():
    series = [
        {"values": [[T0 - 120, "1"], [T0 - 60, "5"], [T0, "NaN"]]},
        {"values": [[T0 - 60, "7"], [T0 - 1, "2"]]},
        {"values": [[T0 - 500, "99"]]},  # before the window
    ]
    assert A.datapoints(series, end=T0, period=60, n=3, comparison=">") == [1.0, 7.0, 2.0]
    assert A.datapoints(series, end=T0, period=60, n=3, comparison="<") == [1.0, 5.0, 2.0]
    assert A.datapoints([], end=T0, period=60, n=2, comparison=">") == [None, None]


def test_backoff_doubles_up_to_the_cap():
    assert [A.backoff(n, 10, 60) for n in range(1, 6)] == [10, 20, 40, 60, 60]


def test_the_signature_is_hmac_sha256_of_the_body():
    import hashlib
    import hmac

    body = b'{"to":"ALARM"}'
    sig = A.sign(b"k", body)
    assert sig == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert A.verify(b"k", body, sig) and not A.verify(b"other", body, sig) and not A.verify(b"k", body + b" ", sig)


def test_a_named_metric_becomes_promql():
    assert (
        A.metric_expression("minicloud_instance_cpu_seconds_total", {"name": 'v"m'}, "max", 60)
        == 'max(rate(minicloud_instance_cpu_seconds_total{name="v\\"m"}[60s]))'
    )
    assert (
        A.metric_expression("minicloud_instance_memory_unused_bytes", {}, "min", 300)
        == "min(min_over_time(minicloud_instance_memory_unused_bytes{}[300s]))"
    )


# -- the loop ----------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t

    def now(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.t, _dt.UTC)


class FakeTsdb:
    """``points``: the datapoints every alarm's query gets (oldest first; None: no sample)."""

    def __init__(self) -> None:
        self.points: list[float | None] = []
        self.scopes: list[object] = []

    async def query_range(self, promql, *, start, end, step, project, exact=False):
        self.scopes.append(project)
        if end == "now":  # the check at create
            return MetricsResult(result_type="matrix", result=[])
        period = float(step.rstrip("s"))
        n = len(self.points)
        values = [[float(end) - (n - 1 - i) * period, str(v)] for i, v in enumerate(self.points) if v is not None]
        return MetricsResult(result_type="matrix", result=[{"metric": {}, "values": values}] if values else [])


class Receiver:
    """A fake webhook receiver: records every request; answers ``statuses`` in turn (then 200)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.before_answer: asyncio.Event | None = None
        self.reached = asyncio.Event()
        self.record_before_blocking = False

    async def __call__(self, url, headers, body):
        if self.before_answer is not None:
            if self.record_before_blocking:
                self.got.append((url, headers, body))
            self.reached.set()
            await self.before_answer.wait()  # the leader dies here
        self.got.append((url, headers, body))
        status = self.statuses.pop(0) if self.statuses else 200
        return status, "" if status < 300 else f"HTTP {status}"


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def keys(tmp_path):
    return KeyStore(tmp_path / "keys")


class World:
    def __init__(self, store, keys) -> None:
        self.store, self.keys = store, keys
        self.clock, self.tsdb, self.receiver = Clock(), FakeTsdb(), Receiver()
        self.settings = Settings(attempts=3, backoff=10, backoff_max=60)
        self.new_term()

    def new_term(self) -> None:
        """A new leader: a fresh loop object (no state carried over) in a new term."""
        self.loop = AlarmLoop(
            self.store, lambda: self.tsdb, self.keys, self.receiver, settings=self.settings, clock=self.clock
        )
        self.loops = LeaderLoops(lambda: True, clock=self.clock.now)
        self.loops.register(self.loop)
        self.loops.term, self.loops._leading = 1, True

    async def cycle(self):
        return await self.loops.run_cycle(self.loop)

    async def create(self, **fields):
        body = msgspec.convert(
            {"name": "high", "comparison": ">", "threshold": 10, "query": "x", "evaluation_periods": 1,
             "actions": [{"url": "http://127.0.0.1:9/hook"}], **fields},
            AlarmCreate,
        )  # fmt: skip
        written = await A.create_alarm(
            Context.system("test"), self.store, body, service=self.tsdb, sealer=self.keys,
            policy=UrlPolicy.from_config(["127.0.0.0/8"]), quota=10,
        )  # fmt: skip
        return written.body

    async def alarm(self, name="high"):
        return ALARM.load(await self.store.get_by_name(ALARM.name, "default", name))

    async def history(self, name="high"):
        page = await A.alarm_history(Context.system("test"), self.store, name, limit=1000)
        return page.items

    async def outbox(self):
        return [ALARM_DELIVERY.load(r) for r in await self.store.list(ALARM_DELIVERY.name)]


@pytest.fixture
def world(store, keys):
    return World(store, keys)


async def test_ok_alarm_ok_one_signed_delivery_per_transition(world):
    created = await world.create()
    assert created.state == "INSUFFICIENT_DATA" and created.webhook_secret
    secret = created.webhook_secret.encode()
    world.tsdb.points = [1]
    await world.cycle()
    assert (await world.alarm()).status.state == "OK"
    world.tsdb.points = [50]
    await world.cycle()
    await world.cycle()  # the same data again: no second transition
    assert (await world.alarm()).status.state == "ALARM"
    world.tsdb.points = [2]
    await world.cycle()
    alarm = await world.alarm()
    assert alarm.status.state == "OK"
    bodies = [json.loads(b) for _, _, b in world.receiver.got]
    assert [(b["from"], b["to"]) for b in bodies] == [("INSUFFICIENT_DATA", "OK"), ("OK", "ALARM"), ("ALARM", "OK")]
    for _, headers, body in world.receiver.got:
        assert A.verify(secret, body, headers["X-Minicloud-Signature"])
        assert headers["X-Minicloud-Delivery"] == json.loads(body)["delivery_id"]
    assert len({h["X-Minicloud-Delivery"] for _, h, _ in world.receiver.got}) == 3
    assert bodies[1]["datapoints"] == [50.0] and bodies[1]["alarm"]["project_id"] == "prj-default"
    assert await world.outbox() == []
    assert [(n.state, n.attempts) for n in alarm.status.notifications] == [("delivered", 1)]
    history = await world.history()
    assert [(h.type, h.to_state, h.outcome) for h in history] == [  # newest first
        ("delivery", "OK", "delivered"),
        ("state", "OK", ""),
        ("delivery", "ALARM", "delivered"),
        ("state", "ALARM", ""),
        ("delivery", "OK", "delivered"),
        ("state", "OK", ""),
    ]
    # the queries were scoped to the alarm's project id
    assert {(s.id, s.name) for s in world.tsdb.scopes} == {("prj-default", "default")}


async def test_an_action_runs_only_on_the_states_it_names(world):
    await world.create(actions=[{"url": "http://127.0.0.1:9/hook", "on": ["ALARM"]}])
    world.tsdb.points = [1]
    await world.cycle()
    world.tsdb.points = [50]
    await world.cycle()
    assert [json.loads(b)["to"] for _, _, b in world.receiver.got] == ["ALARM"]


async def test_the_transition_and_its_outbox_entry_commit_together(world):
    await world.create()
    world.tsdb.points = [50]
    seen = []

    async def receiver(url, headers, body):
        # by the time anything is sent, the state and the outbox entry are both in the store
        seen.append(((await world.alarm()).status.state, [d.id for d in await world.outbox()]))
        return 200, ""

    world.loop.send = receiver
    await world.cycle()
    state, outbox = seen[0]
    assert state == "ALARM" and len(outbox) == 1


async def test_an_alarm_changed_since_the_snapshot_is_not_transitioned(world):
    await world.create()
    world.tsdb.points = [50]
    snapshot = await world.loop.snapshot()
    # someone changes the alarm (its labels) between the snapshot and the act: the compare-and-swap fails
    await crud.patch(Context.system("test"), world.store, ALARM, "high", AlarmUpdate(labels={"team": "a"}))
    outcome = await world.loop.act(world.loop.decide(snapshot, world.clock.now()))
    assert "1 alarms changed meanwhile" in outcome.summary
    assert (await world.alarm()).status.state == "INSUFFICIENT_DATA"
    assert await world.outbox() == [] and world.receiver.got == []
    await world.cycle()  # evaluated afresh next cycle
    assert (await world.alarm()).status.state == "ALARM"
    assert len(world.receiver.got) == 1


async def test_a_failing_receiver_gets_retries_with_backoff_then_the_failure_is_visible(world):
    await world.create()
    world.receiver.statuses = [500, 503, 500]
    world.tsdb.points = [50]
    await world.cycle()  # transition + attempt 1 (fails)
    assert len(world.receiver.got) == 1
    [pending] = await world.outbox()
    assert pending.spec.attempts == 1 and pending.spec.next_at == T0 + 10
    world.clock.t = T0 + 9
    await world.cycle()
    assert len(world.receiver.got) == 1  # not yet due
    world.clock.t = T0 + 10
    await world.cycle()  # attempt 2 (fails): next after 20 s
    assert len(world.receiver.got) == 2
    assert (await world.outbox())[0].spec.next_at == T0 + 30
    world.clock.t = T0 + 30
    await world.cycle()  # attempt 3 of 3 (fails): given up
    assert len(world.receiver.got) == 3
    assert len({h["X-Minicloud-Delivery"] for _, h, _ in world.receiver.got}) == 1  # the same delivery each time
    assert [h["X-Minicloud-Attempt"] for _, h, _ in world.receiver.got] == ["1", "2", "3"]
    assert len({b for _, _, b in world.receiver.got}) == 1  # the same bytes each time
    assert await world.outbox() == []
    world.clock.t = T0 + 1000
    await world.cycle()
    assert len(world.receiver.got) == 3
    [note] = (await world.alarm()).status.notifications
    assert (note.state, note.attempts, note.last_error) == ("failed", 3, "HTTP 500")
    deliveries = [h for h in await world.history() if h.type == "delivery"]
    assert [(h.attempt, h.outcome, h.status_code) for h in deliveries] == [
        (3, "failed", 500),
        (2, "retrying", 503),
        (1, "retrying", 500),
    ]
    assert "not delivered" in deliveries[0].summary


async def test_a_leader_killed_between_commit_and_delivery_one_delivery_per_transition(world):
    await world.create()
    world.tsdb.points = [50]
    world.receiver.before_answer = asyncio.Event()  # the send never completes: the leader dies during it
    first = asyncio.create_task(world.cycle())
    await asyncio.wait_for(world.receiver.reached.wait(), 10)
    first.cancel()  # the leader loses its leadership (or dies) mid-delivery
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await world.alarm()).status.state == "ALARM"
    assert len(await world.outbox()) == 1 and world.receiver.got == []
    # a new leader, a new term: evaluates the same data (no second transition) and sends the pending notification
    world.receiver.before_answer = None
    world.new_term()
    await world.cycle()
    await world.cycle()
    assert [json.loads(b)["to"] for _, _, b in world.receiver.got] == ["ALARM"]
    assert [h.type for h in await world.history()].count("state") == 1
    assert await world.outbox() == []


async def test_a_delivery_received_before_the_leader_died_is_sent_again_with_the_same_id(world):
    await world.create()
    world.tsdb.points = [50]
    world.receiver.before_answer = asyncio.Event()
    world.receiver.record_before_blocking = True  # the receiver got it; the leader died before recording that
    first = asyncio.create_task(world.cycle())
    await asyncio.wait_for(world.receiver.reached.wait(), 10)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    world.receiver.before_answer, world.receiver.record_before_blocking = None, False
    world.new_term()
    await world.cycle()
    ids = [h["X-Minicloud-Delivery"] for _, h, _ in world.receiver.got]
    assert len(ids) == 2 and ids[0] == ids[1]  # at least once; the receiver dedupes on the id
    assert [h.type for h in await world.history()].count("state") == 1


async def test_a_deleted_alarms_pending_delivery_is_dropped(world):
    await world.create()
    world.receiver.statuses = [500]
    world.tsdb.points = [50]
    await world.cycle()
    assert len(await world.outbox()) == 1
    await crud.delete(Context.system("test"), world.store, ALARM, "high")
    world.clock.t = T0 + 60
    await world.cycle()
    assert await world.outbox() == [] and len(world.receiver.got) == 1


async def test_no_tsdb_on_this_node_evaluates_nothing(world):
    await world.create()
    world.loop.query = lambda: None
    world.tsdb.points = [50]
    assert await world.cycle() is None
    assert (await world.alarm()).status.state == "INSUFFICIENT_DATA"


def test_plan_cycle_is_pure():
    assert not plan_cycle(Snapshot((), ()), T0, 10)


async def test_history_entries_expire_with_retention(world, store):
    from minicloud.config import AlarmsConfig, Config
    from minicloud.observe.alarm_loop import alarm_loops

    await world.create()
    world.tsdb.points = [50]
    await world.cycle()
    assert len(await store.list(ALARM_HISTORY.name)) == 2
    cfg = Config(alarms=AlarmsConfig(history_days=1))
    _, retention = alarm_loops(store, cfg, lambda: None, world.keys)
    loops = LeaderLoops(lambda: True, clock=lambda: world.clock.now() + _dt.timedelta(days=1, seconds=1))
    loops.register(retention)
    loops.term, loops._leading = 1, True
    await loops.run_cycle(retention)
    assert await store.list(ALARM_HISTORY.name) == []
