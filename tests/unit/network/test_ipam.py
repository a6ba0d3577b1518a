"""IPAM and VNI allocation: compare-and-swap on record names, so concurrent allocations never hand out one address
or VNI twice (the store is the arbiter, as etcd is across nodes)."""

from __future__ import annotations

import asyncio

import pytest

from minicloud import errors
from minicloud.core import crud
from minicloud.core.write import commit
from minicloud.model.network import NetworkCreate, SubnetCreate, SubnetUpdate
from minicloud.network import ipam
from minicloud.network.kinds import IPALLOC, NETWORK, SUBNET, VNI, VNI_MIN
from minicloud.network.networks import create_network, delete_network
from minicloud.network.subnets import create_subnet


async def _subnet(ctx, store, cidr="10.0.0.0/24", **kw):
    await create_network(ctx, store, NetworkCreate(name="vpc", cidr="10.0.0.0/16"))
    await create_subnet(ctx, store, SubnetCreate(name="sn", network="vpc", cidr=cidr, **kw))
    return await crud.get(ctx, store, SUBNET, "sn")


async def _take(ctx, store, holder: str, wanted: str | None = None) -> str:
    """One allocation committed on its own (as a NIC create will commit it with its record)."""

    async def step(attempt: int) -> str:
        subnet = await crud.get(ctx, store, SUBNET, "sn")
        address, ops = await ipam.allocate(ctx, store, subnet, wanted, holder=holder, spread=min(attempt, 8))
        await commit(ctx, store, ops, respond=lambda rev: None)
        return address

    return await ipam.retrying(step)


async def test_the_lowest_free_address_of_the_range_is_given_and_the_gateway_is_reserved(ctx, store):
    subnet = await _subnet(ctx, store)
    assert (subnet.spec.gateway, subnet.spec.allocation_start, subnet.spec.allocation_end) == (
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.254",
    )
    assert [a.spec.address for a in await ipam.allocations(store, subnet.id)] == ["10.0.0.1"]
    assert await _take(ctx, store, "nic/a") == "10.0.0.2"
    assert await _take(ctx, store, "nic/b") == "10.0.0.3"


async def test_concurrent_allocations_never_give_an_address_twice(ctx, store):
    await _subnet(ctx, store)
    n = 40
    got = await asyncio.gather(*(_take(ctx, store, f"nic/{i}") for i in range(n)))
    assert len(set(got)) == n
    records = [IPALLOC.load(r) for r in await store.list(IPALLOC.name, project="", limit=1000)]
    assert len({r.spec.address for r in records}) == len(records) == n + 1  # + the gateway
    # Lowest first; a retry after a lost race picks among the few lowest free, so the set stays near the start.
    assert all(2 <= int(a.rsplit(".", 1)[1]) <= 2 + n + 8 for a in got)


async def test_a_wanted_address_already_used_is_409_and_outside_the_subnet_422(ctx, store):
    await _subnet(ctx, store)
    assert await _take(ctx, store, "nic/a", "10.0.0.77") == "10.0.0.77"
    with pytest.raises(errors.Conflict, match="already used"):
        await _take(ctx, store, "nic/b", "10.0.0.77")
    with pytest.raises(errors.Conflict, match="already used"):
        await _take(ctx, store, "nic/b", "10.0.0.1")  # the gateway's
    with pytest.raises(errors.ValidationFailed, match="not a host address"):
        await _take(ctx, store, "nic/b", "10.0.1.5")
    with pytest.raises(errors.ValidationFailed):
        await _take(ctx, store, "nic/b", "10.0.0.255")


async def test_an_exhausted_pool_is_409(ctx, store):
    await _subnet(ctx, store, allocation_start="10.0.0.10", allocation_end="10.0.0.12")
    got = await asyncio.gather(*(_take(ctx, store, f"nic/{i}") for i in range(3)))
    assert sorted(got) == ["10.0.0.10", "10.0.0.11", "10.0.0.12"]
    with pytest.raises(errors.Conflict, match="no free address"):
        await _take(ctx, store, "nic/x")


async def test_concurrent_network_creates_get_distinct_vnis(ctx, store):
    n = 20
    await asyncio.gather(
        *(create_network(ctx, store, NetworkCreate(name=f"n{i}", cidr="10.0.0.0/16")) for i in range(n))
    )
    networks = [NETWORK.load(r) for r in await store.list(NETWORK.name, project="default", limit=100)]
    vnis = sorted(n.spec.vni for n in networks)
    assert vnis == list(range(VNI_MIN, VNI_MIN + n))
    records = [VNI.load(r) for r in await store.list(VNI.name, project="", limit=100)]
    assert {r.name: r.spec.network for r in records} == {str(n.spec.vni): n.id for n in networks}


async def test_a_freed_vni_is_given_again_and_a_lost_race_tries_the_next(ctx, store):
    await create_network(ctx, store, NetworkCreate(name="a", cidr="10.0.0.0/16"))
    await create_network(ctx, store, NetworkCreate(name="b", cidr="10.0.0.0/16"))
    await delete_network(ctx, store, "a")
    assert (await crud.get(ctx, store, NETWORK, "b")).spec.vni == VNI_MIN + 1
    await create_network(ctx, store, NetworkCreate(name="c", cidr="10.0.0.0/16"))
    assert (await crud.get(ctx, store, NETWORK, "c")).spec.vni == VNI_MIN
    # A candidate known lost is skipped.
    vni, _ = await ipam.allocate_vni(ctx, store, "net-x", avoid={VNI_MIN + 2})
    assert vni == VNI_MIN + 3


async def test_an_allocation_in_a_subnet_being_deleted_fails_its_check(ctx, store):
    subnet = await _subnet(ctx, store)
    _, ops = await ipam.allocate(ctx, store, subnet, holder="nic/late")
    # The subnet changes (as a delete's mark does) before the allocation commits.
    await crud.patch(ctx, store, SUBNET, "sn", SubnetUpdate(labels={"x": "y"}))
    with pytest.raises(errors.MinicloudError) as exc:
        await commit(ctx, store, ops, respond=lambda rev: None)
    assert ipam.lost_race(exc.value)  # retried on a fresh read by ipam.retrying
