"""Budgets: thresholds on actual and forecast spend notify once through the alarm outbox; enforcement refuses new
billable resources with 409; members read, administrators set."""

from __future__ import annotations

import datetime as _dt
import json

import pytest

from minicloud import errors, ids
from minicloud.api.keys import STORE
from minicloud.billing import budgets
from minicloud.billing.kinds import BUDGET
from minicloud.core.context import Context
from minicloud.iam import audit
from minicloud.model.billing import BudgetCreate
from minicloud.observe.kinds import ALARM, ALARM_DELIVERY, AlarmSpec
from minicloud.state import Create, Txn, Update, list_all
from tests.unit.api.conftest import api  # noqa: F401  (fixture)
from tests.unit.billing.test_billing_api import _charge, _member
from tests.unit.billing.test_costs import _month
from tests.unit.billing.test_metering import store  # noqa: F401  (fixture)
from tests.unit.billing.test_policies import vm

NOV16 = _dt.datetime(2026, 11, 16, tzinfo=_dt.UTC)


async def _alarm(s) -> str:
    spec = AlarmSpec(comparison=">", threshold=1, query="up", expression="up",
                     actions=[{"url": "http://127.0.0.1:9/hook"}])  # fmt: skip
    obj = ALARM.new(project="default", name="spend", spec=spec, stamp="2026-11-01T00:00:00.000Z")
    await s.commit(Txn([Create(ALARM.dump(obj))]))
    return obj.id


async def _cycle(s, now: _dt.datetime) -> str:
    loop = budgets.BudgetLoop(s)
    loop.clock = lambda: now.isoformat().replace("+00:00", "Z")
    plan = loop.decide(await loop.snapshot(), now)
    if not plan:
        return "idle"
    return (await loop.act(plan)).summary


async def test_thresholds_notify_once_through_the_alarm_outbox_and_a_new_month_starts_afresh(store):  # noqa: F811
    await _month(store)  # 0.028 EUR charged in November (web1 0.02, db1 0.008)
    alarm_id = await _alarm(store)
    ctx = Context.system("t", project="default")
    body = BudgetCreate(name="monthly", amount="0.03", thresholds=[50, 80, 100], alarm="spend")
    await budgets.create(ctx, store, body, currency="EUR")
    with pytest.raises(errors.ValidationFailed, match="no alarm"):
        await budgets.create(ctx, store, BudgetCreate(name="b2", amount="1", alarm="nope"), currency="EUR")
    with pytest.raises(errors.Conflict):
        await budgets.create(ctx, store, body, currency="EUR")
    assert "4 notifications" in await _cycle(store, NOV16)
    b = await budgets.get(store, "default", "monthly")
    # spent 0.028: 50 % (0.015) and 80 % (0.024) crossed, 100 % (0.03) not; the meter closed all of November, so
    # the forecast is the actual
    assert b.status.period == "2026-11" and b.status.spent == "0.028" and not b.status.exhausted
    assert b.status.crossed == ["actual:50", "forecast:50", "actual:80", "forecast:80"]
    outbox = [ALARM_DELIVERY.load(r) for r in await list_all(store, ALARM_DELIVERY.name)]
    assert len(outbox) == 4 and {d.spec.alarm_id for d in outbox} == {alarm_id}
    sent = json.loads(outbox[0].spec.body)
    assert sent["type"] == "budget" and sent["budget"] == "monthly" and sent["currency"] == "EUR"
    # again: nothing new (no second notification, whoever runs it)
    assert await _cycle(store, NOV16) == "idle"
    assert len(await list_all(store, ALARM_DELIVERY.name)) == 4
    # December: the month starts from zero
    await _cycle(store, _dt.datetime(2026, 12, 2, tzinfo=_dt.UTC))
    b = await budgets.get(store, "default", "monthly")
    assert b.status.period == "2026-12" and b.status.spent == "0" and b.status.crossed == []


async def test_an_enforced_budget_refuses_new_billable_resources_once_spent(store):  # noqa: F811
    await _month(store)
    ctx = Context.system("t", project="default")
    await budgets.create(ctx, store, BudgetCreate(name="cap", amount="0.02", enforce=True), currency="EUR")
    await _cycle(store, NOV16)
    b = await budgets.get(store, "default", "cap")
    assert b.status.exhausted and "actual:100" in b.status.crossed
    with pytest.raises(errors.Conflict, match="exhausted"):
        await budgets.refuse_if_exhausted(store, "default", "compute:instances:create", NOV16)
    await budgets.refuse_if_exhausted(store, "default", "compute:keypairs:create", NOV16)  # not billable
    await budgets.refuse_if_exhausted(store, "default", "storage:volumes:create", NOV16 + _dt.timedelta(days=20))
    await budgets.refuse_if_exhausted(store, "other", "storage:volumes:create", NOV16)


async def test_a_budget_chosen_to_stop_instances_stops_the_projects_running_ones_once_spent(store):  # noqa: F811
    await _month(store)  # 0.028 EUR charged in November
    await store.commit(Txn([Create(vm("i-web", {})), Create(vm("i-db", {})),
                            Create(vm("i-off", {}, state="stopped").__class__(**{**_fields(vm("i-off", {})),
                                   "spec": {**vm("i-off", {}).spec, "power": "stopped"}}))]))  # fmt: skip
    other = _fields(vm("i-other", {}))
    await store.commit(Txn([Create(vm("i-other", {}).__class__(**{**other, "project": "other"}))]))
    ctx = Context.system("t", project="default")
    # not spent yet: nothing is stopped
    await budgets.create(ctx, store, BudgetCreate(name="big", amount="1", stop_instances=True), currency="EUR")
    assert "stopped" not in await _cycle(store, NOV16)
    assert (await store.get("instance", "i-web")).spec["power"] == "running"
    # spent: the project's instances meant to run are stopped, as the budget (audited); another project's are not
    made = await budgets.create(ctx, store, BudgetCreate(name="cap", amount="0.02", stop_instances=True),
                                currency="EUR")  # fmt: skip
    assert made.body.enforce and made.body.stop_instances  # stop_instances implies enforce
    meant_to_run = {
        r.id
        for r in await list_all(store, "instance", project="default")
        if r.spec.get("power", "running") == "running"
    }
    assert {"i-web", "i-db"} <= meant_to_run and "i-off" not in meant_to_run
    assert f"{len(meant_to_run)} instances stopped" in await _cycle(store, NOV16)
    assert {r.spec.get("power") for r in await list_all(store, "instance", project="default")} == {"stopped"}
    assert (await store.get("instance", "i-other")).spec["power"] == "running"
    entries = [r for r in await list_all(store, audit.KIND) if "i-web" in str(r.spec)]
    assert entries and "budget:cap" in str(entries[-1].spec)
    b = await budgets.get(store, "default", "cap")
    assert {x["instance_id"] for x in b.status.stopped} == meant_to_run
    assert budgets.view(b).stopped == b.status.stopped
    # nothing left to stop; one started again that month is stopped again
    assert "stopped" not in await _cycle(store, NOV16)
    web = await store.get("instance", "i-web")
    await store.commit(Txn([Update(web.__class__(**{**_fields(web), "spec": {**web.spec, "power": "running"}}),
                                   expect_revision=web.revision)]))  # fmt: skip
    assert "1 instances stopped" in await _cycle(store, NOV16)
    # a new month: not exhausted any more, nothing is stopped
    await store.commit(Txn([Update((w := await store.get("instance", "i-web")).__class__(
        **{**_fields(w), "spec": {**w.spec, "power": "running"}}), expect_revision=w.revision)]))  # fmt: skip
    assert "stopped" not in await _cycle(store, _dt.datetime(2026, 12, 2, tzinfo=_dt.UTC))
    assert (await store.get("instance", "i-web")).spec["power"] == "running"


def _fields(record) -> dict:
    return {f: getattr(record, f) for f in record.__struct_fields__}


async def test_budgets_api_admins_set_members_read_and_enforcement_is_409(api, monkeypatch):  # noqa: F811
    assert (await api.post("/v1/projects", json={"name": "pa"})).status == 201
    await _charge(api.app[STORE], "pa", "1.5")
    alice = await _member(api, "alice", "pa")
    body = {"name": "cap", "amount": "10", "enforce": True}
    assert (await api.post("/v1/budgets?project=pa", json=body, headers=alice)).status == 403
    r = await api.post("/v1/budgets?project=pa", json=body)
    assert r.status == 201, await r.text()
    assert (await api.post("/v1/budgets?project=pa", json={**body, "amount": "-1", "name": "x"})).status == 422
    listed = await (await api.get("/v1/budgets?project=pa", headers=alice)).json()
    assert [b["name"] for b in listed] == ["cap"] and listed[0]["currency"] == "EUR"
    # the loop found it spent this month: members' creates of billable resources are refused, other writes not
    st = api.app[STORE]
    obj = BUDGET.load(await st.get_by_name(BUDGET.name, "pa", "cap"))
    period = ids.now()[:7]
    status = obj.status.__class__(period=period, spent="10", exhausted=True, crossed=["actual:100"])
    await st.commit(Txn([Update(BUDGET.dump(obj.replace(status=status)), expect_revision=obj.revision)]))
    r = await api.post("/v1/volumes?project=pa", json={"name": "v", "size_gib": 1}, headers=alice)
    assert r.status == 409 and "exhausted" in (await r.json())["detail"]
    r = await api.post("/v1/keypairs?project=pa", json={"name": "k"}, headers=alice)
    assert r.status != 409
    shown = await (await api.get("/v1/budgets/cap?project=pa", headers=alice)).json()
    assert shown["exhausted"] is True and shown["spent"] == "10"
    assert (await api.delete("/v1/budgets/cap?project=pa", headers=alice)).status == 403
    assert (await api.delete("/v1/budgets/cap?project=pa")).status == 204
    r = await api.post("/v1/volumes?project=pa", json={"name": "v", "size_gib": 1}, headers=alice)
    assert r.status != 409


async def test_a_project_has_at_most_max_per_project_budgets(store, monkeypatch):  # noqa: F811
    # enforcement reads every budget of the project on each billable create: their number is capped
    monkeypatch.setattr(budgets, "MAX_PER_PROJECT", 2)
    ctx = Context.system("t", project="default")
    for name in ("b1", "b2"):
        await budgets.create(ctx, store, BudgetCreate(name=name, amount="1"), currency="EUR")
    with pytest.raises(errors.Conflict, match="project 'default' has 2 budgets"):
        await budgets.create(ctx, store, BudgetCreate(name="b3", amount="1"), currency="EUR")
    await budgets.delete(ctx, store, "b1")
    await budgets.create(ctx, store, BudgetCreate(name="b3", amount="1"), currency="EUR")
