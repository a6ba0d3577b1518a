"""Address and VNI allocation by compare-and-swap on record names, and the CIDR checks the services share.

An allocated address is an ``ipalloc`` record named ``<subnet id>/<address>``, an allocated VNI a ``vni`` record
named by the number; both are cluster-scoped, and the store refuses a second record of one (kind, project, name)
(``name-taken``) on one node or across an etcd cluster. So an allocation is: read what is taken, pick a candidate,
and commit its record **in the same transaction** as whatever holds it (the subnet of a gateway, a router, later a
NIC). A transaction that loses the race fails as a whole (nothing half-done) and is retried with a fresh read
(:func:`retrying`). No address or VNI is ever given twice; a crash never leaves an allocation without its holder.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from minicloud import errors
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.network.kinds import IPALLOC, VNI, VNI_MAX, VNI_MIN, IpAllocSpec, SubnetSpec, VniSpec
from minicloud.state import Check, Create, Delete, Op, Store, TxnFailed

W = TypeVar("W")

#: How many times an allocation that lost a race is retried on a fresh read before giving up with a 409.
ATTEMPTS = 64
_PAGE = 1000


# -- parsing (422 naming the field) ----------------------------------------------------------------------------------
def bad(field: str, message: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(message, invalid_params=[{"name": field, "reason": message}])


def parse_cidr(text: str, field: str = "cidr") -> ipaddress.IPv4Network:
    """``text`` as an IPv4 network with no host bits set, /8 to /29 (room for a gateway and a few hosts)."""
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise bad(field, f"'{text[:43]}' is not an IPv4 CIDR such as 10.0.0.0/24 ({exc})") from None
    if not 8 <= net.prefixlen <= 29:
        raise bad(field, f"{net} is /{net.prefixlen}; use a prefix from /8 to /29")
    return net


def parse_address(text: str, field: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise bad(field, f"'{text[:39]}' is not an IPv4 address such as 10.0.0.1") from None


def parse_route_destination(text: str, field: str = "destination") -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise bad(field, f"'{text[:43]}' is not an IPv4 CIDR ({exc})") from None


def host_in(net: ipaddress.IPv4Network, addr: ipaddress.IPv4Address, field: str) -> ipaddress.IPv4Address:
    """``addr`` if it is a host address of ``net`` (not its network or broadcast address), else 422."""
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise bad(field, f"{addr} is not a host address of {net}")
    return addr


# -- addresses -----------------------------------------------------------------------------------------------------
def alloc_name(subnet_id: str, address: str) -> str:
    return f"{subnet_id}/{address}"


def reserve(ctx: Context, subnet_id: str, address: str, holder: str) -> Create:
    """The op that records ``address`` of ``subnet_id`` as held by ``holder`` (``<kind>/<id>``): commit it with the
    holder. Fails the transaction with ``name-taken`` if the address is held already."""
    obj = IPALLOC.new(
        project="",
        name=alloc_name(subnet_id, address),
        spec=IpAllocSpec(subnet=subnet_id, address=address, holder=holder),
        stamp=ctx.clock(),
    )
    return Create(IPALLOC.dump(obj))


async def allocations(store: Store, subnet_id: str) -> list[Obj[IpAllocSpec, Any]]:
    """Every allocation of the subnet (a range read of the names ``<subnet id>/…``)."""
    prefix = alloc_name(subnet_id, "")
    out: list[Obj[IpAllocSpec, Any]] = []
    after = (prefix, "")
    while True:
        batch = await store.list(IPALLOC.name, project="", after=after, limit=_PAGE)
        for record in batch:
            if not record.name.startswith(prefix):
                return out
            out.append(IPALLOC.load(record))
        if len(batch) < _PAGE:
            return out
        after = (batch[-1].name, batch[-1].id)


async def allocate(
    ctx: Context,
    store: Store,
    subnet: Obj[SubnetSpec, Any],
    wanted: str | None = None,
    *,
    holder: str = "",
    spread: int = 0,
) -> tuple[str, list[Op]]:
    """An address of ``subnet`` for ``holder`` and the ops that take it: the ``ipalloc`` create and a Check on the
    subnet's revision (so a subnet being deleted refuses it). The caller commits the ops with its own record.

    Without ``wanted``: the lowest free address of the allocation range (``spread`` > 0, on a retry after a lost
    race, picks at random among the ``spread + 1`` lowest, so contenders stop colliding). With it: that address,
    which may be any host address of the subnet (422 outside, 409 when held). 409 when the range is exhausted."""
    s = subnet.spec
    if s.deleting:
        raise errors.Conflict(f"subnet '{subnet.name}' is being deleted")
    net = ipaddress.IPv4Network(s.cidr)
    taken = {a.spec.address for a in await allocations(store, subnet.id)}
    if wanted is not None:
        addr = host_in(net, parse_address(wanted, "ip"), "ip")
        if str(addr) in taken:
            raise errors.Conflict(
                f"address {addr} of subnet '{subnet.name}' is already used; choose another or leave it out"
            )
        address = str(addr)
    else:
        start, end = int(ipaddress.IPv4Address(s.allocation_start)), int(ipaddress.IPv4Address(s.allocation_end))
        free: list[str] = []
        for n in range(start, end + 1):
            candidate = str(ipaddress.IPv4Address(n))
            if candidate not in taken:
                free.append(candidate)
                if len(free) > spread:
                    break
        if not free:
            raise errors.Conflict(
                f"subnet '{subnet.name}' has no free address left in {s.allocation_start}-{s.allocation_end}; "
                "release one or create another subnet"
            )
        address = random.choice(free) if spread else free[0]
    holder = holder or ctx.principal.ref
    ops: list[Op] = [
        reserve(ctx, subnet.id, address, holder),
        Check(kind=subnet.kind, id=subnet.id, expect_revision=subnet.revision),
    ]
    return address, ops


def release(alloc: Obj[IpAllocSpec, Any]) -> Delete:
    return Delete(kind=IPALLOC.name, id=alloc.id, expect_revision=alloc.revision)


# -- VNIs ------------------------------------------------------------------------------------------------------------
async def taken_vnis(store: Store) -> set[int]:
    records = await store.list(VNI.name, project="", limit=1_000_000)
    return {int(r.name) for r in records if r.name.isdigit()}


async def allocate_vni(
    ctx: Context, store: Store, network_id: str, *, avoid: set[int] | None = None
) -> tuple[int, Create]:
    """The lowest VNI that is neither recorded nor in ``avoid`` (candidates a previous try lost), and the op that
    records it for ``network_id``. 409 when the range is exhausted."""
    taken = await taken_vnis(store) | (avoid or set())
    vni = VNI_MIN
    while vni in taken:
        vni += 1
    if vni > VNI_MAX:
        raise errors.Conflict("every VXLAN network identifier is in use; delete unused networks")
    obj = VNI.new(project="", name=str(vni), spec=VniSpec(network=network_id, project=ctx.project), stamp=ctx.clock())
    return vni, Create(VNI.dump(obj))


async def vni_record(store: Store, vni: int) -> Obj[VniSpec, Any] | None:
    record = await store.get_by_name(VNI.name, "", str(vni))
    return VNI.load(record) if record is not None else None


# -- races -----------------------------------------------------------------------------------------------------------
def lost_race(exc: BaseException) -> bool:
    """Whether a write failed because a concurrent one took the same address or VNI first, or changed a subnet an
    allocation was checked against: worth retrying on a fresh read. The write layer raises the problem ``from``
    the store's :class:`TxnFailed`, which stays the exception's context."""
    cause = exc.__context__
    if not isinstance(cause, TxnFailed):
        return False
    if cause.reason == "name-taken":
        record = getattr(cause.op, "record", None)
        return record is not None and record.kind in (IPALLOC.name, VNI.name)
    return (
        cause.reason in ("revision-mismatch", "not-found") and isinstance(cause.op, Check) and cause.op.kind == "subnet"
    )


async def retrying(step: Callable[[int], Awaitable[W]], attempts: int = ATTEMPTS) -> W:
    """``await step(attempt)`` until it does not lose an allocation race (:func:`lost_race`) or a compare-and-swap
    on a record it read (412 from the write layer when the caller sent no If-Match): each try reads afresh."""
    for attempt in range(attempts):
        try:
            return await step(attempt)
        except errors.MinicloudError as exc:
            retry = lost_race(exc) or isinstance(exc, errors.PreconditionFailed)
            if not retry:
                raise
            if attempt == attempts - 1:
                raise errors.Conflict("the allocation kept losing to concurrent requests; retry") from None
    raise AssertionError("unreachable")
