"""Storage services under the races and departures the security review found: an attach racing its instance's
delete, a volume create racing its image's or pool's delete, snapshots whose node left the cluster. Each race is
made deterministic by doing the concurrent write at the exact step between the service's read and its commit."""

from __future__ import annotations

import msgspec
import pytest

from minicloud import errors
from minicloud.cluster.kinds import NODE as NODE_KIND
from minicloud.cluster.kinds import NodeSpec
from minicloud.compute.kinds import IMAGE, INSTANCE
from minicloud.model.storage import PoolCreate, SnapshotCreate, StorageEnable, VolumeAttach, VolumeCreate
from minicloud.state import Create, Delete, Txn, Update
from minicloud.storage import engine, pools, quotas, snapshots, volumes
from minicloud.storage.kinds import DISK_SLOTS, SNAPSHOT, STORAGE_USAGE, VOLUME, slots_id
from tests.unit.storage.conftest import NODE, put_image, put_instance, set_status

GIB = 1 << 30


async def _available(ctx, store, name: str, **fields) -> object:
    body = (await volumes.create_volume(ctx, store, VolumeCreate(name=name, size_gib=1, **fields), node=NODE)).body
    await set_status(store, VOLUME, body.id, state="available")
    return body


def _once(monkeypatch, module, name: str, before) -> None:
    """Replace ``module.name`` so that its first call runs ``before()`` (the concurrent write) first."""
    real = getattr(module, name)
    state = {"done": False}

    async def wrapped(*args, **kwargs):
        if not state["done"]:
            state["done"] = True
            await before()
        return await real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


async def _node(store, name: str) -> None:
    obj = NODE_KIND.new(project="", name=name, spec=NodeSpec(address=f"10.0.0.{len(name)}"))
    await store.commit(Txn([Create(NODE_KIND.dump(obj))]))


# -- attach vs the instance's delete -------------------------------------------------------------------------------
async def test_an_attach_racing_its_instances_delete_is_refused_and_leaves_nothing(store, ctx, monkeypatch):
    """Without a condition on the instance the attach committed after the teardown had listed the instance's
    volumes: the volume stayed attached to an instance that no longer existed, with an orphan ``diskslots``."""
    inst = await put_instance(store, "web")
    await _available(ctx, store, "v")

    async def delete_instance() -> None:
        obj = INSTANCE.load(await store.get(INSTANCE.name, inst.id))
        marked = obj.replace(spec=msgspec.structs.replace(obj.spec, deleted=True))
        await store.commit(Txn([Update(INSTANCE.dump(marked), expect_revision=obj.revision)]))

    _once(monkeypatch, volumes, "_slots", delete_instance)  # after the instance is read, before the commit
    with pytest.raises(errors.Conflict, match="instance 'web' is being deleted"):
        await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="web"))
    vol = VOLUME.load(await store.get_by_name(VOLUME.name, "default", "v"))
    assert vol.spec.attachment is None and vol.status.state == "available"
    assert await store.get(DISK_SLOTS.name, slots_id(inst.id)) is None


async def test_an_attach_racing_its_instances_removal_is_404(store, ctx, monkeypatch):
    inst = await put_instance(store, "web")
    await _available(ctx, store, "v")

    async def remove_instance() -> None:
        await store.commit(Txn([Delete(kind=INSTANCE.name, id=inst.id)]))

    _once(monkeypatch, volumes, "_slots", remove_instance)
    with pytest.raises(errors.NotFound):
        await volumes.attach_volume(ctx, store, "v", VolumeAttach(instance="web"))
    assert VOLUME.load(await store.get_by_name(VOLUME.name, "default", "v")).spec.attachment is None
    assert await store.get(DISK_SLOTS.name, slots_id(inst.id)) is None


# -- create vs the source's delete ---------------------------------------------------------------------------------
async def test_a_volume_create_racing_its_images_delete_is_404_and_leaves_nothing(store, ctx, monkeypatch):
    await pools.ensure_local_pool(store)
    image = await put_image(store, "deb", virtual=GIB, pool=pools.LOCAL_POOL_ID, pool_driver="local")

    async def delete_image() -> None:
        await store.commit(Txn([Delete(kind=IMAGE.name, id=image.id)]))

    _once(monkeypatch, volumes, "_check_space", delete_image)  # inside the transaction's step
    with pytest.raises(errors.NotFound, match="image 'deb' was deleted"):
        await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1, image="deb"), node=NODE)
    assert await store.list(VOLUME.name) == [] and await store.get(STORAGE_USAGE.name, "stu-default") is None


async def test_a_volume_create_racing_its_pools_delete_is_404(store, ctx, monkeypatch):
    await pools.create_pool(ctx, store, PoolCreate(name="scratch", driver="local"))

    async def delete_pool() -> None:
        await pools.delete_pool(ctx, store, "scratch")

    _once(monkeypatch, volumes, "_check_space", delete_pool)
    with pytest.raises(errors.NotFound, match="pool 'scratch' was deleted"):
        await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1, pool="scratch"), node=NODE)
    assert await store.list(VOLUME.name) == []


async def test_a_volume_create_still_retries_a_pool_that_only_changed(store, ctx, monkeypatch):
    await pools.create_pool(ctx, store, PoolCreate(name="scratch", driver="local"))

    async def relabel() -> None:
        await pools.create_pool(ctx, store, PoolCreate(name="other", driver="local", default=True))

    _once(monkeypatch, volumes, "_check_space", relabel)  # the default moves: scratch's revision changes
    v = (await volumes.create_volume(ctx, store, VolumeCreate(name="v", size_gib=1, pool="scratch"), node=NODE)).body
    assert v.pool == "scratch"


# -- snapshots whose node left -------------------------------------------------------------------------------------
async def test_a_local_snapshot_whose_node_left_is_removed_at_once(store, ctx):
    await _node(store, NODE)
    v = await _available(ctx, store, "v")
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", volume="v"))).body
    await set_status(store, SNAPSHOT, snap.id, state="available")
    # n1 leaves the cluster (`cluster remove`): another node is the cluster now
    await store.commit(Txn([Delete(kind=NODE_KIND.name, id=NODE_KIND.load(await store.get_by_name(NODE_KIND.name, "", NODE)).id)]))  # fmt: skip
    await _node(store, "n2")
    written = await snapshots.delete_snapshot(ctx, store, "s")
    assert written.status == 204 and await store.get(SNAPSHOT.name, snap.id) is None
    assert VOLUME.load(await store.get(VOLUME.name, v.id)).spec.snapshots == []
    assert (await quotas.usage(store, "default")).snapshots == 0


async def test_a_ceph_snapshot_whose_node_left_goes_to_its_volumes_node(store, ctx):
    await _node(store, NODE)
    await _node(store, "n2")
    await engine.enable_storage(ctx, store, StorageEnable(no_disk=True), node=NODE)
    v = await _available(ctx, store, "v")
    snap = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="s", volume="v"))).body
    await set_status(store, SNAPSHOT, snap.id, state="available")
    first = await snapshots.delete_snapshot(ctx, store, "s")  # marked for n1, which then leaves
    assert first.status == 202
    await put_instance(store, "far", node="n2")
    vol = VOLUME.load(await store.get(VOLUME.name, v.id))
    moved = vol.replace(spec=msgspec.structs.replace(vol.spec, node="n2"))
    await store.commit(Txn([Update(VOLUME.dump(moved), expect_revision=vol.revision)]))
    n1 = NODE_KIND.load(await store.get_by_name(NODE_KIND.name, "", NODE))
    await store.commit(Txn([Delete(kind=NODE_KIND.name, id=n1.id)]))
    again = await snapshots.delete_snapshot(ctx, store, "s")
    assert again.status == 202
    after = SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id))
    assert after.spec.deleted and after.spec.node == "n2"  # n2's storage reconciler removes it from the pool
    assert (await quotas.usage(store, "default")).snapshots == 0  # released once


# -- back-reference lists are bounded whatever the quotas ----------------------------------------------------------
async def test_a_volumes_snapshots_and_a_snapshots_clones_are_bounded(store, ctx, monkeypatch):
    monkeypatch.setattr(snapshots, "MAX_SNAPSHOTS_PER_VOLUME", 2)
    monkeypatch.setattr(volumes, "MAX_CLONES_PER_SNAPSHOT", 1)
    unlimited = quotas.Quotas(volumes=0, volume_gib=0, snapshots=0)
    await _available(ctx, store, "v")
    for name in ("a", "b"):
        body = (await snapshots.create_snapshot(ctx, store, SnapshotCreate(name=name, volume="v"), quotas=unlimited)).body  # fmt: skip
        await set_status(store, SNAPSHOT, body.id, state="available")
    with pytest.raises(errors.Conflict, match="has 2 snapshots, the most a volume may have"):
        await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="c", volume="v"), quotas=unlimited)
    await snapshots.delete_snapshot(ctx, store, "b")  # a deleted one no longer counts
    await snapshots.create_snapshot(ctx, store, SnapshotCreate(name="c", volume="v"), quotas=unlimited)
    await volumes.create_volume(ctx, store, VolumeCreate(name="c1", size_gib=1, snapshot="a"), node=NODE, quotas=unlimited)  # fmt: skip
    with pytest.raises(errors.Conflict, match="has 1 volumes made from it"):
        await volumes.create_volume(ctx, store, VolumeCreate(name="c2", size_gib=1, snapshot="a"), node=NODE, quotas=unlimited)  # fmt: skip
    assert sorted(r.name for r in await store.list(VOLUME.name)) == ["c1", "v"]
