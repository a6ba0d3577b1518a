"""``/v1/instances``: virtual machines. The API records what the user wants (``spec``: shape, image, power, a delete
request); the compute reconciler of the instance's node converges libvirt to it and writes ``status`` back.

Placement happens when the instance is created, so a request that fits nowhere is refused with 409 instead of
leaving an instance stuck in ``error``: the scheduler's pure :func:`~minicloud.compute.scheduler.place` picks the node
and the instance is committed together with a compare-and-swap on that node's ``placement`` record, so two concurrent
creates (on any nodes of the cluster) cannot both take the last free slot.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from minicloud import errors, ids
from minicloud.api import images, instance_types
from minicloud.api import resources as res
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute.kinds import KEYPAIR
from minicloud.compute.scheduler import HYPERVISOR_KIND, PLACEMENT_KIND, Demand, NodeCapacity, place, usage
from minicloud.core import crud
from minicloud.model import Page
from minicloud.model.compute import (
    Address,
    ConsoleQuery,
    Instance,
    InstanceCreate,
    InstanceReboot,
    InstanceResize,
    InstanceStatus,
    InstanceStop,
    InstanceUpdate,
)
from minicloud.state import Create, Record, Update, list_all

routes = Routes("instances")
_PLACEMENT_ATTEMPTS = 8
PLACEMENT_LOCKS = web.AppKey("placement_locks", "NodeLocks")


def view(r: Record) -> Instance:
    s, st = r.spec, r.status or {}
    return Instance(
        **r.common_fields(),
        image=s["image_name"],
        image_id=s["image_id"],
        type=s["type"],
        vcpus=s["vcpus"],
        max_vcpus=s.get("max_vcpus") or s["vcpus"],
        memory_mib=s["memory_mib"],
        disk_gib=s["disk_gib"],
        keypair=s.get("keypair"),
        power=s["power"],
        user_data_bytes=len(s.get("user_data", "").encode()),
        description=s.get("description", ""),
        status=InstanceStatus(
            state=st.get("state", "pending"),
            reason=st.get("reason", ""),
            node=s.get("node"),
            addresses=[Address(**a) for a in st.get("addresses", [])],
            virt_type=st.get("virt_type"),
            launched_at=st.get("launched_at"),
            stopped_at=st.get("stopped_at"),
        ),
    )


KIND = res.register_kind(res.Kind("instance", "instances", "i", view, "instance"))


def instance_dir(app: web.Application, instance_id: str) -> Path:
    return app[CONFIG].data_path / "instances" / instance_id


async def _node_usage(store: Any, node: str) -> dict[str, Demand]:
    records = await list_all(store, KIND.name, where={"node": node})  # indexed: this node's instances only
    return usage((r.spec["node"], Demand(r.spec["vcpus"], r.spec["memory_mib"], r.spec["disk_gib"])) for r in records)


@routes.get("/v1/instances", query=res.ListQuery, response=Page[Instance], auth=Action("compute:instances:list"))
async def list_instances(request: web.Request, query: res.ListQuery) -> Page[Instance]:
    """List instances."""
    return await res.list_page(request, KIND, query)


@routes.post(
    "/v1/instances", body=InstanceCreate, response=Instance, status=201, auth=Action("compute:instances:create")
)
async def create_instance(request: web.Request, body: InstanceCreate) -> Reply:
    """Create an instance: check the image, type and key pair, place it on a node with room, record it. The node then
    builds and starts it; follow ``status.state`` (pending → building → running)."""
    store = request.app[STORE]
    project = res.scope_of(request, KIND)
    if (replay := await res.replayed(request)) is not None:
        return replay
    if await store.get_by_name(KIND.name, project, body.name) is not None:
        raise errors.AlreadyExists(f"an instance named '{body.name}' already exists in project '{project}'")
    try:
        image = await res.resolve(request, images.KIND, body.image)
    except errors.NotFound:
        raise errors.ValidationFailed(
            f"there is no image '{body.image[:64]}' in project '{project}'; see `minicloud image list`",
            invalid_params=[{"name": "image", "reason": "unknown image"}],
        ) from None
    itype = await instance_types.lookup(request, body.type)
    public_keys: list[str] = []
    if body.keypair is not None:
        keypair = await crud.find(await res.context_of(request), request.app[STORE], KEYPAIR, body.keypair)
        if keypair is None:
            raise errors.ValidationFailed(
                f"there is no key pair '{body.keypair[:64]}' in project '{project}'; see `minicloud keypair list`",
                invalid_params=[{"name": "keypair", "reason": "unknown key pair"}],
            )
        public_keys.append(keypair.spec.public_key)
    disk_gib = body.disk_gib or itype.disk_gib
    image_gib = math.ceil((image.spec.get("virtual_size_bytes") or 0) / (1 << 30))
    if disk_gib < image_gib:
        raise errors.ValidationFailed(
            f"the root disk ({disk_gib} GiB) would be smaller than the image ({image_gib} GiB); give "
            f"--disk-size {image_gib} or more, or a larger type",
            invalid_params=[{"name": "disk_gib", "reason": f"smaller than the image ({image_gib} GiB)"}],
        )
    node = image.spec["node"]
    demand = Demand(itype.vcpus, itype.memory_mib, disk_gib)
    stamp = ids.now()
    record = Record(
        kind=KIND.name,
        id=ids.new_id(KIND.prefix),
        project=project,
        name=body.name,
        labels=body.labels,
        spec={
            "uuid": str(uuid.uuid4()),
            "image_id": image.id,
            "image_name": image.name,
            "type": itype.name,
            "vcpus": itype.vcpus,
            "memory_mib": itype.memory_mib,
            "disk_gib": disk_gib,
            "keypair": body.keypair,
            "public_keys": public_keys,
            "user_data": body.user_data,
            "power": "running" if body.start else "stopped",
            "reboot": {"seq": 0, "force": False},
            "stop_force": False,
            "deleted": False,
            "node": node,
            "description": body.description,
        },
        status={"state": "pending"},
        created_at=stamp,
        updated_at=stamp,
    )
    # One placement per node at a time in this process (no wasted rounds when many creates arrive together); the
    # compare-and-swap on the placement record still settles races with creates on other nodes.
    async with _placement_lock(request.app, node):
        return await _place_and_commit(request, record, node, demand, stamp)


class NodeLocks:
    """One ``asyncio.Lock`` per node name, made on first use."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, node: str) -> asyncio.Lock:
        return self._locks.setdefault(node, asyncio.Lock())


def _placement_lock(app: web.Application, node: str) -> asyncio.Lock:
    return app[PLACEMENT_LOCKS].get(node)


async def _place_and_commit(request: web.Request, record: Record, node: str, demand: Demand, stamp: str) -> Reply:
    store = request.app[STORE]
    for attempt in range(_PLACEMENT_ATTEMPTS):
        if attempt:
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # another node won: back off, then retry
        hypervisor = await store.get_by_name(HYPERVISOR_KIND, "", node)
        candidates = [NodeCapacity.from_spec(node, hypervisor.spec)] if hypervisor is not None else []
        if hypervisor is not None:  # CPU hot-plug up to the node's CPUs (`instance resize` while running)
            max_vcpus = max(record.spec["vcpus"], int(hypervisor.spec["cpus"]))
            record = msgspec.structs.replace(record, spec={**record.spec, "max_vcpus": max_vcpus})
        token = await store.get(PLACEMENT_KIND, f"plc-{node}")
        place(demand, candidates, await _node_usage(store, node))
        token_op = (
            Create(
                Record(
                    kind=PLACEMENT_KIND,
                    id=f"plc-{node}",
                    project="",
                    name=f"plc-{node}",
                    spec={"seq": 1},
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
            if token is None
            else Update(
                msgspec.structs.replace(token, spec={"seq": token.spec["seq"] + 1}, updated_at=stamp),
                expect_revision=token.revision,
            )
        )
        try:
            return await res.write(
                request,
                [Create(record), token_op],
                status=201,
                kind_name=KIND.name,
                respond=lambda rev, r=record: view(msgspec.structs.replace(r, revision=rev)),
                headers=lambda rev, r=record: {"Location": f"/v1/instances/{r.id}", **res.etag(rev)},
            )
        except errors.PreconditionFailed:
            continue  # another placement on this node committed first: decide again on fresh figures
        except errors.AlreadyExists:
            if token is None and await store.get(PLACEMENT_KIND, f"plc-{node}") is not None:
                continue  # the placement record was created concurrently
            raise
    raise errors.Conflict("placement kept racing with other creates on the same node; retry")


@routes.get("/v1/instances/{ref}", response=Instance, auth=Action("compute:instances:get"))
async def show_instance(request: web.Request) -> Reply:
    """Show an instance by id or name."""
    return await res.show(request, KIND)


@routes.patch("/v1/instances/{ref}", body=InstanceUpdate, response=Instance, auth=Action("compute:instances:update"))
async def update_instance(request: web.Request, body: InstanceUpdate) -> Reply:
    """Change an instance's description or labels (JSON merge patch; honours If-Match)."""
    return await res.update_description_labels(request, KIND, body)


def _not_deleting(record: Record) -> None:
    if record.spec.get("deleted"):
        raise errors.Conflict(f"instance '{record.name}' is being deleted")


async def _change(request: web.Request, change: Any) -> Reply:
    """Apply ``change(record) -> spec changes`` to the ``{ref}`` instance; 202 with the instance."""

    def mutate(record: Record) -> Record:
        _not_deleting(record)
        return msgspec.structs.replace(record, spec={**record.spec, **change(record)})

    reply = await res.update(request, KIND, mutate)
    reply.status = 202
    return reply


@routes.post("/v1/instances/{ref}/start", response=Instance, status=202, auth=Action("compute:instances:start"))
async def start_instance(request: web.Request) -> Reply:
    """Power the instance on (no-op when it is running). An instance in ``error`` is tried again."""

    def change(r: Record) -> dict[str, Any]:
        retry = r.spec.get("retry", 0) + 1 if (r.status or {}).get("state") == "error" else r.spec.get("retry", 0)
        return {"power": "running", "retry": retry}  # a new spec: the node's reconciler builds or starts it again

    return await _change(request, change)


@routes.post(
    "/v1/instances/{ref}/stop", body=InstanceStop, response=Instance, status=202, auth=Action("compute:instances:stop")
)
async def stop_instance(request: web.Request, body: InstanceStop) -> Reply:
    """Shut the instance down: ACPI power button, powered off after ``compute.stop_timeout``; ``force`` at once."""
    return await _change(request, lambda r: {"power": "stopped", "stop_force": body.force})


@routes.post(
    "/v1/instances/{ref}/reboot",
    body=InstanceReboot,
    response=Instance,
    status=202,
    auth=Action("compute:instances:reboot"),
)
async def reboot_instance(request: web.Request, body: InstanceReboot) -> Reply:
    """Reboot a running instance: ACPI reboot, or a hard reset with ``force``."""

    def change(r: Record) -> dict[str, Any]:
        if r.spec["power"] != "running":
            raise errors.Conflict(f"instance '{r.name}' is stopped; start it instead of rebooting it")
        return {"reboot": {"seq": r.spec.get("reboot", {}).get("seq", 0) + 1, "force": body.force}}

    return await _change(request, change)


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
    itype = await instance_types.lookup(request, body.type)
    record = await res.resolve(request, KIND)
    _not_deleting(record)
    state = (record.status or {}).get("state")
    stopped = record.spec["power"] == "stopped" and state == "stopped"
    if not stopped:
        max_vcpus = record.spec.get("max_vcpus") or record.spec["vcpus"]
        why = (
            "its memory would change"
            if itype.memory_mib != record.spec["memory_mib"]
            else "its root disk would grow"
            if itype.disk_gib > record.spec["disk_gib"]
            else f"it can have at most {max_vcpus} vCPUs while running"
            if itype.vcpus > max_vcpus
            else f"it is {state}"
            if state != "running"
            else ""
        )
        if why:
            raise errors.Conflict(
                f"instance '{record.name}' cannot be resized to {itype.name} while running: {why}. Stop it first "
                f"(`minicloud instance stop {record.name} --wait`); running instances can only change their vCPUs"
            )
    node = record.spec["node"]
    hypervisor = await request.app[STORE].get_by_name(HYPERVISOR_KIND, "", node)
    if hypervisor is not None:
        used = await _node_usage(request.app[STORE], node)
        current = Demand(record.spec["vcpus"], record.spec["memory_mib"], record.spec["disk_gib"])
        mine = {node: used[node] - current}
        place(
            Demand(itype.vcpus, itype.memory_mib, max(itype.disk_gib, record.spec["disk_gib"])),
            [NodeCapacity.from_spec(node, hypervisor.spec)],
            mine,
        )
    return await _change(
        request,
        lambda r: {
            "type": itype.name,
            "vcpus": itype.vcpus,
            "max_vcpus": max(itype.vcpus, r.spec.get("max_vcpus") or r.spec["vcpus"]),
            "memory_mib": itype.memory_mib,
            "disk_gib": max(itype.disk_gib, r.spec["disk_gib"]),
        },
    )


@routes.delete("/v1/instances/{ref}", response=Instance, status=202, auth=Action("compute:instances:delete"))
async def delete_instance(request: web.Request) -> Reply:
    """Delete an instance: its node destroys the domain and removes its disk, seed and console log, then the record
    goes. 202 with the instance in ``deleting``; it is gone (404) once the node finished."""
    record = await res.resolve(request, KIND)
    if await request.app[STORE].get_by_name(HYPERVISOR_KIND, "", record.spec.get("node", "")) is None:
        return await res.delete(request, KIND, record)  # its node never ran compute: nothing to clean up there

    def mutate(r: Record) -> Record:
        status = {**(r.status or {}), "state": "deleting"}
        return msgspec.structs.replace(r, spec={**r.spec, "deleted": True}, status=status)

    reply = await res.update(request, KIND, mutate)
    reply.status = 202
    return reply


@routes.get("/v1/instances/{ref}/console", query=ConsoleQuery, auth=Action("compute:instances:console"))
async def console(request: web.Request, query: ConsoleQuery) -> web.StreamResponse:
    """The instance's serial console log as text; ``?follow=true`` keeps streaming, ``?tail=N`` the last N bytes."""
    record = await res.resolve(request, KIND)
    node = record.spec.get("node")
    if node != request.app[CONFIG].node_name:
        raise errors.Conflict(
            f"the console log of '{record.name}' is kept on node {node}; ask that node's API (`--remote`)",
            node=node,
        )
    path = instance_dir(request.app, record.id) / "console.log"
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"})
    await resp.prepare(request)
    offset = 0
    try:
        size = path.stat().st_size
        offset = max(0, size - query.tail) if query.tail else 0
    except FileNotFoundError:
        pass
    store = request.app[STORE]
    while True:
        chunk = await asyncio.to_thread(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            await resp.write(chunk)
        if not query.follow:
            break
        if not chunk:
            current = await store.get(KIND.name, record.id)
            if current is None or current.spec.get("deleted"):
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
