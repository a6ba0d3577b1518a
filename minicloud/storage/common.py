"""What the storage services share: the retry of a lost compare-and-swap, the administrators' check, and the lookups
of the cluster records (the ``ceph`` record, nodes and their addresses)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from minicloud import errors
from minicloud.cluster.kinds import NODE
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.iam.directory import Directory, authorize
from minicloud.state import Store, TxnFailed
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
