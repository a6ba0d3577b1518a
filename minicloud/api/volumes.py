"""``/v1/volumes``: create, delete, attach, detach, extend and flatten call :mod:`minicloud.storage.volumes`; list, show and
update are generic. Writes answer once recorded; the volume's node converges (poll its ``status.state``)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.storage import Volume, VolumeAttach, VolumeCreate, VolumeDetach, VolumeExtend
from minicloud.storage import volumes
from minicloud.storage.kinds import VOLUME
from minicloud.storage.quotas import Quotas

routes = Routes("volumes")
_BASE = "/v1/volumes/{ref}"


class VolumeDeleteQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Administrators: remove the record at once (no node removes the data).
    force: bool = False


@routes.post("/v1/volumes", body=VolumeCreate, response=Volume, status=201, auth=Action("storage:volumes:create"))
async def create_volume(request: web.Request, body: VolumeCreate) -> Reply:
    """Create a volume (blank, from an image or from a snapshot) in a pool (default: the default pool)."""
    app = request.app
    written = await volumes.create_volume(
        await res.context_of(request), app[STORE], body, node=app[CONFIG].node_name,
        quotas=Quotas.from_config(app[CONFIG]),
    )  # fmt: skip
    return res.reply(request, written)


generic.add_crud_routes(routes, VOLUME)


@routes.delete(_BASE, query=VolumeDeleteQuery, response=Volume, status=202, auth=Action("storage:volumes:delete"))
async def delete_volume(request: web.Request, query: VolumeDeleteQuery) -> Reply:
    """Delete a volume and its snapshots: 409 while attached or while volumes made from its snapshots exist. 202
    (``deleting``): its node removes the data, then the record; 204 when the record went at once (its node left the
    cluster, or ``force``)."""
    written = await volumes.delete_volume(
        await res.context_of(request), request.app[STORE], request.match_info["ref"],
        expect=res.if_match(request), force=query.force, directory=request.app[DIRECTORY],
    )  # fmt: skip
    return res.reply(request, written)


@routes.post(f"{_BASE}/attach", body=VolumeAttach, response=Volume, auth=Action("storage:volumes:attach"))
async def attach_volume(request: web.Request, body: VolumeAttach) -> Reply:
    """Attach an available volume to an instance of the project as its next free guest disk (or ``device``)."""
    ctx = await res.context_of(request)
    return res.reply(request, await volumes.attach_volume(ctx, request.app[STORE], request.match_info["ref"], body))


@routes.post(f"{_BASE}/detach", body=VolumeDetach, response=Volume, auth=Action("storage:volumes:detach"))
async def detach_volume(request: web.Request, body: VolumeDetach) -> Reply:
    """Detach a volume from its instance (``force``: without waiting for the guest)."""
    ctx = await res.context_of(request)
    return res.reply(request, await volumes.detach_volume(ctx, request.app[STORE], request.match_info["ref"], body))


@routes.post(f"{_BASE}/extend", body=VolumeExtend, response=Volume, auth=Action("storage:volumes:extend"))
async def extend_volume(request: web.Request, body: VolumeExtend) -> Reply:
    """Grow a volume (attached ones grow online)."""
    app = request.app
    written = await volumes.extend_volume(
        await res.context_of(request), app[STORE], request.match_info["ref"], body,
        quotas=Quotas.from_config(app[CONFIG]),
    )  # fmt: skip
    return res.reply(request, written)


@routes.post(f"{_BASE}/flatten", response=Volume, auth=Action("storage:volumes:flatten"))
async def flatten_volume(request: web.Request) -> Reply:
    """Copy the data of the snapshot a volume was made from into it, so the snapshot can be deleted: answers the
    volume (``status.flattening`` until its node is done, then ``status.flattened``); asking again answers it
    unchanged. 409 for a volume not made from a snapshot, being deleted, or not yet available."""
    ctx = await res.context_of(request)
    return res.reply(request, await volumes.flatten_volume(ctx, request.app[STORE], request.match_info["ref"]))
