"""Storage services, the defects the review left: a forced detach after the guest refused one, snapshots that follow
their ceph volume to its new node, and the races of an image's and a pool's delete with a volume create (made
deterministic by doing the concurrent write between the delete's checks and its commit)."""

from __future__ import annotations

import dataclasses

import pytest

from minicloud import errors
from minicloud.compute import images, instances
from minicloud.compute.kinds import HYPERVISOR, IMAGE, INSTANCE, HypervisorSpec
from minicloud.model.compute import InstanceCreate
from minicloud.model.storage import PoolCreate, SnapshotCreate, StorageEnable, VolumeAttach, VolumeCreate, VolumeDetach
from minicloud.state import Create, Txn
from minicloud.storage import common, engine, pools, snapshots, volumes
from minicloud.storage.kinds import POOL, SNAPSHOT, VOLUME, VolumeSource, VolumeSpec
from tests.unit.storage.conftest import NODE, put_image, put_instance, set_status

GIB = 1 << 30


async def _ceph_volume(ctx, store, name: str = "v") -> object:
    await engine.enable_storage(ctx, store, StorageEnable(no_disk=True), node=NODE)
    body = (await volumes.create_volume(ctx, store, VolumeCreate(name=name, size_gib=1), node=NODE)).body
    await set_status(store, VOLUME, body.id, state="available", size_gib=1)
    return body


async def _snapshot(ctx, store, name: str, *, available: bool = True) -> object:
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name=name, volume="v"))).body
    if available:
        await set_status(store, SNAPSHOT, snap.id, state="available")
    return snap


# -- forced detach after a refusal ---------------------------------------------------------------------------------
async def test_a_detach_the_guest_refused_can_be_forced(store, ctx):
    """The guest held the disk: the volume stayed ``detaching`` with the reason, and `volume detach --force` then
    answered 409 "not attached" — no way left to force it."""
    await put_instance(store, "web")
    v = await _ceph_volume(ctx, store)
    await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="web"))
    await volumes.detach_volume(ctx, store, "v", VolumeDetach())
    # what the instance's node writes once the guest has not let go in time
    await set_status(store, VOLUME, v.id, state="detaching", reason="the guest of instance web has not released it")
    with pytest.raises(errors.Conflict, match=r"being detached from instance 'web'.*--force"):
        await volumes.detach_volume(ctx, store, "v", VolumeDetach())
    forced = (await volumes.detach_volume(ctx, store, "v", VolumeDetach(force=True))).body
    assert forced.status.state == "detaching" and forced.status.reason == ""
    spec = VOLUME.load(await store.get(VOLUME.name, v.id)).spec
    assert spec.attachment is None and spec.detached_from is not None and spec.detached_from.force
    assert spec.detached_from.instance_name == "web"  # the compute reconciler reads it from here
    again = await volumes.detach_volume(ctx, store, "v", VolumeDetach(force=True))  # forced already: the same
    assert again.status == 200 and again.revision == VOLUME.load(await store.get(VOLUME.name, v.id)).revision
    await set_status(store, VOLUME, v.id, state="available", reason="")
    with pytest.raises(errors.Conflict, match="is not attached"):
        await volumes.detach_volume(ctx, store, "v", VolumeDetach(force=True))


# -- snapshots follow their ceph volume ----------------------------------------------------------------------------
async def test_a_ceph_volumes_snapshots_move_with_it_to_its_new_node(store, ctx):
    """A snapshot kept the node the volume had when it was taken: once the volume moved and that node was gone, a
    snapshot being taken stayed ``creating`` and one being deleted stayed ``deleting``."""
    await put_instance(store, "far", node="n2")
    v = await _ceph_volume(ctx, store)
    kept = await _snapshot(ctx, store, "kept")
    taking = await _snapshot(ctx, store, "taking", available=False)
    going = await _snapshot(ctx, store, "going")
    await snapshots.delete_snapshot(ctx, store, "going")  # marked, no longer in the volume's list
    moved = (await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="far"))).body
    assert moved.node == "n2"
    for snap in (kept, taking, going):
        assert SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id)).spec.node == "n2", snap.name
    after = SNAPSHOT.load(await store.get(SNAPSHOT.name, going.id))
    assert after.spec.deleted and after.status.state == "available"
    assert VOLUME.load(await store.get(VOLUME.name, v.id)).spec.snapshots == [kept.id, taking.id]


async def test_a_snapshot_written_by_its_node_meanwhile_does_not_lose_the_move(store, ctx, monkeypatch):
    await put_instance(store, "far", node="n2")
    await _ceph_volume(ctx, store)
    snap = await _snapshot(ctx, store, "s", available=False)
    real = volumes.snapshots_follow

    async def racing(*args, **kwargs):
        ops = await real(*args, **kwargs)
        if not racing.done:  # the old node says the snapshot is taken, after the attach read it
            racing.done = True
            await set_status(store, SNAPSHOT, snap.id, state="available")
        return ops

    racing.done = False
    monkeypatch.setattr(volumes, "snapshots_follow", racing)
    await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="far"))
    after = SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id))
    assert (after.spec.node, after.status.state) == ("n2", "available")


async def test_a_boot_volumes_snapshots_follow_it_to_the_instances_node(store, ctx):
    host = HYPERVISOR.new(project="", name="n2", spec=HypervisorSpec(cpus=4, memory_mib=4096, disk_gib=100))
    await store.commit(Txn([Create(HYPERVISOR.dump(host))]))
    await _ceph_volume(ctx, store)
    snap = await _snapshot(ctx, store, "s")
    ictx = dataclasses.replace(ctx, action="compute:instances:create")
    written = await instances.create_instance(ictx, store, InstanceCreate(name="vm", boot_volume="v", type="m1.tiny"))
    node = INSTANCE.load(await store.get(INSTANCE.name, written.body.id)).spec.node
    assert node == "n2"
    assert SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id)).spec.node == node


async def test_a_local_volumes_snapshots_stay(store, ctx):
    await put_instance(store, "web")
    body = (await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1), node=NODE)).body
    await set_status(store, VOLUME, body.id, state="available")
    snap = await _snapshot(ctx, store, "s")
    await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="web"))
    assert SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id)).spec.node == NODE


# -- a pool's delete vs a volume create ----------------------------------------------------------------------------
def _after_call(monkeypatch, module, name: str, call: int, concurrent) -> None:
    """Replace ``module.name`` so that its ``call``-th call (1-based) runs ``concurrent()`` after it has answered
    (what it answered is stale by then)."""
    real = getattr(module, name)
    seen = {"n": 0}

    async def wrapped(*args, **kwargs):
        result = await real(*args, **kwargs)
        seen["n"] += 1
        if seen["n"] == call:
            await concurrent()
        return result

    monkeypatch.setattr(module, name, wrapped)


async def test_a_volume_created_while_its_pool_is_checked_keeps_the_pool(store, ctx, monkeypatch):
    """The delete listed the pool's users, a create committed, and the delete went on: a volume in no pool."""
    await pools.create_pool(ctx, store, PoolCreate(name="scratch", driver="local"))

    async def create() -> None:
        await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1, pool="scratch"), node=NODE)

    _after_call(monkeypatch, pools, "pool_users", 1, create)
    with pytest.raises(errors.InUse, match="volume 'v'"):
        await pools.delete_pool(ctx, store, "scratch")
    pool = POOL.load(await store.get_by_name(POOL.name, "", "scratch"))
    assert not pool.spec.deleting  # the mark went with the refusal: creates work again
    await volumes.create_volume(ctx, store, VolumeCreate(name="w", size_gib=1, pool="scratch"), node=NODE)


async def test_a_volume_create_after_the_pool_is_marked_is_refused(store, ctx, monkeypatch):
    await pools.create_pool(ctx, store, PoolCreate(name="scratch", driver="local"))
    refused: list[Exception] = []

    async def create() -> None:
        try:
            await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1, pool="scratch"), node=NODE)
        except errors.MinicloudError as exc:
            refused.append(exc)

    _after_call(monkeypatch, pools, "pool_users", 2, create)  # the look after the mark
    assert (await pools.delete_pool(ctx, store, "scratch")).status == 204
    assert len(refused) == 1 and "pool 'scratch' is being deleted" in str(refused[0])
    assert await store.list(VOLUME.name) == [] and await store.get_by_name(POOL.name, "", "scratch") is None


async def test_a_pool_mark_a_crash_left_is_taken_over_by_the_next_delete(store, ctx):
    await pools.create_pool(ctx, store, PoolCreate(name="scratch", driver="local"))
    pool = POOL.load(await store.get_by_name(POOL.name, "", "scratch"))
    await common._set_deleting(ctx, store, POOL, pool)  # the delete crashed here
    with pytest.raises(errors.Conflict, match="being deleted"):
        await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1, pool="scratch"), node=NODE)
    assert (await pools.delete_pool(ctx, store, "scratch")).status == 204


# -- an image's delete vs a volume create --------------------------------------------------------------------------
async def _pool_image(store, name: str = "deb"):
    await pools.ensure_local_pool(store)
    return await put_image(store, name, virtual=GIB, pool=pools.LOCAL_POOL_ID, pool_driver="local")


def _node_images(tmp_path) -> images.NodeImages:
    return images.NodeImages(node="elsewhere", root=tmp_path / "images", import_dirs=[], url_allow=[],
                             url_max_bytes=0)  # fmt: skip


async def test_a_volume_created_while_its_image_is_checked_keeps_the_image(store, ctx, monkeypatch, tmp_path):
    """The delete listed the image's volumes, a create from the image committed (its Check on the image held: the
    delete had not written it yet), and the delete went on: a clone of an image that no longer existed."""
    image = await _pool_image(store)

    async def create() -> None:
        await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1, image="deb"), node=NODE)

    _after_call(monkeypatch, images, "_refuse_clones", 1, create)
    with pytest.raises(errors.InUse, match=r"1 volume\(s\) made from it \(v\)"):
        await images.delete_image(ctx, store, _node_images(tmp_path), "deb")
    kept = IMAGE.load(await store.get(IMAGE.name, image.id))
    assert not kept.spec.deleting  # the mark went with the refusal
    await volumes.create_volume(ctx, store, VolumeCreate(name="w", size_gib=1, image="deb"), node=NODE)


async def test_a_volume_create_after_the_image_is_marked_is_refused(store, ctx, monkeypatch, tmp_path):
    await _pool_image(store)
    refused: list[Exception] = []

    async def create() -> None:
        try:
            await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1, image="deb"), node=NODE)
        except errors.MinicloudError as exc:
            refused.append(exc)

    _after_call(monkeypatch, images, "_refuse_clones", 2, create)  # the look after the mark
    assert (await images.delete_image(ctx, store, _node_images(tmp_path), "deb")).status == 204
    assert len(refused) == 1 and "image 'deb' is being deleted" in str(refused[0])
    assert await store.list(VOLUME.name) == []


async def test_an_images_volumes_in_other_projects_block_its_delete_and_are_named_by_id(store, ctx, tmp_path):
    """Only the image's own project was looked in: a clone in another project (a shared image's) did not count."""
    image = await _pool_image(store)
    mine = (await volumes.create_volume(ctx, store, VolumeCreate(name="mine", size_gib=1, image="deb"), node=NODE)).body
    theirs = VOLUME.new(
        project="other",
        name="secret-name",
        spec=VolumeSpec(size_gib=1, pool=pools.LOCAL_POOL_ID, driver="local", node=NODE,
                        source=VolumeSource(type="image", id=image.id, name="deb"), image_id=image.id),
    )  # fmt: skip
    await store.commit(Txn([Create(VOLUME.dump(theirs))]))
    await volumes.delete_volume(ctx, store, mine.id)  # being deleted: no longer counts
    with pytest.raises(errors.InUse) as refused:
        await images.delete_image(ctx, store, _node_images(tmp_path), "deb")
    assert theirs.id in str(refused.value) and "secret-name" not in str(refused.value)
    assert "mine" not in str(refused.value)
    assert not IMAGE.load(await store.get(IMAGE.name, image.id)).spec.deleting
