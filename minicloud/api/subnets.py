"""``/v1/subnets``: create (inside its network, overlaps refused, gateway reserved) and delete (refused while
attached or holding addresses) call :mod:`minicloud.network.subnets`; list, show and update are generic."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.network import Subnet, SubnetCreate
from minicloud.network import subnets
from minicloud.network.kinds import SUBNET

routes = Routes("subnets")


@routes.post("/v1/subnets", body=SubnetCreate, response=Subnet, status=201, auth=Action("network:subnets:create"))
async def create_subnet(request: web.Request, body: SubnetCreate) -> Reply:
    """Create a subnet of a network."""
    written = await subnets.create_subnet(await res.context_of(request), request.app[STORE], body)
    return res.reply(request, written)


generic.add_crud_routes(routes, SUBNET)


@routes.delete("/v1/subnets/{ref}", status=204, auth=Action("network:subnets:delete"))
async def delete_subnet(request: web.Request) -> Reply:
    """Delete a subnet no router is attached to and no one holds an address of (409 naming them)."""
    ctx = await res.context_of(request)
    written = await subnets.delete_subnet(
        ctx,
        request.app[STORE],
        request.match_info["ref"],
        expect=res.if_match(request),
        directory=request.app[DIRECTORY],
    )
    return res.reply(request, written)
