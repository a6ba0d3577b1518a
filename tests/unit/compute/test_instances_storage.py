"""Instances and storage pools, through the services on a real SQLite store: where a root disk lives decides where
the instance may run (a Ceph image anywhere, a local one on its node), an image still being copied into its pool is
refused, ``boot_volume`` attaches the volume as ``vda`` in the instance's transaction, and the volumes of an instance
are released with its record."""

from __future__ import annotations

import pytest

from minicloud import errors
from minicloud.compute import instances
from minicloud.compute.kinds import HYPERVISOR, IMAGE, INSTANCE, HypervisorSpec, ImageSpec, ImageStatus
from minicloud.core.context import Context
from minicloud.model.compute import InstanceCreate
from minicloud.state import Create, SQLiteStore, Txn
from minicloud.storage.kinds import (
    DISK_SLOTS,
    POOL,
    VOLUME,
    Attachment,
    DiskSlotsSpec,
    PoolSpec,
    VolumeObserved,
    VolumeSpec,
    slots_id,
)

CTX = Context.system("test", action="compute:instances:create")


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    ops = []
    for node, memory in (("n1", 1024), ("n2", 4096), ("n3", 2048)):
        spec = HypervisorSpec(cpus=4, memory_mib=memory, disk_gib=100)
        ops.append(Create(HYPERVISOR.dump(HYPERVISOR.new(project="", name=node, spec=spec))))
    ops.append(Create(POOL.dump(POOL.new(project="", name="local", id="pool-local", spec=PoolSpec(driver="local")))))
    ceph = PoolSpec(driver="ceph", ceph_pool="minicloud", default=True)
    ops.append(Create(POOL.dump(POOL.new(project="", name="ceph", id="pool-ceph", spec=ceph))))
    await s.commit(Txn(ops))
    yield s
    await s.close()


async def add_image(store, name: str, *, pool: str = "", driver: str = "", state: str = "", boot: str = "disk"):
    spec = ImageSpec(boot=boot, format="qcow2" if boot == "disk" else None, virtual_size_bytes=1 << 30, size_bytes=1,
                     sha256="x", node="n1", pool=pool, pool_driver=driver)  # fmt: skip
    image = IMAGE.new(project="default", name=name, spec=spec, status=ImageStatus(pool_state=state))
    await store.commit(Txn([Create(IMAGE.dump(image))]))
    return image


async def add_volume(store, name: str, *, driver: str = "ceph", state: str = "available", node_: str = "n1", **spec):
    pool = "pool-ceph" if driver == "ceph" else "pool-local"
    vspec = VolumeSpec(size_gib=3, pool=pool, pool_name=driver, driver=driver, node=node_, **spec)
    volume = VOLUME.new(project="default", name=name, spec=vspec, status=VolumeObserved(state=state, size_gib=3))
    await store.commit(Txn([Create(VOLUME.dump(volume))]))
    return volume


async def volume(store, id_: str):
    return VOLUME.load(await store.get(VOLUME.name, id_))


async def instance(store, id_: str):
    return INSTANCE.load(await store.get(INSTANCE.name, id_))


async def test_an_instance_of_a_ready_ceph_image_runs_anywhere_and_takes_no_node_disk(store):
    await add_image(store, "deb", pool="pool-ceph", driver="ceph", state="ready")
    body = InstanceCreate(name="vm", image="deb", type="m1.tiny", disk_gib=90)
    written = await instances.create_instance(CTX, store, body)
    inst = await instance(store, written.body.id)
    # not pinned to the image's node n1: the node with the most free memory
    assert (inst.spec.node, inst.spec.pool, inst.spec.pool_driver) == ("n2", "pool-ceph", "ceph")
    assert instances.demand_of(inst.spec).disk_gib == 0
    # 90 GiB twice would not fit n2's 100 GiB of local disk: the clones live in Ceph
    written = await instances.create_instance(CTX, store, InstanceCreate(name="vm2", image="deb", type="m1.tiny", disk_gib=90))  # fmt: skip
    assert (await instance(store, written.body.id)).spec.node == "n2"


async def test_an_image_still_being_copied_into_its_pool_is_refused_with_a_retry(store):
    await add_image(store, "deb", pool="pool-ceph", driver="ceph", state="importing")
    with pytest.raises(errors.Conflict, match="still being copied into pool 'ceph', retry in a moment"):
        await instances.create_instance(CTX, store, InstanceCreate(name="vm", image="deb", type="m1.tiny"))
    await add_image(store, "bad", pool="pool-ceph", driver="ceph", state="error")
    with pytest.raises(errors.Conflict, match="import it again"):
        await instances.create_instance(CTX, store, InstanceCreate(name="vm", image="bad", type="m1.tiny"))


async def test_a_local_image_pins_the_instance_to_its_node_even_with_a_ceph_default_pool(store):
    await add_image(store, "loc", pool="pool-local", driver="local", state="importing")
    written = await instances.create_instance(CTX, store, InstanceCreate(name="vm", image="loc", type="m1.tiny"))
    inst = await instance(store, written.body.id)
    assert (inst.spec.node, inst.spec.pool, inst.spec.pool_driver) == ("n1", "pool-local", "local")
    assert instances.demand_of(inst.spec).disk_gib == 1
    # asking for the Ceph pool explicitly: the image is not there
    with pytest.raises(errors.Conflict, match="--pool ceph"):
        await instances.create_instance(CTX, store, InstanceCreate(name="x", image="loc", type="m1.tiny", pool="ceph"))
    with pytest.raises(errors.NotFound, match="no storage pool 'nope'"):
        await instances.create_instance(CTX, store, InstanceCreate(name="x", image="loc", type="m1.tiny", pool="nope"))


async def test_a_kernel_image_gets_a_root_disk_in_the_default_pool_on_its_node(store):
    await add_image(store, "k", boot="kernel")
    written = await instances.create_instance(CTX, store, InstanceCreate(name="vm", image="k", type="m1.tiny"))
    inst = await instance(store, written.body.id)
    assert (inst.spec.node, inst.spec.pool, inst.spec.pool_driver) == ("n1", "pool-ceph", "ceph")


async def test_image_or_boot_volume_exactly_one(store):
    with pytest.raises(errors.ValidationFailed, match="--boot-volume"):
        await instances.create_instance(CTX, store, InstanceCreate(name="vm", type="m1.tiny"))
    await add_image(store, "k", boot="kernel")
    await add_volume(store, "v")
    with pytest.raises(errors.ValidationFailed, match="--boot-volume"):
        await instances.create_instance(CTX, store, InstanceCreate(name="vm", image="k", boot_volume="v", type="m1.tiny"))  # fmt: skip


async def test_a_boot_volume_is_attached_as_vda_in_the_instance_transaction(store):
    vol = await add_volume(store, "boot")
    written = await instances.create_instance(CTX, store, InstanceCreate(name="vm", boot_volume="boot", type="m1.tiny"))  # fmt: skip
    inst = await instance(store, written.body.id)
    assert (inst.spec.root_volume, inst.spec.pool, inst.spec.pool_driver, inst.spec.disk_gib) == (vol.id, "pool-ceph", "ceph", 3)  # fmt: skip
    assert inst.spec.image_id == "" and written.body.root_volume == vol.id
    v = await volume(store, vol.id)
    assert v.spec.attachment == Attachment(instance=inst.id, instance_name="vm", node=inst.spec.node, device="vda")
    assert v.spec.root_of == inst.id and v.status.state == "attaching"
    assert v.spec.node == inst.spec.node and v.spec.previous_node == ("n1" if inst.spec.node != "n1" else "")
    # attached now: a second instance cannot boot from it
    with pytest.raises(errors.Conflict, match="attached to instance 'vm'"):
        await instances.create_instance(CTX, store, InstanceCreate(name="vm2", boot_volume="boot", type="m1.tiny"))
    with pytest.raises(errors.NotFound, match="no volume 'nope'"):
        await instances.create_instance(CTX, store, InstanceCreate(name="vm2", boot_volume="nope", type="m1.tiny"))
    await add_volume(store, "b2")
    with pytest.raises(errors.ValidationFailed, match="volume extend"):
        await instances.create_instance(CTX, store, InstanceCreate(name="vm2", boot_volume="b2", type="m1.tiny", disk_gib=9))  # fmt: skip


async def test_a_volume_that_is_not_available_cannot_be_booted(store):
    await add_volume(store, "new", state="creating")
    with pytest.raises(errors.Conflict, match="is creating, not available"):
        await instances.create_instance(CTX, store, InstanceCreate(name="vm", boot_volume="new", type="m1.tiny"))


async def test_a_local_boot_volume_pins_the_instance_to_the_volume_node(store):
    vol = await add_volume(store, "lb", driver="local")
    written = await instances.create_instance(CTX, store, InstanceCreate(name="vm", boot_volume="lb", type="m1.tiny"))  # fmt: skip
    inst = await instance(store, written.body.id)
    assert inst.spec.node == "n1" and (await volume(store, vol.id)).spec.node == "n1"


async def test_removing_an_instance_record_releases_its_volumes_and_keeps_the_boot_volume(store):
    boot = await add_volume(store, "boot")
    written = await instances.create_instance(CTX, store, InstanceCreate(name="vm", boot_volume="boot", type="m1.tiny"))  # fmt: skip
    inst = await instance(store, written.body.id)
    # a data volume attached by the volume service: it follows the instance's node, and has a device slot
    att = Attachment(instance=inst.id, device="vdb")
    data = await add_volume(store, "data", state="in-use", attachment=att, node_=inst.spec.node)
    slots = DISK_SLOTS.new(project="", name=inst.id, id=slots_id(inst.id), spec=DiskSlotsSpec(instance=inst.id, devices={"vdb": data.id}))  # fmt: skip
    await store.commit(Txn([Create(DISK_SLOTS.dump(slots))]))
    ops = await instances.record_removal_ops(store, inst)
    await store.commit(Txn(ops))
    assert await store.get(INSTANCE.name, inst.id) is None
    assert await store.get(DISK_SLOTS.name, slots_id(inst.id)) is None
    for vid in (boot.id, data.id):
        v = await volume(store, vid)
        assert v.spec.attachment is None and v.spec.root_of == "" and v.status.state == "available", vid
