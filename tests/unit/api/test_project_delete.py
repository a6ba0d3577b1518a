"""Deleting a project takes its role bindings with it, atomically, and nothing slips into it meanwhile (issue 9
§2.2)."""

from __future__ import annotations

import msgspec
import pytest

from minicloud import ids
from minicloud.api.keys import STORE
from minicloud.iam import tenancy
from minicloud.state import Create, Record, Txn, TxnFailed, Update
from tests.conftest import make_ssh_key


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _owner_of(api, project: str, user: str) -> str:
    assert (await api.post("/v1/users", json={"name": user})).status == 201
    grant = {"role": "owner", "principal": f"user:{user}", "scope_project": project}
    assert (await api.post(f"/v1/rolebindings?project={project}", json=grant)).status == 201
    key = await api.post("/v1/apikeys", json={"name": f"{user}-key", "user": user})  # in default: p stays empty
    return (await key.json())["secret"]


async def test_a_recreated_project_grants_nothing_to_the_deleted_ones_owner(api):
    assert (await api.post("/v1/projects", json={"name": "p"})).status == 201
    token = await _owner_of(api, "p", "olga")
    assert (await api.client.get("/v1/keypairs?project=p", headers=bearer(token))).status == 200

    assert (await api.delete("/v1/projects/p")).status == 204
    assert [b for b in await api.app[STORE].list("rolebinding") if b.spec.get("project") == "p"] == []
    assert (await api.post("/v1/projects", json={"name": "p"})).status == 201

    c = api.client
    assert (await c.get("/v1/keypairs?project=p", headers=bearer(token))).status == 404
    made = await c.post(
        "/v1/keypairs?project=p", json={"name": "k", "public_key": make_ssh_key()}, headers=bearer(token)
    )
    assert made.status == 404
    grant = {"role": "owner", "principal": "user:olga", "scope_project": "p"}
    assert (await c.post("/v1/rolebindings?project=p", json=grant, headers=bearer(token))).status == 404


async def test_a_project_that_is_not_empty_stays_and_keeps_working(api):
    assert (await api.post("/v1/projects", json={"name": "busy"})).status == 201
    made = await api.post("/v1/keypairs?project=busy", json={"name": "k", "public_key": make_ssh_key()})
    assert made.status == 201
    refused = await api.delete("/v1/projects/busy")
    assert refused.status == 409 and "keypairs" in (await refused.json())["detail"]
    again = await api.post("/v1/keypairs?project=busy", json={"name": "k2", "public_key": make_ssh_key()})
    assert again.status == 201  # marked active again
    assert (await api.delete("/v1/projects/default")).status == 409


async def test_a_create_in_flight_when_its_project_is_deleted_fails_instead_of_surviving_it(api):
    store = api.app[STORE]
    assert (await api.post("/v1/projects", json={"name": "gone"})).status == 201
    stamp = ids.now()
    thing = Record(kind="keypair", id=ids.new_id("kp"), project="gone", name="late", created_at=stamp, updated_at=stamp)
    ops = [Create(thing)]
    guards = await tenancy.guards(store, ops)  # read before the delete: the project is active
    assert len(guards) == 1
    assert (await api.delete("/v1/projects/gone")).status == 204  # empty at its check
    with pytest.raises(TxnFailed):
        await store.commit(Txn([*ops, *guards]))
    assert await store.get("keypair", thing.id) is None


async def test_creates_are_refused_while_a_project_is_marked_deleting(api):
    store = api.app[STORE]
    assert (await api.post("/v1/projects", json={"name": "closing"})).status == 201
    project = await store.get_by_name("project", "", "closing")
    marked = msgspec.structs.replace(project, status={"state": tenancy.DELETING})
    await store.commit(Txn([Update(marked, expect_revision=project.revision)]))
    made = await api.post("/v1/keypairs?project=closing", json={"name": "k", "public_key": make_ssh_key()})
    assert made.status == 409 and "being deleted" in (await made.json())["detail"]
