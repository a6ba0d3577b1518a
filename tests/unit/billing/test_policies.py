"""Auto-stop policies: idle instances of the selector are stopped once, audited and notified; dry runs store
nothing; missing metrics never count as idle."""

from __future__ import annotations

import datetime as _dt

import msgspec

from minicloud.billing import policies
from minicloud.billing.kinds import POLICY, PolicySpec
from minicloud.core.context import Context
from minicloud.iam import audit
from minicloud.model.billing import PolicyCreate
from minicloud.model.metrics import MetricsResult
from minicloud.observe.kinds import ALARM, ALARM_DELIVERY, AlarmSpec
from minicloud.state import Create, Record, Txn, list_all
from tests.unit.api.conftest import api  # noqa: F401  (fixture)
from tests.unit.billing.test_metering import store  # noqa: F401  (fixture)

NOW = _dt.datetime(2026, 11, 30, 12, tzinfo=_dt.UTC)
EARLY = "2026-11-30T06:00:00.000Z"


def vm(rid: str, labels: dict[str, str], launched: str = EARLY, state: str = "running") -> Record:
    return Record(kind="instance", id=rid, project="default", name=rid, labels=labels,
                  spec={"uuid": "u", "image_id": "img-x", "image_name": "deb", "type": "small", "vcpus": 2,
                        "memory_mib": 1024, "disk_gib": 10, "node": "n1", "power": "running"},
                  status={"state": state, "launched_at": launched}, created_at=EARLY, updated_at=EARLY)  # fmt: skip


class FakeQuery:
    """The metrics query service: max CPU % and sample counts per instance id."""

    def __init__(self, figures: dict[str, tuple[float, float]]) -> None:
        self.figures = figures
        self.asked: list[str] = []

    async def query(self, promql: str, *, time=None, project=None) -> MetricsResult:
        self.asked.append(promql)
        index = 0 if promql.startswith("max_over_time") else 1
        result = [{"metric": {"instance_id": iid}, "value": [0, str(v[index])]} for iid, v in self.figures.items()]
        return MetricsResult(result_type="vector", result=result)


def test_only_running_matching_instances_idle_over_a_covered_window_are_chosen():
    spec = PolicySpec(type="auto-stop", selector={"env": "dev"}, idle=7200)
    instances = [vm("i-idle", {"env": "dev"}), vm("i-busy", {"env": "dev"}), vm("i-prod", {"env": "prod"}),
                 vm("i-new", {"env": "dev"}, launched="2026-11-30T11:00:00.000Z"),
                 vm("i-gap", {"env": "dev"}), vm("i-off", {"env": "dev"}, state="stopped")]  # fmt: skip
    figures = {
        "i-idle": {"max_cpu": 1.0, "samples": 700},
        "i-busy": {"max_cpu": 40.0, "samples": 700},
        "i-prod": {"max_cpu": 0.5, "samples": 700},
        "i-new": {"max_cpu": 0.5, "samples": 300},
        "i-gap": {"max_cpu": 0.5, "samples": 100},
    }  # fmt: skip  (7200 s / 10 s / 2 = 360 samples needed)
    chosen = policies.idle_ones(spec, instances, figures, now=int(NOW.timestamp()), scrape_interval=10)
    assert [(i.id, cpu) for i, cpu in chosen] == [("i-idle", 1.0)]


async def test_the_loop_stops_idle_instances_once_with_an_audit_entry_and_a_notification(store):  # noqa: F811
    alarm = ALARM.new(project="default", name="ops", stamp=EARLY, spec=AlarmSpec(
        comparison=">", threshold=1, query="up", expression="up", actions=[{"url": "http://127.0.0.1:9/hook"}]))  # fmt: skip
    await store.commit(Txn([Create(ALARM.dump(alarm)), Create(vm("i-idle", {"env": "dev"})),
                            Create(vm("i-busy", {"env": "dev"}))]))  # fmt: skip
    ctx = Context.system("t", project="default")
    fake = FakeQuery({"i-idle": (1.0, 700), "i-busy": (50.0, 700)})
    body = PolicyCreate(name="dev-nights", selector="label:env=dev", idle=7200, alarm="ops")
    # a dry run stores nothing and says what it would stop
    dry = await policies.create(ctx, store, msgspec.structs.replace(body, dry_run=True), query=fake,
                                scrape_interval=10, now=NOW)  # fmt: skip
    assert dry.dry_run and [a.instance_id for a in dry.actions] == ["i-idle"] and dry.actions[0].outcome == "would-stop"
    assert await list_all(store, POLICY.name) == []
    await policies.create(ctx, store, body, query=fake, scrape_interval=10, now=NOW)
    loop = policies.PolicyLoop(store, lambda: fake, scrape_interval=10)
    loop.wall = lambda: NOW
    plan = loop.decide(await loop.snapshot(), NOW)
    assert (await loop.act(plan)).summary == "stopped 1 idle instances"
    idle = await store.get("instance", "i-idle")
    assert idle.spec["power"] == "stopped" and (await store.get("instance", "i-busy")).spec["power"] == "running"
    outbox = [ALARM_DELIVERY.load(r) for r in await list_all(store, ALARM_DELIVERY.name)]
    assert (
        len(outbox) == 1
        and '"type":"auto-stop"' in outbox[0].spec.body
        and '"instance":"i-idle"' in outbox[0].spec.body
    )
    entries = [r for r in await list_all(store, audit.KIND) if "i-idle" in str(r.spec)]
    assert entries and "policy:dev-nights" in str(entries[-1].spec)
    shown = policies.view(await policies.get(store, "default", "dev-nights"))
    assert [(a.instance_id, a.outcome) for a in shown.actions] == [("i-idle", "stopped")]
    # next cycle: the stopped instance is not a candidate again; nothing more is sent
    plan = loop.decide(await loop.snapshot(), NOW)
    assert not plan and len(await list_all(store, ALARM_DELIVERY.name)) == 1
    # no metrics database: the policy says so and stops nothing
    await store.commit(Txn([Create(vm("i-idle2", {"env": "dev"}))]))
    blind = policies.PolicyLoop(store, lambda: None, scrape_interval=10)
    blind.wall = lambda: NOW
    plan = blind.decide(await blind.snapshot(), NOW)
    assert not plan.stops and "no metrics" in plan.errors[0][1]
    await blind.act(plan)
    assert "no metrics" in (await policies.get(store, "default", "dev-nights")).status.last_error


async def test_policies_api_members_manage_their_projects_policies(api):  # noqa: F811
    assert (await api.post("/v1/projects", json={"name": "pa"})).status == 201
    body = {"name": "dev", "selector": "label:env=dev", "idle": 7200}
    r = await api.post("/v1/policies?project=pa", json=body)
    assert r.status == 201, await r.text()
    assert (await r.json())["selector"] == {"env": "dev"}
    assert (await api.post("/v1/policies?project=pa", json={**body, "name": "x", "idle": 60})).status == 422
    assert (await api.post("/v1/policies?project=pa", json={**body, "name": "y", "selector": "env"})).status == 422
    r = await api.post("/v1/policies?project=pa", json={**body, "name": "z", "dry_run": True})
    assert r.status == 503  # a dry run needs the metrics; this test node has none
    assert [p["name"] for p in await (await api.get("/v1/policies?project=pa")).json()] == ["dev"]
    assert (await api.delete("/v1/policies/dev?project=pa")).status == 204
    assert (await api.get("/v1/policies/dev?project=pa")).status == 404
