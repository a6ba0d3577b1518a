"""The networking API through the test client: create/list/show/patch/delete, the verbs, problems for bad input,
external networks for administrators only, project isolation."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Awaitable

from aiohttp import web

from minicloud.api.app import create_app
from minicloud.api.keys import STORE
from minicloud.cli.main import main
from minicloud.iam import apikeys
from minicloud.state import Create, Txn
from tests.unit.api.conftest import FakeHost, make_config


async def _ok(resp, status=200):
    assert resp.status == status, await resp.text()
    return await resp.json() if status != 204 else None


async def _problem(resp, status):
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    return await resp.json()


async def _member(api, project="p1"):
    assert (await api.post("/v1/projects", json={"name": project})).status == 201
    user = await _ok(await api.post("/v1/users", json={"name": "mia"}), 201)
    grant = {"role": "member", "principal": "user:mia", "scope_project": project}
    await _ok(await api.post(f"/v1/rolebindings?project={project}", json=grant), 201)
    record, token = apikeys.new_key(project, "mia-key", "", None, {}, principal=f"user:{user['id']}")
    await api.app[STORE].commit(Txn([Create(record)]))
    return {"Authorization": f"Bearer {token}"}


async def test_a_vpc_with_a_subnet_and_a_router_end_to_end(api):
    net = await _ok(await api.post("/v1/networks", json={"name": "vpc", "cidr": "10.0.0.0/16"}), 201)
    assert (net["vni"], net["mtu"], net["external"]) == (4096, 1450, False)
    sub = await _ok(await api.post("/v1/subnets", json={"name": "web", "network": "vpc", "cidr": "10.0.1.0/24"}), 201)
    assert (sub["gateway"], sub["allocation_start"], sub["network"]) == ("10.0.1.1", "10.0.1.2", net["id"])
    shown = await _ok(await api.get("/v1/networks/vpc"))
    assert shown["subnets"] == [sub["id"]]
    listed = await _ok(await api.get("/v1/subnets"))
    assert [s["name"] for s in listed["items"]] == ["web"]
    patched = await _ok(await api.patch("/v1/networks/vpc", json={"description": "prod"}))
    assert patched["description"] == "prod"
    await _ok(await api.post("/v1/routers", json={"name": "r"}), 201)
    r = await _ok(await api.post("/v1/routers/r/add-subnet", json={"subnet": "web"}))
    assert r["subnets"] == [sub["id"]]
    r = await _ok(await api.post("/v1/routers/r/add-route", json={"destination": "10.9.0.0/16", "nexthop": "10.0.1.9"}))
    assert r["routes"] == [{"destination": "10.9.0.0/16", "nexthop": "10.0.1.9"}]
    p = await _problem(await api.delete("/v1/networks/vpc"), 409)
    assert "subnet 'web'" in p["detail"]
    p = await _problem(await api.delete("/v1/subnets/web"), 409)
    assert "router 'r'" in p["detail"]
    await _ok(await api.post("/v1/routers/r/remove-route", json={"destination": "10.9.0.0/16", "nexthop": "10.0.1.9"}))
    await _ok(await api.post("/v1/routers/r/remove-subnet", json={"subnet": "web"}))
    await _ok(await api.delete("/v1/routers/r"), 204)
    await _ok(await api.delete("/v1/subnets/web"), 204)
    await _ok(await api.delete("/v1/networks/vpc"), 204)
    assert (await _ok(await api.get("/v1/networks")))["items"] == []


async def test_bad_input_is_a_4xx_problem(api):
    p = await _problem(await api.post("/v1/networks", json={"name": "vpc", "cidr": "10.0.0.300/16"}), 422)
    assert p["invalid_params"][0]["name"] == "cidr"
    await _ok(await api.post("/v1/networks", json={"name": "vpc", "cidr": "10.0.0.0/16"}), 201)
    sub = {"name": "a", "network": "vpc", "cidr": "10.1.0.0/24"}
    assert "outside" in (await _problem(await api.post("/v1/subnets", json=sub), 422))["detail"]
    sub["cidr"], sub["gateway"] = "10.0.1.0/24", "10.0.2.1"
    assert (await _problem(await api.post("/v1/subnets", json=sub), 422))["invalid_params"][0]["name"] == "gateway"
    del sub["gateway"]
    await _ok(await api.post("/v1/subnets", json=sub), 201)
    sub["name"], sub["cidr"] = "b", "10.0.1.128/25"
    assert "overlaps" in (await _problem(await api.post("/v1/subnets", json=sub), 409))["detail"]
    await _ok(await api.post("/v1/security-groups", json={"name": "web"}), 201)
    bad = {"direction": "ingress", "protocol": "tcp", "port_min": 443, "port_max": 80}
    p = await _problem(await api.post("/v1/security-groups/web/rules", json=bad), 422)
    assert p["invalid_params"][0]["name"] == "port_max"
    bad = {"direction": "ingress", "protocol": "tcp", "port_min": 70000}
    await _problem(await api.post("/v1/security-groups/web/rules", json=bad), 422)
    await _problem(await api.post("/v1/routers", json={"name": "r", "external_network": "nope"}), 404)


async def test_security_group_rules_and_the_default_group(api):
    g = await _ok(await api.post("/v1/security-groups", json={"name": "web"}), 201)
    names = [x["name"] for x in (await _ok(await api.get("/v1/security-groups")))["items"]]
    assert names == ["default", "web"]
    rule = {"direction": "ingress", "protocol": "tcp", "port_min": 22, "remote_group": "default"}
    g = await _ok(await api.post("/v1/security-groups/web/rules", json=rule))
    added = g["rules"][-1]
    assert (added["port_min"], added["port_max"], added["remote_cidr"]) == (22, 22, None)
    p = await _problem(await api.delete("/v1/security-groups/default"), 409)
    assert "'web'" in p["detail"]
    g = await _ok(await api.delete(f"/v1/security-groups/web/rules/{added['id']}"))
    assert added["id"] not in [r["id"] for r in g["rules"]]
    await _problem(await api.delete(f"/v1/security-groups/web/rules/{added['id']}"), 404)
    await _ok(await api.delete("/v1/security-groups/default"), 204)


async def test_external_networks_are_admin_only_and_shared_with_routers_of_every_project(api):
    member = await _member(api)
    ext = {
        "name": "public",
        "cidr": "192.0.2.0/24",
        "external": True,
        "provider": "lan",
        "pool": "192.0.2.10-192.0.2.20",
    }
    p = await _problem(await api.client.post("/v1/networks?project=p1", json=ext, headers=member), 403)
    assert "admin:networks:create" in p["detail"]
    net = await _ok(await api.post("/v1/networks", json=ext), 201)
    assert (net["external"], net["vni"], net["provider"]) == (True, None, "lan")
    body = {"name": "r", "external_network": "public"}
    r = await _ok(await api.client.post("/v1/routers?project=p1", json=body, headers=member), 201)
    assert r["external_address"] == "192.0.2.10"
    p = await _problem(await api.delete("/v1/networks/public"), 409)
    assert "router 'r'" in p["detail"]
    # The member's own networks: invisible to other projects.
    await _ok(
        await api.client.post("/v1/networks?project=p1", json={"name": "v", "cidr": "10.0.0.0/16"}, headers=member), 201
    )
    assert (await _ok(await api.get("/v1/networks")))["items"][0]["name"] == "public"
    assert [n["name"] for n in (await _ok(await api.get("/v1/networks?project=p1")))["items"]] == ["v"]
    await _problem(await api.client.get("/v1/networks/public?project=p1", headers=member), 404)


async def test_the_cli_nouns_through_the_sdk(tmp_path):
    """``network``, ``subnet``, ``security-group [rule add|remove]`` and ``router [add-subnet|route add …]`` through
    the real CLI parser, the SDK and the API on a Unix socket."""
    app = create_app(make_config(tmp_path), host=FakeHost())
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    try:

        def cli(*argv: str) -> dict:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["--socket", sock, "-o", "json", *argv]) == 0
            return json.loads(out.getvalue()) if out.getvalue().strip() else {}

        def run(*argv: str) -> Awaitable[dict]:
            return asyncio.to_thread(cli, *argv)

        net = await run("network", "create", "vpc", "--cidr", "10.0.0.0/16")
        assert net["vni"] == 4096
        sub = await run("subnet", "create", "web", "--network", "vpc", "--cidr", "10.0.1.0/24", "--route",
                        "10.9.0.0/16=10.0.1.254", "--dns-server", "1.1.1.1")  # fmt: skip
        assert sub["routes"] == [{"destination": "10.9.0.0/16", "nexthop": "10.0.1.254"}]
        g = await run("security-group", "rule", "add", "default", "ingress", "--protocol", "tcp", "--port", "80-81")
        rule = g["rules"][-1]
        assert (rule["port_min"], rule["port_max"]) == (80, 81)
        g = await run("security-group", "rule", "remove", "default", rule["id"])
        assert rule["id"] not in [r["id"] for r in g["rules"]]
        assert (await run("security-group", "create", "closed", "--no-egress"))["rules"] == []
        await run("router", "create", "edge")
        assert (await run("router", "add-subnet", "edge", "web"))["subnets"] == [sub["id"]]
        r = await run("router", "route", "add", "edge", "10.8.0.0/16", "10.0.1.7")
        assert r["routes"] == [{"destination": "10.8.0.0/16", "nexthop": "10.0.1.7"}]
        await run("router", "route", "remove", "edge", "10.8.0.0/16", "10.0.1.7")
        await run("router", "remove-subnet", "edge", "web")
        await run("router", "delete", "edge")
        await run("subnet", "delete", "web")
        await run("network", "delete", "vpc")
        assert await run("network", "list") == []
    finally:
        await runner.cleanup()


async def test_a_repeated_create_under_one_idempotency_key_allocates_once(api):
    key = {"Idempotency-Key": "net-1"}
    first = await _ok(await api.post("/v1/networks", json={"name": "vpc", "cidr": "10.0.0.0/16"}, headers=key), 201)
    again = await api.post("/v1/networks", json={"name": "vpc", "cidr": "10.0.0.0/16"}, headers=key)
    assert again.status == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert (await again.json())["vni"] == first["vni"]
    records = await api.app[STORE].list("vni", project="", limit=10)
    assert [r.name for r in records] == [str(first["vni"])]
