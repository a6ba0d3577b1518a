"""The ``host`` external network and each project's default VPC (issue 10: instances created without ``--nic``).

**``host``** is the node's legacy default bridge (``[network] bridge``, ``mcbr0``, with its dnsmasq and masquerade,
:mod:`agent.net.default`) seen as an external network: provider ``host``, which every node maps to its own default
bridge unless ``[network.providers] host`` says otherwise. Its CIDR and gateway are the default network's
(``10.213.0.0/24``, ``.1``); its pool (routers' external legs, floating IPs) is the upper quarter of the host
addresses (:func:`host_pool`), and the bridge's dnsmasq hands out only the addresses below it (:func:`dhcp_range`).
Each node's default bridge is its own L2 segment behind its own masquerade, so the same router address on every
node never clashes: a router's SNAT leaves through the bridge of the node the traffic comes from. An agent with
``[network] default_vpc = true`` makes the record at start (:func:`ensure_host_network`, idempotent: fixed ids,
the store refuses a second); it lives in the ``default`` project, like the external networks an administrator
makes, and is managed like them.

**The default VPC** of a project: its network ``default`` (172.31.0.0/16, AWS's), subnet ``default``
(172.31.0.0/20) and router ``default`` with its external gateway on ``host``, the subnet attached. Made on first use
by :func:`ensure_default_vpc` when an instance is created without NICs and the cluster has the ``host`` network (its
existence is the cluster-wide switch: without it, such instances keep the node's default bridge). Every step finds
the project's record by name or creates it, and a create that loses to a concurrent one (the store's uniqueness of
names per project) reads the winner's, so two first creates in a new project make one default VPC; a crash between
steps is finished by the next use. A project may delete any of the three; the next create without ``--nic`` makes
what is missing again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
from typing import Any

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import DEFAULT_PROJECT, Context
from minicloud.core.kinds import Obj
from minicloud.model.network import NetworkCreate, RouterCreate, RouterSubnet, SubnetCreate
from minicloud.network import ipam
from minicloud.network.kinds import IPALLOC, NETWORK, ROUTER, SUBNET, NetworkSpec, RouterSpec, SubnetSpec
from minicloud.state import Create, Op, Store, Txn, TxnFailed

log = logging.getLogger(__name__)

#: The external network (and its subnet, and its provider) standing for the nodes' default bridges.
HOST_NETWORK = "host"
HOST_PROVIDER = "host"
HOST_NETWORK_ID = f"{NETWORK.prefix}-host"
HOST_SUBNET_ID = f"{SUBNET.prefix}-host"
#: The project's default VPC: network, subnet and router of this name.
DEFAULT_NAME = "default"
DEFAULT_CIDR = "172.31.0.0/16"
DEFAULT_SUBNET_CIDR = "172.31.0.0/20"
#: Holder of a legacy guest's lease address in ``host``'s pool (kept so no router takes it): ``lease/<node>/<mac>``.
LEASE_HOLDER = "lease"

Network = Obj[NetworkSpec, Any]
Subnet = Obj[SubnetSpec, Any]
Router = Obj[RouterSpec, Any]


# -- the address plan (pure) ----------------------------------------------------------------------------------------
def host_pool(cidr: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The ``host`` network's pool in the default network ``cidr``: the upper quarter of its host addresses
    (10.213.0.192-10.213.0.254 for a /24; at least one address)."""
    net = ipaddress.IPv4Network(cidr)
    first, last = net.network_address + 1, net.broadcast_address - 1
    size = max(1, (int(last) - int(first) + 1) // 4)
    return last - (size - 1), last


def dhcp_range(cidr: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The default bridge's dnsmasq range once ``host`` exists: from ``.10`` (``.2`` below a /27, as
    :class:`agent.net.default.NetworkSpec` does) up to just below :func:`host_pool`."""
    net = ipaddress.IPv4Network(cidr)
    start = net.network_address + (10 if net.num_addresses >= 32 else 2)
    end = host_pool(cidr)[0] - 1
    return start, max(start, end)


def in_pool(cidr: str, address: str) -> bool:
    lo, hi = host_pool(cidr)
    return lo <= ipaddress.IPv4Address(address) <= hi


def lease_holder(node: str, mac: str) -> str:
    return f"{LEASE_HOLDER}/{node}/{mac.lower()}"


# -- the host network ------------------------------------------------------------------------------------------------
def _system(ctx: Context | None, action: str, project: str = DEFAULT_PROJECT) -> Context:
    base = ctx or Context.system("default-vpc", project=project)
    return dataclasses.replace(base, project=project, action=action, idempotency=None)


async def host_network(store: Store) -> Network | None:
    """The ``host`` external network, or None (the cluster has not turned default VPCs on)."""
    record = await store.get(NETWORK.name, HOST_NETWORK_ID)
    return NETWORK.load(record) if record is not None else None


async def ensure_host_network(store: Store, cidr: str, *, ctx: Context | None = None) -> Network:
    """The ``host`` external network for the default network ``cidr`` (gateway its first address, pool
    :func:`host_pool`), created with its subnet in one transaction if missing. Idempotent under concurrency (fixed
    ids): a node that loses the race reads the winner's. A record of another CIDR is kept (logged): every node's
    ``[network] cidr`` should be the same."""
    found = await host_network(store)
    if found is not None:
        if found.spec.cidr != str(ipaddress.IPv4Network(cidr)):
            log.warning(
                "the host network is %s but this node's [network] cidr is %s; routers' SNAT through this node's "
                "default bridge will not work until they match",
                found.spec.cidr,
                cidr,
            )
        return found
    c = _system(ctx, "admin:networks:create")
    net = ipaddress.IPv4Network(cidr)
    gateway = net.network_address + 1
    lo, hi = host_pool(cidr)
    body = NetworkCreate(name=HOST_NETWORK, cidr=str(net), external=True, provider=HOST_PROVIDER)
    network = NETWORK.new(
        project=c.project,
        name=body.name,
        id=HOST_NETWORK_ID,
        spec=NetworkSpec(
            cidr=str(net),
            mtu=1500,
            external=True,
            provider=HOST_PROVIDER,
            description="the nodes' default bridges (legacy default network); routers' SNAT for default VPCs",
            subnets={HOST_SUBNET_ID: str(net)},
        ),
        stamp=c.clock(),
    )
    subnet = SUBNET.new(
        project=c.project,
        name=HOST_NETWORK,
        id=HOST_SUBNET_ID,
        spec=SubnetSpec(
            network=network.id, cidr=str(net), gateway=str(gateway), allocation_start=str(lo), allocation_end=str(hi)
        ),
        stamp=c.clock(),
    )
    extra = [Create(SUBNET.dump(subnet)), ipam.reserve(c, subnet.id, str(gateway), f"subnet/{subnet.id}")]
    # another node may make it first (or a network named 'host' exists in the default project): read below
    with contextlib.suppress(errors.AlreadyExists):
        await crud.create(c, store, NETWORK, network, extra=extra)
    found = await host_network(store)
    if found is None:
        raise errors.Conflict(
            f"project '{c.project}' has a network named '{HOST_NETWORK}' that is not the default bridges' external "
            "network; rename or delete it to turn on default VPCs"
        )
    return found


async def reserve_lease(store: Store, node: str, mac: str, address: str, *, ctx: Context | None = None) -> bool:
    """Hold ``address`` of ``host``'s pool for a legacy guest's lease (``mac`` on ``node``) so no router or floating
    IP takes it. True when it is held for that guest (now or already); False when something else holds it."""
    c = _system(ctx, "admin:networks:create")
    holder = lease_holder(node, mac)
    with contextlib.suppress(TxnFailed):
        await store.commit(Txn([ipam.reserve(c, HOST_SUBNET_ID, address, holder)]))
    record = await store.get_by_name(IPALLOC.name, "", ipam.alloc_name(HOST_SUBNET_ID, address))
    return record is not None and IPALLOC.load(record).spec.holder == holder


async def release_lease(store: Store, node: str, mac: str, address: str) -> bool:
    """Give back what :func:`reserve_lease` held for ``mac`` on ``node`` (the guest is gone). True when it is not
    held for that guest any more (released now or before); False when it is held by something else (left alone)."""
    record = await store.get_by_name(IPALLOC.name, "", ipam.alloc_name(HOST_SUBNET_ID, address))
    if record is None:
        return True
    alloc = IPALLOC.load(record)
    if alloc.spec.holder != lease_holder(node, mac):
        return False
    with contextlib.suppress(TxnFailed):  # changed meanwhile: look again
        await store.commit(Txn([ipam.release(alloc)]))
        return True
    return await release_lease(store, node, mac, address)


async def pin_release_ops(store: Store, node: str, instance_id: str) -> list[Op]:
    """The ops that give back what :func:`reserve_lease` held for a default-bridge guest of instance ``instance_id``
    on ``node`` (its NIC's MAC is the compute agent's ``mac_for(id, 0)``): committed with the instance record's
    removal, so the address returns to ``host``'s pool at once (the node drops the pin itself at its next start).
    A range read of ``host``'s allocations; nothing when there is no ``host`` network or no such hold."""
    if not node:
        return []
    from agent.compute.design import mac_for  # the guest's MAC on the default bridge, as the node derives it

    holder = lease_holder(node, mac_for(instance_id, 0))
    return [ipam.release(a) for a in await ipam.allocations(store, HOST_SUBNET_ID) if a.spec.holder == holder]


# -- the default VPC -------------------------------------------------------------------------------------------------
async def _find_or_create(ctx: Context, store: Store, kind: Any, name: str, create: Any) -> Obj[Any, Any]:
    found = await crud.find(ctx, store, kind, name)
    if found is not None:
        return found
    with contextlib.suppress(errors.AlreadyExists):  # a concurrent first use made it: read theirs
        await create()
    return await crud.get(ctx, store, kind, name)


async def ensure_default_vpc(ctx: Context, store: Store) -> Subnet | None:
    """The subnet a NIC of an instance created without NICs goes on: the project's default VPC's, made (network,
    subnet, router with its gateway on ``host``, the subnet attached) where missing. None when the cluster has no
    ``host`` network (default VPCs are off: the instance keeps the node's default bridge)."""
    host = await host_network(store)
    if host is None:
        return None
    from minicloud.network.networks import create_network  # networks imports ports, which imports this module's users
    from minicloud.network.routers import add_subnet, create_router
    from minicloud.network.subnets import create_subnet

    c = dataclasses.replace(ctx, idempotency=None)
    net_ctx = dataclasses.replace(c, action="network:networks:create")
    network: Network = await _find_or_create(
        net_ctx,
        store,
        NETWORK,
        DEFAULT_NAME,
        lambda: create_network(
            net_ctx, store, NetworkCreate(name=DEFAULT_NAME, cidr=DEFAULT_CIDR, description="the default VPC")
        ),
    )
    if network.spec.external:
        raise errors.Conflict(
            f"network '{DEFAULT_NAME}' of project '{ctx.project}' is external; instances without --nic need the "
            "project's default VPC there: give --nic or rename that network"
        )
    sub_ctx = dataclasses.replace(c, action="network:subnets:create")
    subnet: Subnet | None = await crud.find(sub_ctx, store, SUBNET, DEFAULT_NAME)
    if subnet is None or subnet.spec.network != network.id:
        mine = sorted(network.spec.subnets.items(), key=lambda kv: kv[1])
        if mine and (record := await store.get(SUBNET.name, mine[0][0])) is not None:
            subnet = SUBNET.load(record)  # the default VPC's own first subnet
        else:
            cidr = DEFAULT_SUBNET_CIDR if ipaddress.IPv4Network(network.spec.cidr).supernet_of(
                ipaddress.IPv4Network(DEFAULT_SUBNET_CIDR)
            ) else network.spec.cidr  # fmt: skip
            subnet = await _find_or_create(
                sub_ctx,
                store,
                SUBNET,
                DEFAULT_NAME,
                lambda: create_subnet(
                    sub_ctx,
                    store,
                    SubnetCreate(name=DEFAULT_NAME, network=network.id, cidr=cidr, description="the default subnet"),
                ),
            )
    assert subnet is not None
    if subnet.spec.router:
        return subnet
    rtr_ctx = dataclasses.replace(c, action="network:routers:create")
    router: Router = await _find_or_create(
        rtr_ctx,
        store,
        ROUTER,
        DEFAULT_NAME,
        lambda: create_router(
            rtr_ctx,
            store,
            RouterCreate(name=DEFAULT_NAME, external_network=HOST_NETWORK_ID, description="the default VPC's router"),
        ),
    )
    # attached meanwhile by a concurrent first use (409): the instance gets its NIC all the same
    with contextlib.suppress(errors.Conflict):
        await add_subnet(
            dataclasses.replace(c, action="network:routers:update"), store, router.id, RouterSubnet(subnet=subnet.id)
        )
    return await crud.get(sub_ctx, store, SUBNET, subnet.id)
