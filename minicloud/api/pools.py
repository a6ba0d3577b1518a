"""``/v1/pools``: create and delete (cluster administrators) call :mod:`minicloud.storage.pools`; list and show are
generic (every caller with a role may read them)."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.storage import Pool, PoolCreate
from minicloud.storage import pools
from minicloud.storage.kinds import POOL

routes = Routes("pools")


@routes.post("/v1/pools", body=PoolCreate, response=Pool, status=201, auth=Action("admin:storage:pools:create"))
async def create_pool(request: web.Request, body: PoolCreate) -> Reply:
    """Create a pool: another RADOS pool of the cluster's Ceph, or a local one; ``default`` takes the default."""
    written = await pools.create_pool(
        await res.context_of(request), request.app[STORE], body, directory=request.app[DIRECTORY]
    )
    return res.reply(request, written)


generic.add_crud_routes(routes, POOL)


@routes.delete("/v1/pools/{ref}", status=204, auth=Action("admin:storage:pools:delete"))
async def delete_pool(request: web.Request) -> Reply:
    """Delete a pool that is not the default and holds no volume or image (409 naming them)."""
    written = await pools.delete_pool(
        await res.context_of(request), request.app[STORE], request.match_info["ref"],
        expect=res.if_match(request), directory=request.app[DIRECTORY],
    )  # fmt: skip
    return res.reply(request, written)
