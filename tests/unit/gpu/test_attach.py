"""A GPU instance on its node (the compute reconciler with the fake hypervisor and a fake sysfs tree): the domain
gets a ``<hostdev>`` per function of its GPU once they are bound to vfio-pci; with ``manage_binding = false`` an
unbound GPU fails the build saying what to do; with ``manage_binding = true`` the node binds, and gives the GPU
back to its driver when the instance is deleted (the record's removal frees the GPU record)."""

from __future__ import annotations

import os

import msgspec

from minicloud.config import GpuConfig
from minicloud.gpu import service
from minicloud.gpu.kinds import GpuSpec
from minicloud.state import Txn
from tests.unit.agent.test_compute_reconciler import NODE, world  # noqa: F401 (fixture)
from tests.unit.gpu.fakes import FakeSysfs

FUNCTIONS = ["0000:3b:00.0", "0000:3b:00.1"]


async def _gpu_world(world, tmp_path, *, manage: bool, driver: str) -> FakeSysfs:  # noqa: F811
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:3b:00.0", driver=driver, group="7")
    fs.add("0000:3b:00.1", device="0x22a3", cls="0x040300", driver=driver, group="7")
    (fs.root / "bus" / "pci" / "drivers_probe").touch()
    world.r.config = msgspec.structs.replace(
        world.config, gpu=GpuConfig(manage_binding=manage, sysfs_root=str(fs.root))
    )
    spec = GpuSpec(node=NODE, pci_address=FUNCTIONS[0], pci_id="10de:2330", model="H100", capable=True,
                   functions=FUNCTIONS, driver=driver)  # fmt: skip
    await service.publish(world.store, NODE, [spec])
    return fs


async def _held_instance(world, name: str):  # noqa: F811
    inst = await world.add_instance(name, gpus=1)
    (g,) = await service.node_gpus(world.store, NODE)
    await world.store.commit(Txn(service.claim_ops([g], inst.id, name, "t")))
    return inst


async def test_an_unbound_gpu_fails_the_build_until_the_operator_binds_it(world, tmp_path):  # noqa: F811
    fs = await _gpu_world(world, tmp_path, manage=False, driver="nvidia")
    inst = await _held_instance(world, "train")
    await world.pass_()
    rec = await world.get(inst)
    assert rec.status.state == "error" and world.domain(inst) is None
    assert "GPU passthrough: the GPU's functions must be bound to vfio-pci" in rec.status.reason
    assert "0000:3b:00.0 (nvidia)" in rec.status.reason and "gpu.manage_binding" in rec.status.reason
    for address in FUNCTIONS:  # the operator binds them
        link = fs.devices / address / "driver"
        os.unlink(link)
        os.symlink(fs.drivers / "vfio-pci", link)
    await world.change_spec(inst, retry=1)  # `instance start`
    await world.pass_()
    dom = world.domain(inst)
    assert dom is not None and (await world.get(inst)).status.state == "running"
    assert dom.xml.count('<hostdev mode="subsystem" type="pci" managed="no">') == 2
    assert 'bus="0x3b" slot="0x00" function="0x1"' in dom.xml
    assert (fs.devices / "0000:3b:00.0" / "driver_override").read_text() == "(null)\n"  # nothing written


async def test_a_managed_binding_binds_at_build_and_gives_back_at_delete(world, tmp_path):  # noqa: F811
    fs = await _gpu_world(world, tmp_path, manage=True, driver="nvidia")
    inst = await _held_instance(world, "train")
    await world.pass_()
    dom = world.domain(inst)
    assert dom is not None and dom.xml.count("<hostdev ") == 2
    assert (fs.devices / "0000:3b:00.0" / "driver_override").read_text() == "vfio-pci"
    assert (fs.drivers / "nvidia" / "unbind").read_text() == "0000:3b:00.1"
    # the kernel's part: both functions now on vfio-pci
    for address in FUNCTIONS:
        os.unlink(fs.devices / address / "driver")
        os.symlink(fs.drivers / "vfio-pci", fs.devices / address / "driver")
    (fs.drivers / "vfio-pci").mkdir(exist_ok=True)
    (fs.drivers / "vfio-pci" / "unbind").touch()
    await world.change_spec(inst, deleted=True)
    await world.pass_()
    assert await world.get(inst) is None and world.domain(inst) is None
    assert (fs.devices / "0000:3b:00.0" / "driver_override").read_text() == "\n"
    assert (fs.drivers / "vfio-pci" / "unbind").read_text() == "0000:3b:00.1"
    (free,) = await service.node_gpus(world.store, NODE)
    assert free.spec.instance == ""
