"""NICs without HTTP: ports created with their instance (address, MAC, groups, node) in one transaction, refused
with the issue's 4xx, released with the record, hot-plugged by ``add_nic``/``remove_nic``, race-free."""

from __future__ import annotations

import asyncio

import pytest

from minicloud import errors
from minicloud.compute import instances
from minicloud.compute.kinds import HYPERVISOR, IMAGE, INSTANCE, HypervisorSpec, ImageSpec
from minicloud.core import crud
from minicloud.core.context import Context, SystemCaller
from minicloud.iam.kinds import PROJECT, ProjectSpec
from minicloud.model.compute import InstanceCreate, NicCreate
from minicloud.model.network import NetworkCreate, SecurityGroupCreate, SubnetCreate
from minicloud.network import ipam, ports
from minicloud.network.kinds import IPALLOC, PORT, SECURITY_GROUP, SUBNET
from minicloud.network.networks import create_network
from minicloud.network.security_groups import create_group
from minicloud.network.subnets import create_subnet, delete_subnet
from minicloud.state import Create, Txn
from tests.unit.network.conftest import ctx_of

NODE = "n1"


async def _image(store, project="default"):
    image = IMAGE.new(project=project, name="guest", spec=ImageSpec(boot="kernel", size_bytes=1, sha256="x", node=NODE))
    await store.commit(Txn([Create(IMAGE.dump(image))]))


@pytest.fixture
async def world(store, ctx):
    """Project ``default`` with an image, network ``vpc`` (10.0.0.0/16) and subnet ``web`` (10.0.1.0/24, range
    .10-.12) and node n1's capacity."""
    await _image(store)
    spec = HypervisorSpec(cpus=4, memory_mib=4096, disk_gib=100)
    await store.commit(Txn([Create(HYPERVISOR.dump(HYPERVISOR.new(project="", name=NODE, spec=spec)))]))
    await create_network(ctx, store, NetworkCreate(name="vpc", cidr="10.0.0.0/16"))
    body = SubnetCreate(
        name="web", network="vpc", cidr="10.0.1.0/24", allocation_start="10.0.1.10", allocation_end="10.0.1.12"
    )
    await create_subnet(ctx, store, body)
    return store


def vm(name="vm", *nics: NicCreate) -> InstanceCreate:
    return InstanceCreate(name=name, image="guest", type="m1.tiny", nics=list(nics) or None)


async def create(ctx, store, name="vm", *nics: NicCreate):
    return (await instances.create_instance(ctx, store, vm(name, *nics))).body


async def _project(store, name):
    await store.commit(Txn([Create(PROJECT.dump(PROJECT.new(project="", name=name, spec=ProjectSpec())))]))


async def _allocs(store, subnet_id):
    return {a.spec.address: a.spec.holder for a in await ipam.allocations(store, subnet_id)}


async def test_a_nic_gets_an_address_a_mac_the_default_group_and_the_node_in_the_instance_transaction(ctx, world):
    store = world
    view = await create(ctx, store, "vm", NicCreate(subnet="web"), NicCreate(network="vpc", ip="10.0.1.200"))
    first, second = view.nics
    assert (first.network, first.subnet, first.ip, second.ip) == ("vpc", "web", "10.0.1.10", "10.0.1.200")
    assert first.security_groups == ["default"] and first.mac.startswith("52:54:00:") and first.mac != second.mac
    stored = await ports.instance_ports(store, "default", view.id)
    assert [p.id for p in stored] == [first.port, second.port]
    assert [(p.spec.index, p.spec.node, p.spec.instance, p.spec.address) for p in stored] == [
        (0, NODE, view.id, "10.0.1.10"),
        (1, NODE, view.id, "10.0.1.200"),
    ]
    assert stored[0].spec.security_groups == [(await crud.get(ctx, store, SECURITY_GROUP, "default")).id]
    allocs = await _allocs(store, stored[0].spec.subnet)
    assert allocs["10.0.1.10"] == f"port/{first.port}" and allocs["10.0.1.200"] == f"port/{second.port}"
    # the reconcilers find them by node (indexed)
    assert {p.id for p in await ports.ports_on_node(store, NODE)} == {first.port, second.port}


async def test_two_nics_on_one_subnet_in_one_create_get_different_addresses(ctx, world):
    view = await create(ctx, world, "vm", NicCreate(subnet="web"), NicCreate(subnet="web"))
    assert [n.ip for n in view.nics] == ["10.0.1.10", "10.0.1.11"]


async def test_bad_nics_are_refused_and_leave_nothing(ctx, world):
    store = world
    await create(ctx, store, "a", NicCreate(subnet="web", ip="10.0.1.11"))
    await _project(store, "other")
    other = ctx_of("other")
    await create_network(other, store, NetworkCreate(name="theirs", cidr="10.0.0.0/16"))
    await create_subnet(other, store, SubnetCreate(name="theirs", network="theirs", cidr="10.0.1.0/24"))
    await create_group(other, store, SecurityGroupCreate(name="theirs"))
    cases = [
        (NicCreate(subnet="web", ip="10.0.1.11"), errors.Conflict, "already used"),
        (NicCreate(subnet="theirs"), errors.NotFound, "subnet"),
        (NicCreate(network="theirs"), errors.NotFound, "network"),
        (NicCreate(subnet="web", security_groups=["theirs"]), errors.NotFound, "security group"),
        (NicCreate(subnet="web", ip="10.9.9.9"), errors.ValidationFailed, "not a host address"),
        (NicCreate(subnet="web", ip="banana"), errors.ValidationFailed, "not an IPv4 address"),
        (NicCreate(subnet="web", network="vpc"), errors.ValidationFailed, "either a subnet or a network"),
    ]
    for nic, error, message in cases:
        with pytest.raises(error, match=message):
            await create(ctx, store, "b", nic)
        assert await store.get_by_name(INSTANCE.name, "default", "b") is None
    await create(ctx, store, "c", NicCreate(subnet="web"), NicCreate(subnet="web"))  # .10 and .12: the pool is full
    with pytest.raises(errors.Conflict, match="no free address"):
        await create(ctx, store, "d", NicCreate(subnet="web"))
    assert len(await store.list(PORT.name, project="default")) == 3


async def test_an_external_network_is_for_administrators_for_now(ctx, world):
    store = world
    await _project(store, "admin")
    admin = ctx_of("admin")
    await create_network(
        admin, store, NetworkCreate(name="public", cidr="192.0.2.0/24", external=True, provider="lan",
                                    gateway="192.0.2.1", pool="192.0.2.100-192.0.2.110"),
    )  # fmt: skip
    user = Context(principal=SystemCaller("alice", admin=False), project="default", action="compute:instances:create")
    with pytest.raises(errors.Forbidden):
        await create(user, store, "vm", NicCreate(network="public"))
    view = await create(ctx, store, "vm", NicCreate(network="public"))  # the system context is an administrator
    assert (view.nics[0].network, view.nics[0].ip) == ("public", "192.0.2.100")


async def test_deleting_the_instance_releases_its_ports_and_addresses_so_the_subnet_can_go(ctx, world):
    store = world
    view = await create(ctx, store, "vm", NicCreate(subnet="web"))
    with pytest.raises(errors.InUse, match="port/"):
        await delete_subnet(ctx, store, "web")
    await instances.delete_instance(ctx, store, "vm")  # asks the node to tear it down
    assert len(await store.list(PORT.name, project="default")) == 1
    inst = INSTANCE.load(await store.get(INSTANCE.name, view.id))
    await store.commit(Txn(await instances.record_removal_ops(store, inst)))  # what the node commits at the end
    assert await store.list(PORT.name, project="default") == []
    assert await store.get(PORT.name, view.nics[0].port) is None
    await delete_subnet(ctx, store, "web")
    assert await store.list(IPALLOC.name, project="") == []


async def test_nic_add_and_remove_change_ports_addresses_and_the_instance_together(ctx, world):
    store = world
    await create(ctx, store, "vm", NicCreate(subnet="web"))
    added = (await instances.add_nic(ctx, store, "vm", NicCreate(subnet="web", ip="10.0.1.50"))).body
    assert [n.ip for n in added.nics] == ["10.0.1.10", "10.0.1.50"]
    stored = await ports.instance_ports(store, "default", added.id)
    assert [p.spec.index for p in stored] == [0, 1] and stored[1].spec.node == NODE
    removed = (await instances.remove_nic(ctx, store, "vm", "10.0.1.10")).body
    assert [n.ip for n in removed.nics] == ["10.0.1.50"]
    assert [p.spec.address for p in await ports.instance_ports(store, "default", added.id)] == ["10.0.1.50"]
    assert "10.0.1.10" not in await _allocs(store, stored[0].spec.subnet)
    again = (await instances.add_nic(ctx, store, "vm", NicCreate(subnet="web"))).body
    assert [n.ip for n in again.nics] == ["10.0.1.50", "10.0.1.10"]
    assert [p.spec.index for p in await ports.instance_ports(store, "default", added.id)] == [1, 2]
    with pytest.raises(errors.NotFound, match="no NIC"):
        await instances.remove_nic(ctx, store, "vm", "10.0.1.99")


async def test_concurrent_creates_never_get_one_address_twice(ctx, world):
    store = world
    results = await asyncio.gather(
        *(create(ctx, store, f"vm{i}", NicCreate(subnet="web")) for i in range(5)), return_exceptions=True
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(made) == 3 and all(isinstance(r, errors.Conflict) for r in refused), results
    assert sorted(v.nics[0].ip for v in made) == ["10.0.1.10", "10.0.1.11", "10.0.1.12"]


async def test_a_member_of_the_external_networks_own_project_cannot_plug_into_it_either(ctx, world):
    """Regression (review): the admin check ran only for an external network of another project, and never for one
    named by its subnet; a member of the network's project could put a NIC (and any address) on the provider LAN."""
    store = world
    body = NetworkCreate(
        name="public", cidr="192.0.2.0/24", external=True, provider="lan", gateway="192.0.2.1",
        pool="192.0.2.100-192.0.2.110",
    )  # fmt: skip
    await create_network(ctx, store, body)  # in `default`, the member's own project
    public_subnet = (await crud.list_objects(ctx, store, SUBNET, limit=10)).items
    subnet_name = next(s.name for s in public_subnet if s.spec.cidr == "192.0.2.0/24")
    member = Context(principal=SystemCaller("bob", admin=False), project="default", action="compute:instances:create")
    with pytest.raises(errors.Forbidden):
        await create(member, store, "by-network", NicCreate(network="public"))
    with pytest.raises(errors.Forbidden):
        await create(member, store, "by-subnet", NicCreate(subnet=subnet_name, ip="192.0.2.1"))
    with pytest.raises(errors.Forbidden):  # nor delete the external network's subnet
        await delete_subnet(member, store, subnet_name)
    assert await store.list(PORT.name, project="default") == []
