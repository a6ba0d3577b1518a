"""Subnets: create inside their network (overlaps refused, race-free), delete when no address but the gateway's is
allocated and no router is attached. List, show and the description/labels patch are generic.

Race-freedom: a subnet create commits a compare-and-swap update of its network (which keeps the subnet CIDRs), so
two concurrent creates in one network cannot both pass the overlap check — the second reads again and sees the
first. A delete marks the subnet ``deleting`` (CAS) before it checks its allocations; every allocation carries a
Check on the subnet's revision (:func:`minicloud.network.ipam.allocate`), so none can slip in between.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

import msgspec

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.iam.directory import Directory
from minicloud.model.network import SubnetCreate
from minicloud.network import ipam
from minicloud.network.kinds import NETWORK, SUBNET, NetworkSpec, RouteSpec, SubnetSpec
from minicloud.state import Op, Store, Txn, TxnFailed, Update

Subnet = Obj[SubnetSpec, Any]
Network = Obj[NetworkSpec, Any]


def _range(
    body: SubnetCreate, net: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address
) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    first, last = net.network_address + 1, net.broadcast_address - 1
    if gateway == first:
        first += 1
    elif gateway == last:
        last -= 1
    start = (
        ipam.host_in(net, ipam.parse_address(body.allocation_start, "allocation_start"), "allocation_start")
        if (body.allocation_start is not None)
        else first
    )
    end = (
        ipam.host_in(net, ipam.parse_address(body.allocation_end, "allocation_end"), "allocation_end")
        if (body.allocation_end is not None)
        else last
    )
    if start > end:
        raise ipam.bad("allocation_end", f"the allocation range {start}-{end} is empty (start after end)")
    return start, end


def subnet_spec(body: SubnetCreate, network: Network) -> SubnetSpec:
    """The validated spec (422 naming the field): a CIDR inside the network, a gateway and an allocation range
    inside the subnet, DNS server addresses, static routes whose next hop is in the subnet."""
    net = ipam.parse_cidr(body.cidr)
    parent = ipaddress.IPv4Network(network.spec.cidr)
    if not net.subnet_of(parent):
        raise ipam.bad("cidr", f"{net} is outside network '{network.name}' ({parent}); choose a CIDR inside it")
    gateway = (
        ipam.host_in(net, ipam.parse_address(body.gateway, "gateway"), "gateway")
        if body.gateway is not None
        else net.network_address + 1
    )
    start, end = _range(body, net, gateway)
    dns = [str(ipam.parse_address(a, "dns_servers")) for a in body.dns_servers]
    routes = []
    for r in body.routes:
        dest = ipam.parse_route_destination(r.destination, "routes.destination")
        hop = ipam.host_in(net, ipam.parse_address(r.nexthop, "routes.nexthop"), "routes.nexthop")
        routes.append(RouteSpec(destination=str(dest), nexthop=str(hop)))
    return SubnetSpec(
        network=network.id,
        cidr=str(net),
        gateway=str(gateway),
        allocation_start=str(start),
        allocation_end=str(end),
        dns_servers=dns,
        routes=routes,
        description=body.description,
    )


async def _overlapping(store: Store, network: Network, cidr: str) -> list[str]:
    net = ipaddress.IPv4Network(cidr)
    names = []
    for sid, other in sorted(network.spec.subnets.items()):
        if net.overlaps(ipaddress.IPv4Network(other)):
            record = await store.get(SUBNET.name, sid)
            names.append(f"'{record.name if record else sid}' ({other})")
    return names


def _network_with(ctx: Context, network: Network, subnets: dict[str, str]) -> Update:
    spec = msgspec.structs.replace(network.spec, subnets=subnets)
    return Update(NETWORK.dump(network.replace(spec=spec, updated_at=ctx.clock())), expect_revision=network.revision)


async def create_subnet(ctx: Context, store: Store, body: SubnetCreate) -> Written:
    """Create a subnet of a VPC in ``ctx``'s project with its gateway address reserved (one transaction with a CAS
    on the network: overlaps are refused with 409 even between concurrent creates). 422 for a bad CIDR, a CIDR
    outside the network, a gateway or range outside the subnet; 404 for an unknown network."""

    async def step(_: int) -> Written:
        network = await crud.get(ctx, store, NETWORK, body.network)
        if network.spec.external:
            raise errors.Conflict(
                f"network '{network.name}' is external: its subnet was made with it; routers reach it through "
                "their external_network"
            )
        spec = subnet_spec(body, network)
        if overlaps := await _overlapping(store, network, spec.cidr):
            raise errors.Conflict(
                f"{spec.cidr} overlaps subnet {', '.join(overlaps)} of network '{network.name}'; choose a free CIDR"
            )
        subnet = SUBNET.new(project=ctx.project, name=body.name, spec=spec, labels=body.labels, stamp=ctx.clock())
        extra: list[Op] = [
            _network_with(ctx, network, {**network.spec.subnets, subnet.id: spec.cidr}),
            ipam.reserve(ctx, subnet.id, spec.gateway, f"subnet/{subnet.id}"),
        ]
        return await crud.create(ctx, store, SUBNET, subnet, extra=extra)

    return await ipam.retrying(step)


async def delete_subnet(
    ctx: Context, store: Store, ref: str, *, expect: int | None = None, directory: Directory | None = None
) -> Written:
    """Delete a subnet no router is attached to and no one holds an address of but its gateway (409 naming them);
    releases the gateway and updates the network in the same transaction. A subnet of an external network is the
    cluster administrator's (``admin:networks:delete``), like the network itself."""
    subnet = await crud.get(ctx, store, SUBNET, ref)
    parent = await store.get(NETWORK.name, subnet.spec.network)
    if parent is not None and NETWORK.load(parent).spec.external:
        from minicloud.network.networks import _require_admin  # networks imports this module

        await _require_admin(ctx, directory, "admin:networks:delete")
    if expect is not None and expect != subnet.revision:
        raise errors.PreconditionFailed(
            "the subnet was changed since the revision you sent in If-Match; read it again and retry"
        )
    if subnet.spec.router:
        record = await store.get("router", subnet.spec.router)
        raise errors.InUse(
            f"subnet '{subnet.name}' is attached to router '{record.name if record else subnet.spec.router}'; "
            "detach it with `minicloud router remove-subnet ROUTER SUBNET`"
        )
    marked = subnet.replace(spec=msgspec.structs.replace(subnet.spec, deleting=True), updated_at=ctx.clock())
    try:
        revision, _ = await store.commit(Txn([Update(SUBNET.dump(marked), expect_revision=subnet.revision)]))
    except TxnFailed:
        raise errors.Conflict(f"subnet '{subnet.name}' changed while it was being deleted; retry") from None
    marked = marked.replace(revision=revision)
    try:
        # the subnet's own addresses: its gateway's, and each node's DHCP port on an external network
        held = [
            a
            for a in await ipam.allocations(store, subnet.id)
            if a.spec.holder != f"subnet/{subnet.id}" and not a.spec.holder.startswith(f"dhcp/{subnet.spec.network}/")
        ]
        if held:
            holders = ", ".join(sorted({f"{a.spec.holder} ({a.spec.address})" for a in held}))
            raise errors.InUse(f"subnet '{subnet.name}' still has addresses held by {holders}; release them first")
        own = [ipam.release(a) for a in await ipam.allocations(store, subnet.id)]

        async def step(_: int) -> Written:
            network = await store.get(NETWORK.name, subnet.spec.network)
            extra: list[Op] = [*own]
            if network is not None:
                net = NETWORK.load(network)
                extra.append(_network_with(ctx, net, {k: v for k, v in net.spec.subnets.items() if k != subnet.id}))
            return await crud.delete_obj(ctx, store, SUBNET, marked, expect=revision, extra=extra)

        return await ipam.retrying(step)
    except BaseException:
        active = marked.replace(spec=msgspec.structs.replace(marked.spec, deleting=False), updated_at=ctx.clock())
        with contextlib.suppress(TxnFailed, errors.MinicloudError):
            await store.commit(Txn([Update(SUBNET.dump(active), expect_revision=revision)]))
        raise
