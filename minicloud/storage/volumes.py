"""Volumes: create (blank, from an image or from a snapshot), delete, attach, detach, extend and flatten. List, show and the
description/labels patch are generic (:mod:`minicloud.core.crud`).

Each call is one transaction through :func:`minicloud.core.write.commit` (audit, ``Idempotency-Key``) whose
conditions make it race-free, retried on a fresh read when it loses (:func:`minicloud.storage.common.retrying`):
a CAS on the project's ``storageusage`` (quotas), on the instance's ``diskslots`` (guest devices: two attaches to
one instance never get the same one), on a source snapshot (its ``clones``) and on the volume itself. The node named
in ``spec.node`` converges the data and writes status; a delete only sets ``spec.deleted`` — except for a volume
whose node has left the cluster (no node will ever remove it: the record goes at once) or, for administrators,
with ``force``.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from minicloud import errors
from minicloud.compute.kinds import IMAGE, INSTANCE
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written, commit
from minicloud.iam.directory import Directory
from minicloud.model.storage import VolumeAttach, VolumeCreate, VolumeDetach, VolumeExtend
from minicloud.state import Check, Create, Delete, Op, Store, Update, list_all
from minicloud.storage import common, pools
from minicloud.storage.kinds import (
    DEVICES,
    DISK_SLOTS,
    GIB,
    POOL,
    SNAPSHOT,
    VOLUME,
    Attachment,
    DiskSlotsSpec,
    PoolSpec,
    Qos,
    SnapshotSpec,
    VolumeSource,
    VolumeSpec,
    slots_id,
)
from minicloud.storage.quotas import DEFAULT_QUOTAS, Quotas, charge

Volume = Obj[VolumeSpec, Any]
Snapshot = Obj[SnapshotSpec, Any]
#: A snapshot lists the volumes made from it in its record: bounded whatever the project's quota says
#: (``quota_volumes = 0`` is unlimited).
MAX_CLONES_PER_SNAPSHOT = 1024


def changed(obj: Obj[Any, Any], ctx: Context, status: Any = None, **spec: Any) -> Obj[Any, Any]:
    return obj.replace(
        spec=msgspec.structs.replace(obj.spec, **spec),
        status=status if status is not None else obj.status,
        updated_at=ctx.clock(),
    )


def cas(kind: Any, obj: Obj[Any, Any]) -> Update:
    """The compare-and-swap write of ``obj`` (changed) against the revision it was read at."""
    return Update(kind.dump(obj), expect_revision=obj.revision)


async def write_volume(ctx: Context, store: Store, vol: Volume, *ops: Op, status: int = 200) -> Written:
    """Commit ``vol`` (changed) by compare-and-swap with ``ops`` in one transaction; answer its view at the new
    revision."""
    return await commit(
        ctx, store, [cas(VOLUME, vol), *ops], status=status, label=VOLUME.label,
        respond=lambda rev: VOLUME.to_view(vol.replace(revision=rev)),
    )  # fmt: skip


def _status(vol: Volume, **changes: Any) -> Any:
    return msgspec.structs.replace(vol.status, **changes)


async def free_gib(store: Store, pool: Obj[PoolSpec, Any]) -> int | None:
    """What a ceph pool can still take, from the last report of the cluster (available bytes over the replica
    count); None when unknown (a local pool, or no report yet)."""
    if pool.spec.driver != "ceph":
        return None
    ceph = await common.ceph_record(store)
    if ceph is None or ceph.status.observed_at is None or ceph.status.capacity_bytes <= 0:
        return None
    return ceph.status.available_bytes // max(1, ceph.spec.replicas) // GIB


async def _check_space(store: Store, pool: Obj[PoolSpec, Any], gib: int) -> None:
    free = await free_gib(store, pool)
    if free is not None and gib > free:
        raise errors.InsufficientCapacity(
            f"pool '{pool.name}' has {free} GiB free, less than the {gib} GiB asked; "
            "ask an administrator to add a disk (`minicloud storage disk add`) or ask for less"
        )


def _too_small(size: int, minimum: int, what: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(
        f"size_gib {size} is smaller than {what}: it must be at least {minimum} GiB",
        invalid_params=[{"name": "size_gib", "reason": f"at least {minimum}"}],
    )


async def create_volume(
    ctx: Context, store: Store, body: VolumeCreate, *, node: str, quotas: Quotas = DEFAULT_QUOTAS
) -> Written:
    """Create a volume in ``ctx``'s project (state ``creating``): blank, from an image (``size_gib`` at least the
    image's virtual size, 422 saying the minimum) or from a snapshot (in the snapshot's pool — 409 for another —,
    at least its size). The pool is ``body.pool`` or the default. ``spec.node`` is the node that makes it: the node
    answering (``node``), or the node holding the image's files for an image outside Ceph, or the snapshot's node
    for a local snapshot. 409 past a quota (naming it and the numbers) or past a ceph pool's free space (saying it),
    or for a taken name. One transaction; idempotent under ``ctx.idempotency``."""
    if body.image is not None and body.snapshot is not None:
        raise errors.ValidationFailed(
            "a volume is made from an image or from a snapshot, not both",
            invalid_params=[{"name": "snapshot", "reason": "not with image"}],
        )
    snapshot: Snapshot | None = None
    if body.snapshot is not None:
        snapshot = await crud.get(ctx, store, SNAPSHOT, body.snapshot)
    pool = await pools.resolve(
        ctx, store, body.pool if body.pool is not None or snapshot is None else snapshot.spec.pool
    )
    if pool.spec.driver == "ceph":
        await common.require_ceph(store)
    source, where = VolumeSource(), node
    if body.image is not None:
        image = await crud.get(ctx, store, IMAGE, body.image)
        if image.spec.boot != "disk":
            raise errors.Conflict(f"image '{image.name}' is a kernel image; a volume is made from a disk image")
        virtual = image.spec.virtual_size_bytes or image.spec.size_bytes
        minimum = max(1, math.ceil(virtual / GIB))
        if body.size_gib < minimum:
            raise _too_small(body.size_gib, minimum, f"image '{image.name}' ({virtual} bytes)")
        source = VolumeSource(type="image", id=image.id, name=image.name)
        if image.spec.pool_driver != "ceph":
            where = image.spec.node  # its files are there
    elif snapshot is not None:
        if snapshot.spec.pool != pool.id:
            raise errors.Conflict(
                f"snapshot '{snapshot.name}' is in another pool than '{pool.name}'; a volume from a snapshot is "
                "made in the snapshot's pool (leave out --pool)"
            )
        if body.size_gib < snapshot.spec.size_gib:
            raise _too_small(body.size_gib, snapshot.spec.size_gib, f"snapshot '{snapshot.name}'")
        source = VolumeSource(type="snapshot", id=snapshot.id, name=snapshot.name)
        if pool.spec.driver == "local":
            where = snapshot.spec.node
    # the pool's limits (it is the volume type) for each limit the create leaves at 0
    q = {k: v or getattr(pool.spec.qos, k) for k, v in msgspec.structs.asdict(body.qos).items()}
    vol = VOLUME.new(
        project=ctx.project,
        name=body.name,
        spec=VolumeSpec(
            size_gib=body.size_gib,
            pool=pool.id,
            pool_name=pool.name,
            driver=pool.spec.driver,
            source=source,
            image_id=source.id if source.type == "image" else "",
            node=where,
            qos=Qos(**q),
            description=body.description,
        ),
        labels=body.labels,
        stamp=ctx.clock(),
    )

    async def step(_: int) -> Written:
        await _check_space(store, pool, body.size_gib)
        ops: list[Op] = await charge(ctx, store, ctx.project, volumes=1, gib=body.size_gib, quotas=quotas)
        # The pool and the image must still be there when the volume is: a delete of either that commits first
        # fails this transaction's Check (the retry answers 404); one that reads the volumes after sees it.
        ops.append(await common.still(store, POOL, pool.id, f"pool '{pool.name}'"))
        if source.type == "image":
            ops.append(await common.still(store, IMAGE, source.id, f"image '{source.name}'"))
        if snapshot is not None:
            snap = await crud.get(ctx, store, SNAPSHOT, snapshot.id)
            if snap.spec.deleted:
                raise errors.Conflict(f"snapshot '{snap.name}' is being deleted")
            if snap.status.state != "available":
                raise errors.Conflict(f"snapshot '{snap.name}' is {snap.status.state}; wait until it is available")
            if len(snap.spec.clones) >= MAX_CLONES_PER_SNAPSHOT:
                raise errors.Conflict(
                    f"snapshot '{snap.name}' has {len(snap.spec.clones)} volumes made from it, the most a snapshot "
                    "may have; make a volume from one of them, or snapshot one of them"
                )
            ops.append(cas(SNAPSHOT, changed(snap, ctx, clones=[*snap.spec.clones, vol.id])))
        return await crud.create(ctx, store, VOLUME, vol, extra=ops)

    return await common.retrying(step)


async def load(store: Store, kind: Any, id_: str) -> Obj[Any, Any] | None:
    record = await store.get(kind.name, id_)
    return kind.load(record) if record is not None else None


async def live_clones(store: Store, snap: Snapshot) -> list[Volume]:
    """The volumes made from ``snap`` that are not being deleted."""
    found = []
    for vid in snap.spec.clones:
        vol = await load(store, VOLUME, vid)
        if vol is not None and not vol.spec.deleted:
            found.append(vol)
    return found


def names(objs: list[Obj[Any, Any]]) -> str:
    return ", ".join(f"'{o.name}'" for o in objs)


async def delete_volume(
    ctx: Context,
    store: Store,
    ref: str,
    *,
    expect: int | None = None,
    force: bool = False,
    directory: Directory | None = None,
) -> Written:
    """Delete a volume: 409 while attached (naming the instance) or while a volume cloned from one of its
    snapshots exists (naming them). Its snapshots go with it. Marks it (and them) ``deleted`` and answers 202 with
    the volume (state ``deleting``): its node removes the data, then the records. The record is removed at once
    (204) when its node is no longer a cluster member, or with ``force`` (``admin:storage:volumes:delete``: the data
    is left wherever it is). Releases the quota in the same transaction. Deleting a volume being deleted answers
    it again."""
    if force:
        await common.require_admin(ctx, directory, "admin:storage:volumes:delete", "deleting a volume with --force")

    async def step(_: int) -> Written:
        vol = await crud.get(ctx, store, VOLUME, ref)
        if expect is not None and expect != vol.revision:
            raise errors.PreconditionFailed(
                "the volume was changed since the revision you sent in If-Match; read it again and retry"
            )
        gone = force or await common.node_gone(store, vol.spec.node)
        if vol.spec.deleted and not gone:
            return Written(VOLUME.to_view(vol), 202, vol.revision)
        if vol.spec.attachment is not None and not gone:
            att = vol.spec.attachment
            raise errors.InUse(
                f"volume '{vol.name}' is attached to instance '{att.instance_name or att.instance}' as {att.device}; "
                f"detach it first (`minicloud volume detach {vol.name}`)"
            )
        snaps = [s for s in [await load(store, SNAPSHOT, sid) for sid in vol.spec.snapshots] if s is not None]
        for snap in snaps:
            if clones := await live_clones(store, snap):
                raise errors.InUse(
                    f"volume '{vol.name}' has snapshot '{snap.name}' that volumes {names(clones)} were made from; "
                    f"flatten them (`minicloud volume flatten {clones[0].name}`) or delete them first"
                )
        ops: list[Op] = []
        if not vol.spec.deleted:
            live = [s for s in snaps if not s.spec.deleted]
            ops += await charge(ctx, store, vol.project, volumes=-1, gib=-vol.spec.size_gib, snapshots=-len(live))
            if vol.spec.source.type == "snapshot" and (parent := await load(store, SNAPSHOT, vol.spec.source.id)):
                ops.append(cas(SNAPSHOT, changed(parent, ctx, clones=[c for c in parent.spec.clones if c != vol.id])))
        if gone:
            ops += [Delete(kind=SNAPSHOT.name, id=s.id, expect_revision=s.revision) for s in snaps]
            ops += await _release_slot_ops(ctx, store, vol)
            return await crud.delete_obj(ctx, store, VOLUME, vol, expect=vol.revision, extra=ops)
        ops += [cas(SNAPSHOT, changed(s, ctx, deleted=True)) for s in snaps if not s.spec.deleted]
        marked = changed(vol, ctx, deleted=True)
        return await write_volume(ctx, store, marked, *ops, status=202)

    return await (step(0) if expect is not None else common.retrying(step))


async def _slots(store: Store, instance: str) -> Obj[DiskSlotsSpec, Any] | None:
    return await load(store, DISK_SLOTS, slots_id(instance))


def _slots_op(ctx: Context, slots: Obj[DiskSlotsSpec, Any] | None, instance: str, devices: dict[str, str]) -> list[Op]:
    """The CAS write that makes the instance's device map ``devices`` (Create, Update, or Delete when empty)."""
    if slots is None:
        if not devices:
            return []
        new = DISK_SLOTS.new(
            project="", id=slots_id(instance), name=instance, spec=DiskSlotsSpec(instance=instance, devices=devices),
            stamp=ctx.clock(),
        )  # fmt: skip
        return [Create(DISK_SLOTS.dump(new))]
    if not devices:
        return [Delete(kind=DISK_SLOTS.name, id=slots.id, expect_revision=slots.revision)]
    return [cas(DISK_SLOTS, changed(slots, ctx, devices=devices))]


async def _release_slot_ops(ctx: Context, store: Store, vol: Volume) -> list[Op]:
    att = vol.spec.attachment
    if att is None:
        return []
    slots = await _slots(store, att.instance)
    if slots is None or slots.spec.devices.get(att.device) != vol.id:
        return []
    return _slots_op(ctx, slots, att.instance, {d: v for d, v in slots.spec.devices.items() if v != vol.id})


async def snapshots_follow(store: Store, vol: Volume, node: str, stamp: str) -> list[Op]:
    """The CAS writes that hand a ceph volume's snapshots to ``node``, the node the volume moves to: commit them
    with the move. Any node with the pool can take or remove a ceph snapshot, and the old node may be gone for
    good (a snapshot left with it would stay ``creating`` or ``deleting``). Snapshots being deleted are no longer
    in the volume's list: they are found among the old node's (indexed). Nothing for a local volume (it does not
    move)."""
    if vol.spec.driver != "ceph" or not node or vol.spec.node == node:
        return []
    found = {sid: None for sid in vol.spec.snapshots}
    if vol.spec.node:
        for record in await list_all(store, SNAPSHOT.name, where={"node": vol.spec.node}):
            if record.spec.get("volume") == vol.id:
                found[record.id] = None
    ops: list[Op] = []
    for sid in found:
        snap = await load(store, SNAPSHOT, sid)
        if snap is not None and snap.spec.volume == vol.id and snap.spec.node != node:
            moved = snap.replace(spec=msgspec.structs.replace(snap.spec, node=node), updated_at=stamp)
            ops.append(cas(SNAPSHOT, moved))
    return ops


async def attach_volume(ctx: Context, store: Store, ref: str, body: VolumeAttach) -> Written:
    """Attach an ``available`` volume to an instance of ``ctx``'s project (404 otherwise) as ``body.device`` or the
    instance's next free guest disk (``vdb`` … ``vdz``), unique per instance (a CAS on its ``diskslots``). 409 when
    the volume is attached already (naming the instance) or not available, the instance is being deleted or not
    placed yet, the device is taken or none is free, or a local volume's node is not the instance's (naming both).
    Sets ``spec.attachment``, moves ``spec.node`` to the instance's node (keeping the old one in
    ``previous_node``, which the new node fences; the volume's snapshots move with it) and the status to
    ``attaching``."""

    async def step(_: int) -> Written:
        vol = await crud.get(ctx, store, VOLUME, ref)
        if vol.spec.deleted:
            raise errors.Conflict(f"volume '{vol.name}' is being deleted")
        if (att := vol.spec.attachment) is not None:
            raise errors.InUse(
                f"volume '{vol.name}' is attached to instance '{att.instance_name or att.instance}' as {att.device}; "
                f"detach it first (`minicloud volume detach {vol.name}`)"
            )
        if vol.status.state != "available":
            raise errors.Conflict(f"volume '{vol.name}' is {vol.status.state}; it can be attached once available")
        inst = await crud.get(ctx, store, INSTANCE, body.instance)
        if inst.spec.deleted:
            raise errors.Conflict(f"instance '{inst.name}' is being deleted")
        target = inst.spec.node
        if not target:
            raise errors.Conflict(f"instance '{inst.name}' is not placed on a node yet; retry once it is")
        if vol.spec.driver == "local" and vol.spec.node != target:
            raise errors.Conflict(
                f"volume '{vol.name}' is in local pool '{vol.spec.pool_name}' on node '{vol.spec.node}' and instance "
                f"'{inst.name}' runs on node '{target}'; a local volume attaches only to instances on its node"
            )
        slots = await _slots(store, inst.id)
        devices = dict(slots.spec.devices) if slots is not None else {}
        if body.device is not None:
            if (holder := devices.get(body.device)) is not None:
                other = await load(store, VOLUME, holder)
                raise errors.Conflict(
                    f"{body.device} of instance '{inst.name}' is taken by volume "
                    f"'{other.name if other else holder}'; choose another device or leave it out"
                )
            device = body.device
        else:
            free = [d for d in DEVICES if d not in devices]
            if not free:
                raise errors.Conflict(f"instance '{inst.name}' has no free guest disk (vdb … vdz are all taken)")
            device = free[0]
        devices[device] = vol.id
        attached = changed(
            vol,
            ctx,
            status=_status(vol, state="attaching", reason=""),
            attachment=Attachment(instance=inst.id, instance_name=inst.name, node=target, device=device),
            node=target,
            previous_node=vol.spec.node if vol.spec.node != target else "",
        )
        # The Check on the instance: a delete (or any change) of it since it was read fails this attach, which
        # reads it again — so a volume is never attached to an instance whose teardown did not see it.
        return await write_volume(
            ctx,
            store,
            attached,
            *await snapshots_follow(store, vol, target, ctx.clock()),
            *_slots_op(ctx, slots, inst.id, devices),
            Check(kind=INSTANCE.name, id=inst.id, expect_revision=inst.revision),
        )

    return await common.retrying(step)


async def detach_volume(ctx: Context, store: Store, ref: str, body: VolumeDetach) -> Written:
    """Detach a volume from its instance (409 when it is not attached, or is the instance's root disk): the
    attachment moves to ``detached_from`` (with ``force``: unplug without waiting for the guest), its guest disk is
    free again, the status is ``detaching`` until the instance's node has unplugged it. A volume still
    ``detaching`` (the guest has not let go: its reason says so) takes a second detach with ``force``: the
    detach becomes forced (the instance's node powers the guest off and starts it without the disk)."""

    async def step(_: int) -> Written:
        vol = await crud.get(ctx, store, VOLUME, ref)
        att = vol.spec.attachment
        gone = vol.spec.detached_from
        if att is None and gone is not None and vol.status.state == "detaching" and body.force:
            if gone.force:
                return Written(VOLUME.to_view(vol), 200, vol.revision)  # forced already
            forced = changed(
                vol, ctx, status=_status(vol, reason=""), detached_from=msgspec.structs.replace(gone, force=True)
            )
            return await write_volume(ctx, store, forced)
        if att is None:
            if gone is not None and vol.status.state == "detaching":
                raise errors.Conflict(
                    f"volume '{vol.name}' is being detached from instance '{gone.instance_name or gone.instance}'; "
                    f"if its guest does not let go, force it (`minicloud volume detach {vol.name} --force`)"
                )
            raise errors.Conflict(f"volume '{vol.name}' is not attached")
        if vol.spec.root_of:
            raise errors.Conflict(
                f"volume '{vol.name}' is the root disk of instance '{att.instance_name or att.instance}'; it goes "
                "with the instance"
            )
        detached = changed(
            vol,
            ctx,
            status=_status(vol, state="detaching", reason=""),
            attachment=None,
            detached_from=msgspec.structs.replace(att, force=body.force),
        )
        return await write_volume(ctx, store, detached, *await _release_slot_ops(ctx, store, vol))

    return await common.retrying(step)


async def extend_volume(
    ctx: Context, store: Store, ref: str, body: VolumeExtend, *, quotas: Quotas = DEFAULT_QUOTAS
) -> Written:
    """Grow a volume to ``body.size_gib`` (422 unless larger than now; 409 past the GiB quota or a ceph pool's free
    space, or unless the volume is available or in use — attached volumes grow online). Its node resizes it."""

    async def step(_: int) -> Written:
        vol = await crud.get(ctx, store, VOLUME, ref)
        if vol.spec.deleted:
            raise errors.Conflict(f"volume '{vol.name}' is being deleted")
        if body.size_gib <= vol.spec.size_gib:
            raise errors.ValidationFailed(
                f"volume '{vol.name}' has {vol.spec.size_gib} GiB; a volume only grows: ask for more",
                invalid_params=[{"name": "size_gib", "reason": f"more than {vol.spec.size_gib}"}],
            )
        if vol.status.state not in ("available", "in-use"):
            raise errors.Conflict(f"volume '{vol.name}' is {vol.status.state}; extend it once available or in use")
        delta = body.size_gib - vol.spec.size_gib
        pool = await load(store, POOL, vol.spec.pool)
        if pool is not None:
            await _check_space(store, pool, delta)
        ops = await charge(ctx, store, vol.project, gib=delta, quotas=quotas)
        grown = changed(vol, ctx, size_gib=body.size_gib)
        return await write_volume(ctx, store, grown, *ops)

    return await common.retrying(step)


async def flatten_volume(ctx: Context, store: Store, ref: str) -> Written:
    """Ask for a volume made from a snapshot to be flattened: ``spec.flatten``; its node copies the snapshot's data
    into it, then :func:`flattened` releases the snapshot (which can then be deleted). Attached volumes too (RBD
    flattens under a running guest). Idempotent: asking again while it is being flattened, or once it is, answers
    the volume unchanged (``status.flattening`` / ``status.flattened``). 409 for a volume not made from a snapshot
    (it has no parent), one being deleted, or one not yet available (or in error). One CAS on the volume."""

    async def step(_: int) -> Written:
        vol = await crud.get(ctx, store, VOLUME, ref)
        if vol.spec.deleted:
            raise errors.Conflict(f"volume '{vol.name}' is being deleted; there is nothing to flatten")
        source = vol.spec.source
        if source.type != "snapshot":
            made = {"blank": "blank", "image": f"from image '{source.name or source.id}'"}.get(
                source.type, "from a backup"
            )
            raise errors.Conflict(
                f"volume '{vol.name}' has no parent snapshot (it was made {made}); only a volume made from a "
                "snapshot (`minicloud volume create NAME --snapshot SNAPSHOT`) can be flattened"
            )
        if vol.spec.flatten:
            return Written(VOLUME.to_view(vol), 200, vol.revision)
        if vol.status.state in ("creating", "error"):
            raise errors.Conflict(f"volume '{vol.name}' is {vol.status.state}; flatten it once it is available")
        asked = changed(vol, ctx, flatten=True)
        return await write_volume(ctx, store, asked)

    return await common.retrying(step)


async def flattened(ctx: Context, store: Store, vol_id: str) -> bool:
    """For the volume's node once :meth:`VolumeDriver.flatten` is done: in one transaction, ``status.flattened``
    (CAS on the volume) and the volume out of its snapshot's ``clones`` (CAS on the snapshot, when it still lists
    it), so the snapshot's delete is no longer refused because of it. False when there is nothing to do (no such
    volume, no flatten asked, done already, or being deleted: the delete releases the snapshot itself)."""

    async def step(_: int) -> bool:
        vol = await load(store, VOLUME, vol_id)
        if vol is None or vol.spec.deleted or not vol.spec.flatten or vol.status.flattened:
            return False
        done = vol.replace(status=_status(vol, flattened=True), updated_at=ctx.clock())
        ops: list[Op] = [cas(VOLUME, done)]
        parent = await load(store, SNAPSHOT, vol.spec.source.id) if vol.spec.source.type == "snapshot" else None
        if parent is not None and vol.id in parent.spec.clones:
            ops.append(cas(SNAPSHOT, changed(parent, ctx, clones=[c for c in parent.spec.clones if c != vol.id])))
        await commit(ctx, store, ops, status=200, label=VOLUME.label, respond=lambda rev: None)
        return True

    return await common.retrying(step)


async def attached_volumes(store: Store, instance: str) -> dict[str, Volume]:
    """The volumes attached to ``instance``, by guest disk (from its ``diskslots``)."""
    slots = await _slots(store, instance)
    found = {}
    for device, vid in sorted((slots.spec.devices if slots is not None else {}).items()):
        vol = await load(store, VOLUME, vid)
        if vol is not None:
            found[device] = vol
    return found


async def release_instance(ctx: Context, store: Store, instance: str) -> list[Op]:
    """The ops that detach every volume from ``instance`` (not its root volume, ``root_of``) and delete its
    ``diskslots``: for whoever removes the instance record once its domain is gone — commit them in the same
    transaction (CAS on each record read, so a lost race fails that transaction; read again and retry). The
    volumes become ``available`` (the domain that used them no longer exists)."""
    ops: list[Op] = []
    for vol in (await attached_volumes(store, instance)).values():
        if vol.spec.root_of == instance or vol.spec.attachment is None or vol.spec.attachment.instance != instance:
            continue
        ops.append(
            cas(
                VOLUME,
                changed(
                    vol,
                    ctx,
                    status=_status(vol, state="available", reason=""),
                    attachment=None,
                    detached_from=vol.spec.attachment,
                ),
            )
        )
    slots = await _slots(store, instance)
    if slots is not None:
        ops.append(Delete(kind=DISK_SLOTS.name, id=slots.id, expect_revision=slots.revision))
    return ops


__all__ = [
    "attach_volume",
    "attached_volumes",
    "create_volume",
    "delete_volume",
    "detach_volume",
    "extend_volume",
    "flatten_volume",
    "flattened",
    "free_gib",
    "live_clones",
    "release_instance",
    "snapshots_follow",
]
