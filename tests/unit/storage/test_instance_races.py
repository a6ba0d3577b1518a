"""An instance create racing the delete of its image or pool: never an instance of a deleted image or pool, never a
half-created one. The create Checks the image and the pool in its transaction; the deletes mark them before their
last look for users. Each race is made deterministic by doing the concurrent write at the exact step between one
side's read and its commit."""

from __future__ import annotations

import pytest

from minicloud import errors
from minicloud.compute import images, instances
from minicloud.compute.kinds import HYPERVISOR, IMAGE, INSTANCE, HypervisorSpec, ImageSpec, ImageStatus
from minicloud.core.context import Context
from minicloud.model.compute import InstanceCreate
from minicloud.model.storage import PoolCreate
from minicloud.network.kinds import PORT
from minicloud.state import Create, Txn
from minicloud.storage import common, pools
from minicloud.storage.kinds import POOL, PoolSpec

ICTX = Context.system("test", action="compute:instances:create")


@pytest.fixture
async def cluster(store):
    spec = HypervisorSpec(cpus=4, memory_mib=4096, disk_gib=100)
    ops = [Create(HYPERVISOR.dump(HYPERVISOR.new(project="", name="n1", spec=spec)))]
    ceph = PoolSpec(driver="ceph", ceph_pool="minicloud", default=True)
    ops.append(Create(POOL.dump(POOL.new(project="", name="ceph", id="pool-ceph", spec=ceph))))
    await store.commit(Txn(ops))
    return store


async def _image(store, name: str = "deb", *, boot: str = "disk"):
    spec = ImageSpec(boot=boot, format="qcow2" if boot == "disk" else None, virtual_size_bytes=1 << 30, size_bytes=1,
                     sha256="x", node="n1", pool="pool-ceph" if boot == "disk" else "",
                     pool_driver="ceph" if boot == "disk" else "")  # fmt: skip
    image = IMAGE.new(project="default", name=name, spec=spec, status=ImageStatus(pool_state="ready"))
    await store.commit(Txn([Create(IMAGE.dump(image))]))
    return image


def _node_images(tmp_path) -> images.NodeImages:
    return images.NodeImages(node="elsewhere", root=tmp_path / "images", import_dirs=[], url_allow=[],
                             url_max_bytes=0)  # fmt: skip


def _after_call(monkeypatch, module, name: str, call: int, concurrent) -> None:
    """``module.name``'s ``call``-th call (1-based) runs ``concurrent()`` once it has answered."""
    real = getattr(module, name)
    seen = {"n": 0}

    async def wrapped(*args, **kwargs):
        result = await real(*args, **kwargs)
        seen["n"] += 1
        if seen["n"] == call:
            await concurrent()
        return result

    monkeypatch.setattr(module, name, wrapped)


async def _nothing_half_made(store) -> None:
    assert await store.list(INSTANCE.name) == [] and await store.list(PORT.name) == []


def _create(name: str = "vm", **kw) -> InstanceCreate:
    return InstanceCreate(name=name, type="m1.tiny", **{"image": "deb", **kw})  # type: ignore[arg-type]


async def test_an_instance_created_while_its_image_is_checked_keeps_the_image(cluster, ctx, monkeypatch, tmp_path):
    """The delete looked for users, an instance create committed (the image was not marked yet), the delete went
    on: without its second look after the mark, an instance of an image that no longer existed."""
    store = cluster
    image = await _image(store)

    async def create() -> None:
        await instances.create_instance(ICTX, store, _create())

    _after_call(monkeypatch, images, "_refuse_users", 1, create)
    with pytest.raises(errors.InUse, match=r"used by 1 instance\(s\) \(vm\)"):
        await images.delete_image(ctx, store, _node_images(tmp_path), "deb")
    kept = IMAGE.load(await store.get(IMAGE.name, image.id))
    assert not kept.spec.deleting  # the mark went with the refusal: creates work again
    await instances.create_instance(ICTX, store, _create("vm2"))


async def test_an_instance_create_after_the_image_is_marked_is_refused(cluster, ctx, monkeypatch, tmp_path):
    store = cluster
    await _image(store)
    refused: list[Exception] = []

    async def create() -> None:
        try:
            await instances.create_instance(ICTX, store, _create())
        except errors.MinicloudError as exc:
            refused.append(exc)

    _after_call(monkeypatch, images, "_refuse_users", 2, create)  # the look after the mark
    assert (await images.delete_image(ctx, store, _node_images(tmp_path), "deb")).status == 204
    assert len(refused) == 1 and "image 'deb' is being deleted" in str(refused[0])
    await _nothing_half_made(store)


async def test_an_image_deleted_between_the_creates_read_and_commit_is_404_and_leaves_nothing(
    cluster, ctx, monkeypatch, tmp_path
):
    """The create read the image, the whole delete ran (no user yet), then the create committed: its Check on the
    image fails, the next try says the image is gone."""
    store = cluster
    await _image(store)

    async def delete() -> None:
        await images.delete_image(ctx, store, _node_images(tmp_path), "deb")

    _after_call(monkeypatch, common, "still", 1, delete)  # the image read for the Check, not committed yet
    with pytest.raises(errors.NotFound, match="image 'deb' was deleted while this request ran"):
        await instances.create_instance(ICTX, store, _create())
    await _nothing_half_made(store)


async def test_an_instance_created_while_its_pool_is_checked_keeps_the_pool(cluster, ctx, monkeypatch):
    """A kernel image's root disk goes into ``--pool``: the pool's delete sees the instance (its root disk)."""
    store = cluster
    await _image(store, "kern", boot="kernel")
    await pools.create_pool(ctx, store, PoolCreate(name="scratch", driver="local"))

    async def create() -> None:
        await instances.create_instance(ICTX, store, _create(image="kern", pool="scratch"))

    _after_call(monkeypatch, pools, "pool_users", 1, create)
    with pytest.raises(errors.InUse, match="instance 'vm'"):
        await pools.delete_pool(ctx, store, "scratch")
    assert not POOL.load(await store.get_by_name(POOL.name, "", "scratch")).spec.deleting


async def test_an_instance_create_after_the_pool_is_marked_is_refused(cluster, ctx, monkeypatch):
    store = cluster
    await _image(store, "kern", boot="kernel")
    await pools.create_pool(ctx, store, PoolCreate(name="scratch", driver="local"))
    refused: list[Exception] = []

    async def create() -> None:
        try:
            await instances.create_instance(ICTX, store, _create(image="kern", pool="scratch"))
        except errors.MinicloudError as exc:
            refused.append(exc)

    _after_call(monkeypatch, pools, "pool_users", 2, create)
    assert (await pools.delete_pool(ctx, store, "scratch")).status == 204
    assert len(refused) == 1 and "pool 'scratch' is being deleted" in str(refused[0])
    await _nothing_half_made(store)
