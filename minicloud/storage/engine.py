"""The Ceph cluster minicloud runs, seen from the control plane: ``storage enable`` (the ``ceph`` record, the ``ceph``
pool, a first disk), ``storage show`` and the disks (``storage disk add|list|remove``). The nodes do the work: the
bootstrap node starts the first MON and MGR and seals the keys into the record, each node runs its disks' OSDs and
reports status (``agent/reconcilers/storage.py``). Everything here is for cluster administrators
(``admin:storage:*``) but ``storage show`` (``storage:cluster:get``)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from minicloud import errors, ids
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written, commit
from minicloud.iam.directory import Directory
from minicloud.model.storage import Storage, StorageDisk, StorageDiskCreate, StorageEnable
from minicloud.state import Create, Op, Store
from minicloud.storage import common, pools
from minicloud.storage.kinds import (
    CEPH,
    CEPH_NAME,
    CEPH_POOL_NAME,
    DEFAULT_CEPH_POOL,
    POOL,
    STORAGE_DISK,
    CephSpec,
    CephStatus,
    PoolSpec,
    StorageDiskSpec,
)

#: ``storage enable``'s file OSD when no size is given.
DEFAULT_OSD_FILE_BYTES = 10 << 30
Disk = Obj[StorageDiskSpec, Any]


def _view(ceph: Obj[CephSpec, CephStatus] | None, disks: list[Disk], pool_objs: list[Any]) -> Storage:
    common_parts: dict[str, Any] = {
        "disks": [STORAGE_DISK.to_view(d) for d in disks],
        "pools": [POOL.to_view(p) for p in pool_objs],
    }
    if ceph is None:
        return Storage(enabled=False, state="disabled", summary="storage is not enabled", **common_parts)
    s, st = ceph.spec, ceph.status
    return Storage(
        enabled=True,
        state=st.state,
        health=st.health,
        summary=st.summary,
        reason=st.reason,
        fsid=s.fsid,
        bootstrap_node=s.bootstrap_node,
        mons=dict(s.mons),
        replicas=s.replicas,
        capacity_bytes=st.capacity_bytes,
        used_bytes=st.used_bytes,
        available_bytes=st.available_bytes,
        pgs=dict(st.pgs),
        osds=list(st.osds),
        observed_at=st.observed_at,
        **common_parts,
    )


async def _disks(store: Store) -> list[Disk]:
    return [STORAGE_DISK.load(r) for r in await store.list(STORAGE_DISK.name, project="", limit=10_000)]


async def _pools(store: Store) -> list[Any]:
    return [POOL.load(r) for r in await store.list(POOL.name, project="", limit=10_000)]


async def show_storage(ctx: Context, store: Store) -> Storage:
    """The ``ceph`` record's status (health in plain words, capacity, PGs, OSDs by node), its disks and the pools;
    ``enabled: false`` (state ``disabled``) before ``storage enable``."""
    return _view(await common.ceph_record(store), await _disks(store), await _pools(store))


def _disk_name(node: str, device: str | None, id_: str) -> str:
    if device:
        return f"{node}-{device.removeprefix('/dev/').replace('/', '-')}"
    return f"{node}-file-{id_.rsplit('-', 1)[-1][:8]}"


def _new_disk(ctx: Context, node: str, device: str | None, size_bytes: int) -> Disk:
    id_ = ids.new_id(STORAGE_DISK.prefix)
    spec = StorageDiskSpec(
        node=node, source="device" if device else "file", path=device or "", size_bytes=0 if device else size_bytes
    )
    return STORAGE_DISK.new(project="", id=id_, name=_disk_name(node, device, id_), spec=spec, stamp=ctx.clock())


async def enable_storage(
    ctx: Context, store: Store, body: StorageEnable, *, node: str, directory: Directory | None = None
) -> Written:
    """Enable storage (``admin:storage:enable``): in one transaction the ``ceph`` record (a new fsid, the bootstrap
    node ``body.node`` or the node answering, ``node``, as its one MON at its cluster address, 1 replica, RADOS pool
    ``minicloud``), the ``ceph`` pool (now the default; the previous default pool no longer is) and, unless
    ``no_disk``, a file disk on the bootstrap node. 409 when already enabled; 404 for an unknown node. Answers 201
    with the storage view (state ``bootstrapping``); idempotent under ``ctx.idempotency``."""
    await common.require_admin(ctx, directory, "admin:storage:enable", "enabling storage")
    await pools.ensure_local_pool(store)
    bootstrap = body.node or node
    address = await common.node_address(store, bootstrap, node)

    async def step(_: int) -> Written:
        if await common.ceph_record(store) is not None:
            raise errors.AlreadyExists("storage is already enabled; see `minicloud storage show`")
        ceph = CEPH.new(
            project="",
            name=CEPH_NAME,
            spec=CephSpec(
                fsid=str(uuid.uuid4()),
                bootstrap_node=bootstrap,
                mons={bootstrap: address},
                replicas=1,
                pools=[DEFAULT_CEPH_POOL],
            ),
            stamp=ctx.clock(),
        )
        pool = POOL.new(
            project="",
            name=CEPH_POOL_NAME,
            spec=PoolSpec(
                driver="ceph",
                ceph_pool=DEFAULT_CEPH_POOL,
                default=True,
                description="RBD images in the cluster's Ceph, usable from every node",
            ),
            stamp=ctx.clock(),
        )
        ops: list[Op] = [Create(CEPH.dump(ceph)), Create(POOL.dump(pool)), *await pools.unset_defaults(ctx, store)]
        disks = []
        if not body.no_disk:
            disk = _new_disk(ctx, bootstrap, None, body.file_size_bytes or DEFAULT_OSD_FILE_BYTES)
            ops.append(Create(STORAGE_DISK.dump(disk)))
            disks.append(disk)
        others = [p.replace(spec=msgspec.structs.replace(p.spec, default=False)) for p in await _pools(store)]
        shown = sorted([*others, pool], key=lambda p: p.name)
        written = await commit(
            ctx,
            store,
            ops,
            status=201,
            label=CEPH.label,
            respond=lambda rev: _view(ceph.replace(revision=rev), disks, shown),
        )
        written.headers["Location"] = "/v1/storage"
        return written

    return await common.retrying(step)


async def add_disk(
    ctx: Context, store: Store, body: StorageDiskCreate, *, node: str, directory: Directory | None = None
) -> Written:
    """Give Ceph a disk (``admin:storage:disks:create``): a block device or a file OSD of ``file_size_bytes`` on
    ``body.node`` (default: the node answering). The node creates the OSD. 409 when storage is not enabled or the
    device is already given (its name ``<node>-<device>`` is taken); 422 unless exactly one of device and file."""
    await common.require_admin(ctx, directory, "admin:storage:disks:create", "adding a storage disk")
    if (body.device is None) == (body.file_size_bytes is None):
        raise errors.ValidationFailed(
            "give a block device (DEVICE) or a file size (--file SIZE), not both or neither",
            invalid_params=[{"name": "device", "reason": "exactly one of device and file_size_bytes"}],
        )
    await common.require_ceph(store)
    target = body.node or node
    await common.node_address(store, target, node)
    disk = _new_disk(ctx, target, body.device, body.file_size_bytes or 0)
    return await crud.create(ctx, store, STORAGE_DISK, disk)


async def list_disks(ctx: Context, store: Store) -> list[StorageDisk]:
    """Every disk (``admin:storage:disks:list``), by name."""
    return [STORAGE_DISK.to_view(d) for d in await _disks(store)]


async def remove_disk(
    ctx: Context, store: Store, ref: str, *, expect: int | None = None, directory: Directory | None = None
) -> Written:
    """Ask for a disk's removal (``admin:storage:disks:delete``): ``remove`` is set; its node drains the OSD (its
    data moves to the others), stops and purges it, then deletes the record. Answers the disk (state ``draining``).
    Idempotent: removing a disk being removed answers it again."""
    await common.require_admin(ctx, directory, "admin:storage:disks:delete", "removing a storage disk")

    def mark(disk: Disk) -> Disk:
        return disk.replace(spec=msgspec.structs.replace(disk.spec, remove=True))

    return await crud.update(ctx, store, STORAGE_DISK, ref, mark, expect=expect)


__all__ = ["add_disk", "enable_storage", "list_disks", "remove_disk", "show_storage"]
