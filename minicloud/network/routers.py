"""Routers: create (with an address on an external network for SNAT), attach and detach subnets, add and remove
static routes, delete when no subnet is attached. List, show and the description/labels patch are generic.

Every change that links two records writes both in one transaction with a compare-and-swap on each (router and
subnet; router and external network), so the back-references that deletes rely on are never stale.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written, commit
from minicloud.model.network import Route, RouterCreate, RouterSubnet
from minicloud.network import ipam
from minicloud.network.kinds import NETWORK, ROUTER, SUBNET, NetworkSpec, RouterSpec, RouteSpec, SubnetSpec
from minicloud.state import Op, Store, Txn, TxnFailed, Update

Router = Obj[RouterSpec, Any]
Network = Obj[NetworkSpec, Any]
Subnet = Obj[SubnetSpec, Any]


def _update(ctx: Context, kind: Any, obj: Obj[Any, Any], **spec: Any) -> Update:
    changed = obj.replace(spec=msgspec.structs.replace(obj.spec, **spec), updated_at=ctx.clock())
    return Update(kind.dump(changed), expect_revision=obj.revision)


async def external_network(ctx: Context, store: Store, ref: str) -> Network:
    """The external network ``ref`` names: in the caller's project, or (external networks being shared) by id or
    name in any project. 404 when there is none; 409 for a network that is not external."""
    own = await crud.find(ctx, store, NETWORK, ref)
    if own is not None:
        if not own.spec.external:
            raise errors.Conflict(f"network '{own.name}' is not external; create routers' gateways on an external one")
        return own
    if ref.startswith(NETWORK.prefix + "-") and (record := await store.get(NETWORK.name, ref)) is not None:
        candidates = [record]
    else:
        candidates = await store.list(NETWORK.name, project=None, name=ref, limit=100)
    for record in candidates:
        network = NETWORK.load(record)
        if network.spec.external:
            return network
    raise crud.not_found(NETWORK, ref, ctx.project)


async def create_router(ctx: Context, store: Store, body: RouterCreate) -> Written:
    """Create a router; with ``external_network`` it gets the lowest free address of that network's pool (committed
    with it, the network naming it back). 404 for an unknown network, 409 for a full pool or a taken name."""
    if body.external_network is None:
        obj = ROUTER.new(
            project=ctx.project,
            name=body.name,
            spec=RouterSpec(description=body.description),
            labels=body.labels,
            stamp=ctx.clock(),
        )
        return await crud.create(ctx, store, ROUTER, obj)
    ref = body.external_network

    async def step(attempt: int) -> Written:
        network = await external_network(ctx, store, ref)
        if not network.spec.subnets:
            raise errors.Conflict(f"external network '{network.name}' has no subnet to take an address from")
        record = await store.get(SUBNET.name, sorted(network.spec.subnets)[0])
        if record is None:
            raise errors.Conflict(f"the subnet of external network '{network.name}' was deleted")
        subnet = SUBNET.load(record)
        obj = ROUTER.new(
            project=ctx.project, name=body.name, spec=RouterSpec(description=body.description), labels=body.labels,
            stamp=ctx.clock(),
        )  # fmt: skip
        address, ops = await ipam.allocate(ctx, store, subnet, holder=f"router/{obj.id}", spread=min(attempt, 8))
        obj = obj.replace(
            spec=msgspec.structs.replace(
                obj.spec, external_network=network.id, external_subnet=subnet.id, external_address=address
            )
        )
        extra = [*ops, _update(ctx, NETWORK, network, routers=[*network.spec.routers, obj.id])]
        return await crud.create(ctx, store, ROUTER, obj, extra=extra)

    return await ipam.retrying(step)


async def delete_router(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Delete a router with no subnet attached (409 naming them), releasing its external address."""

    async def step(_: int) -> Written:
        router = await crud.get(ctx, store, ROUTER, ref)
        if expect is not None and expect != router.revision:
            raise errors.PreconditionFailed(
                "the router was changed since the revision you sent in If-Match; read it again and retry"
            )
        if router.spec.subnets:
            names = [r.name if (r := await store.get(SUBNET.name, s)) else s for s in router.spec.subnets]
            raise errors.InUse(
                f"router '{router.name}' still has subnets {', '.join(names)}; "
                "detach them with `minicloud router remove-subnet ROUTER SUBNET`"
            )
        extra: list[Op] = []
        if router.spec.external_subnet:
            for alloc in await ipam.allocations(store, router.spec.external_subnet):
                holder = alloc.spec.holder
                if holder == f"router/{router.id}" or holder.startswith(f"router/{router.id}/"):  # its nodes' legs
                    extra.append(ipam.release(alloc))
        if router.spec.external_network and (rec := await store.get(NETWORK.name, router.spec.external_network)):
            network = NETWORK.load(rec)
            extra.append(_update(ctx, NETWORK, network, routers=[r for r in network.spec.routers if r != router.id]))
        return await crud.delete_obj(ctx, store, ROUTER, router, expect=router.revision, extra=extra)

    return await (step(0) if expect is not None else ipam.retrying(step))


async def node_address(store: Store, router_id: str, node: str) -> str | None:
    """The external address of ``node``'s leg of router ``router_id`` (the SNAT source of its guests there), taken
    on first use with a compare-and-swap on the router: its ``external_address`` when no node has that yet (a single
    node changes nothing), else a new address of the external subnet (holder ``router/<id>/<node>``). Two nodes
    must not put one address and MAC on the LAN: its switch sends a MAC's frames to the port it last saw it on, so
    the replies to one node's connections would reach the other. None for a router that is gone or has no external
    gateway; 409 when the external pool is exhausted."""
    ctx = Context.system("network", action="network:routers:leg")
    for attempt in range(ipam.ATTEMPTS):
        record = await store.get(ROUTER.name, router_id)
        if record is None:
            return None
        router = ROUTER.load(record)
        s = router.spec
        if not (s.external_subnet and s.external_address):
            return None
        if have := s.node_addresses.get(node):
            return have
        ops: list[Op] = []
        if s.external_address not in s.node_addresses.values():
            address = s.external_address
        else:
            subnet = await store.get(SUBNET.name, s.external_subnet)
            if subnet is None:
                return None
            address, ops = await ipam.allocate(
                ctx, store, SUBNET.load(subnet), holder=f"router/{router.id}/{node}", spread=min(attempt, 8)
            )
        ops.append(_update(ctx, ROUTER, router, node_addresses={**s.node_addresses, node: address}))
        try:
            await store.commit(Txn(ops))
            return address
        except TxnFailed:
            continue
    raise errors.Conflict(f"router {router_id}'s address for node {node} kept losing to concurrent changes; retrying")


async def add_subnet(ctx: Context, store: Store, ref: str, body: RouterSubnet) -> Written:
    """Attach a subnet of the project: the router answers on its gateway address. 409 when the subnet is attached
    already (here or elsewhere) or overlaps a subnet the router has."""

    async def step(_: int) -> Written:
        router = await crud.get(ctx, store, ROUTER, ref)
        subnet = await crud.get(ctx, store, SUBNET, body.subnet)
        parent = await store.get(NETWORK.name, subnet.spec.network)
        if parent is not None and NETWORK.load(parent).spec.external:
            raise errors.Conflict(
                f"subnet '{subnet.name}' belongs to an external network: a router reaches it as its external gateway "
                "(`minicloud router create … --external-network NET`), not as one of its subnets"
            )
        if subnet.spec.router:
            where = "this router" if subnet.spec.router == router.id else f"router {subnet.spec.router}"
            raise errors.Conflict(f"subnet '{subnet.name}' is already attached to {where}")
        net = ipaddress.IPv4Network(subnet.spec.cidr)
        for sid in router.spec.subnets:
            other = await store.get(SUBNET.name, sid)
            if other is not None and net.overlaps(ipaddress.IPv4Network(SUBNET.load(other).spec.cidr)):
                raise errors.Conflict(
                    f"subnet '{subnet.name}' ({net}) overlaps subnet '{other.name}' of router '{router.name}'"
                )
        ops: list[Op] = [
            _update(ctx, ROUTER, router, subnets=[*router.spec.subnets, subnet.id]),
            _update(ctx, SUBNET, subnet, router=router.id),
        ]
        return await _commit(ctx, store, ops)

    return await ipam.retrying(step)


async def remove_subnet(ctx: Context, store: Store, ref: str, body: RouterSubnet) -> Written:
    """Detach a subnet (409 when it is not attached here, or a static route goes through it)."""

    async def step(_: int) -> Written:
        router = await crud.get(ctx, store, ROUTER, ref)
        subnet = await crud.get(ctx, store, SUBNET, body.subnet)
        if subnet.id not in router.spec.subnets:
            raise errors.Conflict(f"subnet '{subnet.name}' is not attached to router '{router.name}'")
        net = ipaddress.IPv4Network(subnet.spec.cidr)
        through = [r.destination for r in router.spec.routes if ipaddress.IPv4Address(r.nexthop) in net]
        if through:
            raise errors.Conflict(
                f"routes to {', '.join(through)} go through subnet '{subnet.name}'; remove them first "
                "(`minicloud router route remove ROUTER DESTINATION NEXTHOP`)"
            )
        ops: list[Op] = [
            _update(ctx, ROUTER, router, subnets=[s for s in router.spec.subnets if s != subnet.id]),
            _update(ctx, SUBNET, subnet, router=""),
        ]
        return await _commit(ctx, store, ops)

    return await ipam.retrying(step)


async def _commit(ctx: Context, store: Store, ops: list[Op]) -> Written:
    """Commit ``ops`` (the router's update first) and answer with the updated router."""
    first = ops[0]
    assert isinstance(first, Update)
    router = ROUTER.load(first.record)
    return await commit(
        ctx, store, ops, label=ROUTER.label, respond=lambda rev: ROUTER.to_view(router.replace(revision=rev))
    )


async def _reachable(store: Store, router: Router, hop: ipaddress.IPv4Address) -> bool:
    for sid in [*router.spec.subnets, *([router.spec.external_subnet] if router.spec.external_subnet else [])]:
        record = await store.get(SUBNET.name, sid)
        if record is not None and hop in ipaddress.IPv4Network(SUBNET.load(record).spec.cidr):
            return True
    return False


#: Static routes per router (a subnet's bound too).
MAX_ROUTES = 64


async def add_route(ctx: Context, store: Store, ref: str, body: Route) -> Written:
    """Add a static route; its next hop must be in a subnet the router has (422), its destination new (409)."""
    dest = str(ipam.parse_route_destination(body.destination))
    hop = ipam.parse_address(body.nexthop, "nexthop")
    router = await crud.get(ctx, store, ROUTER, ref)
    if not await _reachable(store, router, hop):
        raise ipam.bad("nexthop", f"{hop} is in none of router '{router.name}''s subnets; attach that subnet first")
    route = RouteSpec(destination=dest, nexthop=str(hop))

    def mutate(r: Router) -> Router:
        if any(x.destination == dest for x in r.spec.routes):
            raise errors.Conflict(f"router '{r.name}' already has a route to {dest}; remove it first")
        if len(r.spec.routes) >= MAX_ROUTES:
            raise errors.Conflict(f"router '{r.name}' already has {MAX_ROUTES} static routes, the most it may have")
        return r.replace(spec=msgspec.structs.replace(r.spec, routes=[*r.spec.routes, route]))

    return await crud.update(ctx, store, ROUTER, router.id, mutate)


async def remove_route(ctx: Context, store: Store, ref: str, body: Route) -> Written:
    """Remove the static route to ``destination`` via ``nexthop`` (404 when there is none)."""
    dest = str(ipam.parse_route_destination(body.destination))

    def mutate(r: Router) -> Router:
        routes = [x for x in r.spec.routes if not (x.destination == dest and x.nexthop == body.nexthop)]
        if len(routes) == len(r.spec.routes):
            raise errors.NotFound(f"router '{r.name}' has no route to {dest} via {crud.shown(body.nexthop)}")
        return r.replace(spec=msgspec.structs.replace(r.spec, routes=routes))

    return await crud.update(ctx, store, ROUTER, ref, mutate)
