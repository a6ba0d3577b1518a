"""Instance types: the built-in catalogue and the services for admin-defined types."""

from __future__ import annotations

from minicloud import errors
from minicloud.compute.kinds import INSTANCE_TYPE, InstanceTypeSpec
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.write import Written
from minicloud.model.compute import InstanceType, InstanceTypeCreate
from minicloud.state import Store

TYPE_KIND = INSTANCE_TYPE.name

#: Built-in shapes, OpenStack's m1 family, except that m1.tiny is the smallest that boots the test guest.
BUILTIN: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType(name="m1.tiny", vcpus=1, memory_mib=128, disk_gib=1, builtin=True, description="test guests"),
        InstanceType(name="m1.small", vcpus=1, memory_mib=2048, disk_gib=20, builtin=True),
        InstanceType(name="m1.medium", vcpus=2, memory_mib=4096, disk_gib=40, builtin=True),
        InstanceType(name="m1.large", vcpus=4, memory_mib=8192, disk_gib=80, builtin=True),
        InstanceType(name="m1.xlarge", vcpus=8, memory_mib=16384, disk_gib=160, builtin=True),
    )
}


async def find(ctx: Context, store: Store, ref: str) -> InstanceType | None:
    """The type ``ref`` names (a built-in name, a custom type's name or id), or None."""
    if ref in BUILTIN:
        return BUILTIN[ref]
    obj = await crud.find(ctx, store, INSTANCE_TYPE, ref)
    return INSTANCE_TYPE.to_view(obj) if obj is not None else None


async def lookup(ctx: Context, store: Store, ref: str) -> InstanceType:
    """The type ``ref`` names; 422 naming the choices when there is none (what a create that names it needs)."""
    itype = await find(ctx, store, ref)
    if itype is None:
        raise errors.ValidationFailed(
            f"there is no instance type '{ref[:64]}'; see `minicloud type list` (built-in: {', '.join(BUILTIN)})",
            invalid_params=[{"name": "type", "reason": "unknown instance type"}],
        )
    return itype


async def list_types(ctx: Context, store: Store) -> list[InstanceType]:
    """Built-in types first, then custom ones by name (a small, admin-made catalogue: one page)."""
    custom = await crud.list_objects(ctx, store, INSTANCE_TYPE, limit=10_000)
    return [*BUILTIN.values(), *(INSTANCE_TYPE.to_view(o) for o in custom.items)]


async def create_type(ctx: Context, store: Store, body: InstanceTypeCreate) -> Written:
    """Define a custom type (409 for a built-in's name or a taken one)."""
    if body.name in BUILTIN:
        raise errors.AlreadyExists(f"'{body.name}' is a built-in instance type; choose another name")
    if body.gpu_model and not body.gpus:
        raise errors.ValidationFailed(
            "a GPU model pattern needs GPUs: give --gpus N with --gpu-model",
            invalid_params=[{"name": "gpu_model", "reason": "given without gpus"}],
        )
    spec = InstanceTypeSpec(
        vcpus=body.vcpus, memory_mib=body.memory_mib, disk_gib=body.disk_gib, description=body.description,
        gpus=body.gpus, gpu_model=body.gpu_model,
    )  # fmt: skip
    obj = INSTANCE_TYPE.new(project=ctx.project, name=body.name, spec=spec, stamp=ctx.clock())
    return await crud.create(ctx, store, INSTANCE_TYPE, obj)


async def delete_type(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Delete a custom type (403 for a built-in). Instances keep their shape: it is copied into each instance."""
    if ref in BUILTIN:
        raise errors.Forbidden(f"'{ref}' is a built-in instance type and cannot be deleted")
    return await crud.delete(ctx, store, INSTANCE_TYPE, ref, expect=expect)
