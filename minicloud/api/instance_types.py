"""``/v1/instance-types``: the built-in catalogue plus admin-defined types (cluster-wide)."""

from __future__ import annotations

from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute.types import BUILTIN, TYPE_KIND
from minicloud.model import Page
from minicloud.model.compute import InstanceType, InstanceTypeCreate
from minicloud.state import Record

routes = Routes("instance-types")


def view(r: Record) -> InstanceType:
    s = r.spec
    return InstanceType(
        name=r.name,
        vcpus=s["vcpus"],
        memory_mib=s["memory_mib"],
        disk_gib=s["disk_gib"],
        builtin=False,
        description=s.get("description", ""),
        id=r.id,
        revision=r.revision,
    )


KIND = res.register_kind(res.Kind("instancetype", "instance-types", "ity", view, "type", cluster_level=True))


async def lookup(request: web.Request, name: str) -> InstanceType:
    """The type called ``name`` (built-in or custom); 422 naming the choices when there is none."""
    if name in BUILTIN:
        return BUILTIN[name]
    record = await request.app[STORE].get_by_name(TYPE_KIND, "", name)
    if record is None and name.startswith(KIND.prefix + "-"):
        record = await request.app[STORE].get(TYPE_KIND, name)
    if record is None:
        raise errors.ValidationFailed(
            f"there is no instance type '{name[:64]}'; see `minicloud type list` (built-in: {', '.join(BUILTIN)})",
            invalid_params=[{"name": "type", "reason": "unknown instance type"}],
        )
    return view(record)


@routes.get("/v1/instance-types", response=Page[InstanceType], auth=Action("compute:instancetypes:list"))
async def list_types(request: web.Request) -> Page[InstanceType]:
    """List instance types: built-in first, then custom ones by name."""
    custom = await request.app[STORE].list(TYPE_KIND, project="", limit=10_000)
    return Page(items=[*BUILTIN.values(), *(view(r) for r in custom)])


@routes.get("/v1/instance-types/{ref}", response=InstanceType, auth=Action("compute:instancetypes:get"))
async def show_type(request: web.Request) -> InstanceType:
    """Show an instance type by name."""
    ref = request.match_info["ref"]
    try:
        return await lookup(request, ref)
    except errors.ValidationFailed:
        raise errors.NotFound(f"no instance type '{ref[:64]}'; see `minicloud type list`") from None


@routes.post(
    "/v1/instance-types",
    body=InstanceTypeCreate,
    response=InstanceType,
    status=201,
    auth=Action("admin:instancetypes:create"),
)
async def create_type(request: web.Request, body: InstanceTypeCreate) -> Reply:
    """Define a custom instance type (cluster administrators)."""
    if body.name in BUILTIN:
        raise errors.AlreadyExists(f"'{body.name}' is a built-in instance type; choose another name")
    spec = {
        "vcpus": body.vcpus,
        "memory_mib": body.memory_mib,
        "disk_gib": body.disk_gib,
        "description": body.description,
    }
    record = res.new_record(KIND, request, body.name, {}, spec)
    return await res.create(request, KIND, record)


@routes.delete("/v1/instance-types/{ref}", status=204, auth=Action("admin:instancetypes:delete"))
async def delete_type(request: web.Request) -> Reply:
    """Delete a custom instance type. Instances keep their shape (it is copied into each instance)."""
    ref = request.match_info["ref"]
    if ref in BUILTIN:
        raise errors.Forbidden(f"'{ref}' is a built-in instance type and cannot be deleted")
    return await res.delete(request, KIND)
