"""Networks (VPCs and external networks): create with a cluster-unique VNI, delete when unused. List, show and the
description/labels patch are generic (:mod:`minicloud.core.crud`)."""

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
from minicloud.iam.directory import Directory, authorize
from minicloud.model.network import NetworkCreate
from minicloud.network import ipam
from minicloud.network.kinds import NETWORK, SUBNET, VNI, VXLAN_OVERHEAD, NetworkSpec, SubnetSpec
from minicloud.network.security_groups import ensure_default_group
from minicloud.state import Create, Delete, Op, Store, Txn, TxnFailed

DEFAULT_UNDERLAY_MTU = 1500


async def _require_admin(ctx: Context, directory: Directory | None, action: str) -> None:
    """External networks are the cluster administrator's (``admin:networks:*``)."""
    if directory is not None:
        await authorize(directory, ctx.principal, action, "", cluster=True)
    elif not ctx.principal.admin:
        raise errors.Forbidden(f"external networks are for cluster administrators ({action})", action=action)


def _pool(text: str | None, net: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address) -> tuple[str, str]:
    """``FIRST-LAST`` inside ``net`` (default: every host address but the gateway's side)."""
    if text is None:
        first, last = net.network_address + 1, net.broadcast_address - 1
        if gateway == first:
            first += 1
        elif gateway == last:
            last -= 1
        return str(first), str(last)
    lo, sep, hi = text.partition("-")
    if not sep:
        raise ipam.bad("pool", f"'{text}' is not a range FIRST-LAST such as 192.0.2.100-192.0.2.199")
    start = ipam.host_in(net, ipam.parse_address(lo.strip(), "pool"), "pool")
    end = ipam.host_in(net, ipam.parse_address(hi.strip(), "pool"), "pool")
    if start > end:
        raise ipam.bad("pool", f"the pool starts ({start}) after it ends ({end})")
    return str(start), str(end)


async def create_network(
    ctx: Context,
    store: Store,
    body: NetworkCreate,
    *,
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
    directory: Directory | None = None,
) -> Written:
    """Create a VPC with the lowest free VNI (a compare-and-swap on the ``vni`` record's name, retried on a lost
    race) and MTU ``underlay_mtu - 50``; or, for an administrator, an external network with its one subnet (the
    gateway reserved, the pool its allocation range). The project's ``default`` security group is made on first use.
    Atomic (one transaction); 409 for a taken name; idempotent under ``ctx.idempotency``."""
    net = ipam.parse_cidr(body.cidr)
    if body.external:
        await _require_admin(ctx, directory, "admin:networks:create")
        return await _create_external(ctx, store, body, net, underlay_mtu)
    for field in ("provider", "gateway", "pool"):
        if getattr(body, field) is not None:
            raise ipam.bad(field, f"'{field}' is only for external networks (--external)")
    await ensure_default_group(ctx, store)
    avoid: set[int] = set()
    obj = NETWORK.new(
        project=ctx.project,
        name=body.name,
        spec=NetworkSpec(cidr=str(net), mtu=underlay_mtu - VXLAN_OVERHEAD, description=body.description),
        labels=body.labels,
        stamp=ctx.clock(),
    )

    async def step(attempt: int) -> Written:
        vni, op = await ipam.allocate_vni(ctx, store, obj.id, avoid=avoid)
        try:
            return await crud.create(ctx, store, NETWORK, obj.replace(spec=_with(obj.spec, vni=vni)), extra=[op])
        except errors.MinicloudError as exc:
            if ipam.lost_race(exc):
                avoid.add(vni)
            raise

    return await ipam.retrying(step)


def _with(spec: Any, **changes: Any) -> Any:
    return msgspec.structs.replace(spec, **changes)


async def _create_external(
    ctx: Context, store: Store, body: NetworkCreate, net: ipaddress.IPv4Network, underlay_mtu: int
) -> Written:
    if not body.provider:
        raise ipam.bad("provider", "an external network needs --provider PHYSNET (a [network.providers] key)")
    gateway = (
        ipam.host_in(net, ipam.parse_address(body.gateway, "gateway"), "gateway")
        if body.gateway is not None
        else net.network_address + 1
    )
    start, end = _pool(body.pool, net, gateway)
    network = NETWORK.new(
        project=ctx.project,
        name=body.name,
        spec=NetworkSpec(
            cidr=str(net), mtu=underlay_mtu, external=True, provider=body.provider, description=body.description
        ),
        labels=body.labels,
        stamp=ctx.clock(),
    )
    subnet = SUBNET.new(
        project=ctx.project,
        name=body.name,
        spec=SubnetSpec(
            network=network.id, cidr=str(net), gateway=str(gateway), allocation_start=start, allocation_end=end
        ),
        stamp=ctx.clock(),
    )
    network = network.replace(spec=_with(network.spec, subnets={subnet.id: str(net)}))
    extra: list[Op] = [
        ipam.reserve(ctx, subnet.id, str(gateway), f"subnet/{subnet.id}"),
    ]
    return await crud.create(ctx, store, NETWORK, network, extra=[Create(SUBNET.dump(subnet)), *extra])


async def users(store: Store, network: Obj[NetworkSpec, Any]) -> list[str]:
    """What keeps ``network`` from being deleted, as ``subnet NAME`` / ``router NAME`` phrases."""
    found = []
    for sid in sorted(network.spec.subnets):
        record = await store.get(SUBNET.name, sid)
        found.append(f"subnet '{record.name if record else sid}'")
    for rid in network.spec.routers:
        record = await store.get("router", rid)
        found.append(f"router '{record.name if record else rid}'")
    return found


async def delete_network(
    ctx: Context, store: Store, ref: str, *, expect: int | None = None, directory: Directory | None = None
) -> Written:
    """Delete a network that has no subnets and is no router's external network (409 naming them), and free its
    VNI in the same transaction. A compare-and-swap on the revision read: a subnet created meanwhile (which bumps
    the network's revision) makes it read again and refuse."""

    async def step(_: int) -> Written:
        network = await crud.get(ctx, store, NETWORK, ref)
        if network.spec.external:
            await _require_admin(ctx, directory, "admin:networks:delete")
        if expect is not None and expect != network.revision:
            raise errors.PreconditionFailed(
                "the network was changed since the revision you sent in If-Match; read it again and retry"
            )
        if in_use := await users(store, network):
            raise errors.InUse(
                f"network '{network.name}' is still used by {', '.join(in_use)}; delete or detach them first"
            )
        extra: list[Op] = []
        vni = await ipam.vni_record(store, network.spec.vni) if network.spec.vni is not None else None
        if vni is not None and vni.spec.network == network.id:
            extra.append(Delete(kind=VNI.name, id=vni.id, expect_revision=vni.revision))
        return await crud.delete_obj(ctx, store, NETWORK, network, expect=network.revision, extra=extra)

    return await (step(0) if expect is not None else ipam.retrying(step))


# -- a node's DHCP port on an external network -------------------------------------------------------------------------
def dhcp_holder(network_id: str, node: str) -> str:
    """The IPAM holder of ``node``'s DHCP port on external network ``network_id``."""
    return f"dhcp/{network_id}/{node}"


async def node_dhcp_address(store: Store, network_id: str, node: str) -> ipaddress.IPv4Interface | None:
    """The address (with its prefix) of ``node``'s DHCP port on external network ``network_id``, whose NICs plug
    straight into the LAN: held in IPAM as :func:`dhcp_holder`, taken from the subnet's range on first use (what
    Neutron's DHCP port does; dnsmasq answers from an address of the subnet). Released with the subnet, or by
    :func:`release_node_dhcp_address` when the node no longer carries the network. None when the network or its
    subnet is gone or being deleted; 409 when the range is exhausted."""
    holder = dhcp_holder(network_id, node)
    ctx = Context.system("network", action="network:networks:dhcp")
    for attempt in range(ipam.ATTEMPTS):
        record = await store.get(NETWORK.name, network_id)
        if record is None or not NETWORK.load(record).spec.external:
            return None
        subnets = NETWORK.load(record).spec.subnets
        srec = await store.get(SUBNET.name, next(iter(sorted(subnets)))) if subnets else None
        if srec is None:
            return None
        subnet = SUBNET.load(srec)
        if subnet.spec.deleting:
            return None
        prefix = ipaddress.IPv4Network(subnet.spec.cidr).prefixlen
        for a in await ipam.allocations(store, subnet.id):
            if a.spec.holder == holder:
                return ipaddress.IPv4Interface(f"{a.spec.address}/{prefix}")
        address, ops = await ipam.allocate(ctx, store, subnet, holder=holder, spread=min(attempt, 8))
        try:
            await store.commit(Txn(ops))
        except TxnFailed:
            continue
        return ipaddress.IPv4Interface(f"{address}/{prefix}")
    raise errors.Conflict(f"the DHCP address of node {node} on network {network_id} kept losing to concurrent changes")


async def release_node_dhcp_address(store: Store, network_id: str, node: str) -> None:
    """Give back ``node``'s DHCP address on external network ``network_id`` (nothing if it holds none)."""
    record = await store.get(NETWORK.name, network_id)
    if record is None:
        return
    holder = dhcp_holder(network_id, node)
    for sid in NETWORK.load(record).spec.subnets:
        for a in await ipam.allocations(store, sid):
            if a.spec.holder == holder:
                with contextlib.suppress(TxnFailed):  # changed or gone meanwhile: the subnet's delete released it
                    await store.commit(Txn([ipam.release(a)]))
