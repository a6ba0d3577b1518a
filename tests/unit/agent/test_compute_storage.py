"""The compute reconciler with storage: root disks cloned in a pool, boot volumes, volumes plugged into and out of the
domain (defined, hot-plugged, unplugged, grown), against the fake hypervisor, the fake volume driver and a real SQLite
store. Passes are driven by hand (``world.pass_()``) so every step is deterministic. The real libvirt + Ceph path is
tests/integration/test_storage_guests.py."""

from __future__ import annotations

import ipaddress
import uuid
import xml.etree.ElementTree as ET

import msgspec
import pytest

from agent.compute.driver import FakeDriver
from agent.net.default import FakeNetwork, NetworkSpec
from agent.reconcilers import compute as compute_mod
from agent.reconcilers.compute import NODE_KEY, ComputeReconciler, root_volume_name
from agent.storage.driver import DiskSource, FakeVolumeDriver
from agent.storage.node import CephSecret, NodeStorage
from minicloud.compute.kinds import IMAGE, INSTANCE, ImageSpec, ImageStatus
from minicloud.state import Change, Create, Txn, Update
from minicloud.state.sqlite import SQLiteStore
from minicloud.storage.kinds import VOLUME, Attachment, Qos, VolumeObserved, VolumeSpec
from tests.unit.agent.test_compute_reconciler import NODE, World, _config

POOL = "pool-ceph"
GIB = 1 << 30
SECRET = CephSecret(uuid="5a1e0c5e-0000-4000-8000-000000000001", usage="minicloud client.minicloud", key=b"k" * 16)


class RbdFake(FakeVolumeDriver):
    """The fake volume driver, answering RBD disk sources like the ceph driver does."""

    def source(self, vol: str) -> DiskSource:
        return DiskSource(kind="rbd", pool="minicloud", image=vol, hosts=(("127.0.0.1", 3300),), user="minicloud",
                          secret_uuid=SECRET.uuid, format="raw")  # fmt: skip


class GuestHoldsDisks(FakeDriver):
    """A hypervisor whose guest never lets go of a disk: the definition loses it, the live domain keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, str] = {}

    async def live_xml(self, uuid_: str) -> str:
        return self.live.get(uuid_) or self.doms[uuid_].xml

    async def detach_device(self, uuid_: str, device_xml: str) -> None:
        self.live.setdefault(uuid_, self.doms[uuid_].xml)
        await super().detach_device(uuid_, device_xml)

    async def destroy(self, uuid_: str) -> None:
        self.live.pop(uuid_, None)
        await super().destroy(uuid_)


@pytest.fixture(params=[FakeDriver])
async def world(tmp_path, request):
    config = _config(tmp_path)
    store = SQLiteStore(config.data_path / "state.db")
    config.data_path.mkdir(parents=True)
    await store.open()
    image = ImageSpec(boot="disk", format="qcow2", virtual_size_bytes=GIB, node="other-node", size_bytes=1, sha256="x",
                      pool=POOL, pool_driver="ceph")  # fmt: skip
    obj = IMAGE.new(project="default", name="deb", id="img-1", spec=image, status=ImageStatus(pool_state="ready"))
    await store.commit(Txn([Create(IMAGE.dump(obj))]))
    driver = request.param()
    network = FakeNetwork(NetworkSpec(name="default", bridge="mcunit0", cidr=ipaddress.IPv4Network("10.99.0.0/24")))
    storage = NodeStorage()
    r = ComputeReconciler(store=store, config=config, driver=driver, network=network, virt_type="qemu",
                          virt_reason="test", storage=storage)  # fmt: skip
    w = World(store, config, driver, network, r)
    w.storage = storage
    w.pool = RbdFake("ceph")
    await w.pool.create("img-1", GIB)
    await w.pool.snapshot("img-1", "base", protect=True)
    await r.start(w.enqueued.append)
    yield w
    await r.close()
    await store.close()


def ready(w: World) -> None:
    w.storage.set_ceph_secret(SECRET)
    w.storage.publish(POOL, w.pool)


async def add(w: World, name: str = "vm", **spec):
    fields = {"image_id": "img-1", "image_name": "deb", "pool": POOL, "pool_driver": "ceph", "disk_gib": 2}
    return await w.add_instance(name, **{**fields, **spec})


async def add_volume(w: World, name: str, *, inst=None, device: str = "vdb", state: str = "attaching", **spec):
    att = Attachment(instance=inst.id, instance_name=inst.name, node=NODE, device=device) if inst else None
    vspec = VolumeSpec(size_gib=1, pool=POOL, driver="ceph", node=NODE, attachment=att, **spec)
    vol = VOLUME.new(project="default", name=name, spec=vspec, status=VolumeObserved(state=state, size_gib=1))
    await w.pool.create(vol.id, GIB)
    await w.store.commit(Txn([Create(VOLUME.dump(vol))]))
    return vol


async def volume(w: World, vol):
    return VOLUME.load(await w.store.get(VOLUME.name, vol.id))


async def change_volume(w: World, vol, *, status: dict | None = None, **spec) -> None:
    cur = await volume(w, vol)
    new = cur.replace(
        spec=msgspec.structs.replace(cur.spec, **spec), status=msgspec.structs.replace(cur.status, **(status or {}))
    )
    await w.store.commit(Txn([Update(VOLUME.dump(new), expect_revision=cur.revision)]))


def disks(w: World, inst) -> dict[str, ET.Element]:
    root = ET.fromstring(w.domain(inst).xml)
    return {d.find("target").get("dev"): d for d in root.iter("disk")}


async def test_a_ceph_instance_waits_for_its_pool_then_boots_from_a_clone_of_the_image(world):
    inst = await add(world)
    await world.pass_()
    rec = await world.get(inst)
    assert world.domain(inst) is None and f"waiting for storage pool {POOL}" in rec.status.reason
    world.enqueued.clear()
    world.storage.publish(POOL, world.pool)  # the pool, but no Ceph key yet
    assert inst.id in world.enqueued  # requeued by the storage change
    await world.pass_()
    assert "waiting for the Ceph key" in (await world.get(inst)).status.reason
    assert not await world.pool.exists(root_volume_name(inst.id))  # nothing made while waiting
    world.storage.set_ceph_secret(SECRET)
    await world.pass_()
    rec = await world.get(inst)
    assert rec.status.state == "running" and world.domain(inst).state == "running"
    assert await world.pool.size(root_volume_name(inst.id)) == 2 * GIB
    assert ("clone", "img-1", "base", root_volume_name(inst.id), 2 * GIB) in world.pool.calls
    vda = disks(world, inst)["vda"]
    assert vda.get("type") == "network" and vda.find("source").get("name") == f"minicloud/{inst.id}-root"
    assert vda.find("auth/secret").get("uuid") == SECRET.uuid
    assert world.driver.secrets == {SECRET.uuid: (SECRET.usage, SECRET.key)}
    assert not (world.files(inst) / "root.qcow2").exists() and (world.files(inst) / "seed.iso").exists()


async def test_deleting_a_ceph_instance_removes_its_clone_and_a_crash_in_between_converges(world, monkeypatch):
    ready(world)
    inst = await add(world)
    await world.pass_()
    assert await world.pool.exists(root_volume_name(inst.id))
    await world.change_spec(inst, deleted=True)
    world.pool.fail_next.add("delete")  # the pool refuses once: the instance waits and tries again
    await world.pass_()
    rec = await world.get(inst)
    assert rec is not None and "deleting the root disk" in rec.status.reason and world.domain(inst) is None
    await world.pass_()
    assert await world.get(inst) is None and not await world.pool.exists(root_volume_name(inst.id))
    # a root disk whose record went behind the agent's back is swept by the node key
    await world.pool.clone("img-1", "base", "i-gone-root", GIB)
    await world.r.reconcile(NODE_KEY)
    assert not await world.pool.exists("i-gone-root") and await world.pool.exists("img-1")


async def test_a_volume_is_defined_with_the_instance_and_hot_plugged_and_unplugged_while_it_runs(world):
    ready(world)
    inst = await add(world)
    first = await add_volume(world, "data1", inst=inst, qos=Qos(read_iops_sec=100))
    await world.pass_()
    d = disks(world, inst)
    assert d["vdb"].findtext("serial") == first.id and d["vdb"].findtext("iotune/read_iops_sec") == "100"
    assert (await volume(world, first)).status.state == "in-use" and (await volume(world, first)).status.device == "vdb"
    # hot-plug a second one into the running guest
    second = await add_volume(world, "data2", inst=inst, device="vdc")
    change = Change(revision=1, type="updated", kind=VOLUME.name, id=second.id, project="default",
                    record=await world.store.get(VOLUME.name, second.id))  # fmt: skip
    assert list(world.r.keys_for(change)) == [inst.id]
    await world.pass_()
    assert disks(world, inst)["vdc"].findtext("serial") == second.id and world.domain(inst).state == "running"
    assert (await volume(world, second)).status.state == "in-use"
    # detach the first: the volume service moves the attachment to detached_from and says detaching
    v = await volume(world, first)
    await change_volume(world, first, attachment=None, detached_from=v.spec.attachment, status={"state": "detaching"})
    await world.pass_()
    assert set(disks(world, inst)) == {"vda", "vdc", "sda"}
    v = await volume(world, first)
    assert (v.status.state, v.status.device) == ("available", "")
    assert await world.pool.exists(first.id)  # the data stays


async def test_a_grown_volume_is_announced_to_the_running_guest(world):
    ready(world)
    inst = await add(world)
    vol = await add_volume(world, "data", inst=inst)
    await world.pass_()
    assert world.driver.block_sizes == {}  # plugged at its size: nothing to announce
    await world.pool.resize(vol.id, 3 * GIB)  # what the storage reconciler does, then it records the size
    await change_volume(world, vol, size_gib=3, status={"size_gib": 3})
    await world.pass_()
    assert world.driver.block_sizes == {(inst.spec.uuid, "vdb"): 3 * GIB}
    await world.pass_()
    assert world.driver.block_sizes == {(inst.spec.uuid, "vdb"): 3 * GIB}


async def test_a_stopped_instance_gets_its_volumes_in_its_definition(world):
    ready(world)
    inst = await add(world, power="stopped")
    await world.pass_()
    assert world.domain(inst).state == "shutoff"
    vol = await add_volume(world, "data", inst=inst)
    await world.pass_()
    assert disks(world, inst)["vdb"].findtext("serial") == vol.id and world.domain(inst).state == "shutoff"
    assert (await volume(world, vol)).status.state == "in-use"


async def test_a_volume_whose_pool_is_not_usable_here_waits_without_stopping_the_instance(world):
    ready(world)
    inst = await add(world)
    other = await add_volume(world, "elsewhere", inst=inst, pool_name="x")
    await change_volume(world, other, pool="pool-other")
    await world.pass_()
    assert world.domain(inst).state == "running" and "vdb" not in disks(world, inst)
    assert (await volume(world, other)).status.state == "attaching"
    world.enqueued.clear()
    world.storage.publish("pool-other", world.pool)
    assert inst.id in world.enqueued
    await world.pass_()
    assert "vdb" in disks(world, inst) and (await volume(world, other)).status.state == "in-use"


async def test_a_boot_volume_is_the_root_disk_and_outlives_the_instance(world):
    ready(world)
    boot = await add_volume(world, "boot", device="vda")
    inst = await add(world, image_id="", image_name="", root_volume=boot.id, disk_gib=1)
    att = Attachment(instance=inst.id, instance_name=inst.name, node=NODE, device="vda")
    await change_volume(world, boot, attachment=att, root_of=inst.id)
    await world.pass_()
    vda = disks(world, inst)["vda"]
    assert vda.find("source").get("name") == f"minicloud/{boot.id}" and vda.findtext("serial") == boot.id
    assert (await volume(world, boot)).status.state == "in-use"
    assert not await world.pool.exists(root_volume_name(inst.id))
    await world.change_spec(inst, deleted=True)
    await world.pass_()
    assert await world.get(inst) is None and await world.pool.exists(boot.id)
    v = await volume(world, boot)
    assert (v.spec.attachment, v.spec.root_of, v.status.state) == (None, "", "available")


@pytest.mark.parametrize("world", [GuestHoldsDisks], indirect=True)
async def test_a_guest_that_holds_a_volume_keeps_it_detaching_and_force_powers_it_off(world, monkeypatch):
    monkeypatch.setattr(compute_mod, "_DETACH_TIMEOUT", 0.0)
    ready(world)
    inst = await add(world)
    vol = await add_volume(world, "data", inst=inst)
    await world.pass_()
    v = await volume(world, vol)
    await change_volume(world, vol, attachment=None, detached_from=v.spec.attachment, status={"state": "detaching"})
    results = await world.pass_()
    v = await volume(world, vol)
    assert v.status.state == "detaching" and "has not released it" in v.status.reason
    assert results[inst.id].requeue_after is not None  # asked again later: the guest may let go
    # forced: the guest is powered off, started again without the disk, and the instance stays running
    await change_volume(world, vol, detached_from=msgspec.structs.replace(v.spec.detached_from, force=True))
    await world.pass_()
    await world.pass_()
    assert world.domain(inst).state == "running" and "vdb" not in disks(world, inst)
    assert (await volume(world, vol)).status.state == "available"
    assert (await world.get(inst)).status.state == "running"


async def test_a_local_instance_is_unchanged(world):
    """No pool (records made before pools): the qcow2 overlay in the instance's directory, as before."""
    kernel = IMAGE.new(project="default", name="k", id="img-k", spec=ImageSpec(boot="kernel", node=NODE, size_bytes=1, sha256="x"))  # fmt: skip
    await world.store.commit(Txn([Create(IMAGE.dump(kernel))]))
    files = world.config.data_path / "images" / "img-k"
    files.mkdir(parents=True)
    (files / "kernel").write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 100)
    inst = await world.add_instance("loc", uuid=str(uuid.uuid4()), image_id="img-k", image_name="k")
    await world.pass_()
    assert (world.files(inst) / "root.qcow2").exists() and disks(world, inst)["vda"].get("type") == "file"
    assert world.pool.calls == [("create", "img-1", GIB), ("snapshot", "img-1", "base", True)]
    assert INSTANCE.load(await world.store.get(INSTANCE.name, inst.id)).status.state == "running"
