"""``/v1/instances``: virtual machines. Each handler decodes, calls the instance service
(:mod:`minicloud.compute.instances`: placement, the power verbs, resize, delete) and renders; list, show and patch
come from the kind's declaration (:data:`minicloud.compute.kinds.INSTANCE`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute import instances as service
from minicloud.compute.instances import NodeLocks
from minicloud.compute.kinds import INSTANCE
from minicloud.core.write import Written
from minicloud.model.compute import (
    ConsoleQuery,
    Instance,
    InstanceCreate,
    InstanceReboot,
    InstanceResize,
    InstanceStop,
    NicCreate,
)

routes = Routes("instances")
#: The process's per-node placement locks (built in :func:`minicloud.api.app.build_app`).
PLACEMENT_LOCKS = web.AppKey("placement_locks", NodeLocks)
__all__ = ["PLACEMENT_LOCKS", "NodeLocks", "routes"]


def _accepted(request: web.Request, written: Written) -> Reply:
    """202 with the instance and its revision as ETag (the node converges to the change)."""
    return res.reply(request, written, res.etag(written.revision) if written.body is not None else None)


@routes.post(
    "/v1/instances", body=InstanceCreate, response=Instance, status=201, auth=Action("compute:instances:create")
)
async def create_instance(request: web.Request, body: InstanceCreate) -> Reply:
    """Create an instance: check the image, type and key pair, place it on a node with room, record it. The node then
    builds and starts it; follow ``status.state`` (pending → building → running)."""
    ctx = await res.context_of(request)
    written = await service.create_instance(
        ctx,
        request.app[STORE],
        body,
        locks=request.app[PLACEMENT_LOCKS],
        directory=request.app[DIRECTORY],
        weigher=request.app[CONFIG].compute.scheduler_weigher,
    )
    return res.reply(request, written)


@routes.post(
    "/v1/instances/{ref}/nics",
    body=NicCreate,
    response=Instance,
    status=202,
    auth=Action("compute:instances:nics"),
)
async def add_nic(request: web.Request, body: NicCreate) -> Reply:
    """Give the instance another NIC on a subnet or network (hot-plugged while it runs): its port gets an address
    (``ip`` or the lowest free one) and the security groups (default: the project's ``default``)."""
    ctx = await res.context_of(request)
    written = await service.add_nic(
        ctx, request.app[STORE], request.match_info["ref"], body, directory=request.app[DIRECTORY]
    )
    return _accepted(request, written)


@routes.delete("/v1/instances/{ref}/nics/{nic}", response=Instance, status=202, auth=Action("compute:instances:nics"))
async def remove_nic(request: web.Request) -> Reply:
    """Unplug and delete one NIC (its port id, MAC or address); its address is released."""
    ctx = await res.context_of(request)
    written = await service.remove_nic(ctx, request.app[STORE], request.match_info["ref"], request.match_info["nic"])
    return _accepted(request, written)


@routes.post("/v1/instances/{ref}/start", response=Instance, status=202, auth=Action("compute:instances:start"))
async def start_instance(request: web.Request) -> Reply:
    """Power the instance on (no-op when it is running). An instance in ``error`` is tried again."""
    ctx = await res.context_of(request)
    written = await service.start_instance(
        ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request)
    )
    return _accepted(request, written)


@routes.post(
    "/v1/instances/{ref}/stop", body=InstanceStop, response=Instance, status=202, auth=Action("compute:instances:stop")
)
async def stop_instance(request: web.Request, body: InstanceStop) -> Reply:
    """Shut the instance down: ACPI power button, powered off after ``compute.stop_timeout``; ``force`` at once."""
    ctx = await res.context_of(request)
    written = await service.stop_instance(
        ctx, request.app[STORE], request.match_info["ref"], force=body.force, expect=res.if_match(request)
    )
    return _accepted(request, written)


@routes.post(
    "/v1/instances/{ref}/reboot",
    body=InstanceReboot,
    response=Instance,
    status=202,
    auth=Action("compute:instances:reboot"),
)
async def reboot_instance(request: web.Request, body: InstanceReboot) -> Reply:
    """Reboot a running instance: ACPI reboot, or a hard reset with ``force``."""
    ctx = await res.context_of(request)
    written = await service.reboot_instance(
        ctx, request.app[STORE], request.match_info["ref"], force=body.force, expect=res.if_match(request)
    )
    return _accepted(request, written)


@routes.post(
    "/v1/instances/{ref}/resize",
    body=InstanceResize,
    response=Instance,
    status=202,
    auth=Action("compute:instances:resize"),
)
async def resize_instance(request: web.Request, body: InstanceResize) -> Reply:
    """Give an instance another type. Stopped: any type (vCPUs, memory; the root disk never shrinks). Running: only
    the vCPU count may change, up to the maximum the instance was created with (CPU hot-plug); memory and disk
    changes need it stopped."""
    ctx = await res.context_of(request)
    written = await service.resize_instance(
        ctx, request.app[STORE], request.match_info["ref"], body.type, expect=res.if_match(request)
    )
    return _accepted(request, written)


@routes.delete("/v1/instances/{ref}", response=Instance, status=202, auth=Action("compute:instances:delete"))
async def delete_instance(request: web.Request) -> Reply:
    """Delete an instance: its node destroys the domain and removes its disk, seed and console log, then the record
    goes. 202 with the instance in ``deleting``; it is gone (404) once the node finished."""
    ctx = await res.context_of(request)
    written = await service.delete_instance(
        ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request)
    )
    return _accepted(request, written)


@routes.get("/v1/instances/{ref}/console", query=ConsoleQuery, auth=Action("compute:instances:console"))
async def console(request: web.Request, query: ConsoleQuery) -> web.StreamResponse:
    """The instance's serial console log as text; ``?follow=true`` keeps streaming, ``?tail=N`` the last N bytes."""
    config, store = request.app[CONFIG], request.app[STORE]
    ctx = await res.context_of(request)
    obj, path = await service.console_log(
        ctx, store, request.match_info["ref"], node=config.node_name, data_path=config.data_path
    )
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"})
    await resp.prepare(request)
    offset = 0
    try:
        size = path.stat().st_size
        offset = max(0, size - query.tail) if query.tail else 0
    except FileNotFoundError:
        pass
    while True:
        chunk = await asyncio.to_thread(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            await resp.write(chunk)
        if not query.follow:
            break
        if not chunk:
            if await service.is_going(store, obj.id):
                break
            await asyncio.sleep(0.25)
    await resp.write_eof()
    return resp


def _read_from(path: Path, offset: int, limit: int = 1 << 20) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


generic.add_crud_routes(routes, INSTANCE)
