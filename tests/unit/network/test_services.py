"""Networking services without HTTP: validation (4xx naming the fault), race-free overlap and in-use checks,
back-references kept in the same transaction, the default security group."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from minicloud import errors
from minicloud.core import crud
from minicloud.iam.kinds import PROJECT, ProjectSpec
from minicloud.model.network import (
    NetworkCreate,
    Route,
    RouterCreate,
    RouterSubnet,
    SecurityGroupCreate,
    SecurityGroupRuleCreate,
    SubnetCreate,
)
from minicloud.network import ipam, routers
from minicloud.network import security_groups as sg
from minicloud.network.kinds import NETWORK, ROUTER, SECURITY_GROUP, SUBNET
from minicloud.network.networks import create_network, delete_network
from minicloud.network.subnets import create_subnet, delete_subnet
from minicloud.state import Create, Txn
from tests.unit.network.conftest import ctx_of


async def vpc(ctx, store, name="vpc", cidr="10.0.0.0/16", **kw):
    return (await create_network(ctx, store, NetworkCreate(name=name, cidr=cidr), **kw)).body


async def subnet(ctx, store, name, cidr, network="vpc", **kw):
    return (await create_subnet(ctx, store, SubnetCreate(name=name, network=network, cidr=cidr, **kw))).body


async def test_a_network_gets_a_vni_and_the_underlay_mtu_less_50_and_the_project_a_default_group(ctx, store):
    net = await vpc(ctx, store, underlay_mtu=9000)
    assert (net.vni, net.mtu, net.external, net.subnets) == (4096, 8950, False, [])
    default = await crud.get(ctx, store, SECURITY_GROUP, "default")
    rules = [(r.direction, r.protocol, r.remote_cidr, r.remote_group) for r in default.spec.rules]
    assert rules == [("egress", "any", "0.0.0.0/0", None), ("ingress", "any", None, default.id)]


@pytest.mark.parametrize(
    ("cidr", "field"),
    [("10.0.0.0/33", "cidr"), ("banana", "cidr"), ("10.0.0.1/16", "cidr"), ("10.0.0.0/30", "cidr")],
)
async def test_a_bad_cidr_is_422_naming_the_field(ctx, store, cidr, field):
    with pytest.raises(errors.ValidationFailed) as exc:
        await vpc(ctx, store, cidr=cidr)
    assert exc.value.invalid_params[0]["name"] == field


async def test_subnet_validation(ctx, store):
    await vpc(ctx, store)
    with pytest.raises(errors.ValidationFailed, match="outside network 'vpc'"):
        await subnet(ctx, store, "s", "10.1.0.0/24")
    with pytest.raises(errors.ValidationFailed, match=r"not a host address of 10\.0\.1\.0/24") as exc:
        await subnet(ctx, store, "s", "10.0.1.0/24", gateway="10.0.2.1")
    assert exc.value.invalid_params[0]["name"] == "gateway"
    with pytest.raises(errors.ValidationFailed, match="empty"):
        await subnet(ctx, store, "s", "10.0.1.0/24", allocation_start="10.0.1.50", allocation_end="10.0.1.40")
    with pytest.raises(errors.ValidationFailed) as exc:
        await subnet(ctx, store, "s", "10.0.1.0/24", routes=[Route(destination="10.9.0.0/16", nexthop="10.0.9.1")])
    assert exc.value.invalid_params[0]["name"] == "routes.nexthop"
    with pytest.raises(errors.NotFound, match="network"):
        await subnet(ctx, store, "s", "10.0.1.0/24", network="nope")
    s = await subnet(ctx, store, "s", "10.0.1.0/24", gateway="10.0.1.254", dns_servers=["1.1.1.1"])
    assert (s.gateway, s.allocation_start, s.allocation_end, s.dns_servers) == (
        "10.0.1.254", "10.0.1.1", "10.0.1.253", ["1.1.1.1"],
    )  # fmt: skip
    assert (await crud.get(ctx, store, NETWORK, "vpc")).spec.subnets == {s.id: "10.0.1.0/24"}


async def test_overlapping_subnets_are_409_even_when_created_concurrently(ctx, store):
    await vpc(ctx, store)
    await subnet(ctx, store, "a", "10.0.0.0/24")
    with pytest.raises(errors.Conflict, match="overlaps subnet 'a'"):
        await subnet(ctx, store, "b", "10.0.0.128/25")
    # Ten concurrent creates of overlapping CIDRs: exactly one wins, the rest are refused as overlapping.
    results = await asyncio.gather(
        *(subnet(ctx, store, f"c{i}", "10.0.8.0/22" if i % 2 else "10.0.9.0/24") for i in range(10)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    assert len(won) == 1
    assert all(isinstance(r, errors.Conflict) and "overlaps" in str(r) for r in results if r not in won)
    assert len((await crud.get(ctx, store, NETWORK, "vpc")).spec.subnets) == 2


async def test_deleting_a_network_in_use_is_409_naming_its_users_then_frees_its_vni(ctx, store):
    net = await vpc(ctx, store)
    await subnet(ctx, store, "web", "10.0.1.0/24")
    with pytest.raises(errors.InUse, match="subnet 'web'"):
        await delete_network(ctx, store, "vpc")
    await delete_subnet(ctx, store, "web")
    assert await ipam.allocations(store, "sub-none") == []
    assert (await crud.get(ctx, store, NETWORK, "vpc")).spec.subnets == {}
    await delete_network(ctx, store, "vpc")
    assert await ipam.vni_record(store, net.vni) is None
    assert await store.list("ipalloc", project="", limit=10) == []


async def test_a_subnet_with_addresses_held_or_a_router_is_not_deleted(ctx, store):
    await vpc(ctx, store)
    s = await subnet(ctx, store, "web", "10.0.1.0/24")
    obj = await crud.get(ctx, store, SUBNET, "web")
    _, ops = await ipam.allocate(ctx, store, obj, holder="nic/n1")
    await store.commit(Txn(ops))
    with pytest.raises(errors.InUse, match=r"nic/n1 \(10.0.1.2\)"):
        await delete_subnet(ctx, store, "web")
    assert not (await crud.get(ctx, store, SUBNET, "web")).spec.deleting  # unmarked again
    await routers.create_router(ctx, store, RouterCreate(name="r"))
    await routers.add_subnet(ctx, store, "r", RouterSubnet(subnet=s.id))
    with pytest.raises(errors.InUse, match="attached to router 'r'"):
        await delete_subnet(ctx, store, "web")


async def test_external_networks_are_for_administrators_and_routers_take_their_addresses(store):
    admin = ctx_of("default")
    ext = NetworkCreate(
        name="public", cidr="192.0.2.0/24", external=True, provider="lan", pool="192.0.2.100-192.0.2.101"
    )
    net = (await create_network(admin, store, ext)).body
    assert (net.external, net.vni, net.mtu, len(net.subnets)) == (True, None, 1500, 1)
    with pytest.raises(errors.ValidationFailed):
        await create_network(admin, store, NetworkCreate(name="p2", cidr="10.0.0.0/16", provider="lan"))
    # A router in another project finds the external network by name and takes the pool's lowest address.
    p = ctx_of("p1")
    await store.commit(Txn([Create(PROJECT.dump(PROJECT.new(project="", name="p1", spec=ProjectSpec())))]))
    r1 = (await routers.create_router(p, store, RouterCreate(name="r1", external_network="public"))).body
    r2 = (await routers.create_router(p, store, RouterCreate(name="r2", external_network=net.id))).body
    assert (r1.external_address, r2.external_address) == ("192.0.2.100", "192.0.2.101")
    with pytest.raises(errors.Conflict, match="no free address"):
        await routers.create_router(p, store, RouterCreate(name="r3", external_network="public"))
    with pytest.raises(errors.InUse, match="router 'r1', router 'r2'"):
        await delete_network(admin, store, "public")
    await routers.delete_router(p, store, "r1")
    r3 = (await routers.create_router(p, store, RouterCreate(name="r3", external_network="public"))).body
    assert r3.external_address == "192.0.2.100"


async def test_routers_attach_subnets_and_static_routes(ctx, store):
    await vpc(ctx, store)
    a = await subnet(ctx, store, "a", "10.0.1.0/24")
    await vpc(ctx, store, name="vpc2", cidr="10.0.0.0/16")
    b = await subnet(ctx, store, "b", "10.0.1.0/24", network="vpc2")
    await routers.create_router(ctx, store, RouterCreate(name="r"))
    r = (await routers.add_subnet(ctx, store, "r", RouterSubnet(subnet="a"))).body
    assert r.subnets == [a.id]
    assert (await crud.get(ctx, store, SUBNET, "a")).spec.router == r.id
    with pytest.raises(errors.Conflict, match="already attached"):
        await routers.add_subnet(ctx, store, "r", RouterSubnet(subnet="a"))
    with pytest.raises(errors.Conflict, match="overlaps"):
        await routers.add_subnet(ctx, store, "r", RouterSubnet(subnet=b.id))
    with pytest.raises(errors.ValidationFailed, match="none of router"):
        await routers.add_route(ctx, store, "r", Route(destination="10.9.0.0/16", nexthop="10.0.2.1"))
    with pytest.raises(errors.ValidationFailed):
        await routers.add_route(ctx, store, "r", Route(destination="10.9.0.1/16", nexthop="10.0.1.9"))
    r = (await routers.add_route(ctx, store, "r", Route(destination="10.9.0.0/16", nexthop="10.0.1.9"))).body
    assert [(x.destination, x.nexthop) for x in r.routes] == [("10.9.0.0/16", "10.0.1.9")]
    with pytest.raises(errors.Conflict, match="already has a route"):
        await routers.add_route(ctx, store, "r", Route(destination="10.9.0.0/16", nexthop="10.0.1.8"))
    with pytest.raises(errors.Conflict, match="go through subnet 'a'"):
        await routers.remove_subnet(ctx, store, "r", RouterSubnet(subnet="a"))
    with pytest.raises(errors.InUse, match="still has subnets a"):
        await routers.delete_router(ctx, store, "r")
    await routers.remove_route(ctx, store, "r", Route(destination="10.9.0.0/16", nexthop="10.0.1.9"))
    with pytest.raises(errors.NotFound):
        await routers.remove_route(ctx, store, "r", Route(destination="10.9.0.0/16", nexthop="10.0.1.9"))
    await routers.remove_subnet(ctx, store, "r", RouterSubnet(subnet="a"))
    assert (await crud.get(ctx, store, SUBNET, "a")).spec.router == ""
    await routers.delete_router(ctx, store, "r")
    assert await crud.find(ctx, store, ROUTER, "r") is None


def rule(**kw) -> SecurityGroupRuleCreate:
    return SecurityGroupRuleCreate(**{"direction": "ingress", **kw})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (rule(protocol="tcp", port_min=90, port_max=80), "port_max"),
        (rule(protocol="tcp", port_min=0), "port_min"),
        (rule(protocol="tcp", port_max=80), "port_min"),
        (rule(protocol="icmp", port_min=8), "port_min"),
        (rule(protocol="any", port_min=22), "port_min"),
        (rule(remote_cidr="10.0.0.0/8", remote_group="default"), "remote_cidr"),
        (rule(remote_cidr="10.0.0.1/8"), "remote_cidr"),
    ],
)
async def test_a_bad_rule_is_422_naming_the_field(ctx, store, body, field):
    await sg.create_group(ctx, store, SecurityGroupCreate(name="web"))
    with pytest.raises(errors.ValidationFailed) as exc:
        await sg.add_rule(ctx, store, "web", body)
    assert exc.value.invalid_params[0]["name"] == field


async def test_security_group_rules_and_references(ctx, store):
    web = (await sg.create_group(ctx, store, SecurityGroupCreate(name="web"))).body
    assert [(r.direction, r.remote_cidr) for r in web.rules] == [("egress", "0.0.0.0/0")]
    g = (await sg.add_rule(ctx, store, "web", rule(protocol="tcp", port_min=80, port_max=443))).body
    added = g.rules[-1]
    assert (added.port_min, added.port_max, added.remote_cidr) == (80, 443, "0.0.0.0/0")
    with pytest.raises(errors.Conflict, match="already has this rule"):
        await sg.add_rule(ctx, store, "web", rule(protocol="tcp", port_min=80, port_max=443))
    db = (await sg.create_group(ctx, store, SecurityGroupCreate(name="db", rules=[]))).body
    assert db.rules == []
    await sg.add_rule(ctx, store, "db", rule(protocol="tcp", port_min=5432, remote_group="web"))
    with pytest.raises(errors.InUse, match="'db'"):
        await sg.delete_group(ctx, store, "web")
    # A remote group of another project is not found there.
    other = ctx_of("p2")
    await store.commit(Txn([Create(PROJECT.dump(PROJECT.new(project="", name="p2", spec=ProjectSpec())))]))
    await sg.create_group(other, store, SecurityGroupCreate(name="mine"))
    with pytest.raises(errors.NotFound, match="security group"):
        await sg.add_rule(other, store, "mine", rule(remote_group=web.id))
    g = await crud.get(ctx, store, SECURITY_GROUP, "db")
    await sg.remove_rule(ctx, store, "db", g.spec.rules[0].id)
    with pytest.raises(errors.NotFound, match="no rule"):
        await sg.remove_rule(ctx, store, "db", g.spec.rules[0].id)
    await sg.delete_group(ctx, store, "web")


async def test_a_rule_naming_a_group_cannot_race_its_delete(ctx, store):
    await sg.create_group(ctx, store, SecurityGroupCreate(name="a"))
    await sg.create_group(ctx, store, SecurityGroupCreate(name="b"))
    results = await asyncio.gather(
        sg.add_rule(ctx, store, "a", rule(remote_group="b")), sg.delete_group(ctx, store, "b"), return_exceptions=True
    )
    a = await crud.get(ctx, store, SECURITY_GROUP, "a")
    b = await crud.find(ctx, store, SECURITY_GROUP, "b")
    named = {r.remote_group for r in a.spec.rules} - {None}
    # Either the rule went in and the group stayed, or the group went and no rule names it.
    assert (b is not None and named == {b.id}) or (b is None and not named), results


async def test_the_default_group_is_made_once_under_concurrency(ctx, store):
    got = await asyncio.gather(*(sg.ensure_default_group(ctx, store) for _ in range(5)))
    assert len({g.id for g in got}) == 1


async def test_an_edit_of_a_router_keeps_the_egress_counters_its_nodes_reported(ctx, store):
    # The network.egress-gib meter reads them from the router's status; an edit (load, change, dump) must not drop them.
    from minicloud.state import Update

    await vpc(ctx, store)
    s = await subnet(ctx, store, "web", "10.0.1.0/24")
    await routers.create_router(ctx, store, RouterCreate(name="r"))
    rec = await store.get_by_name(ROUTER.name, ctx.project, "r")
    reported = {"egress": {"n1/42": {"since": 7, "bytes": 1800}}}
    await store.commit(Txn([Update(msgspec.structs.replace(rec, status=reported), expect_revision=rec.revision)]))
    await routers.add_subnet(ctx, store, "r", RouterSubnet(subnet=s.id))
    after = await store.get_by_name(ROUTER.name, ctx.project, "r")
    assert after.spec["subnets"] == [s.id] and after.status == reported
