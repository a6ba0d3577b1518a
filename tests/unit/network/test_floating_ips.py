"""Floating IPs without HTTP: allocated from an external network's pool (IPAM, with the record), associated with a
NIC whose subnet a router connects to that network, moved, disassociated, released; refusals."""

from __future__ import annotations

import asyncio

import pytest

from minicloud import errors
from minicloud.core import crud
from minicloud.model.compute import NicCreate
from minicloud.model.floating_ip import FloatingIpAllocate, FloatingIpAssociate
from minicloud.model.network import NetworkCreate, RouterCreate, RouterSubnet
from minicloud.network import floating_ips as fips
from minicloud.network import routers
from minicloud.network.kinds import FLOATING_IP, ROUTER
from minicloud.network.networks import create_network
from tests.unit.network.conftest import ctx_of
from tests.unit.network.test_ports import _allocs, _project, create, world  # noqa: F401  (fixture)


@pytest.fixture
async def public(ctx, world):  # noqa: F811
    """``world`` plus external network ``public`` (pool 192.0.2.100-.102) and router ``edge`` (.100) on ``web``."""
    ext = NetworkCreate(
        name="public", cidr="192.0.2.0/24", external=True, provider="lan", pool="192.0.2.100-192.0.2.102"
    )
    net = (await create_network(ctx, world, ext)).body
    await routers.create_router(ctx, world, RouterCreate(name="edge", external_network="public"))
    await routers.add_subnet(ctx, world, "edge", RouterSubnet(subnet="web"))
    return net


async def test_allocate_associate_move_disassociate_release(ctx, world, public):  # noqa: F811
    a = await create(ctx, world, "a", NicCreate(subnet="web"))
    b = await create(ctx, world, "b", NicCreate(subnet="web"))
    fip = (await fips.allocate(ctx, world, FloatingIpAllocate(network="public"))).body
    assert (fip.name, fip.address, fip.network, fip.instance) == ("192.0.2.101", "192.0.2.101", public.id, None)
    assert (await _allocs(world, public.subnets[0]))["192.0.2.101"] == f"floatingip/{fip.id}"

    on_a = (await fips.associate(ctx, world, "192.0.2.101", FloatingIpAssociate(instance="a"))).body
    assert (on_a.instance, on_a.port, on_a.fixed_address) == (a.id, a.nics[0].port, a.nics[0].ip)
    record = FLOATING_IP.load(await world.get(FLOATING_IP.name, fip.id))
    assert record.spec.port_network.startswith("net-") and record.spec.port_network != public.id
    on_b = (await fips.associate(ctx, world, fip.id, FloatingIpAssociate(instance="b", nic=b.nics[0].ip))).body
    assert (on_b.instance, on_b.fixed_address) == (b.id, b.nics[0].ip)
    # one floating IP per NIC
    other = (await fips.allocate(ctx, world, FloatingIpAllocate(network="public"))).body
    with pytest.raises(errors.Conflict, match=r"already has floating IP 192\.0\.2\.101"):
        await fips.associate(ctx, world, other.id, FloatingIpAssociate(instance="b"))

    off = (await fips.disassociate(ctx, world, fip.id)).body
    assert (off.instance, off.port, off.fixed_address) == (None, None, None)
    await fips.release(ctx, world, fip.id)
    assert await world.get(FLOATING_IP.name, fip.id) is None
    assert "192.0.2.101" not in await _allocs(world, public.subnets[0])


async def test_refusals(ctx, world, public):  # noqa: F811
    await create(ctx, world, "a", NicCreate(subnet="web"))
    with pytest.raises(errors.NotFound):
        await fips.allocate(ctx, world, FloatingIpAllocate(network="nowhere"))
    with pytest.raises(errors.Conflict, match="not external"):
        await fips.allocate(ctx, world, FloatingIpAllocate(network="vpc"))
    fip = (await fips.allocate(ctx, world, FloatingIpAllocate(network="public"))).body
    with pytest.raises(errors.NotFound):
        await fips.associate(ctx, world, fip.id, FloatingIpAssociate(instance="a", nic="10.9.9.9"))
    # a NIC whose subnet no router connects to the floating IP's network
    await routers.remove_subnet(ctx, world, "edge", RouterSubnet(subnet="web"))
    with pytest.raises(errors.Conflict, match="router add-subnet"):
        await fips.associate(ctx, world, fip.id, FloatingIpAssociate(instance="a"))
    # a floating IP of another project is not found there
    await _project(world, "p2")
    with pytest.raises(errors.NotFound):
        await fips.associate(ctx_of("p2"), world, fip.id, FloatingIpAssociate(instance="a"))
    with pytest.raises(errors.NotFound):
        await fips.release(ctx_of("p2"), world, fip.address)
    # the pool runs out: 409
    await fips.allocate(ctx, world, FloatingIpAllocate(network="public"))
    with pytest.raises(errors.Conflict, match="has no free address left"):
        await fips.allocate(ctx, world, FloatingIpAllocate(network="public"))


async def test_concurrent_allocations_never_get_one_address_twice(ctx, world, public):  # noqa: F811
    made = await asyncio.gather(*(fips.allocate(ctx, world, FloatingIpAllocate(network="public")) for _ in range(2)))
    assert sorted(w.body.address for w in made) == ["192.0.2.101", "192.0.2.102"]


async def test_two_concurrent_associations_of_one_nic_give_it_one_floating_ip(ctx, world, public):  # noqa: F811
    b = await create(ctx, world, "b", NicCreate(subnet="web"))
    first = (await fips.allocate(ctx, world, FloatingIpAllocate(network="public"))).body
    second = (await fips.allocate(ctx, world, FloatingIpAllocate(network="public"))).body
    got = await asyncio.gather(
        *(fips.associate(ctx, world, f.id, FloatingIpAssociate(instance="b")) for f in (first, second)),
        return_exceptions=True,
    )
    won = [g for g in got if not isinstance(g, BaseException)]
    lost = [g for g in got if isinstance(g, BaseException)]
    assert len(won) == 1 and len(lost) == 1, got
    assert isinstance(lost[0], errors.Conflict) and "already has floating IP" in str(lost[0])
    on_b = [FLOATING_IP.load(r).spec for r in await world.list(FLOATING_IP.name, project="default", limit=10)]
    assert [s.port for s in on_b if s.port] == [b.nics[0].port]
    # moving the winner to the same NIC again (a retry) is fine: it is its own
    again = (await fips.associate(ctx, world, won[0].body.id, FloatingIpAssociate(instance="b"))).body
    assert again.port == b.nics[0].port


async def test_each_node_takes_its_own_external_address_of_a_router_and_the_router_delete_releases_them(
    ctx,
    world,  # noqa: F811
    public,
):
    edge = await crud.get(ctx, world, ROUTER, "edge")
    assert edge.spec.external_address == "192.0.2.100" and edge.spec.node_addresses == {}
    # the first node takes the router's own address, others get theirs from the pool (at once: no two the same)
    assert await routers.node_address(world, edge.id, "n1") == "192.0.2.100"
    n2, n3 = await asyncio.gather(
        routers.node_address(world, edge.id, "n2"), routers.node_address(world, edge.id, "n3")
    )
    assert {n2, n3} == {"192.0.2.101", "192.0.2.102"}
    assert await routers.node_address(world, edge.id, "n2") == n2  # kept
    shown = (await crud.get(ctx, world, ROUTER, "edge")).spec.node_addresses
    assert shown == {"n1": "192.0.2.100", "n2": n2, "n3": n3}
    allocs = await _allocs(world, public.subnets[0])
    assert allocs[n2] == f"router/{edge.id}/n2" and allocs[n3] == f"router/{edge.id}/n3"
    with pytest.raises(errors.Conflict, match="has no free address left"):  # the pool is spent: a fourth node gets none
        await routers.node_address(world, edge.id, "n4")
    await routers.remove_subnet(ctx, world, "edge", RouterSubnet(subnet="web"))
    await routers.delete_router(ctx, world, "edge")
    left = await _allocs(world, public.subnets[0])
    assert not [h for h in left.values() if h.startswith("router/")], left  # every node's address went with it
