"""Projects as the tenancy boundary, and the append-only audit log."""

from __future__ import annotations

import msgspec
import pytest

from minicloud.api.keys import STORE
from minicloud.api.middleware import flush_refusals
from minicloud.state import Txn, TxnFailed, Update
from tests.conftest import make_ssh_key
from tests.unit.api.test_conventions import problem


async def make(api, name, project=None):
    q = f"?project={project}" if project else ""
    return await api.post(f"/v1/keypairs{q}", json={"name": name, "public_key": make_ssh_key()})


async def test_projects_isolate_resources_and_names_repeat_across_them(api):
    assert (await api.post("/v1/projects", json={"name": "web", "description": "the web team"})).status == 201
    here = await (await make(api, "same")).json()
    there = await (await make(api, "same", "web")).json()
    assert here["project"] == "default" and there["project"] == "web" and here["id"] != there["id"]
    assert [k["id"] for k in (await (await api.get("/v1/keypairs")).json())["items"]] == [here["id"]]
    assert [k["id"] for k in (await (await api.get("/v1/keypairs?project=web")).json())["items"]] == [there["id"]]
    # Another project's resource is 404 by id or name, never 403: names do not leak.
    await problem(await api.get(f"/v1/keypairs/{there['id']}"), 404)
    assert (await api.get(f"/v1/keypairs/{there['id']}?project=web")).status == 200
    await problem(await api.delete(f"/v1/keypairs/{there['id']}"), 404)


async def test_unknown_or_malformed_projects_are_404(api):
    for project in ("nope", "../etc", "a'b"):
        p = await problem(await api.get(f"/v1/keypairs?project={project}"), 404)
        assert "project list" in p["detail"]


async def test_projects_are_deleted_only_when_empty(api):
    await api.post("/v1/projects", json={"name": "tmp"})
    await make(api, "k", "tmp")
    p = await problem(await api.delete("/v1/projects/tmp"), 409)
    assert "keypairs" in p["detail"]
    assert (await api.delete("/v1/keypairs/k?project=tmp")).status == 204
    assert (await api.delete("/v1/projects/tmp")).status == 204
    await problem(await api.post("/v1/projects", json={"name": "default"}), 409)
    await problem(await api.post("/v1/projects", json={"name": "../x"}), 422)


async def audit(api, **query):
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return (await (await api.get(f"/v1/audit?{q}")).json())["items"]


async def test_allowed_changes_are_audited_in_the_same_transaction(api):
    created = await (await make(api, "audited")).json()
    entries = [e for e in await audit(api, result="allowed") if e["target"].get("name") == "audited"]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["action"] == "compute:keypairs:create" and entry["status"] == 201
    assert entry["principal"] == "user:usr-admin" and entry["project"] == "default"  # by id
    assert entry["target"] == {"kind": "keypair", "id": created["id"], "name": "audited"}
    record = await api.app[STORE].get("audit", entry["id"])
    assert record.revision == created["revision"]  # one transaction: the change and its entry


async def test_failed_and_denied_requests_are_audited_but_reads_are_not(api):
    await make(api, "dup")
    await make(api, "dup")  # 409
    await api.get("/v1/keypairs", anon=True)  # 401
    await api.get("/v1/keypairs")  # an allowed read: not audited
    await flush_refusals(api.app, everything=True)  # refusals (401) are written once a minute, aggregated
    failed = await audit(api, result="failed")
    assert [(e["action"], e["status"]) for e in failed] == [("compute:keypairs:create", 409)]
    denied = await audit(api, result="denied")
    assert [(e["principal"], e["status"], e["method"]) for e in denied] == [("anonymous", 401, "GET")]
    assert all(e["method"] != "GET" or e["result"] == "denied" for e in await audit(api))


async def test_audit_filters_by_user_and_time(api):
    await make(api, "one")
    everyone = await audit(api)
    me = everyone[-1]["principal"]
    assert await audit(api, user=me) == [e for e in everyone if e["principal"] == me]
    assert await audit(api, since="2h") == everyone
    assert await audit(api, since="2099-01-01T00:00:00Z") == []
    await problem(await api.get("/v1/audit?since=yesterday"), 422)


async def test_the_audit_log_is_append_only(api):
    await make(api, "x")
    entry = (await audit(api))[-1]
    store = api.app[STORE]
    record = await store.get("audit", entry["id"])
    with pytest.raises(TxnFailed) as exc:
        await store.commit(Txn([Update(msgspec.structs.replace(record, spec={"result": "forged"}))]))
    assert exc.value.reason == "append-only"
    assert (await store.get("audit", entry["id"])).spec["result"] == "allowed"
