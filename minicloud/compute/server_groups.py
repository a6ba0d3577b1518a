"""Server groups: instances the scheduler keeps apart (``anti-affinity``, ``soft-anti-affinity``) or together
(``affinity``), per node or, with ``scope=zone``, per zone.

A group's members are the instances whose ``spec.server_group`` names it: nothing is stored on the group, so an
instance's deletion or move needs no change of its group. Two creates joining the same group at the same time
cannot both take the last node an anti-affinity group allows: each create commits with a compare-and-swap on the
group record (:func:`join_op` raises its ``seq``), so the second one fails its transaction, reads the members
again and decides again (as the per-node ``placement`` record does for capacity).

A group is deleted only without members (409 naming them). Bounds: at most :data:`MAX_MEMBERS` members per group
(a create beyond is a 409), groups count against nothing else (one record each, deleted by the user).
"""

from __future__ import annotations

from typing import Any

import msgspec

from minicloud import errors
from minicloud.compute.kinds import INSTANCE, SERVERGROUP, ServerGroupSpec
from minicloud.compute.nodes import placement_cache
from minicloud.compute.scheduler import Group
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.model.compute import ServerGroup, ServerGroupCreate
from minicloud.state import Op, Store, Update, list_all

#: The most instances one group holds.
MAX_MEMBERS = 200

GroupObj = Obj[ServerGroupSpec, Any]


async def create_server_group(ctx: Context, store: Store, body: ServerGroupCreate) -> Written:
    """A new server group in ``ctx``'s project (201; 409 when the name is taken)."""
    spec = ServerGroupSpec(policy=body.policy, scope=body.scope, description=body.description)
    obj = SERVERGROUP.new(project=ctx.project, name=body.name, spec=spec, labels=body.labels, stamp=ctx.clock())
    return await crud.create(ctx, store, SERVERGROUP, obj)


async def members(store: Store, group: GroupObj) -> list[tuple[str, str, str]]:
    """The group's members as ``(instance id, name, node)``, by name (the project's instances, filtered)."""
    out = []
    for r in await list_all(store, INSTANCE.name, project=group.project):
        if r.spec.get("server_group") == group.id:
            out.append((r.id, r.name, str(r.spec.get("node", ""))))
    return sorted(out, key=lambda m: m[1])


def _view(group: GroupObj, found: list[tuple[str, str, str]]) -> ServerGroup:
    view: ServerGroup = SERVERGROUP.to_view(group)
    return msgspec.structs.replace(view, members=[m[0] for m in found], member_nodes=[m[2] for m in found])


async def list_server_groups(
    ctx: Context,
    store: Store,
    *,
    limit: int = 100,
    cursor: str | None = None,
    name: str | None = None,
    labels: dict[str, str] | None = None,
) -> tuple[list[ServerGroup], str | None]:
    """One page of the project's groups, each with its members and their nodes (from the placement cache: no
    instance is read), and the next page's cursor."""
    page = await crud.list_objects(ctx, store, SERVERGROUP, limit=limit, cursor=cursor, name=name, labels=labels)
    cache = placement_cache(store)
    views = []
    for group in page.items:
        found = sorted(await cache.members(store, group.id))
        view: ServerGroup = SERVERGROUP.to_view(group)
        views.append(msgspec.structs.replace(view, members=[m[0] for m in found], member_nodes=[m[1] for m in found]))
    return views, page.next_cursor


async def show_server_group(ctx: Context, store: Store, ref: str) -> ServerGroup:
    """The group ``ref`` names (id or name) with its members and their nodes; 404 otherwise."""
    group = await crud.get(ctx, store, SERVERGROUP, ref)
    return _view(group, await members(store, group))


async def delete_server_group(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Delete an empty group (204); 409 naming its members otherwise. The compare-and-swap on the group's revision
    refuses a delete that races with an instance joining it (that create raised ``seq``)."""
    group = await crud.get(ctx, store, SERVERGROUP, ref)
    found = await members(store, group)
    if found:
        names = ", ".join(m[1] for m in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise errors.InUse(
            f"server group '{group.name}' has {len(found)} member(s) ({names}); delete them first", members=len(found)
        )
    try:
        return await crud.delete_obj(ctx, store, SERVERGROUP, group, expect=expect)
    except errors.PreconditionFailed:
        if expect is not None:
            raise
        raise errors.Conflict(
            f"an instance joined server group '{group.name}' while it was being deleted; look at its members again"
        ) from None


async def resolve(ctx: Context, store: Store, ref: str) -> GroupObj:
    """The group an instance create names, in the caller's project only (a group of another project is refused
    as unknown: 404 naming the parameter)."""
    group = await crud.find(ctx, store, SERVERGROUP, ref)
    if group is None:
        raise errors.NotFound(
            f"there is no server group {crud.shown(ref)} in project '{ctx.project}'; see `minicloud server-group list`",
            invalid_params=[{"name": "server_group", "reason": "unknown server group"}],
        )
    return group


async def snapshot(store: Store, ref_group: GroupObj, zones: dict[str, str]) -> tuple[Group, Op]:
    """Read the group again with its members: the scheduler's :class:`Group` (members' nodes and zones from
    ``zones``: node → zone) and the op the create commits with (compare-and-swap on the group record). 409 when the
    group is full, 404 when it was deleted meanwhile."""
    record = await store.get(SERVERGROUP.name, ref_group.id)
    if record is None:
        raise errors.NotFound(f"server group '{ref_group.name}' was deleted meanwhile")
    group = SERVERGROUP.load(record)
    found = await placement_cache(store).members(store, group.id)
    if len(found) >= MAX_MEMBERS:
        raise errors.Conflict(f"server group '{group.name}' has {MAX_MEMBERS} members already, the most it may have")
    nodes = tuple(m[1] for m in found if m[1])
    view = Group(
        name=group.name,
        policy=group.spec.policy,  # type: ignore[arg-type]
        scope=group.spec.scope,  # type: ignore[arg-type]
        member_nodes=nodes,
        member_zones=tuple(zones.get(n, "") for n in nodes),
    )
    return view, join_op(group, record.revision)


def join_op(group: GroupObj, revision: int) -> Op:
    """The compare-and-swap a member's create commits with: ``seq`` raised, expected at ``revision``."""
    spec = msgspec.structs.replace(group.spec, seq=group.spec.seq + 1)
    return Update(SERVERGROUP.dump(group.replace(spec=spec)), expect_revision=revision)
