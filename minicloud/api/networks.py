"""``/v1/networks``: create (a VPC with a cluster-unique VNI; an external network for administrators) and delete
(refused while in use) call :mod:`minicloud.network.networks`; list, show and update come from the declaration."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.network import Network, NetworkCreate
from minicloud.network import networks
from minicloud.network.kinds import NETWORK

routes = Routes("networks")


@routes.post("/v1/networks", body=NetworkCreate, response=Network, status=201, auth=Action("network:networks:create"))
async def create_network(request: web.Request, body: NetworkCreate) -> Reply:
    """Create a network (VPC); ``external`` ones also need ``admin:networks:create``."""
    app = request.app
    written = await networks.create_network(
        await res.context_of(request), app[STORE], body,
        underlay_mtu=app[CONFIG].network.underlay_mtu, directory=app[DIRECTORY],
    )  # fmt: skip
    return res.reply(request, written)


generic.add_crud_routes(routes, NETWORK)


@routes.delete("/v1/networks/{ref}", status=204, auth=Action("network:networks:delete"))
async def delete_network(request: web.Request) -> Reply:
    """Delete a network without subnets or routers (409 naming them); frees its VNI. Honours If-Match."""
    written = await networks.delete_network(
        await res.context_of(request), request.app[STORE], request.match_info["ref"],
        expect=res.if_match(request), directory=request.app[DIRECTORY],
    )  # fmt: skip
    return res.reply(request, written)
