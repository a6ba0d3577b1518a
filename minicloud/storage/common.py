"""What the storage services share: the retry of a lost compare-and-swap, the race-free delete by a ``deleting`` mark,
the administrators' check, and the lookups of the cluster records (the ``ceph`` record, nodes and their addresses)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from minicloud import errors
from minicloud.cluster.kinds import NODE
from minicloud.core.context import Context
from minicloud.core.kinds import Kind, Obj
from minicloud.core.write import Written
from minicloud.iam.directory import Directory, authorize
from minicloud.state import Check, Store, Txn, TxnFailed, Update
from minicloud.storage.kinds import CEPH, CEPH_NAME, DISK_SLOTS, STORAGE_USAGE, CephSpec, CephStatus

W = TypeVar("W")
ATTEMPTS = 8
#: The address of a node that has no ``node`` record (a single node that never enabled clustering).
LOOPBACK = "127.0.0.1"


def lost_race(exc: BaseException) -> bool:
    """Whether a write failed because a record it read changed meanwhile (a CAS on a volume, snapshot, pool, the
    ``storageusage`` or ``diskslots`` record), or a concurrent request created the same bookkeeping record first:
    worth retrying on a fresh read. The write layer raises the problem ``from`` the store's :class:`TxnFailed`."""
    cause = exc.__context__
    if not isinstance(cause, TxnFailed):
        return False
    if cause.reason == "name-taken" or cause.reason == "exists":
        record = getattr(cause.op, "record", None)
        return record is not None and record.kind in (STORAGE_USAGE.name, DISK_SLOTS.name)
    return cause.reason in ("revision-mismatch", "not-found")


async def retrying(step: Callable[[int], Awaitable[W]], attempts: int = ATTEMPTS) -> W:
    """``await step(attempt)`` until it does not lose a race (:func:`lost_race`): each try reads afresh."""
    for attempt in range(attempts):
        try:
            return await step(attempt)
        except errors.MinicloudError as exc:
            if not lost_race(exc):
                raise
            if attempt == attempts - 1:
                raise errors.Conflict("the change kept losing to concurrent requests; retry") from None
    raise AssertionError("unreachable")


async def still(store: Store, kind: Kind, id_: str, what: str) -> Check:
    """A Check that the record ``id_`` is, at commit, what was just read (404 when it is gone already, 409 while a
    delete of it is looking for its users: ``spec.deleting``). A create that uses a pool or an image commits it, so
    a delete by :func:`delete_marked` either sees the new user or makes the create fail and read again."""
    record = await store.get(kind.name, id_)
    if record is None:
        raise errors.NotFound(f"{what} was deleted while this request ran")
    if record.spec.get("deleting"):
        raise errors.Conflict(f"{what} is being deleted")
    return Check(kind=kind.name, id=id_, expect_revision=record.revision)


async def delete_marked(
    ctx: Context,
    store: Store,
    kind: Kind,
    obj: Obj,
    refuse: Callable[[Obj], Awaitable[None]],
    delete: Callable[[Obj], Awaitable[Written]],
) -> Written:
    """Delete ``obj`` race-free against creates that Check it: ``refuse`` (raises while something uses it) before a
    write, then set its ``spec.deleting`` mark (CAS; a create that commits after it fails its Check, reads the mark
    and is refused), ``refuse`` again (what committed before the mark is seen now), then ``delete`` the marked
    object (CAS on the mark). The mark goes again when the delete does not happen; one a crash left is taken over by
    the next delete. The mark and unmark are bookkeeping, not audited; the delete, or its refusal, is."""
    if not obj.spec.deleting:
        await refuse(obj)  # the common refusal, without a write
        obj = await _set_deleting(ctx, store, kind, obj)
    try:
        await refuse(obj)
        return await delete(obj)
    except BaseException:
        await asyncio.shield(_clear_deleting(ctx, store, kind, obj.id))
        raise


async def _set_deleting(ctx: Context, store: Store, kind: Kind, obj: Obj) -> Obj:
    marked = obj.replace(spec=msgspec.structs.replace(obj.spec, deleting=True), updated_at=ctx.clock())
    try:
        rev, _ = await store.commit(Txn([Update(kind.dump(marked), expect_revision=obj.revision)]))
    except TxnFailed as exc:  # a lost race: :func:`retrying` reads again
        raise errors.Conflict(f"the {kind.label} changed while it was being deleted; retry") from exc
    return marked.replace(revision=rev)


async def _clear_deleting(ctx: Context, store: Store, kind: Kind, obj_id: str) -> None:
    """Clear the ``deleting`` mark (read, CAS, again on a lost race); nothing when it is not set or the object is
    gone."""
    for _ in range(ATTEMPTS):
        record = await store.get(kind.name, obj_id)
        if record is None or not (obj := kind.load(record)).spec.deleting:
            return
        clear = obj.replace(spec=msgspec.structs.replace(obj.spec, deleting=False), updated_at=ctx.clock())
        try:
            await store.commit(Txn([Update(kind.dump(clear), expect_revision=obj.revision)]))
            return
        except TxnFailed:
            continue


async def require_admin(ctx: Context, directory: Directory | None, action: str, what: str) -> None:
    """``what`` is for cluster administrators (``admin:storage:*``)."""
    if directory is not None:
        await authorize(directory, ctx.principal, action, "", cluster=True)
    elif not ctx.principal.admin:
        raise errors.Forbidden(f"{what} is for cluster administrators ({action})", action=action)


async def ceph_record(store: Store) -> Obj[CephSpec, CephStatus] | None:
    record = await store.get_by_name(CEPH.name, "", CEPH_NAME)
    return CEPH.load(record) if record is not None else None


async def require_ceph(store: Store) -> Obj[CephSpec, CephStatus]:
    """The ``ceph`` record; 409 saying how to enable storage when there is none."""
    ceph = await ceph_record(store)
    if ceph is None:
        raise errors.Conflict("storage is not enabled; an administrator enables it with `minicloud storage enable`")
    return ceph


async def node_names(store: Store) -> set[str]:
    """The cluster's node names (empty on a single node that never enabled clustering: it has no node records)."""
    return {r.name for r in await store.list(NODE.name, project="", limit=10_000)}


async def node_address(store: Store, node: str, answering: str) -> str:
    """``node``'s cluster address; 404 for a node the cluster does not have. A single node without node records
    knows only itself (loopback)."""
    record = await store.get_by_name(NODE.name, "", node)
    if record is not None:
        return str(NODE.load(record).spec.address)
    if node == answering and not await node_names(store):
        return LOOPBACK
    raise errors.NotFound(f"no node named '{node}' in the cluster; see `minicloud cluster list`")


async def node_gone(store: Store, node: str) -> bool:
    """True when ``node`` is no longer a member: the cluster has node records and none is named ``node``."""
    if not node:
        return False
    names = await node_names(store)
    return bool(names) and node not in names


def name_of(record: Any, fallback: str) -> str:
    return str(record.name) if record is not None else fallback
