"""Floating IPs: allocate (an address of an external network's pool, IPAM-allocated with the record), associate with
an instance's NIC, disassociate, release. List, show and the description/labels patch are generic.

A floating IP is named by its address. Associating needs the NIC's subnet attached to a router whose external
gateway is on the floating IP's network (the router's side on the instance's node does the 1:1 NAT, as in Neutron);
one floating IP per NIC (race-free: an association also bumps the NIC's port record). The record keeps the NIC (port), its address and its network: the network reconciler of
the node running that port programs the NAT there (``agent/net/router.py``), and only there.
"""

from __future__ import annotations

from typing import Any

import msgspec

from minicloud import errors, ids
from minicloud.compute.kinds import INSTANCE
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.model.floating_ip import FloatingIpAllocate, FloatingIpAssociate
from minicloud.network import ipam
from minicloud.network.kinds import FLOATING_IP, PORT, ROUTER, SUBNET, FloatingIpSpec
from minicloud.network.routers import external_network
from minicloud.state import Op, Store, Update, list_all

FloatingIp = Obj[FloatingIpSpec, Any]


async def allocate(ctx: Context, store: Store, body: FloatingIpAllocate) -> Written:
    """The lowest free address of the external network's pool, held by a new floating IP of the caller's project.
    404 for an unknown network, 409 for a network that is not external or a pool that is exhausted."""

    async def step(attempt: int) -> Written:
        network = await external_network(ctx, store, body.network)
        if not network.spec.subnets:
            raise errors.Conflict(f"external network '{network.name}' has no subnet to take an address from")
        record = await store.get(SUBNET.name, sorted(network.spec.subnets)[0])
        if record is None:
            raise errors.Conflict(f"the subnet of external network '{network.name}' was deleted")
        subnet = SUBNET.load(record)
        fid = ids.new_id(FLOATING_IP.prefix)
        address, ops = await ipam.allocate(ctx, store, subnet, holder=f"floatingip/{fid}", spread=min(attempt, 8))
        obj = FLOATING_IP.new(
            project=ctx.project,
            name=address,
            spec=FloatingIpSpec(network=network.id, subnet=subnet.id, address=address, description=body.description),
            labels=body.labels,
            id=fid,
            stamp=ctx.clock(),
        )
        try:
            return await crud.create(ctx, store, FLOATING_IP, obj, extra=ops)
        except errors.AlreadyExists:
            # the name is the address: a concurrent allocation of this project took it first; read again
            raise errors.PreconditionFailed(f"address {address} was taken concurrently") from None

    return await ipam.retrying(step)


async def release(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Delete the floating IP (disassociating it) and free its address."""

    async def step(_: int) -> Written:
        fip = await crud.get(ctx, store, FLOATING_IP, ref)
        if expect is not None and expect != fip.revision:
            raise errors.PreconditionFailed(
                "the floating IP was changed since the revision you sent in If-Match; read it again and retry"
            )
        extra: list[Op] = [
            ipam.release(a)
            for a in await ipam.allocations(store, fip.spec.subnet)
            if a.spec.holder == f"floatingip/{fip.id}"
        ]
        return await crud.delete_obj(ctx, store, FLOATING_IP, fip, expect=fip.revision, extra=extra)

    return await (step(0) if expect is not None else ipam.retrying(step))


async def associate(ctx: Context, store: Store, ref: str, body: FloatingIpAssociate) -> Written:
    """NAT the floating IP to a NIC of an instance of the project (moving it if it was associated elsewhere). 404 for
    an unknown instance or NIC; 409 when no NIC's subnet has a router on the floating IP's network, or the NIC has
    a floating IP already.

    One floating IP per NIC, race-free: the write also bumps the NIC's port record at the revision read before the
    check, so of two concurrent associations of one NIC only one commits; the other looks again and gets the 409."""
    for _ in range(_ASSOCIATE_ATTEMPTS):
        try:
            return await _associate(ctx, store, ref, body)
        except errors.PreconditionFailed:  # the floating IP or the NIC's port changed meanwhile: look again
            continue
    raise errors.PreconditionFailed("the floating IP or the NIC kept changing; retry")


_ASSOCIATE_ATTEMPTS = 5


async def _associate(ctx: Context, store: Store, ref: str, body: FloatingIpAssociate) -> Written:
    fip = await crud.get(ctx, store, FLOATING_IP, ref)
    inst = await crud.get(ctx, store, INSTANCE, body.instance)
    nics = list(inst.spec.nics)
    if body.nic is not None:
        wanted = body.nic.lower()
        nics = [n for n in nics if wanted in (n.port.lower(), n.mac.lower(), n.ip)]
        if not nics:
            raise errors.NotFound(f"instance '{inst.name}' has no NIC {crud.shown(body.nic)}")
    chosen = None
    for nic in nics:
        srec = await store.get(SUBNET.name, nic.subnet)
        rid = SUBNET.load(srec).spec.router if srec is not None else ""
        rrec = await store.get(ROUTER.name, rid) if rid else None
        if rrec is not None and ROUTER.load(rrec).spec.external_network == fip.spec.network:
            chosen = nic
            break
    if chosen is None:
        raise errors.Conflict(
            f"no NIC of instance '{inst.name}' is on a subnet attached to a router with its external gateway on the "
            "floating IP's network; `minicloud router add-subnet ROUTER SUBNET` first"
        )
    port_record = await store.get(PORT.name, chosen.port)
    if port_record is None:
        raise errors.NotFound(f"the NIC {chosen.port} of instance '{inst.name}' is gone")
    for other in await list_all(store, FLOATING_IP.name, project=ctx.project):
        if other.id != fip.id and FLOATING_IP.load(other).spec.port == chosen.port:
            raise errors.Conflict(f"that NIC of instance '{inst.name}' already has floating IP {other.name}")
    port, fixed, network = chosen.port, chosen.ip, chosen.network

    def mutate(f: FloatingIp) -> FloatingIp:
        spec = msgspec.structs.replace(f.spec, instance=inst.id, port=port, fixed_address=fixed, port_network=network)
        return f.replace(spec=spec)

    def bump(_: FloatingIp) -> list[Op]:  # the NIC's port, unchanged but for its revision, at the one checked above
        touched = msgspec.structs.replace(port_record, updated_at=ctx.clock())
        return [Update(touched, expect_revision=port_record.revision)]

    return await crud.update(ctx, store, FLOATING_IP, fip.id, mutate, expect=fip.revision, extra=bump)


async def disassociate(ctx: Context, store: Store, ref: str) -> Written:
    """Stop NATing the floating IP (it stays allocated to the project). Idempotent."""

    def mutate(f: FloatingIp) -> FloatingIp:
        spec = msgspec.structs.replace(f.spec, instance="", port="", fixed_address="", port_network="")
        return f.replace(spec=spec)

    return await crud.update(ctx, store, FLOATING_IP, ref, mutate)
