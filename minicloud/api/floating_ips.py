"""``/v1/floating-ips``: allocate, release, associate and disassociate call :mod:`minicloud.network.floating_ips`;
list, show and update are generic."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.floating_ip import FloatingIp, FloatingIpAllocate, FloatingIpAssociate
from minicloud.network import floating_ips
from minicloud.network.kinds import FLOATING_IP

routes = Routes("floating-ips")
_BASE = "/v1/floating-ips/{ref}"


@routes.post(
    "/v1/floating-ips", body=FloatingIpAllocate, response=FloatingIp, status=201,
    auth=Action("network:floatingips:create"),
)  # fmt: skip
async def allocate_floating_ip(request: web.Request, body: FloatingIpAllocate) -> Reply:
    """Allocate a floating IP from an external network's pool."""
    written = await floating_ips.allocate(await res.context_of(request), request.app[STORE], body)
    return res.reply(request, written)


generic.add_crud_routes(routes, FLOATING_IP)


@routes.delete(_BASE, status=204, auth=Action("network:floatingips:delete"))
async def release_floating_ip(request: web.Request) -> Reply:
    """Release a floating IP (disassociating it); its address goes back to the pool."""
    ctx = await res.context_of(request)
    written = await floating_ips.release(
        ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)


@routes.post(
    f"{_BASE}/associate", body=FloatingIpAssociate, response=FloatingIp, auth=Action("network:floatingips:associate")
)
async def associate_floating_ip(request: web.Request, body: FloatingIpAssociate) -> Reply:
    """NAT the floating IP to an instance's NIC (moving it from where it was)."""
    ctx = await res.context_of(request)
    written = await floating_ips.associate(ctx, request.app[STORE], request.match_info["ref"], body)
    return res.reply(request, written)


@routes.post(f"{_BASE}/disassociate", response=FloatingIp, auth=Action("network:floatingips:disassociate"))
async def disassociate_floating_ip(request: web.Request) -> Reply:
    """Stop NATing the floating IP; it stays allocated."""
    ctx = await res.context_of(request)
    written = await floating_ips.disassociate(ctx, request.app[STORE], request.match_info["ref"])
    return res.reply(request, written)
