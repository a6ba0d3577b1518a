"""Ports: an instance's NICs. A port is a ``port`` record in the instance's project holding an address of a subnet
(its ``ipalloc`` names ``port/<id>`` as holder), a MAC and its security groups; the instance keeps a copy of what it
shows (:class:`~minicloud.compute.kinds.InstanceNicSpec`), written in the same transaction.

These functions only *prepare*: they resolve and validate what a NIC asks for (:func:`resolve`), and return the
ops that create (:func:`create_ops`) or remove (:func:`delete_ops`) ports. The caller commits them together with the
instance (create, placement, hot-plug, the final delete), so a port never exists without its instance nor an
address without its port, on one node or across an etcd cluster. A transaction that lost an address race fails as
a whole and is retried on a fresh read by the caller (:func:`minicloud.network.ipam.lost_race`).

Port records are named ``<instance id>/<index>``: an instance's ports are one range read (:func:`instance_ports`)
and two ports cannot take one index of one instance.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.iam.directory import Directory
from minicloud.network import ipam
from minicloud.network.kinds import (
    IPALLOC,
    NETWORK,
    PORT,
    SECURITY_GROUP,
    SUBNET,
    NetworkSpec,
    PortSpec,
    SecurityGroupSpec,
    SubnetSpec,
)
from minicloud.network.networks import _require_admin
from minicloud.network.routers import external_network
from minicloud.network.security_groups import ensure_default_group
from minicloud.state import Create, Delete, Op, Store, list_all

Port = Obj[PortSpec, Any]
Network = Obj[NetworkSpec, Any]
Subnet = Obj[SubnetSpec, Any]
Group = Obj[SecurityGroupSpec, Any]
_PAGE = 1000
#: At most this many NICs per instance (PCI slots on the q35 root bus are the practical bound).
MAX_NICS = 8


@dataclass(frozen=True)
class Wanted:
    """A resolved NIC request: the network, the subnet to allocate in (None: the first of the network's subnets with
    a free address), the address asked for (None: IPAM picks) and the security groups."""

    network: Network
    subnet: Subnet | None
    ip: str | None
    groups: tuple[Group, ...]


def port_name(instance_id: str, index: int) -> str:
    return f"{instance_id}/{index}"


def mac_for(port_id: str) -> str:
    """The port's MAC: locally administered QEMU prefix ``52:54:00`` + 24 bits of the port id's hash (fixed for the
    port's life). Two ports of one network share a MAC with probability ~n²/2^25 (n ports): 0.03 % at 100."""
    h = hashlib.sha256(port_id.encode()).digest()
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*h[:3])


async def _network(ctx: Context, store: Store, ref: str, directory: Directory | None) -> Network:
    own = await crud.find(ctx, store, NETWORK, ref)
    if own is not None:
        return own
    try:
        return await external_network(ctx, store, ref)
    except errors.NotFound:
        raise crud.not_found(NETWORK, ref, ctx.project) from None


async def resolve(
    ctx: Context,
    store: Store,
    *,
    subnet: str | None,
    network: str | None,
    ip: str | None,
    security_groups: list[str] | None,
    directory: Directory | None = None,
) -> Wanted:
    """Validate one NIC request: exactly one of ``subnet`` / ``network`` (422), both of the caller's project (404),
    except an external network given by ``network``; a NIC on an external network (named by network or by
    subnet) only cluster administrators may make for now (403); ``ip`` an IPv4 address (422; whether it is in the subnet and free is checked on allocation); the
    security groups of the project (404), default: the project's ``default`` group (made on first use)."""
    if (subnet is None) == (network is None):
        raise ipam.bad("nics", "give a NIC either a subnet or a network (subnet=S or network=N), not both or neither")
    if ip is not None:
        ipam.parse_address(ip, "ip")
    if subnet is not None:
        sub = await crud.get(ctx, store, SUBNET, subnet)
        record = await store.get(NETWORK.name, sub.spec.network)
        if record is None:
            raise crud.not_found(NETWORK, sub.spec.network, ctx.project)
        net: Network = NETWORK.load(record)
        chosen: Subnet | None = sub
    else:
        assert network is not None
        net = await _network(ctx, store, network, directory)
    if net.spec.external:
        # A NIC on the provider LAN (and an address of the operator's choosing there) is the operator's to give,
        # whichever project holds the external network and whether it is named by network or by subnet.
        await _require_admin(ctx, directory, "admin:networks:attach")
    if network is not None:
        if not net.spec.subnets:
            raise errors.Conflict(f"network '{net.name}' has no subnet; create one with `minicloud subnet create`")
        chosen = None
        if ip is not None:  # the subnet that contains the address asked for
            addr = ipaddress.IPv4Address(ip)
            for sid, cidr in sorted(net.spec.subnets.items(), key=lambda kv: kv[1]):
                if addr in ipaddress.IPv4Network(cidr) and (rec := await store.get(SUBNET.name, sid)) is not None:
                    chosen = SUBNET.load(rec)
                    break
            if chosen is None:
                raise ipam.bad("ip", f"{ip} is in none of network '{net.name}''s subnets")
    if security_groups is None:
        groups: tuple[Group, ...] = (await ensure_default_group(ctx, store),)
    else:
        found: dict[str, Group] = {}
        for ref in security_groups:
            g = await crud.get(ctx, store, SECURITY_GROUP, ref)
            found.setdefault(g.id, g)
        groups = tuple(found.values())
    return Wanted(network=net, subnet=chosen, ip=ip, groups=groups)


async def _subnets_of(store: Store, network: Network) -> list[Subnet]:
    out = []
    for sid, _ in sorted(network.spec.subnets.items(), key=lambda kv: kv[1]):
        if (record := await store.get(SUBNET.name, sid)) is not None:
            out.append(SUBNET.load(record))
    return out


async def create_ops(
    ctx: Context,
    store: Store,
    wanted: Wanted,
    *,
    project: str,
    instance_id: str,
    index: int,
    node: str,
    spread: int = 0,
    exclude: frozenset[str] = frozenset(),
) -> tuple[Port, Subnet, list[Op]]:
    """A new port for ``wanted`` (an address allocated on a fresh read) and the ops that record it: the port and
    its ``ipalloc`` (+ a Check on the subnet's revision). Commit them with the instance. ``exclude``: addresses
    (``<subnet id>/<address>``) other ports of the same transaction take. 409 when the address asked for is used
    or no subnet has a free address; 422 for an address outside the subnet."""
    port = PORT.new(
        project=project,
        name=port_name(instance_id, index),
        spec=PortSpec(network=wanted.network.id, subnet="", address="", mac=""),
        stamp=ctx.clock(),
    )
    holder = f"port/{port.id}"
    if wanted.subnet is not None:
        current = await store.get(SUBNET.name, wanted.subnet.id)
        if current is None:
            raise crud.not_found(SUBNET, wanted.subnet.name, project)
        subnet = SUBNET.load(current)
        ip = wanted.ip or await _free(store, subnet, exclude)
        address, ops = await ipam.allocate(ctx, store, subnet, ip, holder=holder, spread=spread)
    else:
        candidates = await _subnets_of(store, wanted.network)
        last: errors.MinicloudError | None = None
        for subnet in candidates:
            try:
                ip = await _free(store, subnet, exclude)
                address, ops = await ipam.allocate(ctx, store, subnet, ip, holder=holder, spread=spread)
                break
            except errors.Conflict as exc:
                last = exc
        else:
            raise last or errors.Conflict(f"network '{wanted.network.name}' has no subnet with a free address")
    spec = PortSpec(
        network=wanted.network.id,
        subnet=subnet.id,
        address=address,
        mac=mac_for(port.id),
        instance=instance_id,
        index=index,
        node=node,
        security_groups=[g.id for g in wanted.groups],
    )
    port = port.replace(spec=spec)
    return port, subnet, [Create(PORT.dump(port)), *ops]


async def _free(store: Store, subnet: Subnet, exclude: frozenset[str]) -> str | None:
    """None (IPAM picks) unless another port of the same transaction holds an address of ``subnet``: then the
    lowest address of the range free of both (None if there is none: IPAM answers 409)."""
    mine = {e.partition("/")[2] for e in exclude if e.startswith(f"{subnet.id}/")}
    if not mine:
        return None
    taken = mine | {a.spec.address for a in await ipam.allocations(store, subnet.id)}
    s = subnet.spec
    start, end = int(ipaddress.IPv4Address(s.allocation_start)), int(ipaddress.IPv4Address(s.allocation_end))
    for n in range(start, end + 1):
        if (candidate := str(ipaddress.IPv4Address(n))) not in taken:
            return candidate
    raise errors.Conflict(
        f"subnet '{subnet.name}' has no free address left in {s.allocation_start}-{s.allocation_end}; "
        "release one or create another subnet"
    )


async def instance_ports(store: Store, project: str, instance_id: str) -> list[Port]:
    """The ports of an instance (a range read of the names ``<instance id>/…``), by index."""
    prefix = f"{instance_id}/"
    out: list[Port] = []
    after = (prefix, "")
    while True:
        batch = await store.list(PORT.name, project=project, after=after, limit=_PAGE)
        for record in batch:
            if not record.name.startswith(prefix):
                return sorted(out, key=lambda p: p.spec.index)
            out.append(PORT.load(record))
        if len(batch) < _PAGE:
            return sorted(out, key=lambda p: p.spec.index)
        after = (batch[-1].name, batch[-1].id)


async def delete_ops(store: Store, port: Port) -> list[Op]:
    """The ops that remove ``port`` and release its address (compare-and-swap on both); commit them with the
    instance's change. Idempotent in effect: an address already released is not released again."""
    ops: list[Op] = [Delete(kind=PORT.name, id=port.id, expect_revision=port.revision)]
    record = await store.get_by_name(IPALLOC.name, "", ipam.alloc_name(port.spec.subnet, port.spec.address))
    if record is not None:
        alloc = IPALLOC.load(record)
        if alloc.spec.holder == f"port/{port.id}":
            ops.append(ipam.release(alloc))
    return ops


async def ports_on_node(store: Store, node: str) -> list[Port]:
    """Every port placed on ``node`` (indexed lookup): what its network reconciler builds."""
    return [PORT.load(r) for r in await list_all(store, PORT.name, where={"node": node})]
