"""``/v1/storage``: the Ceph cluster minicloud runs — ``GET`` shows it, ``POST /v1/storage/enable`` bootstraps it —
and its disks (``/v1/storage/disks``). Cluster administrators' (``admin:storage:*``) but the show. Calls
:mod:`minicloud.storage.engine`."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.storage import Storage, StorageDisk, StorageDiskCreate, StorageEnable
from minicloud.storage import engine

routes = Routes("storage")


@routes.get("/v1/storage", response=Storage, auth=Action("storage:cluster:get"))
async def show_storage(request: web.Request) -> Storage:
    """The storage cluster: state, health in plain words, capacity, placement groups, OSDs by node, disks, pools."""
    return await engine.show_storage(await res.context_of(request), request.app[STORE])


@routes.post("/v1/storage/enable", body=StorageEnable, response=Storage, status=201,
             auth=Action("admin:storage:enable"))  # fmt: skip
async def enable_storage(request: web.Request, body: StorageEnable) -> Reply:
    """Enable storage: bootstrap Ceph on a node (default: this one) with a file disk there unless ``no_disk``; its
    ``ceph`` pool becomes the default. 409 when already enabled. Poll ``GET /v1/storage`` until ``ready``."""
    app = request.app
    written = await engine.enable_storage(
        await res.context_of(request), app[STORE], body, node=app[CONFIG].node_name, directory=app[DIRECTORY]
    )
    return res.reply(request, written)


@routes.get("/v1/storage/disks", response=list[StorageDisk], auth=Action("admin:storage:disks:list"))
async def list_disks(request: web.Request) -> list[StorageDisk]:
    """Every disk given to Ceph, with its OSD and state."""
    return await engine.list_disks(await res.context_of(request), request.app[STORE])


@routes.post("/v1/storage/disks", body=StorageDiskCreate, response=StorageDisk, status=201,
             auth=Action("admin:storage:disks:create"))  # fmt: skip
async def add_disk(request: web.Request, body: StorageDiskCreate) -> Reply:
    """Give Ceph a block device or a file of ``file_size_bytes`` on a node (default: this one). 409 when storage is
    not enabled or the device was already given."""
    app = request.app
    written = await engine.add_disk(
        await res.context_of(request), app[STORE], body, node=app[CONFIG].node_name, directory=app[DIRECTORY]
    )
    return res.reply(request, written)


@routes.delete("/v1/storage/disks/{ref}", response=StorageDisk, auth=Action("admin:storage:disks:delete"))
async def remove_disk(request: web.Request) -> Reply:
    """Remove a disk: its node drains the OSD, then the record goes. Answers the disk (``draining``)."""
    written = await engine.remove_disk(
        await res.context_of(request), request.app[STORE], request.match_info["ref"],
        expect=res.if_match(request), directory=request.app[DIRECTORY],
    )  # fmt: skip
    return res.reply(request, written)
