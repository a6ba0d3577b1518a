"""Metering, prices, the ledger and invoices against the real SQLite store with a fake clock (no timing)."""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from decimal import Decimal

import pytest

from minicloud import errors
from minicloud.billing import invoices, ledger, metering, prices
from minicloud.billing.kinds import CURSOR_ID, METER_CURSOR, METER_STATE, USAGE
from minicloud.billing.meters import hour_floor
from minicloud.cluster.leader import LeaderLoops
from minicloud.core.context import Context
from minicloud.model.billing import PriceSet
from minicloud.state import Create, Delete, Record, SQLiteStore, Txn, Update, list_all

DAY = _dt.datetime(2026, 11, 3, tzinfo=_dt.UTC)


def at(h: int, m: int = 0, s: int = 0, day: _dt.datetime = DAY) -> _dt.datetime:
    return day + _dt.timedelta(hours=h, minutes=m, seconds=s)


def text(t: _dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(t: _dt.datetime) -> int:
    return int(t.timestamp())


class Clock:
    def __init__(self, now: _dt.datetime) -> None:
        self.now = now

    def __call__(self) -> _dt.datetime:
        return self.now

    def text(self) -> str:
        return text(self.now)


def instance(state: str, when: _dt.datetime, *, vcpus: int = 2, memory_mib: int = 2048, rtype: str = "small",
             launched: _dt.datetime | None = None, stopped: _dt.datetime | None = None, created=None,
             labels=None) -> Record:  # fmt: skip
    return Record(
        kind="instance", id="i-web1", project="default", name="web1", labels=labels or {"team": "web"},
        spec={"uuid": "u", "image_id": "img-x", "image_name": "deb", "type": rtype, "vcpus": vcpus,
              "memory_mib": memory_mib, "disk_gib": 10, "node": "n1"},
        status={"state": state, "launched_at": text(launched) if launched else None,
                "stopped_at": text(stopped) if stopped else None},
        created_at=text(created or at(10)), updated_at=text(when),
    )  # fmt: skip


async def put(store: SQLiteStore, record: Record) -> None:
    existing = await store.get(record.kind, record.id)
    await store.commit(Txn([Update(record) if existing is not None else Create(record)]))


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


class Meter:
    """The two billing loops under one fake clock (a new Meter is a new leader: new loop objects, new term)."""

    def __init__(self, store: SQLiteStore, clock: Clock) -> None:
        self.clock = clock
        self.loops = LeaderLoops(lambda: True, clock=clock)
        self.fold = metering.MeterLoop(store, batch=100, close_delay=300)
        self.close = metering.CloseLoop(store, batch=50, close_delay=300)
        for loop in (self.fold, self.close):
            loop.clock = clock.text
        self.loops.register(self.fold, self.close)
        self.loops._leading = True
        self.loops.term = 1

    async def run(self) -> None:
        for _ in range(200):  # until neither has anything to do
            a = await self.loops.run_cycle(self.fold, 1)
            b = await self.loops.run_cycle(self.close, 1)
            if a is None and b is None:
                return
        raise AssertionError("the billing loops did not settle")


async def usage_of(store: SQLiteStore) -> dict[tuple[str, str, int, int], int]:
    out = {}
    for r in await list_all(store, USAGE.name):
        u = USAGE.load(r).spec
        out[(u.resource_id, u.meter, u.hour, u.correction_of)] = u.quantity
    return out


async def set_price(store: SQLiteStore, meter: str, amount: str, effective: str = "2026-11-01") -> None:
    ctx = Context.system("test")
    await prices.set_price(ctx, store, PriceSet(meter=meter, amount=amount, effective=effective), currency="EUR",
                           now=_dt.datetime(2026, 10, 1, tzinfo=_dt.UTC))  # fmt: skip


async def running_instance_scenario(store: SQLiteStore, clock: Clock, *, meter_midway: Meter | None = None) -> None:
    """web1: pending 10:00, running from 10:00:00 (launched_at), stopped at 12:30:00 (stopped_at, reported 12:30:05)."""
    await put(store, instance("pending", at(10), created=at(10)))
    await put(store, instance("running", at(10, 0, 3), launched=at(10)))
    if meter_midway is not None:
        clock.now = at(11, 20)
        await meter_midway.run()
    await put(store, instance("stopped", at(12, 30, 5), launched=at(10), stopped=at(12, 30)))


VCPU, MEM, DISK = "compute.vcpu-hour", "compute.memory-gib-hour", "compute.root-disk-gib-hour"


# -- pure accounting ---------------------------------------------------------------------------------------------------
def test_fold_and_close_split_a_segment_across_hours():
    state = metering.MeterStateSpec(resource_kind="instance", resource_id="i-1", since=epoch(at(10, 30)),
                                    closed_until=epoch(at(10)), rates={VCPU: 2})  # fmt: skip
    state, corrections = metering.fold(state, epoch(at(11, 15)), {VCPU: 4}, {}, "x", False)
    assert corrections == []
    state, out, done = metering.close(state, epoch(at(12)))
    assert out == [(VCPU, epoch(at(10)), 1800 * 2), (VCPU, epoch(at(11)), 900 * 2 + 2700 * 4)]
    assert not done and state.closed_until == epoch(at(12))


def test_a_late_transition_into_a_closed_hour_is_a_correction():
    state = metering.MeterStateSpec(resource_kind="instance", resource_id="i-1", since=epoch(at(10)),
                                    closed_until=epoch(at(13)), rates={VCPU: 2})  # fmt: skip
    state, corrections = metering.fold(state, epoch(at(12, 30)), {}, {}, "x", False)
    assert corrections == [(VCPU, epoch(at(12)), -2 * 1800)]
    assert state.since == epoch(at(13)) and state.rates == {}


# -- against the store ---------------------------------------------------------------------------------------------------
async def test_instance_running_a_known_time_gives_the_seconds_and_the_charge(store):
    await set_price(store, VCPU, "0.004")
    await set_price(store, MEM, "0.0005")
    clock = Clock(at(10))
    await running_instance_scenario(store, clock)
    clock.now = at(13, 10)  # 13:00 + close_delay passed
    await Meter(store, clock).run()
    usage = await usage_of(store)
    h = epoch(at(10))
    assert usage[("i-web1", VCPU, h, 0)] == 2 * 3600
    assert usage[("i-web1", VCPU, h + 3600, 0)] == 2 * 3600
    assert usage[("i-web1", VCPU, h + 7200, 0)] == 2 * 1800  # stopped at 12:30:00 (its stopped_at), not 12:30:05
    assert usage[("i-web1", MEM, h + 7200, 0)] == 2048 * 1800
    assert usage[("i-web1", DISK, h + 7200, 0)] == 10 * 3600  # the root disk is billed while stopped too
    chain = await ledger.entries(store, "default")
    charges = [json.loads(e.spec.charge) for e in chain]
    vcpu = sum(Decimal(c["amount"]) for c in charges if c["meter"] == VCPU)
    assert vcpu == Decimal("0.004") * Decimal("2.5") * 2  # 2.5 h x 2 vCPUs
    mem = sum(Decimal(c["amount"]) for c in charges if c["meter"] == MEM)
    assert mem == Decimal("0.0005") * Decimal("2.5") * 2  # 2 GiB
    assert all(c["labels"] == {"team": "web"} for c in charges)
    assert {c["currency"] for c in charges if c["meter"] in (VCPU, MEM)} == {"EUR"}
    assert {c["price"] for c in charges if c["meter"] == DISK} == {None}  # unpriced: charged 0, visibly
    assert (await ledger.verify(store, "default")).ok


async def test_stop_start_and_resize_split_usage_exactly(store):
    clock = Clock(at(10))
    await put(store, instance("running", at(10), launched=at(10)))
    await put(store, instance("stopped", at(10, 20), launched=at(10), stopped=at(10, 20)))
    await put(store, instance("running", at(10, 50), launched=at(10, 50)))
    # resize to 4 vCPUs at 11:15 (its record's stamp)
    await put(store, instance("running", at(11, 15), vcpus=4, rtype="large", launched=at(10, 50)))
    clock.now = at(12, 6)
    await Meter(store, clock).run()
    usage = await usage_of(store)
    assert usage[("i-web1", VCPU, epoch(at(10)), 0)] == 2 * (20 * 60) + 2 * (10 * 60)
    assert usage[("i-web1", VCPU, epoch(at(11)), 0)] == 2 * (15 * 60) + 4 * (45 * 60)
    state = METER_STATE.load(await store.get(METER_STATE.name, metering.state_id("i-web1")))
    assert state.spec.attrs["type"] == "large" and state.spec.closed_until == epoch(at(12))


async def test_running_twice_or_a_new_leader_mid_hour_gives_identical_records(tmp_path):
    results = []
    for midway in (False, True):
        s = SQLiteStore(tmp_path / f"state-{midway}.db", retain_changes=1000)
        await s.open()
        try:
            await set_price(s, VCPU, "0.004")
            clock = Clock(at(10))
            first = Meter(s, clock)
            await running_instance_scenario(s, clock, meter_midway=first if midway else None)
            clock.now = at(13, 10)
            # the leader that ran mid-hour is gone (SIGKILL): a new one with new loop objects takes over
            await Meter(s, clock).run()
            once = await usage_of(s)
            await Meter(s, clock).run()  # and again: nothing new
            assert await usage_of(s) == once
            chain = await ledger.entries(s, "default")
            results.append((once, [json.loads(e.spec.charge) for e in chain]))
        finally:
            await s.close()
    assert results[0][0] == results[1][0]
    assert sorted(results[0][1], key=lambda c: c["usage_id"]) == sorted(results[1][1], key=lambda c: c["usage_id"])


async def test_late_data_is_folded_in_with_a_correction_never_a_rewrite(store):
    await set_price(store, VCPU, "0.004")
    clock = Clock(at(10))
    await put(store, instance("running", at(10), launched=at(10)))
    clock.now = at(13, 10)
    await Meter(store, clock).run()
    before = await usage_of(store)
    assert before[("i-web1", VCPU, epoch(at(12)), 0)] == 7200
    # the node was offline: it reports at 13:20 that the guest stopped at 12:30
    await put(store, instance("stopped", at(13, 20), launched=at(10), stopped=at(12, 30)))
    clock.now = at(13, 25)
    await Meter(store, clock).run()
    after = await usage_of(store)
    assert {k: v for k, v in after.items() if k in before} == before  # closed records untouched
    corrections = {k: v for k, v in after.items() if k[3] and k[1] == VCPU}
    assert list(corrections.values()) == [-2 * 1800] and next(iter(corrections))[2] == epoch(at(12))
    charges = [json.loads(e.spec.charge) for e in await ledger.entries(store, "default")]
    assert Decimal(charges[-1]["amount"]) == Decimal("-0.004")
    clock.now = at(14, 10)
    await Meter(store, clock).run()
    assert ("i-web1", VCPU, epoch(at(13)), 0) not in await usage_of(store)  # stopped since 12:30


async def test_a_deleted_resource_is_billed_until_its_delete_and_its_state_goes(store):
    vol = Record(kind="volume", id="vol-1", project="default", name="data", spec={"size_gib": 100, "pool": "p1"},
                 created_at=text(at(10)), updated_at=text(at(10)))  # fmt: skip
    await put(store, vol)
    clock = Clock(at(10))
    audit = Record(
        kind="marker", id="m-1", project="", name="m", created_at=text(at(10, 45)), updated_at=text(at(10, 45))
    )
    await store.commit(Txn([Delete(kind="volume", id="vol-1"), Create(audit)]))  # the delete's revision carries a stamp
    clock.now = at(11, 10)
    await Meter(store, clock).run()
    assert (await usage_of(store))[("vol-1", "storage.volume-gib-hour", epoch(at(10)), 0)] == 100 * 45 * 60
    assert await store.get(METER_STATE.name, metering.state_id("vol-1")) is None


async def test_a_compacted_log_resynchronises_from_the_records(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    try:
        await put(s, instance("running", at(10), launched=at(10)))
        filler = [Create(Record(kind="marker", id=f"m-{i}", project="", name=f"m{i}", created_at=text(at(10, 1)),
                                updated_at=text(at(10, 1)))) for i in range(1100)]  # fmt: skip
        for op in filler:
            await s.commit(Txn([op]))
        await s.compact()
        clock = Clock(at(11, 10))
        await Meter(s, clock).run()
        cursor = METER_CURSOR.load(await s.get(METER_CURSOR.name, CURSOR_ID)).spec
        assert cursor.resyncs == 1
        assert (await usage_of(s))[("i-web1", VCPU, epoch(at(10)), 0)] == 7200
    finally:
        await s.close()


# -- prices ------------------------------------------------------------------------------------------------------------------
async def test_bad_prices_are_refused(store):
    ctx = Context.system("test")
    now = at(10, 30)

    async def attempt(**kw):
        return await prices.set_price(ctx, store, PriceSet(**kw), currency="EUR", now=now)

    with pytest.raises(errors.ValidationFailed, match=r"the meters are: compute\.gpu-hour, compute\.memory-gib-hour"):
        await attempt(meter="compute.tpu-hour", amount="1")
    with pytest.raises(errors.ValidationFailed, match="negative"):
        await attempt(meter=VCPU, amount="-0.1")
    with pytest.raises(errors.ValidationFailed, match="past or the current hour"):
        await attempt(meter=VCPU, amount="0.1", effective="2026-11-03T10:00:00Z")
    await attempt(meter=VCPU, amount="0.004", effective="2026-12-01")
    with pytest.raises(errors.ValidationFailed, match="overlap"):
        await attempt(meter=VCPU, amount="0.005", effective="2026-11-20")
    await attempt(meter=MEM, amount="0.1", effective="2026-12-01", until="2027-01-01")
    with pytest.raises(errors.ValidationFailed, match="overlap"):
        await attempt(meter=MEM, amount="0.2", effective="2026-12-15")
    await attempt(meter=VCPU, amount="0.006", effective="2027-01-01")
    listed = await prices.list_prices(store, VCPU)
    assert [(p.amount, p.effective) for p in listed] == [("0.004", "2026-12-01T00:00:00Z"),
                                                         ("0.006", "2027-01-01T00:00:00Z")]  # fmt: skip
    objs = await ledger.load_prices(store)
    assert ledger.price_at(objs, VCPU, epoch(_dt.datetime(2026, 12, 31, 23, tzinfo=_dt.UTC))).spec.amount == "0.004"
    assert ledger.price_at(objs, MEM, epoch(_dt.datetime(2027, 1, 1, tzinfo=_dt.UTC))) is None


# -- ledger and invoices ------------------------------------------------------------------------------------------------
async def _month_of_usage(store: SQLiteStore) -> Clock:
    await set_price(store, VCPU, "0.004")
    clock = Clock(at(10))
    await running_instance_scenario(store, clock)
    clock.now = _dt.datetime(2026, 12, 1, 0, 10, tzinfo=_dt.UTC)  # past the end of November + close_delay
    await Meter(store, clock).run()
    return clock


async def test_editing_one_ledger_entry_in_the_database_is_detected(tmp_path):
    path = tmp_path / "state.db"
    s = SQLiteStore(path, retain_changes=1000)
    await s.open()
    await _month_of_usage(s)
    chain = await ledger.entries(s, "default")
    assert len(chain) > 5 and (await ledger.verify(s, "default")).ok
    victim = chain[3]
    await s.close()
    db = sqlite3.connect(path)
    spec = json.loads(db.execute("SELECT spec FROM records WHERE id = ?", (victim.id,)).fetchone()[0])
    spec["charge"] = spec["charge"].replace('"amount":"', '"amount":"1', 1)
    db.execute("UPDATE records SET spec = ? WHERE id = ?", (json.dumps(spec), victim.id))
    db.commit()
    db.close()
    s = SQLiteStore(path, retain_changes=1000)
    await s.open()
    try:
        result = await ledger.verify(s, "default")
        assert not result.ok and result.first_bad_seq == victim.spec.seq and result.first_bad_id == victim.id
        assert "altered" in result.reason
    finally:
        await s.close()


async def test_a_closed_invoice_regenerates_byte_identical(store):
    clock = await _month_of_usage(store)
    ctx = Context.system("test")
    with pytest.raises(errors.ValidationFailed, match="has not ended"):
        await invoices.close_invoice(ctx, store, "2026-12", clock.now)
    written = await invoices.close_invoice(ctx, store, "2026-11", clock.now)
    assert written.body.state == "closed" and written.body.totals == {"EUR": "0.0200000000"}
    with pytest.raises(errors.Conflict, match="already closed"):
        await invoices.close_invoice(ctx, store, "2026-11", clock.now)
    # more charges arrive (a late correction for November, and December's usage): November does not change
    dec1 = _dt.datetime(2026, 12, 1, 1, tzinfo=_dt.UTC)
    await put(store, instance("running", dec1, launched=dec1))
    clock.now = _dt.datetime(2026, 12, 1, 3, 10, tzinfo=_dt.UTC)
    await Meter(store, clock).run()
    stored, again = await invoices.regenerate(store, "default", "2026-11")
    assert stored.encode() == again.encode()
    shown, document = await invoices.show(store, "default", "2026-11")
    assert document == stored and shown.state == "closed"
    december, _ = await invoices.show(store, "default", "2026-12")
    assert december.state == "open" and december.totals["EUR"] != "0"
    csv_text = invoices.to_csv(shown)
    assert csv_text.splitlines()[0].startswith("project,period,meter") and "compute.vcpu-hour" in csv_text


async def test_an_invoice_cannot_close_before_the_meter_closed_its_hours(store):
    await set_price(store, VCPU, "0.004")
    clock = Clock(at(10))
    await put(store, instance("running", at(10), launched=at(10)))
    clock.now = at(11, 10)
    await Meter(store, clock).run()
    with pytest.raises(errors.Conflict, match="closed usage only up to"):
        await invoices.close_invoice(Context.system("t"), store, "2026-11", _dt.datetime(2026, 12, 2, tzinfo=_dt.UTC))
    assert hour_floor(epoch(at(11, 10))) == epoch(at(11))


async def test_the_fold_reads_many_meter_states_in_pages_not_one_get_each(store, monkeypatch):
    def volume(i: int, size: int) -> Record:
        return Record(kind="volume", id=f"vol-{i:03d}", project="default", name=f"v{i}", labels={},
                      spec={"size_gib": size, "pool": "p"}, status={}, created_at=text(at(10)),
                      updated_at=text(at(10, i % 60)))  # fmt: skip

    clock = Clock(at(10, 30))
    for i in range(40):
        await put(store, volume(i, 1))
    await Meter(store, clock).run()
    for i in range(0, 40, 2):  # every other volume grows: 20 states to read
        await put(store, volume(i, 2))
    gets: list[str] = []
    real_get = store.get

    async def counting_get(kind: str, id_: str):
        gets.append(kind)
        return await real_get(kind, id_)

    monkeypatch.setattr(store, "get", counting_get)
    wanted = {f"vol-{i:03d}" for i in range(0, 40, 2)}
    paged = await metering.load_states(store, wanted)
    assert set(paged) == wanted and gets.count(METER_STATE.name) == 0
    monkeypatch.setattr(metering, "GET_EACH", 100)
    each = await metering.load_states(store, wanted)
    assert each == paged and gets.count(METER_STATE.name) == 20
    monkeypatch.setattr(metering, "GET_EACH", 16)
    gets.clear()
    clock.now = at(11, 10)
    await Meter(store, clock).run()
    assert gets.count(METER_STATE.name) == 0
    states = {s.spec.resource_id: s.spec for s in map(METER_STATE.load, await list_all(store, METER_STATE.name))}
    assert states["vol-000"].rates == {"storage.volume-gib-hour": 2} and states["vol-001"].rates == {
        "storage.volume-gib-hour": 1
    }


async def test_gpu_seconds_of_a_running_instance_and_s3_request_and_egress_counters(store):
    from minicloud.billing.meters import gpu_count

    assert [gpu_count(s) for s in ({"gpus": 2}, {"gpus": [{"address": "0000:01:00.0"}]}, {"gpus": {"count": 3}},
                                   {}, {"gpus": "many"})] == [2, 1, 3, 0, 0]  # fmt: skip
    clock = Clock(at(10))
    gpu = instance("running", at(10), launched=at(10))
    gpu.spec.update(gpus=1, gpu_model="L4")  # as the instance spec holds them (its type's, copied)
    await put(store, gpu)
    stopped = instance("stopped", at(11, 30), launched=at(10), stopped=at(11, 30))
    stopped.spec.update(gpus=1, gpu_model="L4")

    def bucket(when, requests: int, sent: int) -> Record:
        return Record(kind="bucket", id="bkt-1", project="default", name="logs", labels={"team": "web"},
                      spec={}, status={"state": "ready", "size_bytes": 0, "requests": requests, "bytes_out": sent},
                      created_at=text(at(10, 5)), updated_at=text(when))  # fmt: skip

    await put(store, bucket(at(10, 5), 0, 0))
    await put(store, bucket(at(10, 20), 100, 1000))
    clock.now = at(10, 40)
    await Meter(store, clock).run()
    await put(store, bucket(at(11, 10), 250, 1000))
    await put(store, bucket(at(11, 30), 20, 5))  # the counter restarted (the usage log was reset): all of it is new
    await put(store, stopped)
    clock.now = at(12, 10)
    await Meter(store, clock).run()
    used = await usage_of(store)
    assert used[("i-web1", "compute.gpu-hour", epoch(at(10)), 0)] == 3600
    assert used[("i-web1", "compute.gpu-hour", epoch(at(11)), 0)] == 1800
    gpu_usage = [USAGE.load(r).spec for r in await list_all(store, USAGE.name)]
    assert {u.attrs.get("gpu_model") for u in gpu_usage if u.meter == "compute.gpu-hour"} == {"L4"}
    assert used[("bkt-1", "objects.requests", epoch(at(10)), 0)] == 100
    assert used[("bkt-1", "objects.egress-gib", epoch(at(10)), 0)] == 1000
    assert used[("bkt-1", "objects.requests", epoch(at(11)), 0)] == 150 + 20
    assert used[("bkt-1", "objects.egress-gib", epoch(at(11)), 0)] == 5
    # a late observation of a closed hour is a correction of that hour
    await put(store, bucket(at(13), 30, 5))
    state = METER_STATE.load(await store.get(METER_STATE.name, metering.state_id("bkt-1"))).spec
    late, corrections = metering.count(state, {"objects.requests": 40}, epoch(at(11, 50)))
    assert corrections == [("objects.requests", epoch(at(11)), 20)] and late.counters["objects.requests"] == 40


async def test_the_change_log_is_kept_after_the_meter_cursor_within_a_bound(tmp_path):
    from types import SimpleNamespace

    s = SQLiteStore(tmp_path / "state.db", retain_changes=10)
    await s.open()
    try:
        clock = Clock(at(10))
        await put(s, instance("running", at(10), launched=at(10)))
        await Meter(s, clock).run()
        config = SimpleNamespace(billing=SimpleNamespace(enabled=True))
        cursor = await metering.compaction_hold(s, config)
        assert cursor is not None and 0 < cursor < s.revision  # the change log revision the meter read up to
        for i in range(150):
            await s.commit(Txn([Create(Record(kind="keypair", id=f"kp-{i}", project="default", name=f"k{i}",
                                              labels={}, spec={}, status={}, created_at=text(at(10)),
                                              updated_at=text(at(10))))]))  # fmt: skip
        head = s.revision
        # held at the meter's cursor, but never more than 10 x retain_changes revisions back
        assert await s.compact(hold=cursor) == head - 100
        assert await s.compact(hold=head - 30) == head - 30
        assert await s.compact(hold=None) == head - 10
        assert await metering.compaction_hold(s, SimpleNamespace(billing=SimpleNamespace(enabled=False))) is None
    finally:
        await s.close()


async def test_router_egress_counters_per_node_restarts_exactly_once_and_late_corrections(store):
    from minicloud.billing.meters import METERS, consumption, egress_key

    assert METERS["network.egress-gib"].counter and METERS["network.egress-gib"].divisor == 1 << 30
    clock = Clock(at(10))

    def router(when, egress) -> Record:
        return Record(kind="router", id="rtr-1", project="default", name="edge", labels={"team": "web"},
                      spec={"external_network": "net-ext"},
                      status={"egress": {node: {"since": s, "bytes": b} for node, (s, b) in egress.items()}},
                      created_at=text(at(10)), updated_at=text(when))  # fmt: skip

    assert consumption(router(at(10), {"n1": (7, 5)})).counters == {egress_key("n1", 7): 5}
    assert consumption(router(at(10), {})).counters == {}  # nothing counted yet: no meter state
    await put(store, router(at(10), {}))
    await put(store, router(at(10, 10), {"n1": (100, 1000)}))
    await put(store, router(at(10, 20), {"n1": (100, 1500), "n2": (200, 300)}))
    clock.now = at(10, 40)
    await Meter(store, clock).run()
    await put(store, router(at(11, 5), {"n1": (100, 1600), "n2": (200, 300)}))
    # n1's agent restarted (its counter starts again with a new epoch) and n2's counter went down (reset in place)
    await put(store, router(at(11, 20), {"n1": (4000, 50), "n2": (200, 30)}))
    await put(store, router(at(11, 30), {"n1": (4000, 80), "n2": (200, 30)}))
    clock.now = at(12, 10)
    await Meter(store, clock).run()
    used = await usage_of(store)
    assert used[("rtr-1", "network.egress-gib", epoch(at(10)), 0)] == 1500 + 300
    assert used[("rtr-1", "network.egress-gib", epoch(at(11)), 0)] == 100 + 80 + 30
    egress = [USAGE.load(r).spec for r in await list_all(store, USAGE.name)]
    assert {u.attrs.get("external_network") for u in egress} == {"net-ext"}
    state = METER_STATE.load(await store.get(METER_STATE.name, metering.state_id("rtr-1"))).spec
    assert set(state.counters) == {egress_key("n1", 4000), egress_key("n2", 200)}  # n1's old epoch dropped
    # exactly once: a repeated fold, a new leader, the same records
    before = await usage_of(store)
    await Meter(store, clock).run()
    await Meter(store, clock).run()
    assert await usage_of(store) == before
    # a late observation (a node that was offline reports bytes of a closed hour) is a correction of that hour
    late, corrections = metering.count(
        state, {egress_key("n1", 4000): 180, egress_key("n2", 200): 30}, epoch(at(11, 50))
    )
    assert corrections == [("network.egress-gib", epoch(at(11)), 100)]
    assert late.counters[egress_key("n1", 4000)] == 180
    await put(store, router(at(12, 20), {"n1": (4000, 180), "n2": (200, 30)}))
    clock.now = at(13, 10)
    await Meter(store, clock).run()
    assert (await usage_of(store))[("rtr-1", "network.egress-gib", epoch(at(12)), 0)] == 100
