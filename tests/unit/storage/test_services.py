"""Storage services without HTTP: enable and disks, pools, volumes (quotas, sizes, free space, attach devices, delete
rules) and snapshots (clones, revert) against the real SQLite store; races are run concurrently."""

from __future__ import annotations

import asyncio

import pytest

from minicloud import errors
from minicloud.cluster.kinds import NODE as NODE_KIND
from minicloud.cluster.kinds import NodeSpec
from minicloud.core import crud
from minicloud.model.storage import (
    PoolCreate,
    SnapshotCreate,
    StorageDiskCreate,
    StorageEnable,
    VolumeAttach,
    VolumeCreate,
    VolumeDetach,
    VolumeExtend,
)
from minicloud.state import Create, Txn
from minicloud.storage import engine, pools, quotas, snapshots, volumes
from minicloud.storage.kinds import CEPH, DISK_SLOTS, POOL, SNAPSHOT, STORAGE_DISK, STORAGE_USAGE, VOLUME, slots_id
from minicloud.storage.quotas import Quotas
from tests.unit.storage.conftest import NODE, ctx_of, put_image, put_instance, set_status

GIB = 1 << 30


async def vol(ctx, store, name, size=1, quota=quotas.DEFAULT_QUOTAS, **fields):
    written = await volumes.create_volume(ctx, store, VolumeCreate(name=name, size_gib=size, **fields), node=NODE,
                                          quotas=quota)  # fmt: skip
    return written.body


async def available(store, volume_id):
    await set_status(store, VOLUME, volume_id, state="available")


# -- pools and enable ----------------------------------------------------------------------------------------------
async def test_local_pool_is_made_once_even_when_first_uses_race(store):
    got = await asyncio.gather(*(pools.ensure_local_pool(store) for _ in range(5)))
    assert {p.id for p in got} == {pools.LOCAL_POOL_ID}
    listed = await store.list(POOL.name, project="")
    assert len(listed) == 1 and POOL.load(listed[0]).spec.default


async def test_enable_makes_ceph_record_pool_and_disk_in_one_go(store, ctx):
    written = await engine.enable_storage(ctx, store, StorageEnable(file_size_bytes=2 * GIB), node=NODE)
    assert written.status == 201 and written.body.state == "bootstrapping"
    assert written.body.mons == {NODE: "127.0.0.1"} and written.body.bootstrap_node == NODE
    ceph = CEPH.load(await store.get_by_name(CEPH.name, "", "ceph"))
    assert ceph.spec.pools == ["minicloud"] and ceph.spec.replicas == 1 and len(ceph.spec.fsid) == 36
    by_name = {POOL.load(r).name: POOL.load(r) for r in await store.list(POOL.name, project="")}
    assert by_name["ceph"].spec.default and not by_name["local"].spec.default
    assert by_name["ceph"].spec.ceph_pool == "minicloud"
    (disk,) = [STORAGE_DISK.load(r) for r in await store.list(STORAGE_DISK.name, project="")]
    assert (disk.spec.node, disk.spec.source, disk.spec.size_bytes) == (NODE, "file", 2 * GIB)
    with pytest.raises(errors.Conflict, match="already enabled"):
        await engine.enable_storage(ctx, store, StorageEnable(), node=NODE)
    shown = await engine.show_storage(ctx, store)
    assert shown.enabled and [d.state for d in shown.disks] == ["pending"]


async def test_enable_uses_the_node_record_address_and_refuses_unknown_nodes(store, ctx):
    node = NODE_KIND.new(project="", name="n2", spec=NodeSpec(address="10.1.0.2"))
    await store.commit(Txn([Create(NODE_KIND.dump(node))]))
    with pytest.raises(errors.NotFound, match="no node named 'n9'"):
        await engine.enable_storage(ctx, store, StorageEnable(node="n9"), node=NODE)
    written = await engine.enable_storage(ctx, store, StorageEnable(node="n2", no_disk=True), node=NODE)
    assert written.body.mons == {"n2": "10.1.0.2"} and written.body.disks == []


async def test_storage_administration_is_for_administrators(store):
    user = ctx_of(admin=False)
    with pytest.raises(errors.Forbidden):
        await engine.enable_storage(user, store, StorageEnable(), node=NODE)
    with pytest.raises(errors.Forbidden):
        await pools.create_pool(user, store, PoolCreate(name="p", driver="local"))


async def test_disks_need_storage_and_one_source(store, ctx):
    with pytest.raises(errors.Conflict, match="not enabled"):
        await engine.add_disk(ctx, store, StorageDiskCreate(device="/dev/vdb"), node=NODE)
    await engine.enable_storage(ctx, store, StorageEnable(no_disk=True), node=NODE)
    with pytest.raises(errors.ValidationFailed):
        await engine.add_disk(ctx, store, StorageDiskCreate(), node=NODE)
    added = (await engine.add_disk(ctx, store, StorageDiskCreate(device="/dev/vdb"), node=NODE)).body
    assert added.name == f"{NODE}-vdb" and added.source == "device" and added.path == "/dev/vdb"
    with pytest.raises(errors.AlreadyExists):
        await engine.add_disk(ctx, store, StorageDiskCreate(device="/dev/vdb"), node=NODE)
    removed = (await engine.remove_disk(ctx, store, added.name)).body
    assert removed.remove and removed.state == "draining"


async def test_pool_create_default_and_delete_rules(store, ctx):
    with pytest.raises(errors.Conflict, match="not enabled"):
        await pools.create_pool(ctx, store, PoolCreate(name="fast", driver="ceph"))
    await engine.enable_storage(ctx, store, StorageEnable(no_disk=True), node=NODE)
    await pools.create_pool(ctx, store, PoolCreate(name="fast", driver="ceph", ceph_pool="fast-rbd", default=True))
    ceph = CEPH.load(await store.get_by_name(CEPH.name, "", "ceph"))
    assert ceph.spec.pools == ["minicloud", "fast-rbd"]
    assert [p.name for p in map(POOL.load, await store.list(POOL.name, project="")) if p.spec.default] == ["fast"]
    with pytest.raises(errors.Conflict, match="is the default"):
        await pools.delete_pool(ctx, store, "fast")
    await vol(ctx, store, "v", pool="ceph")
    with pytest.raises(errors.InUse, match="volume 'v'"):
        await pools.delete_pool(ctx, store, "ceph")
    await pools.delete_pool(ctx, store, "local")
    assert await store.get_by_name(POOL.name, "", "local") is None


# -- volumes -------------------------------------------------------------------------------------------------------
async def test_blank_volume_goes_to_the_default_pool_on_the_answering_node(store, ctx):
    v = await vol(ctx, store, "data", size=5, description="d")
    assert (v.pool, v.driver, v.node, v.size_gib, v.status.state) == ("local", "local", NODE, 5, "creating")
    assert (await quotas.usage(store, "default")).volume_gib == 5


async def test_quota_refuses_and_names_the_numbers_even_under_concurrency(store, ctx):
    quota = Quotas(volumes=3, volume_gib=100, snapshots=1)
    results = await asyncio.gather(*(vol(ctx, store, f"v{i}", quota=quota) for i in range(6)), return_exceptions=True)
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, errors.Conflict)]
    assert len(made) == 3 and len(refused) == 3
    assert "volumes 4 would pass the project's quota of 3" in str(refused[0])
    with pytest.raises(errors.Conflict, match="volume storage 101 GiB would pass the project's quota of 100 GiB"):
        await vol(ctx, store, "big", size=98, quota=Quotas(volume_gib=100))
    assert (await quotas.usage(store, "default")).volumes == 3


async def test_volume_from_an_image_must_hold_it(store, ctx):
    await put_image(store, "deb", virtual=3 * GIB + 1)
    with pytest.raises(errors.ValidationFailed, match="at least 4 GiB"):
        await vol(ctx, store, "root", size=3, image="deb")
    v = await vol(ctx, store, "root", size=4, image="deb")
    assert (v.source.type, v.source.name) == ("image", "deb")


async def test_ceph_free_space_is_checked_when_known(store, ctx):
    await engine.enable_storage(ctx, store, StorageEnable(no_disk=True), node=NODE)
    ceph = CEPH.load(await store.get_by_name(CEPH.name, "", "ceph"))
    await set_status(store, CEPH, ceph.id, capacity_bytes=100 * GIB, available_bytes=10 * GIB, observed_at="t")
    with pytest.raises(errors.InsufficientCapacity, match="has 10 GiB free"):
        await vol(ctx, store, "v", size=11)
    assert (await vol(ctx, store, "v", size=10)).driver == "ceph"


async def test_volumes_of_a_project_are_invisible_to_another(store, ctx):
    await vol(ctx, store, "v")
    with pytest.raises(errors.NotFound):
        await crud.get(ctx_of("other"), store, VOLUME, "v")


# -- attach / detach -----------------------------------------------------------------------------------------------
async def test_attach_assigns_distinct_devices_even_when_concurrent(store, ctx):
    inst = await put_instance(store, "web")
    vols = [await vol(ctx, store, f"v{i}") for i in range(4)]
    for v in vols:
        await available(store, v.id)
    attached = await asyncio.gather(
        *(volumes.attach_volume(ctx, store, v.id, VolumeAttach(instance="web")) for v in vols)
    )
    devices = sorted(w.body.attachment.device for w in attached)
    assert devices == ["vdb", "vdc", "vdd", "vde"]
    assert all(w.body.status.state == "attaching" and w.body.node == NODE for w in attached)
    slots = DISK_SLOTS.load(await store.get(DISK_SLOTS.name, slots_id(inst.id)))
    assert sorted(slots.spec.devices) == devices
    first = attached[0].body
    with pytest.raises(errors.InUse, match="attached to instance 'web'"):
        await volumes.attach_volume(ctx, store, first.id, VolumeAttach(instance="web"))
    with pytest.raises(errors.InUse, match="attached to instance 'web'"):
        await volumes.delete_volume(ctx, store, first.id)
    detached = (await volumes.detach_volume(ctx, store, first.id, VolumeDetach(force=True))).body
    assert detached.attachment is None and detached.status.state == "detaching"
    spec = VOLUME.load(await store.get(VOLUME.name, first.id)).spec
    assert spec.detached_from.device == first.attachment.device and spec.detached_from.force
    await available(store, first.id)
    again = (await volumes.attach_volume(ctx, store, first.id, VolumeAttach(instance="web"))).body
    assert again.attachment.device == first.attachment.device  # freed by the detach


async def test_attach_refusals(store, ctx):
    await put_instance(store, "far", node="n2")
    await put_instance(store, "gone", deleted=True)
    await put_instance(store, "mine", project="other")
    v = await vol(ctx, store, "v")
    with pytest.raises(errors.Conflict, match="is creating"):
        await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="far"))
    await available(store, v.id)
    with pytest.raises(errors.Conflict, match="on node 'n1' and instance 'far' runs on node 'n2'"):
        await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="far"))
    with pytest.raises(errors.Conflict, match="being deleted"):
        await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="gone"))
    with pytest.raises(errors.NotFound):
        await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="mine"))
    with pytest.raises(errors.Conflict, match="not attached"):
        await volumes.detach_volume(ctx, store, "v", VolumeDetach())


async def test_ceph_volume_follows_its_instance_and_remembers_the_previous_node(store, ctx):
    await engine.enable_storage(ctx, store, StorageEnable(no_disk=True), node=NODE)
    await put_instance(store, "far", node="n2")
    v = await vol(ctx, store, "v")
    await available(store, v.id)
    body = (await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="far", device="vdq"))).body
    assert (body.node, body.attachment.device) == ("n2", "vdq")
    assert VOLUME.load(await store.get(VOLUME.name, v.id)).spec.previous_node == NODE


# -- extend, delete ------------------------------------------------------------------------------------------------
async def test_extend_grows_only_and_counts_against_the_quota(store, ctx):
    v = await vol(ctx, store, "v", size=2)
    await available(store, v.id)
    with pytest.raises(errors.ValidationFailed, match="only grows"):
        await volumes.extend_volume(ctx, store, "v", VolumeExtend(size_gib=2))
    with pytest.raises(errors.Conflict, match="quota"):
        await volumes.extend_volume(ctx, store, "v", VolumeExtend(size_gib=11), quotas=Quotas(volume_gib=10))
    assert (await volumes.extend_volume(ctx, store, "v", VolumeExtend(size_gib=10))).body.size_gib == 10
    assert (await quotas.usage(store, "default")).volume_gib == 10


async def test_delete_marks_and_releases_quota_and_a_gone_node_removes_at_once(store, ctx):
    v = await vol(ctx, store, "v", size=3)
    written = await volumes.delete_volume(ctx, store, "v")
    assert written.status == 202 and written.body.status.state == "deleting"
    assert await store.get(STORAGE_USAGE.name, "stu-default") is None  # back to zero: no record left
    assert (await volumes.delete_volume(ctx, store, "v")).status == 202  # again: same answer
    # a node record exists, and it is not the volume's: nobody will ever remove it
    other = NODE_KIND.new(project="", name="n2", spec=NodeSpec(address="10.0.0.2"))
    await store.commit(Txn([Create(NODE_KIND.dump(other))]))
    assert (await volumes.delete_volume(ctx, store, "v")).status == 204
    assert await store.get(VOLUME.name, v.id) is None


async def test_force_delete_is_for_administrators(store, ctx):
    await vol(ctx, store, "v")
    with pytest.raises(errors.Forbidden):
        await volumes.delete_volume(ctx_of(admin=False), store, "v", force=True)
    assert (await volumes.delete_volume(ctx, store, "v", force=True)).status == 204


# -- snapshots -----------------------------------------------------------------------------------------------------
async def test_snapshot_clone_and_delete_rules(store, ctx):
    v = await vol(ctx, store, "v", size=2)
    with pytest.raises(errors.Conflict, match="is creating"):
        await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", volume="v"))
    await available(store, v.id)
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", volume="v"))).body
    assert (snap.volume, snap.size_gib, snap.status.state) == ("v", 2, "creating")
    with pytest.raises(errors.Conflict, match="is creating"):
        await vol(ctx, store, "c", size=2, snapshot="s")
    await set_status(store, SNAPSHOT, snap.id, state="available")
    with pytest.raises(errors.ValidationFailed, match="at least 2 GiB"):
        await vol(ctx, store, "c", size=1, snapshot="s")
    clone = await vol(ctx, store, "c", size=2, snapshot="s")
    assert (clone.source.type, clone.pool) == ("snapshot", "local")
    with pytest.raises(errors.InUse, match="volumes 'c' were made from"):
        await volumes.delete_volume(ctx, store, "v")
    with pytest.raises(errors.InUse, match="'c'"):
        await snapshots.delete_snapshot(ctx, store, "s")
    await volumes.delete_volume(ctx, store, "c")
    deleted = await volumes.delete_volume(ctx, store, "v")
    assert deleted.status == 202
    assert SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id)).spec.deleted
    assert await quotas.usage(store, "default") == quotas.StorageUsageSpec(project="default")


async def test_snapshot_quota(store, ctx):
    v = await vol(ctx, store, "v")
    await available(store, v.id)
    one = Quotas(snapshots=1)
    await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="a", volume="v"), quotas=one)
    with pytest.raises(errors.Conflict, match="snapshots 2 would pass the project's quota of 1"):
        await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="b", volume="v"), quotas=one)
    await snapshots.delete_snapshot(ctx, store, "a")
    await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="b", volume="v"), quotas=one)


async def test_revert_needs_a_detached_volume_or_a_stopped_instance(store, ctx):
    await put_instance(store, "web")
    v = await vol(ctx, store, "v")
    await available(store, v.id)
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", volume="v"))).body
    await set_status(store, SNAPSHOT, snap.id, state="available")
    await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="web"))
    await set_status(store, VOLUME, v.id, state="in-use")
    with pytest.raises(errors.Conflict, match="stop the instance"):
        await snapshots.revert_snapshot(ctx, store, "s")
    await volumes.detach_volume(ctx, store, "v", VolumeDetach())
    await available(store, v.id)
    await snapshots.revert_snapshot(ctx, store, "s")
    await snapshots.revert_snapshot(ctx, store, "s")
    revert = VOLUME.load(await store.get(VOLUME.name, v.id)).spec.revert
    assert (revert.snapshot, revert.seq) == (snap.id, 2)


async def test_release_instance_frees_its_volumes_and_slots(store, ctx):
    inst = await put_instance(store, "web")
    v = await vol(ctx, store, "v")
    await available(store, v.id)
    await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="web"))
    assert list(await volumes.attached_volumes(store, inst.id)) == ["vdb"]
    await store.commit(Txn(await volumes.release_instance(ctx, store, inst.id)))
    after = VOLUME.load(await store.get(VOLUME.name, v.id))
    assert after.spec.attachment is None and after.status.state == "available"
    assert await store.get(DISK_SLOTS.name, slots_id(inst.id)) is None


# -- flatten -------------------------------------------------------------------------------------------------------
async def _clone_of_a_snapshot(ctx, store):
    v = await vol(ctx, store, "v")
    await available(store, v.id)
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", volume="v"))).body
    await set_status(store, SNAPSHOT, snap.id, state="available")
    clone = await vol(ctx, store, "c", snapshot="s")
    return v, snap, clone


async def _clones(store, snap_id):
    return SNAPSHOT.load(await store.get(SNAPSHOT.name, snap_id)).spec.clones


async def test_a_flattened_clone_no_longer_holds_its_snapshot(store, ctx):
    _, snap, clone = await _clone_of_a_snapshot(ctx, store)
    with pytest.raises(errors.Conflict, match="volume 'v' has no parent snapshot \\(it was made blank\\)"):
        await volumes.flatten_volume(ctx, store, "v")
    with pytest.raises(errors.Conflict, match="volume 'c' is creating; flatten it once it is available"):
        await volumes.flatten_volume(ctx, store, "c")
    await available(store, clone.id)
    asked = await volumes.flatten_volume(ctx, store, "c")
    assert asked.status == 200 and (asked.body.status.flattening, asked.body.status.flattened) == (True, False)
    again = await volumes.flatten_volume(ctx, store, "c")  # idempotent: nothing written
    assert again.status == 200 and again.revision == asked.revision
    # asked is not done: the snapshot still has its clone, and both refusals say how to release it
    with pytest.raises(errors.InUse, match="flatten them \\(`minicloud volume flatten c`\\) or delete them first"):
        await snapshots.delete_snapshot(ctx, store, "s")
    with pytest.raises(errors.InUse, match="`minicloud volume flatten c`"):
        await volumes.delete_volume(ctx, store, "v")
    # the node has copied the data: one transaction releases the snapshot
    sys_ctx = ctx_of()
    assert await volumes.flattened(sys_ctx, store, clone.id) is True
    assert await volumes.flattened(sys_ctx, store, clone.id) is False
    assert await _clones(store, snap.id) == []
    shown = await crud.get(ctx, store, VOLUME, "c")
    assert shown.status.flattened and VOLUME.to_view(shown).status.flattening is False
    assert VOLUME.to_view(shown).source.name == "s"  # where it came from stays on record
    assert (await volumes.flatten_volume(ctx, store, "c")).body.status.flattened  # done already: answered again
    assert (await snapshots.delete_snapshot(ctx, store, "s")).status == 202
    assert (await volumes.delete_volume(ctx, store, "v")).status == 202
    await volumes.delete_volume(ctx, store, "c")
    with pytest.raises(errors.Conflict, match="volume 'c' is being deleted"):
        await volumes.flatten_volume(ctx, store, "c")
    assert await quotas.usage(store, "default") == quotas.StorageUsageSpec(project="default")


async def test_a_volume_from_an_image_has_no_parent_snapshot(store, ctx):
    await put_image(store, "guest", virtual=GIB, pool="pool-local", pool_driver="local")
    await vol(ctx, store, "from-image", image="guest")
    with pytest.raises(errors.Conflict, match="it was made from image 'guest'"):
        await volumes.flatten_volume(ctx, store, "from-image")


async def test_flatten_races_a_delete_and_a_clone_create_without_losing_a_clone(store, ctx):
    """The flatten request against the clone's delete (CAS on the volume), and its release against a new clone of
    the same snapshot (CAS on the snapshot): every outcome leaves the snapshot listing exactly the live clones."""
    _, snap, clone = await _clone_of_a_snapshot(ctx, store)
    await available(store, clone.id)
    flat, gone = await asyncio.gather(
        volumes.flatten_volume(ctx, store, "c"), volumes.delete_volume(ctx, store, "c"), return_exceptions=True
    )
    assert gone.status == 202
    assert not isinstance(flat, Exception) or isinstance(flat, errors.Conflict)
    assert await _clones(store, snap.id) == []
    assert await volumes.flattened(ctx_of(), store, clone.id) is False  # being deleted: the delete released it
    second = await vol(ctx, store, "c2", snapshot="s")
    await available(store, second.id)
    await volumes.flatten_volume(ctx, store, "c2")
    done, third = await asyncio.gather(
        volumes.flattened(ctx_of(), store, second.id), vol(ctx, store, "c3", snapshot="s")
    )
    assert done is True and await _clones(store, snap.id) == [third.id]
