"""The billing API: members see only their project's costs, prices and invoice close are admins', bad input 422."""

from __future__ import annotations

import json

from minicloud.api.keys import STORE
from minicloud.billing import ledger
from minicloud.billing.meters import hour_text
from minicloud.iam import apikeys
from minicloud.state import Create, Txn
from tests.unit.api.conftest import api  # noqa: F401  (fixture)


async def _member(api, name: str, project: str, role: str = "member") -> dict[str, str]:  # noqa: F811
    user = await api.post("/v1/users", json={"name": name})
    assert user.status == 201
    grant = {"role": role, "principal": f"user:{name}", "scope_project": project}
    assert (await api.post(f"/v1/rolebindings?project={project}", json=grant)).status == 201
    record, token = apikeys.new_key(project, f"{name}-key", "", None, {}, principal=f"user:{(await user.json())['id']}")
    await api.app[STORE].commit(Txn([Create(record)]))
    return {"Authorization": f"Bearer {token}"}


async def _charge(store, project: str, amount: str) -> None:
    head = await ledger.head_of(store, project)
    charge = {"usage_id": f"use-{project}", "project": project, "resource_kind": "volume", "resource_id": "vol-1",
              "resource_name": "data", "meter": "storage.volume-gib-hour", "service": "storage",
              "hour": hour_text(1793700000), "quantity": 3600, "unit": "GiB-second", "pricing_unit": "GiB-hour",
              "price": amount, "price_id": "price-x", "currency": "EUR", "amount": amount, "labels": {}, "attrs": {},
              "correction_of": 0}  # fmt: skip
    await store.commit(Txn(ledger.append_ops(project, head, [charge], "2026-11-03T10:00:00.000Z")))


async def test_members_see_only_their_projects_costs_and_admins_set_prices(api):  # noqa: F811
    for project in ("pa", "pb"):
        assert (await api.post("/v1/projects", json={"name": project})).status == 201
    await _charge(api.app[STORE], "pa", "1.5")
    await _charge(api.app[STORE], "pb", "7")
    alice = await _member(api, "alice", "pa")
    viewer = await _member(api, "vera", "pa", role="viewer")
    r = await api.get("/v1/invoices/2026-11?project=pa", headers=alice)
    assert r.status == 200, await r.text()
    assert (await r.json())["totals"] == {"EUR": "1.5"}
    assert (await api.get("/v1/invoices/2026-11?project=pb", headers=alice)).status == 404
    assert (await api.get("/v1/invoices?project=pa", headers=viewer)).status == 200
    r = await api.get("/v1/invoices/2026-11?project=pa&format=csv", headers=viewer)
    assert r.status == 200 and "storage.volume-gib-hour" in await r.text()
    r = await api.get("/v1/billing/verify?project=pa", headers=alice)
    assert (await r.json())["ok"] is True
    assert (await api.get("/v1/billing/verify?project=pa&all=true", headers=alice)).status == 403
    everyone = await (await api.get("/v1/billing/verify?all=true")).json()
    assert {p["project"] for p in everyone["projects"]} == {"pa", "pb"}
    # prices and invoice close are admins'
    body = {"meter": "compute.vcpu-hour", "amount": "0.004", "effective": "2099-01-01"}
    assert (await api.post("/v1/prices?project=pa", json=body, headers=alice)).status == 403
    assert (await api.post("/v1/invoices/2026-10/close?project=pa", headers=alice)).status == 403
    r = await api.post("/v1/prices", json=body)
    assert r.status == 201, await r.text()
    assert (await r.json())["currency"] == "EUR"
    r = await api.post("/v1/prices", json={**body, "meter": "compute.tpu-hour"})
    assert r.status == 422 and "compute.vcpu-hour" in json.dumps(await r.json())
    assert (await api.post("/v1/prices", json={**body, "amount": "-1", "effective": "2099-02-01"})).status == 422
    assert (await api.post("/v1/prices", json={**body, "effective": "2098-06-01"})).status == 422  # overlap
    assert (await api.get("/v1/prices?project=pa", headers=alice)).status == 200
    r = await api.post("/v1/invoices/2099-01/close")
    assert r.status == 422 and "has not ended" in (await r.json())["detail"]


async def test_prices_are_cluster_wide_so_a_project_grant_cannot_set_them(api):  # noqa: F811
    """A price applies to every project: a custom role bound in one project (``billing:*``) does not open it."""
    assert (await api.post("/v1/projects", json={"name": "pa"})).status == 201
    role = {"name": "pa-billing", "allow": ["billing:*"]}
    assert (await api.post("/v1/roles", json=role)).status == 201
    bob = await _member(api, "bob", "pa", role="pa-billing")
    body = {"meter": "compute.vcpu-hour", "amount": "99", "effective": "2099-01-01"}
    r = await api.post("/v1/prices?project=pa", json=body, headers=bob)
    assert r.status == 403, await r.text()
    assert (await api.get("/v1/prices?project=pa", headers=bob)).status == 200


async def test_cost_report_and_focus_export_are_per_project_and_all_for_admins(api):  # noqa: F811
    for project in ("pa", "pb"):
        assert (await api.post("/v1/projects", json={"name": project})).status == 201
    await _charge(api.app[STORE], "pa", "1.5")
    await _charge(api.app[STORE], "pb", "7")
    alice = await _member(api, "alice", "pa", role="viewer")
    r = await api.get("/v1/costs?project=pa&since=2026-11-01&group_by=project", headers=alice)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["totals"] == {"EUR": "1.5"} and [row["group"] for row in body["rows"]] == ["pa"]
    assert (await api.get("/v1/costs?project=pb", headers=alice)).status == 404
    assert (await api.get("/v1/costs?project=pa&all=true", headers=alice)).status == 403
    assert (await api.get("/v1/costs?project=pa&group_by=colour", headers=alice)).status == 422
    everyone = await (await api.get("/v1/costs?all=true&since=2026-11-01&group_by=project")).json()
    assert everyone["totals"] == {"EUR": "8.5"}
    r = await api.get("/v1/costs/focus?project=pa&period=2026-11", headers=alice)
    assert r.status == 200 and r.content_type == "text/csv"
    lines = (await r.text()).splitlines()
    assert lines[0].startswith("BilledCost,BillingAccountId,") and len(lines) == 2 and ",pa,pa," in lines[1]
    assert (await api.get("/v1/costs/focus?project=pa&period=2026-13", headers=alice)).status == 422
    both = await (await api.get("/v1/costs/focus?period=2026-11&all=true")).text()
    assert len(both.splitlines()) == 3
