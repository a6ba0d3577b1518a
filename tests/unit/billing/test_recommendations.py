"""Savings recommendations: each kind with its evidence and the monthly saving at the prices in force."""

from __future__ import annotations

import datetime as _dt

from minicloud.api.keys import STORE
from minicloud.billing import ledger
from minicloud.billing.recommendations import by_instance, recommend
from minicloud.model.metrics import MetricsResult
from minicloud.state import Create, Record, Txn
from tests.unit.api.conftest import api  # noqa: F401  (fixture)
from tests.unit.billing.test_billing_api import _member
from tests.unit.billing.test_metering import set_price, store  # noqa: F401  (fixture)

NOW = _dt.datetime(2026, 11, 30, 12, tzinfo=_dt.UTC)
T = "2026-10-01T00:00:00.000Z"


def rec(kind: str, rid: str, name: str, spec: dict, status: dict | None = None, project: str = "default") -> Record:
    return Record(kind=kind, id=rid, project=project, name=name, labels={}, spec=spec, status=status or {},
                  created_at=T, updated_at=T)  # fmt: skip


def vm(rid: str, vcpus: int, mib: int, rtype: str) -> Record:
    return rec("instance", rid, rid, {"type": rtype, "vcpus": vcpus, "memory_mib": mib, "disk_gib": 10},
               {"state": "running"})  # fmt: skip


TYPES = [rec("instancetype", f"it-{n}", n, {"vcpus": c, "memory_mib": m, "disk_gib": 10}, project="")
         for n, c, m in (("small", 1, 1024), ("medium", 2, 4096), ("large", 8, 16384))]  # fmt: skip


async def test_each_kind_with_its_evidence_and_saving(store):  # noqa: F811
    for meter, amount in (("compute.vcpu-hour", "0.01"), ("compute.memory-gib-hour", "0.002"),
                          ("storage.volume-gib-hour", "0.0001"), ("storage.snapshot-gib-hour", "0.00005"),
                          ("network.floating-ip-hour", "0.005")):  # fmt: skip
        await set_price(store, meter, amount)
    prices = await ledger.load_prices(store)
    metrics = {
        "i-idle": {"avg_cpu": 1.5, "p95_cpu": 3.0, "p95_memory_bytes": 200 * 2**20},
        # 8 vCPUs at p95 15 % -> 1.2 x 1.25 = 1.5 -> 2 vCPUs; memory p95 3 GiB x 1.25 = 3.75 GiB -> medium
        "i-big": {"avg_cpu": 10.0, "p95_cpu": 15.0, "p95_memory_bytes": 3 * 2**30},
        "i-busy": {"avg_cpu": 70.0, "p95_cpu": 95.0, "p95_memory_bytes": 15 * 2**30},
    }
    items = recommend(
        instances=[vm("i-idle", 2, 4096, "medium"), vm("i-big", 8, 16384, "large"), vm("i-busy", 8, 16384, "large")],
        volumes=[rec("volume", "vol-1", "loose", {"size_gib": 100}),
                 rec("volume", "vol-2", "used", {"size_gib": 100, "attachment": {"instance": "i-big"}})],
        snapshots=[rec("snapshot", "snap-1", "old", {"size_gib": 20, "volume_name": "loose"})],
        floating_ips=[rec("floatingip", "fip-1", "spare", {"address": "203.0.113.5"}),
                      rec("floatingip", "fip-2", "web", {"address": "203.0.113.6", "instance": "i-big"})],
        types=TYPES, prices=prices, metrics=metrics, now=NOW, days=7,
    )  # fmt: skip
    got = {(r.kind, r.resource_id): r for r in items}
    assert set(got) == {("idle", "i-idle"), ("rightsize", "i-big"), ("unattached-volume", "vol-1"),
                        ("old-snapshot", "snap-1"), ("unassociated-floating-ip", "fip-1")}  # fmt: skip
    # idle: 2 vCPUs x 0.01 + 4 GiB x 0.002 = 0.028/h x 730 = 20.44
    assert (
        got[("idle", "i-idle")].monthly_saving == "20.44" and got[("idle", "i-idle")].evidence["avg_cpu_percent"] == 1.5
    )
    big = got[("rightsize", "i-big")]
    # large 8 x 0.01 + 16 x 0.002 = 0.112/h; medium 0.028/h: (0.112 - 0.028) x 730 = 61.32
    assert big.evidence["suggested_type"] == "medium" and big.monthly_saving == "61.32" and big.currency == "EUR"
    assert got[("unattached-volume", "vol-1")].monthly_saving == "7.3"  # 100 x 0.0001 x 730
    assert got[("old-snapshot", "snap-1")].evidence["age_days"] == 60
    assert got[("unassociated-floating-ip", "fip-1")].monthly_saving == "3.65"
    assert items[0].kind == "rightsize"  # the largest saving first
    # no metrics: no instance recommendations, the rest stays
    without = recommend(instances=[vm("i-idle", 2, 4096, "medium")], volumes=[], snapshots=[], floating_ips=[],
                        types=TYPES, prices=prices, metrics=None, now=NOW, days=7)  # fmt: skip
    assert without == []


def test_metric_results_by_instance():
    results = {"avg_cpu": MetricsResult(result_type="vector", result=[
        {"metric": {"instance_id": "i-1"}, "value": [1, "2.5"]}, {"metric": {"instance_id": "i-2"}, "value": [1, "NaN"]},
    ])}  # fmt: skip
    assert by_instance(results) == {"i-1": {"avg_cpu": 2.5}}


async def test_recommendations_api_is_per_project_and_says_when_metrics_are_missing(api):  # noqa: F811
    assert (await api.post("/v1/projects", json={"name": "pa"})).status == 201
    st = api.app[STORE]
    await st.commit(Txn([Create(rec("volume", "vol-9", "loose", {"size_gib": 5}, project="pa")),
                         Create(rec("instance", "i-9", "vm", {"vcpus": 1, "memory_mib": 512}, {"state": "running"},
                                    project="pa"))]))  # fmt: skip
    viewer = await _member(api, "vera", "pa", role="viewer")
    r = await api.get("/v1/costs/recommendations?project=pa&days=3", headers=viewer)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert [i["kind"] for i in body["items"]] == ["unattached-volume"] and body["days"] == 3
    assert body["metrics"].startswith("unavailable")  # this test node runs no metrics database
    assert (await api.get("/v1/costs/recommendations?project=pa&days=365", headers=viewer)).status == 422
    assert (await api.get("/v1/costs/recommendations?project=default", headers=viewer)).status == 404
