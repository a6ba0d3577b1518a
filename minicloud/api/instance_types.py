"""``/v1/instance-types``: the built-in catalogue plus admin-defined types (cluster-wide)."""

from __future__ import annotations

from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute import types
from minicloud.model import Page
from minicloud.model.compute import InstanceType, InstanceTypeCreate

routes = Routes("instance-types")


async def lookup(request: web.Request, name: str) -> InstanceType:
    """The type called ``name`` (built-in or custom); 422 naming the choices when there is none."""
    return await types.lookup(await res.context_of(request), request.app[STORE], name)


@routes.get("/v1/instance-types", response=Page[InstanceType], auth=Action("compute:instancetypes:list"))
async def list_types(request: web.Request) -> Page[InstanceType]:
    """List instance types: built-in first, then custom ones by name."""
    return Page(items=await types.list_types(await res.context_of(request), request.app[STORE]))


@routes.get("/v1/instance-types/{ref}", response=InstanceType, auth=Action("compute:instancetypes:get"))
async def show_type(request: web.Request) -> InstanceType:
    """Show an instance type by name."""
    ref = request.match_info["ref"]
    itype = await types.find(await res.context_of(request), request.app[STORE], ref)
    if itype is None:
        raise errors.NotFound(f"no instance type '{ref[:64]}'; see `minicloud type list`")
    return itype


@routes.post(
    "/v1/instance-types",
    body=InstanceTypeCreate,
    response=InstanceType,
    status=201,
    auth=Action("admin:instancetypes:create"),
)
async def create_type(request: web.Request, body: InstanceTypeCreate) -> Reply:
    """Define a custom instance type (cluster administrators)."""
    return res.reply(request, await types.create_type(await res.context_of(request), request.app[STORE], body))


@routes.delete("/v1/instance-types/{ref}", status=204, auth=Action("admin:instancetypes:delete"))
async def delete_type(request: web.Request) -> Reply:
    """Delete a custom instance type. Instances keep their shape (it is copied into each instance)."""
    ctx = await res.context_of(request)
    written = await types.delete_type(ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request))
    return res.reply(request, written)
