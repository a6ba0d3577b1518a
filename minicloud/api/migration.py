"""``POST /v1/instances/{ref}/migrate``: move an instance to another node, and ``POST /v1/nodes/{name}/drain``: move
every instance that can move off a node (:mod:`minicloud.compute.migration`). An
administrator's action (it names nodes); answers 202 with the operation that follows the migration's phases."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.keys import OPERATIONS, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute import migration
from minicloud.compute.migration import InstanceMigrate
from minicloud.model import Operation

routes = Routes("migration")


@routes.post(
    "/v1/instances/{ref}/migrate",
    body=InstanceMigrate,
    response=Operation,
    status=202,
    auth=Action("admin:instances:migrate"),
)
async def migrate_instance(request: web.Request, body: InstanceMigrate) -> Reply:
    """Live-migrate a running instance to ``node`` (default: the node with the most room that can run it). 409 with
    the reason when it cannot move (see the docs: volumes, VPC NICs, a node without room or cordoned, a node-local
    image the target lacks, another migration going on)."""
    if (replay := await res.replayed(request)) is not None:
        return replay
    written = await migration.migrate_instance(
        await res.context_of(request),
        request.app[STORE],
        request.app[OPERATIONS],
        request.match_info["ref"],
        node=body.node,
        cold=body.cold,
    )
    return res.reply(request, written)


@routes.post("/v1/nodes/{name}/drain", response=Operation, status=202, auth=Action("nodes:drain"))
async def drain_node(request: web.Request) -> Reply:
    """Cordon the node, then live-migrate its running instances away one at a time (the scheduler picks each
    target). The operation's result lists what moved where and what stays on the node, with the reason."""
    if (replay := await res.replayed(request)) is not None:
        return replay
    written = await migration.drain_node(
        await res.context_of(request), request.app[STORE], request.app[OPERATIONS], request.match_info["name"][:64]
    )
    return res.reply(request, written)
