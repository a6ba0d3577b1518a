"""Instance NICs through the API and the CLI parser, on one node with the fake hypervisor: ``nics`` on create, the
NICs in the instance's view, the issue's 4xx, hot-plug routes, and the port plugged once the node's network exists."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from agent.node import NODE_NETWORKS
from minicloud.cli.instance import parse_nic
from minicloud.cli.main import build_parser
from tests.unit.api.test_compute_api import _image, _wait_state
from tests.unit.api.test_network_api import _member


async def _ok(resp, status):
    assert resp.status == status, await resp.text()
    return await resp.json()


async def _problem(resp, status):
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    return await resp.json()


async def _vpc(api, query=""):
    await _ok(await api.post(f"/v1/networks{query}", json={"name": "vpc", "cidr": "10.0.0.0/16"}), 201)
    body = {"name": "web", "network": "vpc", "cidr": "10.0.1.0/24", "allocation_end": "10.0.1.11"}
    return await _ok(await api.post(f"/v1/subnets{query}", json=body), 201)


def _create(name, *nics):
    return {"name": name, "image": "guest", "type": "m1.tiny", "nics": list(nics)}


async def test_an_instance_with_nics_shows_them_and_runs_once_its_network_is_built_here(api):
    await _image(api)
    await _vpc(api)
    net = await _ok(await api.get("/v1/networks/vpc"), 200)
    inst = await _ok(await api.post("/v1/instances", json=_create("vm", {"subnet": "web", "ip": "10.0.1.7"})), 201)
    [nic] = inst["nics"]
    assert (nic["network"], nic["subnet"], nic["ip"], nic["security_groups"]) == ("vpc", "web", "10.0.1.7", ["default"])
    assert nic["network_id"] == net["id"] and nic["mac"].startswith("52:54:00:")
    # the node's network reconciler builds the network (fake drivers here), then the compute reconciler plugs it
    body = await _wait_state(api, "vm", "running")
    assert api.app[NODE_NETWORKS].bridge_for(net["id"]) == f"mcb-{net['vni']:06x}"
    assert body["status"]["addresses"] == [{"network": "vpc", "mac": nic["mac"], "ip": "10.0.1.7"}]
    # hot-plug: add, then remove by address
    added = await _ok(await api.post("/v1/instances/vm/nics", json={"network": "vpc"}), 202)
    assert [n["ip"] for n in added["nics"]] == ["10.0.1.7", "10.0.1.2"]
    removed = await _ok(await api.delete("/v1/instances/vm/nics/10.0.1.7"), 202)
    assert [n["ip"] for n in removed["nics"]] == ["10.0.1.2"]
    await _problem(await api.delete("/v1/instances/vm/nics/10.0.1.7"), 404)
    # the subnet is in use while the instance holds an address of it; deleting the instance frees it
    await _problem(await api.delete("/v1/subnets/web"), 409)
    await _ok(await api.delete("/v1/instances/vm"), 202)
    for _ in range(200):
        if (await api.get("/v1/instances/vm")).status == 404:
            break
        await asyncio.sleep(0.02)
    assert (await api.delete("/v1/subnets/web")).status == 204
    for _ in range(200):  # no port of the network is left on the node: the network reconciler removed it
        if api.app[NODE_NETWORKS].bridge_for(net["id"]) is None:
            break
        await asyncio.sleep(0.02)
    assert api.app[NODE_NETWORKS].bridge_for(net["id"]) is None


async def test_bad_nics_are_4xx_problems(api):
    await _image(api)
    ours = await _vpc(api)
    member = await _member(api)  # project p1 with its own network and group
    await _vpc(api, "?project=p1")
    await _ok(await api.client.post("/v1/security-groups?project=p1", json={"name": "theirs"}, headers=member), 201)
    await _ok(await api.post("/v1/instances", json=_create("a", {"subnet": "web", "ip": "10.0.1.5"})), 201)
    cases = [
        ({"subnet": "web", "ip": "10.0.1.5"}, 409, "already used"),
        ({"subnet": "nope"}, 404, "subnet"),
        ({"subnet": "web", "security_groups": ["theirs"]}, 404, "security group"),
        ({"subnet": "web", "network": "vpc"}, 422, "either a subnet or a network"),
        ({"subnet": "web", "ip": "10.0.9.1"}, 422, "not a host address"),
    ]
    for nic, status, words in cases:
        p = await _problem(await api.post("/v1/instances", json=_create("b", nic)), status)
        assert words in p["detail"], p
    # the pool (10.0.1.2-10.0.1.11, .5 taken) runs out: 409
    many = [{"subnet": "web"}] * 8
    await _ok(await api.post("/v1/instances", json=_create("c", *many)), 201)
    await _ok(await api.post("/v1/instances", json=_create("d", {"subnet": "web"})), 201)
    p = await _problem(await api.post("/v1/instances", json=_create("e", {"subnet": "web"})), 409)
    assert "no free address" in p["detail"]
    # a subnet of another project, even by id: 404
    await _image(api, project="p1")
    body = _create("m", {"subnet": ours["id"]})
    p = await _problem(await api.client.post("/v1/instances?project=p1", json=body, headers=member), 404)
    assert "subnet" in p["detail"]


def test_the_cli_parses_nics_as_the_issue_writes_them():
    assert parse_nic("subnet=web,ip=10.0.1.5,security-groups=web+ssh") == {
        "subnet": "web",
        "ip": "10.0.1.5",
        "security_groups": ["web", "ssh"],
    }
    assert parse_nic("network=public") == {"network": "public"}
    for bad in ("subnet=a,network=b", "ip=10.0.0.1", "subnet=", "colour=red", "subnet=a,subnet=b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_nic(bad)
    args = build_parser().parse_args(
        ["instance", "create", "vm", "--image", "g", "--type", "t", "--nic", "subnet=S,ip=A", "--nic", "network=N"]
    )
    assert args.nic == [{"subnet": "S", "ip": "A"}, {"network": "N"}]
    args = build_parser().parse_args(["instance", "nic", "add", "vm", "--subnet", "S", "--security-group", "g"])
    assert (args.subnet, args.security_groups) == ("S", ["g"])
    args = build_parser().parse_args(["instance", "nic", "remove", "vm", "10.0.1.5"])
    assert args.nic == "10.0.1.5"
