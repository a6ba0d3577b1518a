"""Regressions from the endpoint review: an external network's subnet is no router interface, and the lists a
member can grow one item at a time (rules of a group, static routes of a router) are bounded."""

from __future__ import annotations

import pytest

from minicloud import errors
from minicloud.model.network import (
    NetworkCreate,
    Route,
    RouterCreate,
    RouterSubnet,
    SecurityGroupCreate,
    SecurityGroupRuleCreate,
    SubnetCreate,
)
from minicloud.network import routers, security_groups
from minicloud.network.kinds import SUBNET
from minicloud.network.networks import create_network
from minicloud.network.subnets import create_subnet


async def test_an_external_networks_subnet_cannot_be_attached_to_a_router_as_an_interface(ctx, store):
    body = NetworkCreate(
        name="public", cidr="192.0.2.0/24", external=True, provider="lan", gateway="192.0.2.1",
        pool="192.0.2.100-192.0.2.110",
    )  # fmt: skip
    await create_network(ctx, store, body)
    public_subnet = next(s for s in map(SUBNET.load, await store.list(SUBNET.name, project="default")))
    await routers.create_router(ctx, store, RouterCreate(name="r"))
    with pytest.raises(errors.Conflict, match="external network"):
        await routers.add_subnet(ctx, store, "r", RouterSubnet(subnet=public_subnet.id))


async def test_a_group_holds_at_most_max_rules_and_a_router_at_most_max_routes(ctx, store):
    await security_groups.create_group(ctx, store, SecurityGroupCreate(name="g", rules=[]))
    for port in range(1, security_groups.MAX_RULES + 1):
        rule = SecurityGroupRuleCreate(direction="ingress", protocol="tcp", port_min=port)
        await security_groups.add_rule(ctx, store, "g", rule)
    with pytest.raises(errors.Conflict, match="rules"):
        await security_groups.add_rule(ctx, store, "g", SecurityGroupRuleCreate(direction="ingress", protocol="udp"))

    await create_network(ctx, store, NetworkCreate(name="vpc", cidr="10.0.0.0/16"))
    await create_subnet(ctx, store, SubnetCreate(name="web", network="vpc", cidr="10.0.1.0/24"))
    await routers.create_router(ctx, store, RouterCreate(name="r"))
    await routers.add_subnet(ctx, store, "r", RouterSubnet(subnet="web"))
    for i in range(routers.MAX_ROUTES):
        await routers.add_route(ctx, store, "r", Route(destination=f"172.16.{i}.0/24", nexthop="10.0.1.5"))
    with pytest.raises(errors.Conflict, match="static routes"):
        await routers.add_route(ctx, store, "r", Route(destination="172.17.0.0/24", nexthop="10.0.1.5"))
