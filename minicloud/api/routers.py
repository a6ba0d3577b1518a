"""``/v1/routers``: create (an external address when given an external network), delete (refused with subnets
attached), attach and detach subnets, add and remove static routes call :mod:`minicloud.network.routers`; list,
show and update are generic."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.network import Route, Router, RouterCreate, RouterSubnet
from minicloud.network import routers
from minicloud.network.kinds import ROUTER

routes = Routes("routers")
_BASE = "/v1/routers/{ref}"


@routes.post("/v1/routers", body=RouterCreate, response=Router, status=201, auth=Action("network:routers:create"))
async def create_router(request: web.Request, body: RouterCreate) -> Reply:
    """Create a router, optionally with a gateway on an external network."""
    written = await routers.create_router(await res.context_of(request), request.app[STORE], body)
    return res.reply(request, written)


generic.add_crud_routes(routes, ROUTER)


@routes.delete(_BASE, status=204, auth=Action("network:routers:delete"))
async def delete_router(request: web.Request) -> Reply:
    """Delete a router with no subnet attached (409 naming them); releases its external address."""
    ctx = await res.context_of(request)
    written = await routers.delete_router(
        ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)


@routes.post(f"{_BASE}/add-subnet", body=RouterSubnet, response=Router, auth=Action("network:routers:add-subnet"))
async def add_router_subnet(request: web.Request, body: RouterSubnet) -> Reply:
    """Attach a subnet (the router takes its gateway address)."""
    written = await routers.add_subnet(
        await res.context_of(request), request.app[STORE], request.match_info["ref"], body
    )
    return res.reply(request, written)


@routes.post(f"{_BASE}/remove-subnet", body=RouterSubnet, response=Router, auth=Action("network:routers:remove-subnet"))
async def remove_router_subnet(request: web.Request, body: RouterSubnet) -> Reply:
    """Detach a subnet."""
    ctx = await res.context_of(request)
    written = await routers.remove_subnet(ctx, request.app[STORE], request.match_info["ref"], body)
    return res.reply(request, written)


@routes.post(f"{_BASE}/add-route", body=Route, response=Router, auth=Action("network:routers:add-route"))
async def add_router_route(request: web.Request, body: Route) -> Reply:
    """Add a static route (its next hop in one of the router's subnets)."""
    written = await routers.add_route(
        await res.context_of(request), request.app[STORE], request.match_info["ref"], body
    )
    return res.reply(request, written)


@routes.post(f"{_BASE}/remove-route", body=Route, response=Router, auth=Action("network:routers:remove-route"))
async def remove_router_route(request: web.Request, body: Route) -> Reply:
    """Remove a static route."""
    ctx = await res.context_of(request)
    written = await routers.remove_route(ctx, request.app[STORE], request.match_info["ref"], body)
    return res.reply(request, written)
