"""Snapshots: create (of a volume, in its pool, made by the volume's node), delete (refused while volumes cloned from
it exist) and revert (the volume goes back to it). List, show and the description/labels patch are generic.

Race-free: a create commits with a CAS on its volume (which lists its snapshots) and on the project's
``storageusage`` (quota); a delete with a CAS on the snapshot (which lists its clones: a clone create CASes it too)
and on the volume."""

from __future__ import annotations

from typing import Any

from minicloud import errors
from minicloud.compute.kinds import INSTANCE
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.write import Written, commit
from minicloud.model.storage import SnapshotCreate
from minicloud.state import Check, Op, Store
from minicloud.storage import common
from minicloud.storage.kinds import SNAPSHOT, VOLUME, RevertRequest, SnapshotSpec
from minicloud.storage.quotas import DEFAULT_QUOTAS, Quotas, charge
from minicloud.storage.volumes import cas, changed, live_clones, load, names, write_volume

#: A volume lists its snapshots in its record (and RBD keeps each in the image's header): bounded whatever the
#: project's quota says (``quota_snapshots = 0`` is unlimited).
MAX_SNAPSHOTS_PER_VOLUME = 256


async def create_snapshot(
    ctx: Context, store: Store, body: SnapshotCreate, *, quotas: Quotas = DEFAULT_QUOTAS
) -> Written:
    """Snapshot a volume of ``ctx``'s project (state ``creating``; the volume's node takes it). 409 while the volume
    is not available or in use, is being deleted, past the snapshot quota, or for a taken name. One transaction.
    With ``instance`` instead: its root disk (:func:`_create_root_snapshot`)."""
    if (body.volume is None) == (body.instance is None):
        raise errors.ValidationFailed(
            "snapshot a volume (volume) or an instance's root disk (instance): exactly one of them",
            invalid_params=[{"name": "volume", "reason": "exactly one of volume and instance is required"}],
        )
    if body.instance is not None:
        return await _create_root_snapshot(ctx, store, body, body.instance, quotas)
    assert body.volume is not None
    volume = await crud.get(ctx, store, VOLUME, body.volume)
    snap = SNAPSHOT.new(
        project=ctx.project,
        name=body.name,
        spec=SnapshotSpec(
            volume=volume.id,
            volume_name=volume.name,
            pool=volume.spec.pool,
            node=volume.spec.node,
            size_gib=volume.spec.size_gib,
            description=body.description,
        ),
        labels=body.labels,
        stamp=ctx.clock(),
    )

    async def step(_: int) -> Written:
        vol = await crud.get(ctx, store, VOLUME, volume.id)
        if vol.spec.deleted:
            raise errors.Conflict(f"volume '{vol.name}' is being deleted")
        if vol.status.state not in ("available", "in-use"):
            raise errors.Conflict(f"volume '{vol.name}' is {vol.status.state}; snapshot it once available or in use")
        if len(vol.spec.snapshots) >= MAX_SNAPSHOTS_PER_VOLUME:
            raise errors.Conflict(
                f"volume '{vol.name}' has {len(vol.spec.snapshots)} snapshots, the most a volume may have; delete "
                "some first"
            )
        ops: list[Op] = await charge(ctx, store, ctx.project, snapshots=1, quotas=quotas)
        ops.append(cas(VOLUME, changed(vol, ctx, snapshots=[*vol.spec.snapshots, snap.id])))
        spec = changed(snap, ctx, node=vol.spec.node, size_gib=vol.spec.size_gib)
        return await crud.create(ctx, store, SNAPSHOT, spec, extra=ops)

    return await common.retrying(step)


async def _create_root_snapshot(ctx: Context, store: Store, body: SnapshotCreate, ref: str, quotas: Quotas) -> Written:
    """Snapshot the root disk of an instance of ``ctx``'s project: crash-consistent, running or not (its node takes
    it). Only a root disk in a ceph pool (an RBD clone of its image); an instance booted from a volume: snapshot that
    volume. 409 while the instance is being deleted or not placed, past the snapshot quota, or for a taken name. The
    snapshot goes with its instance (its data is in the root disk): make a volume from it to keep it."""
    inst = await crud.get(ctx, store, INSTANCE, ref)
    if inst.spec.root_volume:
        vol = await load(store, VOLUME, inst.spec.root_volume)
        raise errors.Conflict(
            f"instance '{inst.name}' boots from volume '{vol.name if vol else inst.spec.root_volume}'; snapshot that "
            "volume (`minicloud snapshot create NAME --volume VOLUME`)"
        )
    if inst.spec.pool_driver != "ceph":
        raise errors.Conflict(
            f"the root disk of instance '{inst.name}' is not in a ceph pool; root-disk snapshots need Ceph (create "
            "the instance in a ceph pool, or boot it from a volume and snapshot that)"
        )

    async def step(_: int) -> Written:
        cur = await crud.get(ctx, store, INSTANCE, inst.id)
        if cur.spec.deleted:
            raise errors.Conflict(f"instance '{cur.name}' is being deleted")
        if not cur.spec.node:
            raise errors.Conflict(f"instance '{cur.name}' is not placed on a node yet; retry once it is")
        snap = SNAPSHOT.new(
            project=ctx.project,
            name=body.name,
            spec=SnapshotSpec(
                volume="",
                instance=cur.id,
                instance_name=cur.name,
                pool=cur.spec.pool,
                node=cur.spec.node,
                size_gib=cur.spec.disk_gib,
                description=body.description,
            ),
            labels=body.labels,
            stamp=ctx.clock(),
        )
        ops: list[Op] = await charge(ctx, store, ctx.project, snapshots=1, quotas=quotas)
        # an instance delete that commits first fails this create (its retry sees the delete)
        ops.append(Check(kind=INSTANCE.name, id=cur.id, expect_revision=cur.revision))
        return await crud.create(ctx, store, SNAPSHOT, snap, extra=ops)

    return await common.retrying(step)


async def forget_root_snapshot(ctx: Context, store: Store, snap_id: str) -> bool:
    """Remove the record of a root-disk snapshot whose instance is gone (its data went with the root disk) and
    release its quota, in one transaction; False when there is nothing to do (no such snapshot, or its instance
    exists). For the snapshot's node."""

    async def step(_: int) -> bool:
        record = await store.get(SNAPSHOT.name, snap_id)
        if record is None:
            return False
        snap = SNAPSHOT.load(record)
        if not snap.spec.instance or await store.get(INSTANCE.name, snap.spec.instance) is not None:
            return False
        ops: list[Op] = [] if snap.spec.deleted else await charge(ctx, store, snap.project, snapshots=-1)
        await crud.delete_obj(ctx, store, SNAPSHOT, snap, expect=snap.revision, extra=ops)
        return True

    return await common.retrying(step)


async def delete_snapshot(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Delete a snapshot: 409 while volumes made from it exist and are not flattened (naming them). Marks it ``deleted`` (its node
    removes it, then the record) and answers 202 with it; releases the quota and drops it from its volume's list in
    the same transaction. Deleting a snapshot being deleted answers it again. When its node has left the cluster, a
    ceph snapshot is handed to its volume's node and any other goes at once (204)."""

    async def step(_: int) -> Written:
        snap = await crud.get(ctx, store, SNAPSHOT, ref)
        if expect is not None and expect != snap.revision:
            raise errors.PreconditionFailed(
                "the snapshot was changed since the revision you sent in If-Match; read it again and retry"
            )
        vol = await load(store, VOLUME, snap.spec.volume)
        node = snap.spec.node
        if await common.node_gone(store, node):
            # The node that took it left the cluster: no node would ever remove it. A ceph snapshot is the volume's
            # current node's to remove (the pool is reachable from there); otherwise the record goes at once (its
            # data went with the node, or goes with the volume).
            live = vol is not None and vol.spec.driver == "ceph" and not await common.node_gone(store, vol.spec.node)
            node = vol.spec.node if live and vol is not None else ""
        if snap.spec.deleted and node == snap.spec.node:
            return Written(SNAPSHOT.to_view(snap), 202, snap.revision)
        if clones := await live_clones(store, snap):
            raise errors.InUse(
                f"snapshot '{snap.name}' has volumes made from it: {names(clones)}; flatten them (`minicloud volume "
                f"flatten {clones[0].name}`) or delete them first"
            )
        ops: list[Op] = [] if snap.spec.deleted else await charge(ctx, store, snap.project, snapshots=-1)
        if vol is not None and snap.id in vol.spec.snapshots:
            ops.append(cas(VOLUME, changed(vol, ctx, snapshots=[s for s in vol.spec.snapshots if s != snap.id])))
        if not node:
            return await crud.delete_obj(ctx, store, SNAPSHOT, snap, expect=snap.revision, extra=ops)
        marked = changed(snap, ctx, deleted=True, node=node)
        return await commit(
            ctx,
            store,
            [cas(SNAPSHOT, marked), *ops],
            status=202,
            label=SNAPSHOT.label,
            respond=lambda rev: SNAPSHOT.to_view(marked.replace(revision=rev)),
        )

    return await (step(0) if expect is not None else common.retrying(step))


async def revert_snapshot(ctx: Context, store: Store, ref: str) -> Written:
    """Revert the snapshot's volume to it: the volume's ``spec.revert`` becomes this snapshot with the next
    sequence number, and its node rolls it back once. 409 unless the snapshot is available and the volume is
    detached or its instance stopped (a running guest would see its disk change under it). Answers the volume."""

    async def step(_: int) -> Written:
        snap = await crud.get(ctx, store, SNAPSHOT, ref)
        if snap.spec.deleted or snap.status.state != "available":
            state = "being deleted" if snap.spec.deleted else snap.status.state
            raise errors.Conflict(f"snapshot '{snap.name}' is {state}; only an available snapshot can be reverted to")
        if snap.spec.instance:
            return await _revert_root(ctx, store, snap)
        vol = await load(store, VOLUME, snap.spec.volume)
        if vol is None or vol.spec.deleted:
            raise errors.Conflict(f"the volume of snapshot '{snap.name}' is gone or being deleted")
        if (att := vol.spec.attachment) is not None:
            inst = await load(store, INSTANCE, att.instance)
            if inst is not None and not (inst.spec.power == "stopped" and inst.status.state == "stopped"):
                raise errors.Conflict(
                    f"volume '{vol.name}' is attached to instance '{inst.name}', which is {inst.status.state}; stop "
                    f"the instance (`minicloud instance stop {inst.name}`) or detach the volume first"
                )
        if vol.status.state not in ("available", "in-use"):
            raise errors.Conflict(f"volume '{vol.name}' is {vol.status.state}; revert it once available")
        reverted = changed(vol, ctx, revert=RevertRequest(snapshot=snap.id, seq=vol.spec.revert.seq + 1))
        return await write_volume(ctx, store, reverted)

    return await common.retrying(step)


async def _revert_root(ctx: Context, store: Store, snap: Any) -> Written:
    """Ask the root disk of the snapshot's instance back to the snapshot (its ``revert_seq`` + 1; the instance's
    node rolls it back once, while the instance is stopped). 409 unless the instance is stopped. Answers the
    snapshot."""
    inst = await load(store, INSTANCE, snap.spec.instance)
    if inst is None or inst.spec.deleted:
        raise errors.Conflict(f"the instance of snapshot '{snap.name}' is gone or being deleted")
    if not (inst.spec.power == "stopped" and inst.status.state == "stopped"):
        raise errors.Conflict(
            f"instance '{inst.name}' is {inst.status.state}; stop it first (`minicloud instance stop {inst.name} "
            "--wait`): a running guest would see its disk change under it"
        )
    asked = changed(snap, ctx, revert_seq=snap.spec.revert_seq + 1, node=inst.spec.node or snap.spec.node)
    return await commit(
        ctx,
        store,
        # the instance stays stopped until the commit (a start that commits first fails this revert, which reads
        # it again and refuses)
        [cas(SNAPSHOT, asked), Check(kind=INSTANCE.name, id=inst.id, expect_revision=inst.revision)],
        status=200,
        label=SNAPSHOT.label,
        respond=lambda rev: SNAPSHOT.to_view(asked.replace(revision=rev)),
    )
