"""``/v1/snapshots``: create, delete and revert call :mod:`minicloud.storage.snapshots`; list, show and update are
generic."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.storage import Snapshot, SnapshotCreate, Volume
from minicloud.storage import snapshots
from minicloud.storage.kinds import SNAPSHOT
from minicloud.storage.quotas import Quotas

routes = Routes("snapshots")


@routes.post(
    "/v1/snapshots", body=SnapshotCreate, response=Snapshot, status=201, auth=Action("storage:snapshots:create")
)
async def create_snapshot(request: web.Request, body: SnapshotCreate) -> Reply:
    """Snapshot a volume, or an instance's root disk (``instance``: an RBD root disk, running or not); its node
    takes it: poll ``status.state`` until ``available``."""
    app = request.app
    written = await snapshots.create_snapshot(
        await res.context_of(request), app[STORE], body, quotas=Quotas.from_config(app[CONFIG])
    )
    return res.reply(request, written)


generic.add_crud_routes(routes, SNAPSHOT)


@routes.delete("/v1/snapshots/{ref}", response=Snapshot, status=202, auth=Action("storage:snapshots:delete"))
async def delete_snapshot(request: web.Request) -> Reply:
    """Delete a snapshot (409 while volumes made from it exist). 202: its node removes it, then the record."""
    written = await snapshots.delete_snapshot(
        await res.context_of(request), request.app[STORE], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)


@routes.post("/v1/snapshots/{ref}/revert", response=Volume, auth=Action("storage:snapshots:revert"))
async def revert_snapshot(request: web.Request) -> Reply:
    """Revert the snapshot's volume to it (the volume detached or its instance stopped): answers the volume. A
    root-disk snapshot reverts its instance's root disk (the instance stopped): answers the snapshot."""
    ctx = await res.context_of(request)
    return res.reply(request, await snapshots.revert_snapshot(ctx, request.app[STORE], request.match_info["ref"]))
