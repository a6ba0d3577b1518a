"""Pools: where volumes and images live. ``local`` (qcow2 files on one node's disk) always exists — made on first use
by :func:`ensure_local_pool`, idempotent and race-free (a fixed id) — and is the default until ``storage enable``
makes the ``ceph`` pool default. Administrators create more (another RADOS pool of the same Ceph, or another local
pool) and delete unused ones. List and show are generic (every caller with a role may read them)."""

from __future__ import annotations

from typing import Any

import msgspec

from minicloud import errors
from minicloud.compute.kinds import IMAGE, INSTANCE
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written, commit
from minicloud.iam.directory import Directory
from minicloud.model.storage import PoolCreate
from minicloud.state import Create, Op, Store, Update
from minicloud.storage import common
from minicloud.storage.kinds import CEPH, LOCAL_POOL_NAME, POOL, VOLUME, PoolSpec, Qos

Pool = Obj[PoolSpec, Any]
#: The ``local`` pool's fixed id: two first uses racing collide on it, and the loser reads the winner's.
LOCAL_POOL_ID = "pool-local"


async def ensure_local_pool(store: Store) -> Pool:
    """The ``local`` pool, created (default when no pool is) if missing, audited as ``system:storage``. Idempotent;
    safe to race."""
    for _ in range(3):
        record = await store.get(POOL.name, LOCAL_POOL_ID) or await store.get_by_name(POOL.name, "", LOCAL_POOL_NAME)
        if record is not None:
            return POOL.load(record)
        ctx = Context.system("storage")
        default = await default_pool(store) is None
        obj = POOL.new(
            project="",
            id=LOCAL_POOL_ID,
            name=LOCAL_POOL_NAME,
            spec=PoolSpec(driver="local", default=default, description="qcow2 files on each node's disk"),
            stamp=ctx.clock(),
        )
        try:
            await commit(ctx, store, [Create(POOL.dump(obj))], status=201, label=POOL.label, respond=lambda rev: None)
        except errors.Conflict:
            continue  # created concurrently: read it
    raise errors.Conflict("the local pool could not be created; retry")


async def default_pool(store: Store) -> Pool | None:
    pools = [POOL.load(r) for r in await store.list(POOL.name, project="", limit=10_000)]
    return next((p for p in pools if p.spec.default), None)


async def resolve(ctx: Context, store: Store, ref: str | None) -> Pool:
    """The pool ``ref`` names, or the default pool (404 / 409 when there is none)."""
    await ensure_local_pool(store)
    if ref is not None:
        return await crud.get(ctx, store, POOL, ref)
    pool = await default_pool(store)
    if pool is None:
        raise errors.Conflict("no pool is the default; name one with --pool (see `minicloud pool list`)")
    return pool


async def unset_defaults(ctx: Context, store: Store, keep: str = "") -> list[Op]:
    """CAS updates that make every default pool but ``keep`` non-default."""
    ops: list[Op] = []
    for record in await store.list(POOL.name, project="", limit=10_000):
        pool = POOL.load(record)
        if pool.spec.default and pool.id != keep:
            spec = msgspec.structs.replace(pool.spec, default=False)
            ops.append(
                Update(POOL.dump(pool.replace(spec=spec, updated_at=ctx.clock())), expect_revision=pool.revision)
            )
    return ops


async def create_pool(ctx: Context, store: Store, body: PoolCreate, *, directory: Directory | None = None) -> Written:
    """Create a pool (administrators, ``admin:storage:pools:create``). A ``ceph`` pool needs storage enabled (409)
    and adds its RADOS pool (``ceph_pool``, default the pool's name) to what every node ensures, with a CAS on the
    ``ceph`` record; ``default`` takes the default from the others. One transaction; 409 for a taken name."""
    await common.require_admin(ctx, directory, "admin:storage:pools:create", "creating a pool")
    await ensure_local_pool(store)

    async def step(_: int) -> Written:
        ops: list[Op] = []
        if body.driver == "ceph":
            ceph = await common.require_ceph(store)
            rados = body.ceph_pool or body.name
            if rados not in ceph.spec.pools:
                spec = msgspec.structs.replace(ceph.spec, pools=[*ceph.spec.pools, rados])
                ops.append(
                    Update(CEPH.dump(ceph.replace(spec=spec, updated_at=ctx.clock())), expect_revision=ceph.revision)
                )
        else:
            if body.ceph_pool is not None:
                raise errors.ValidationFailed(
                    "ceph_pool is only for ceph pools",
                    invalid_params=[{"name": "ceph_pool", "reason": "only with driver ceph"}],
                )
            rados = ""
        obj = POOL.new(
            project="",
            name=body.name,
            spec=PoolSpec(
                driver=body.driver,
                ceph_pool=rados,
                default=body.default,
                description=body.description,
                qos=msgspec.convert(msgspec.to_builtins(body.qos), Qos),
            ),
            labels=body.labels,
            stamp=ctx.clock(),
        )
        if body.default:
            ops.extend(await unset_defaults(ctx, store, keep=obj.id))
        return await crud.create(ctx, store, POOL, obj, extra=ops)

    return await common.retrying(step)


async def pool_users(store: Store, pool: Pool, limit: int = 5) -> list[str]:
    """What keeps ``pool`` from being deleted: up to ``limit`` volumes, images and instances (their root disks) in
    it, as phrases."""
    found: list[str] = []
    for kind, noun in ((VOLUME, "volume"), (IMAGE, "image"), (INSTANCE, "instance")):
        for record in await store.list(kind.name, limit=100_000):
            if record.spec.get("pool") == pool.id:
                found.append(f"{noun} '{record.name}' (project '{record.project}')")
                if len(found) >= limit:
                    return found
    return found


async def _refuse_users(store: Store, pool: Pool) -> None:
    if users := await pool_users(store, pool):
        raise errors.InUse(f"pool '{pool.name}' is still used by {', '.join(users)}; delete them first")


async def delete_pool(
    ctx: Context, store: Store, ref: str, *, expect: int | None = None, directory: Directory | None = None
) -> Written:
    """Delete a pool no volume or image uses (409 naming them) and that is not the default (409: make another the
    default first). Administrators (``admin:storage:pools:delete``). A ceph pool's RADOS pool is no longer ensured;
    its (empty) data stays in Ceph."""
    await common.require_admin(ctx, directory, "admin:storage:pools:delete", "deleting a pool")

    async def step(_: int) -> Written:
        pool = await crud.get(ctx, store, POOL, ref)
        if expect is not None and expect != pool.revision:
            raise errors.PreconditionFailed(
                "the pool was changed since the revision you sent in If-Match; read it again and retry"
            )
        if pool.spec.default:
            raise errors.Conflict(
                f"pool '{pool.name}' is the default; make another pool the default first "
                "(`minicloud pool create NAME --driver … --default`)"
            )
        # race-free against volume creates: see common.delete_marked
        return await common.delete_marked(
            ctx, store, POOL, pool, lambda p: _refuse_users(store, p), lambda p: _delete(ctx, store, p)
        )

    return await (step(0) if expect is not None else common.retrying(step))


async def _delete(ctx: Context, store: Store, pool: Pool) -> Written:
    """The audited delete of the marked ``pool`` (CAS on the mark), and its RADOS pool out of the ``ceph`` record."""
    extra: list[Op] = []
    ceph = await common.ceph_record(store)
    if pool.spec.driver == "ceph" and ceph is not None and pool.spec.ceph_pool in ceph.spec.pools:
        shared = {
            POOL.load(r).spec.ceph_pool
            for r in await store.list(POOL.name, project="", limit=10_000)
            if r.id != pool.id
        }
        still = [p for p in ceph.spec.pools if p != pool.spec.ceph_pool or p in shared]
        spec = msgspec.structs.replace(ceph.spec, pools=still)
        extra.append(Update(CEPH.dump(ceph.replace(spec=spec, updated_at=ctx.clock())), expect_revision=ceph.revision))
    return await crud.delete_obj(ctx, store, POOL, pool, expect=pool.revision, extra=extra)
