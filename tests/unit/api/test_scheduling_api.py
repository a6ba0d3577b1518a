"""Server groups, node states and the placement hints over HTTP on one node with the fake hypervisor: problem+json
for bad input (unknown zone, a group of another project, --node for a project member, a bad policy), members shown,
delete refused while there are members, cordon refused for a node running alone."""

from __future__ import annotations

import asyncio

from minicloud.api.keys import CONFIG, STORE
from minicloud.compute.kinds import HYPERVISOR
from minicloud.iam import apikeys
from minicloud.state import Create, Txn


async def _kernel_image(api, project: str = "default") -> None:
    d = api.app[CONFIG].data_path / "import"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vmlinuz").write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    resp = await api.post(f"/v1/images?project={project}", json={"name": "guest", "kernel": str(d / "vmlinuz")})
    assert resp.status == 201, await resp.text()


async def _published(api) -> None:
    for _ in range(200):
        if await api.app[STORE].get_by_name(HYPERVISOR.name, "", "n1") is not None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the node never published its capacity")


async def test_server_groups_and_placement_hints_over_http(api):
    await _kernel_image(api)
    await _published(api)
    bad = await api.post("/v1/server-groups", json={"name": "g", "policy": "together"})
    assert bad.status == 422
    resp = await api.post("/v1/server-groups", json={"name": "g", "policy": "anti-affinity"})
    assert resp.status == 201
    group = await resp.json()
    assert (group["policy"], group["scope"], group["members"]) == ("anti-affinity", "node", [])
    inst = {"name": "vm1", "image": "guest", "type": "m1.tiny", "server_group": "g"}
    resp = await api.post("/v1/instances", json=inst)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["server_group"] == group["id"] and body["status"]["placement"].startswith("spread: ")
    shown = await (await api.get("/v1/server-groups/g")).json()
    assert shown["members"] == [body["id"]] and shown["member_nodes"] == ["n1"]
    # one node: a second member has nowhere to go
    resp = await api.post("/v1/instances", json={**inst, "name": "vm2"})
    problem = await resp.json()
    assert resp.status == 409 and "anti-affinity group 'g' already has a member in this node" in problem["detail"]
    listed = await (await api.get("/v1/server-groups")).json()
    assert [(g["name"], g["members"]) for g in listed["items"]] == [("g", [body["id"]])]
    resp = await api.delete("/v1/server-groups/g")
    assert resp.status == 409 and "has 1 member" in (await resp.json())["detail"]
    # bad hints
    resp = await api.post("/v1/instances", json={"name": "z", "image": "guest", "type": "m1.tiny", "zone": "eu-1"})
    problem = await resp.json()
    assert resp.status == 400 and problem["invalid_params"][0]["name"] == "zone", problem
    resp = await api.post("/v1/instances", json={"name": "z", "image": "guest", "type": "m1.tiny", "zone": "Bad Zone"})
    assert resp.status == 422
    resp = await api.post("/v1/instances", json={"name": "z", "image": "guest", "type": "m1.tiny", "node": "n7"})
    assert resp.status == 400 and "no compute node 'n7'" in (await resp.json())["detail"]
    # a group of another project is unknown; --node is refused to a project member
    assert (await api.post("/v1/projects", json={"name": "p2"})).status == 201
    await _kernel_image(api, "p2")
    resp = await api.post("/v1/instances?project=p2", json={**inst, "name": "x", "server_group": group["id"]})
    problem = await resp.json()
    assert resp.status == 404 and "no server group" in problem["detail"], problem
    mia = await (await api.post("/v1/users", json={"name": "mia"})).json()
    grant = {"role": "member", "principal": "user:mia", "scope_project": "default"}
    assert (await api.post("/v1/rolebindings", json=grant)).status == 201
    record, token = apikeys.new_key("default", "mia-key", "", None, {}, principal=f"user:{mia['id']}")
    await api.app[STORE].commit(Txn([Create(record)]))
    auth = {"Authorization": f"Bearer {token}"}
    pinned = {"name": "mine", "image": "guest", "type": "m1.tiny", "node": "n1"}
    resp = await api.client.post("/v1/instances", json=pinned, headers=auth)
    assert resp.status == 403, await resp.text()
    assert (await api.client.get("/v1/nodes", headers=auth)).status == 403
    assert (await api.client.post("/v1/nodes/n1/cordon", json={}, headers=auth)).status == 403


async def test_node_list_and_cordon_on_a_node_running_alone(api):
    await _published(api)
    [node] = await (await api.get("/v1/nodes")).json()
    assert (node["name"], node["scheduling"], node["instances"]) == ("n1", "schedulable", 0) and node["vcpus"] > 0
    resp = await api.post("/v1/nodes/n1/cordon", json={"reason": "maintenance"})
    assert resp.status == 409 and "runs alone" in (await resp.json())["detail"]
    resp = await api.post("/v1/nodes/nope/cordon", json={})
    assert resp.status == 404
    resp = await api.post("/v1/nodes/n1/cordon", json={"reason": "x" * 300})
    assert resp.status == 422
