"""``/v1/server-groups`` (create, show with members, delete only when empty; list and patch from the kind's
declaration) and ``/v1/nodes`` (the compute nodes as the scheduler sees them; ``cordon``/``uncordon``)."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute import nodes, server_groups
from minicloud.compute.kinds import SERVERGROUP
from minicloud.model import Page
from minicloud.model.compute import ComputeNode, NodeCordon, ServerGroup, ServerGroupCreate

routes = Routes("server-groups")


@routes.post(
    "/v1/server-groups",
    body=ServerGroupCreate,
    response=ServerGroup,
    status=201,
    auth=Action("compute:server-groups:create"),
)
async def create_server_group(request: web.Request, body: ServerGroupCreate) -> Reply:
    """Create a server group: instances created with it are kept apart (anti-affinity, per node or zone), together
    (affinity) or apart when possible (soft-anti-affinity)."""
    written = await server_groups.create_server_group(await res.context_of(request), request.app[STORE], body)
    return res.reply(request, written)


@routes.get("/v1/server-groups/{ref}", response=ServerGroup, auth=Action("compute:server-groups:get"))
async def show_server_group(request: web.Request) -> Reply:
    """A server group with its members and their nodes."""
    ctx = await res.context_of(request)
    view = await server_groups.show_server_group(ctx, request.app[STORE], request.match_info["ref"])
    return Reply(view, headers=res.etag(view.revision))


@routes.delete("/v1/server-groups/{ref}", status=204, auth=Action("compute:server-groups:delete"))
async def delete_server_group(request: web.Request) -> Reply:
    """Delete a server group without members (409 naming them otherwise)."""
    ctx = await res.context_of(request)
    written = await server_groups.delete_server_group(
        ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)


@routes.get(
    "/v1/server-groups", query=res.ListQuery, response=Page[ServerGroup], auth=Action("compute:server-groups:list")
)
async def list_server_groups(request: web.Request, query: res.ListQuery) -> Page[ServerGroup]:
    """List server groups with their members (paged; name and label filters)."""
    items, cursor = await server_groups.list_server_groups(
        await res.context_of(request),
        request.app[STORE],
        limit=query.limit,
        cursor=query.cursor,
        name=query.name,
        labels=res.parse_selector(query.label),
    )
    return Page(items=items, next_cursor=cursor)


generic.add_crud_routes(routes, SERVERGROUP)


@routes.get("/v1/nodes", response=list[ComputeNode], auth=Action("nodes:list"))
async def list_nodes(request: web.Request) -> list[ComputeNode]:
    """The compute nodes: zone, liveness, cordon, instances and capacity used."""
    return await nodes.list_nodes(request.app[STORE])


async def _node(request: web.Request, name: str) -> ComputeNode:
    found = [n for n in await nodes.list_nodes(request.app[STORE]) if n.name == name]
    return found[0] if found else ComputeNode(name=name)


@routes.post("/v1/nodes/{name}/cordon", body=NodeCordon, response=ComputeNode, auth=Action("nodes:cordon"))
async def cordon_node(request: web.Request, body: NodeCordon) -> Reply:
    """Place no new instances on the node (those on it stay)."""
    name = request.match_info["name"]
    written = await nodes.cordon(await res.context_of(request), request.app[STORE], name, body.reason)
    return res.reply(request, dataclasses.replace(written, body=await _node(request, name)))


@routes.post("/v1/nodes/{name}/uncordon", response=ComputeNode, auth=Action("nodes:uncordon"))
async def uncordon_node(request: web.Request) -> Reply:
    """Place instances on the node again."""
    name = request.match_info["name"]
    written = await nodes.uncordon(await res.context_of(request), request.app[STORE], name)
    return res.reply(request, dataclasses.replace(written, body=await _node(request, name)))
