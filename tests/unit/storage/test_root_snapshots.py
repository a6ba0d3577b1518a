"""Snapshots of an instance's root disk, through the services: made by the instance's node, counted against the
snapshot quota, refused where there is no RBD root disk, reverted only while the instance is stopped, usable as the
source of a volume; forgotten (quota released) once the instance is gone."""

from __future__ import annotations

import msgspec
import pytest

from minicloud import errors
from minicloud.compute.kinds import INSTANCE
from minicloud.model.storage import SnapshotCreate, VolumeCreate
from minicloud.state import Delete, Txn, Update
from minicloud.storage import pools, snapshots, volumes
from minicloud.storage.kinds import (
    CEPH,
    CEPH_NAME,
    POOL,
    SNAPSHOT,
    STORAGE_USAGE,
    VOLUME,
    CephSpec,
    PoolSpec,
    rbd_image,
)
from minicloud.storage.quotas import Quotas
from tests.unit.storage.conftest import NODE, put_instance, set_status


@pytest.fixture
async def ceph_pool(store):
    from minicloud.state import Create

    spec = PoolSpec(driver="ceph", ceph_pool="minicloud", default=True)
    ceph = CEPH.new(project="", name=CEPH_NAME, spec=CephSpec(fsid="f", bootstrap_node=NODE))
    await store.commit(
        Txn([Create(POOL.dump(POOL.new(project="", name="ceph", id="pool-ceph", spec=spec))), Create(CEPH.dump(ceph))])
    )


async def _stop(store, inst_id: str, *, power: str = "stopped", state: str = "stopped") -> None:
    obj = INSTANCE.load(await store.get(INSTANCE.name, inst_id))
    new = obj.replace(
        spec=msgspec.structs.replace(obj.spec, power=power), status=msgspec.structs.replace(obj.status, state=state)
    )
    await store.commit(Txn([Update(INSTANCE.dump(new), expect_revision=obj.revision)]))


async def test_a_root_disk_snapshot_is_taken_by_the_instances_node_and_counted(store, ctx, ceph_pool):
    inst = await put_instance(store, "web", pool="pool-ceph", pool_driver="ceph")
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", instance="web"))).body
    assert (snap.instance, snap.instance_id, snap.volume, snap.size_gib) == ("web", inst.id, "", 1)
    rec = SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id))
    assert (rec.spec.node, rec.spec.pool, rbd_image(rec.spec)) == (NODE, "pool-ceph", f"{inst.id}-root")
    assert STORAGE_USAGE.load(await store.get(STORAGE_USAGE.name, "stu-default")).spec.snapshots == 1
    with pytest.raises(errors.Conflict, match="quota"):
        await snapshots.create_snapshot(
            ctx, store, SnapshotCreate(name="s2", instance="web"), quotas=Quotas(snapshots=1)
        )


async def test_root_disk_snapshots_need_an_rbd_root_disk_and_exactly_one_source(store, ctx, ceph_pool):
    await put_instance(store, "local-vm", pool=pools.LOCAL_POOL_ID, pool_driver="local")
    with pytest.raises(errors.Conflict, match="need Ceph"):
        await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", instance="local-vm"))
    await put_instance(store, "booted", pool="pool-ceph", pool_driver="ceph", root_volume="vol-x")
    with pytest.raises(errors.Conflict, match="snapshot that volume"):
        await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", instance="booted"))
    with pytest.raises(errors.ValidationFailed, match="exactly one"):
        await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s"))
    with pytest.raises(errors.ValidationFailed, match="exactly one"):
        await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", instance="booted", volume="v"))
    with pytest.raises(errors.NotFound):
        await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", instance="nope"))
    assert await store.list(SNAPSHOT.name) == []


async def test_a_root_disk_revert_waits_for_the_instance_to_be_stopped(store, ctx, ceph_pool):
    inst = await put_instance(store, "web", pool="pool-ceph", pool_driver="ceph")
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", instance="web"))).body
    with pytest.raises(errors.Conflict, match="only an available snapshot"):
        await snapshots.revert_snapshot(ctx, store, "s")
    await set_status(store, SNAPSHOT, snap.id, state="available")
    await _stop(store, inst.id, power="running", state="running")
    with pytest.raises(errors.Conflict, match="stop it first"):
        await snapshots.revert_snapshot(ctx, store, "s")
    await _stop(store, inst.id)
    written = await snapshots.revert_snapshot(ctx, store, "s")
    assert written.status == 200 and written.body.instance_id == inst.id
    assert SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id)).spec.revert_seq == 1


async def test_a_volume_from_a_root_disk_snapshot_and_the_snapshot_forgotten_with_its_instance(store, ctx, ceph_pool):
    inst = await put_instance(store, "web", pool="pool-ceph", pool_driver="ceph")
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", instance="web"))).body
    await set_status(store, SNAPSHOT, snap.id, state="available")
    vol = (await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=2, snapshot="s"), node=NODE)).body
    assert (vol.source.type, vol.source.id, vol.pool) == ("snapshot", snap.id, "ceph")
    # not while the instance exists
    assert not await snapshots.forget_root_snapshot(ctx, store, snap.id)
    record = await store.get(INSTANCE.name, inst.id)
    await store.commit(Txn([Delete(kind=INSTANCE.name, id=inst.id, expect_revision=record.revision)]))
    assert await snapshots.forget_root_snapshot(ctx, store, snap.id)
    assert await store.get(SNAPSHOT.name, snap.id) is None
    usage = STORAGE_USAGE.load(await store.get(STORAGE_USAGE.name, "stu-default")).spec
    assert (usage.snapshots, usage.volumes) == (0, 1)
    assert await store.get(VOLUME.name, vol.id) is not None  # the volume has its own copy
