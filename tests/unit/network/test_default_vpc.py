"""Default VPCs without HTTP: the ``host`` external network (idempotent, race-free), an instance created without
NICs gets one on its project's default VPC (made on first use, once under concurrent first uses, again after its
deletion) only when the cluster has ``host``; legacy leases held in ``host``'s pool; the node's side (the DHCP range
below the pool, pinned leases, the implicit ``host`` provider)."""

from __future__ import annotations

import asyncio
import ipaddress

from minicloud.compute import instances
from minicloud.compute.kinds import HYPERVISOR, IMAGE, HypervisorSpec, ImageSpec
from minicloud.config import Config, NetworkConfig
from minicloud.core import crud
from minicloud.iam.kinds import PROJECT, ProjectSpec
from minicloud.model.compute import InstanceCreate
from minicloud.model.network import RouterSubnet
from minicloud.network import default_vpc, ipam
from minicloud.network.kinds import NETWORK, ROUTER, SUBNET
from minicloud.network.networks import delete_network
from minicloud.network.routers import delete_router, remove_subnet
from minicloud.network.subnets import delete_subnet
from minicloud.state import Create, Txn
from tests.unit.network.conftest import ctx_of

NODE = "n1"
CIDR = "10.213.0.0/24"


async def _world(store, *projects: str) -> None:
    spec = HypervisorSpec(cpus=8, memory_mib=8192, disk_gib=100)
    ops = [Create(HYPERVISOR.dump(HYPERVISOR.new(project="", name=NODE, spec=spec)))]
    for p in projects:
        if p != "default":
            ops.append(Create(PROJECT.dump(PROJECT.new(project="", name=p, spec=ProjectSpec()))))
        image = ImageSpec(boot="kernel", size_bytes=1, sha256="x", node=NODE)
        ops.append(Create(IMAGE.dump(IMAGE.new(project=p, name="guest", spec=image))))
    await store.commit(Txn(ops))


async def create(store, name: str, project: str = "default"):
    body = InstanceCreate(name=name, image="guest", type="m1.tiny")
    return (await instances.create_instance(ctx_of(project), store, body)).body


def test_the_host_pool_is_the_upper_quarter_and_dhcp_ends_below_it():
    assert default_vpc.host_pool(CIDR) == (ipaddress.IPv4Address("10.213.0.192"), ipaddress.IPv4Address("10.213.0.254"))
    assert [str(a) for a in default_vpc.dhcp_range(CIDR)] == ["10.213.0.10", "10.213.0.191"]
    assert [str(a) for a in default_vpc.host_pool("10.9.0.0/28")] == ["10.9.0.12", "10.9.0.14"]
    assert [str(a) for a in default_vpc.dhcp_range("10.9.0.0/28")] == ["10.9.0.2", "10.9.0.11"]
    assert default_vpc.in_pool(CIDR, "10.213.0.200") and not default_vpc.in_pool(CIDR, "10.213.0.191")


async def test_the_host_network_is_made_once_even_by_concurrent_nodes(store):
    made = await asyncio.gather(*(default_vpc.ensure_host_network(store, CIDR) for _ in range(4)))
    assert {n.id for n in made} == {default_vpc.HOST_NETWORK_ID}
    host = made[0]
    assert (host.name, host.project, host.spec.external, host.spec.provider) == ("host", "default", True, "host")
    subnet = SUBNET.load(await store.get(SUBNET.name, default_vpc.HOST_SUBNET_ID))
    assert (subnet.spec.gateway, subnet.spec.allocation_start, subnet.spec.allocation_end) == (
        "10.213.0.1", "10.213.0.192", "10.213.0.254",
    )  # fmt: skip
    assert len(await store.list(NETWORK.name, project=None, limit=100)) == 1
    assert (await default_vpc.ensure_host_network(store, CIDR)).revision == host.revision  # nothing rewritten


async def test_without_the_host_network_an_instance_without_nics_keeps_the_default_bridge(store):
    await _world(store, "default")
    view = await create(store, "vm")
    assert view.nics == []
    assert await store.list(NETWORK.name, project=None, limit=10) == []


async def test_an_instance_without_nics_gets_the_projects_default_vpc_made_on_first_use(store):
    await _world(store, "default", "p2")
    await default_vpc.ensure_host_network(store, CIDR)
    view = await create(store, "vm", "p2")
    (nic,) = view.nics
    assert (nic.network, nic.subnet, nic.security_groups) == ("default", "default", ["default"])
    assert ipaddress.IPv4Address(nic.ip) in ipaddress.IPv4Network("172.31.0.0/20")
    c = ctx_of("p2")
    network = await crud.get(c, store, NETWORK, "default")
    subnet = await crud.get(c, store, SUBNET, "default")
    router = await crud.get(c, store, ROUTER, "default")
    assert (network.spec.cidr, subnet.spec.cidr, subnet.spec.network) == ("172.31.0.0/16", "172.31.0.0/20", network.id)
    assert router.spec.subnets == [subnet.id] and subnet.spec.router == router.id
    assert router.spec.external_network == default_vpc.HOST_NETWORK_ID
    assert default_vpc.in_pool(CIDR, router.spec.external_address)
    # the second instance reuses all of it
    again = await create(store, "vm2", "p2")
    assert again.nics[0].subnet == "default" and again.nics[0].ip != nic.ip
    assert len(await store.list(ROUTER.name, project="p2", limit=10)) == 1


async def test_concurrent_first_creates_in_a_new_project_make_one_default_vpc(store):
    await _world(store, "default", "p3")
    await default_vpc.ensure_host_network(store, CIDR)
    views = await asyncio.gather(*(create(store, f"vm{i}", "p3") for i in range(4)))
    assert len({v.nics[0].ip for v in views}) == 4
    assert len(await store.list(NETWORK.name, project="p3", limit=10)) == 1
    assert len(await store.list(SUBNET.name, project="p3", limit=10)) == 1
    (router,) = [ROUTER.load(r) for r in await store.list(ROUTER.name, project="p3", limit=10)]
    assert len(router.spec.subnets) == 1
    # one router address taken from the pool for the project
    holders = [a.spec.holder for a in await ipam.allocations(store, default_vpc.HOST_SUBNET_ID)]
    assert sum(h.startswith("router/") for h in holders) == 1


async def test_a_deleted_default_vpc_is_made_again_on_next_use(store):
    await _world(store, "default")
    await default_vpc.ensure_host_network(store, CIDR)
    c = ctx_of("default")
    first = await create(store, "vm")
    await instances.delete_instance(c, store, "vm")  # no hypervisor ran compute? it did publish: remove by hand
    if await crud.find(c, store, instances.INSTANCE, "vm") is not None:
        obj = await instances.get_instance(c, store, "vm")
        await store.commit(Txn(await instances.record_removal_ops(store, obj)))
    await remove_subnet(c, store, "default", RouterSubnet(subnet="default"))
    await delete_router(c, store, "default")
    await delete_subnet(c, store, "default")
    old = (await crud.get(c, store, NETWORK, "default")).id
    await delete_network(c, store, "default")
    second = await create(store, "vm")
    assert second.nics[0].subnet == "default" and first.nics[0].network == "default"
    assert (await crud.get(c, store, NETWORK, "default")).id != old
    assert (await crud.get(c, store, SUBNET, "default")).spec.router


async def test_a_legacy_lease_in_the_pool_is_held_so_no_router_takes_it(store):
    await _world(store, "default")
    await default_vpc.ensure_host_network(store, CIDR)
    assert await default_vpc.reserve_lease(store, NODE, "52:54:00:AA:BB:CC", "10.213.0.192")
    assert await default_vpc.reserve_lease(store, NODE, "52:54:00:aa:bb:cc", "10.213.0.192")  # idempotent
    assert not await default_vpc.reserve_lease(store, "n2", "52:54:00:00:00:01", "10.213.0.192")  # someone else's
    await create(store, "vm")
    router = await crud.get(ctx_of(), store, ROUTER, "default")
    assert router.spec.external_address == "10.213.0.193"


def _config(tmp_path, **network) -> Config:
    from minicloud.config import AgentConfig, ComputeConfig

    return Config(
        agent=AgentConfig(data_dir=str(tmp_path), node_name=NODE),
        compute=ComputeConfig(driver="libvirt"),
        network=NetworkConfig(**network),
    )


def test_the_node_pins_leases_found_in_the_pool_and_maps_host_to_its_bridge(tmp_path):
    from agent import node

    d = tmp_path / "networks" / "default"
    d.mkdir(parents=True)
    (d / "leases").write_text("0 52:54:00:00:00:01 10.213.0.20 a *\n0 52:54:00:00:00:02 10.213.0.230 b *\n")
    off = _config(tmp_path)
    assert not node.default_vpc_on(off) and "host" not in node.node_providers(off)
    assert node.default_network(off).spec.dhcp_end == ipaddress.IPv4Address("10.213.0.254")
    on = _config(tmp_path, default_vpc=True)
    assert node.node_providers(on) == {"host": "mcbr0"}
    assert node.node_providers(_config(tmp_path, default_vpc=True, providers={"host": "br-lan"}))["host"] == "br-lan"
    spec = node.default_network(on).spec
    assert (str(spec.dhcp_start), str(spec.dhcp_end)) == ("10.213.0.10", "10.213.0.191")
    assert spec.static_hosts == (("52:54:00:00:00:02", "10.213.0.230"),)
    # pinned once: a later lease file changes nothing
    (d / "leases").write_text("0 52:54:00:00:00:03 10.213.0.240 c *\n")
    assert node.default_bridge_pins(on) == {"52:54:00:00:00:02": "10.213.0.230"}
    from agent.net.default import dnsmasq_argv

    assert "--dhcp-host=52:54:00:00:00:02,10.213.0.230" in dnsmasq_argv(spec, d)
    fake = _config(tmp_path, default_vpc=True)
    fake = Config(agent=fake.agent, compute=type(fake.compute)(driver="fake"), network=fake.network)
    assert not node.default_vpc_on(fake)


async def test_pins_of_guests_gone_from_the_node_are_dropped_and_their_addresses_go_back_to_the_pool(store, tmp_path):
    """At start, a pin whose guest no instance of this node has any more (deleted while the agent was down, moved)
    leaves ``pinned.json`` and its address is released from ``host``'s pool; a live guest keeps its pin and hold."""
    from aiohttp import web

    from agent import node
    from agent.compute.design import mac_for
    from minicloud.api.keys import CONFIG, STORE
    from minicloud.compute.kinds import INSTANCE, InstanceSpec

    await _world(store, "default")
    live, gone = mac_for("i-live", 0), "52:54:00:00:00:09"
    d = tmp_path / "networks" / "default"
    d.mkdir(parents=True)
    (d / "leases").write_text(f"0 {live} 10.213.0.230 a *\n0 {gone} 10.213.0.240 b *\n")
    spec = InstanceSpec(uuid="u", image_id="i", image_name="i", type="t", vcpus=1, memory_mib=64, disk_gib=1, node=NODE)
    await store.commit(Txn([Create(INSTANCE.dump(INSTANCE.new(project="default", name="a", id="i-live", spec=spec)))]))
    config = _config(tmp_path, default_vpc=True)
    app = web.Application()
    app[CONFIG], app[STORE] = config, store

    async def start() -> None:
        ctx = node._default_vpc_ctx(app)
        await anext(ctx)
        await ctx.aclose()

    await default_vpc.ensure_host_network(store, CIDR)
    # the first start pinned both (the gone one's instance vanished while the agent was down) ...
    assert await default_vpc.reserve_lease(store, NODE, gone, "10.213.0.240")
    await start()
    assert node.default_bridge_pins(config) == {live: "10.213.0.230"}
    assert node.default_network(config).spec.static_hosts == ((live, "10.213.0.230"),)
    holders = {a.spec.address: a.spec.holder for a in await ipam.allocations(store, default_vpc.HOST_SUBNET_ID)}
    assert holders.get("10.213.0.230") == default_vpc.lease_holder(NODE, live) and "10.213.0.240" not in holders
    # idempotent; another holder's address is never released
    await start()
    assert node.default_bridge_pins(config) == {live: "10.213.0.230"}
    assert not await default_vpc.release_lease(store, "n2", live, "10.213.0.230")
    assert await default_vpc.release_lease(store, NODE, gone, "10.213.0.240")  # not held: nothing to do


async def test_removing_a_default_bridge_instance_gives_its_pinned_address_back_at_once(store):
    from agent.compute.design import mac_for
    from minicloud.compute.kinds import INSTANCE, InstanceSpec

    await _world(store, "default")
    await default_vpc.ensure_host_network(store, CIDR)
    spec = InstanceSpec(uuid="u", image_id="i", image_name="i", type="t", vcpus=1, memory_mib=64, disk_gib=1, node=NODE)
    old = INSTANCE.new(project="default", name="old", id="i-old", spec=spec)
    await store.commit(Txn([Create(INSTANCE.dump(old))]))
    assert await default_vpc.reserve_lease(store, NODE, mac_for("i-old", 0), "10.213.0.200")
    assert await default_vpc.reserve_lease(store, NODE, "52:54:00:00:00:07", "10.213.0.201")  # another guest's
    await store.commit(
        Txn(await instances.record_removal_ops(store, INSTANCE.load(await store.get(INSTANCE.name, "i-old"))))
    )
    held = {a.spec.address for a in await ipam.allocations(store, default_vpc.HOST_SUBNET_ID)}
    assert "10.213.0.200" not in held and "10.213.0.201" in held
