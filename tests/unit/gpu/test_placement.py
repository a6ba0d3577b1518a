"""GPU placement through the services on a real SQLite store (three nodes, a Ceph image that runs anywhere): types
that ask for GPUs go where enough free, capable, matching GPUs are; a GPU is held by one instance (concurrent
creates for the last GPUs across nodes); 409s name what is missing; release on delete; resize refused while
running."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from minicloud import errors
from minicloud.compute import instances, types
from minicloud.compute.kinds import INSTANCE
from minicloud.compute.scheduler import Demand, NodeCapacity, NodeView, SchedRequest, gpu_filter
from minicloud.gpu import service
from minicloud.gpu.kinds import GpuSpec
from minicloud.gpu.placement import model_matches
from minicloud.model.compute import InstanceCreate, InstanceTypeCreate
from minicloud.state import Txn
from tests.unit.compute.test_scheduling import CTX, placed, store  # noqa: F401 (fixture)

SHARED = "IOMMU group 7 also holds 0000:00:1f.3 (class 0x040300, driver snd_hda_intel), which is neither ..."


def body(name: str, type: str = "m1.tiny", **kw: object) -> InstanceCreate:
    return InstanceCreate(name=name, image="deb", type=type, **kw)  # type: ignore[arg-type]


def gpu(node: str, pci: str = "0000:3b:00.0", model: str = "H100 80GB HBM3", **kw: object) -> GpuSpec:
    fields: dict[str, object] = {"capable": True, **kw}
    return GpuSpec(node=node, pci_address=pci, pci_id="10de:2330", model=model, **fields)  # type: ignore[arg-type]


async def gpu_type(store, name: str, gpus: int, model: str = "") -> None:  # noqa: F811
    t = InstanceTypeCreate(name=name, vcpus=1, memory_mib=128, disk_gib=1, gpus=gpus, gpu_model=model)
    await types.create_type(CTX, store, t)


def test_model_patterns_match_with_and_without_the_vendor_prefix():
    assert model_matches("H100 80GB HBM3", "H100*") and model_matches("H100 80GB HBM3", "nvidia h100*")
    assert model_matches("A100-SXM4-40GB", "") and not model_matches("L4", "H100*")
    assert model_matches("GH100 [H100 SXM5 80GB]", "*H100*")


def test_the_gpu_filter_alone():
    req = SchedRequest(demand=Demand(1, 128, 1), gpus=2, gpu_model="H100*")
    cap = NodeCapacity("a", 8, 1024, 100)
    two = (gpu("a"), gpu("a", "0000:af:00.0"))
    assert gpu_filter(req, NodeView(capacity=cap, gpus=two)) is None
    assert gpu_filter(SchedRequest(demand=Demand(1, 128, 1)), NodeView(capacity=cap)) is None  # no GPU wanted
    assert gpu_filter(req, NodeView(capacity=cap)) == (
        "2 free passthrough-capable GPUs matching 'H100*' wanted, the node has no GPU"
    )


async def test_gpu_types_are_placed_where_matching_capable_gpus_are_free(store):  # noqa: F811
    await service.publish(store, "n1", [gpu("n1")])
    await service.publish(store, "n2", [gpu("n2", model="L4")])
    await service.publish(store, "n3", [gpu("n3", capable=False, reason=SHARED)])
    await gpu_type(store, "g1.large", 1, "H100*")
    shown = await types.lookup(CTX, store, "g1.large")
    assert (shown.gpus, shown.gpu_model) == (1, "H100*")
    with pytest.raises(errors.ValidationFailed, match="needs GPUs"):
        await types.create_type(
            CTX, store, InstanceTypeCreate(name="bad", vcpus=1, memory_mib=128, disk_gib=1, gpu_model="H100*")
        )
    first = await instances.create_instance(CTX, store, body("vm1", type="g1.large"))
    assert await placed(store, first) == "n1" and first.body.gpus == 1
    (held,) = await service.held_by(store, "n1", first.body.id)
    assert (held.spec.pci_address, held.spec.instance_name) == ("0000:3b:00.0", "vm1")
    with pytest.raises(errors.InsufficientCapacity) as exc:
        await instances.create_instance(CTX, store, body("vm2", type="g1.large"))
    detail = exc.value.detail
    assert (
        "n1: 1 free passthrough-capable GPU matching 'H100*' wanted, 0 free (0000:3b:00.0 held by instance vm1)"
        in detail
    )
    assert "n2: 1 free passthrough-capable GPU matching 'H100*' wanted, none of its GPUs matches (L4)" in detail
    assert (
        "n3: 1 free passthrough-capable GPU matching 'H100*' wanted, 0 free (0000:3b:00.0 not capable: IOMMU group 7"
        in detail
    )
    assert "gpu list" in detail
    # more GPUs than any node has, and a model nothing matches
    await gpu_type(store, "g4", 4)
    with pytest.raises(errors.InsufficientCapacity, match="4 free passthrough-capable GPUs wanted, 0 free"):
        await instances.create_instance(CTX, store, body("vm3", type="g4"))
    await gpu_type(store, "ga", 1, "A100*")
    with pytest.raises(errors.InsufficientCapacity, match="matching 'A100\\*' wanted, none of its GPUs matches"):
        await instances.create_instance(CTX, store, body("vm4", type="ga"))
    # any model: the L4 on n2 (n1's is held, n3's cannot be passed through)
    await gpu_type(store, "g1.any", 1)
    assert await placed(store, await instances.create_instance(CTX, store, body("vm5", type="g1.any"))) == "n2"
    # an instance without GPUs still goes anywhere
    assert await instances.create_instance(CTX, store, body("plain"))


async def test_concurrent_creates_for_the_last_gpus_across_nodes_hold_each_once(store):  # noqa: F811
    await service.publish(store, "n1", [gpu("n1")])
    await service.publish(store, "n2", [gpu("n2")])
    await gpu_type(store, "g1", 1)
    results = await asyncio.gather(
        *(instances.create_instance(CTX, store, body(f"vm{i}", type="g1")) for i in range(5)), return_exceptions=True
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(made) == 2 and len(refused) == 3
    assert all(isinstance(r, errors.InsufficientCapacity) for r in refused), refused
    nodes = sorted([await placed(store, w) for w in made])
    assert nodes == ["n1", "n2"]
    holders = [g.spec.instance for gs in (await service.all_gpus(store)).values() for g in gs]
    assert sorted(holders) == sorted(w.body.id for w in made)


async def test_gpus_are_released_when_the_instance_goes_and_resize_is_refused_while_running(store):  # noqa: F811
    await service.publish(store, "n1", [gpu("n1")])
    await gpu_type(store, "g1", 1)
    await gpu_type(store, "g1.big", 1)
    await gpu_type(store, "g2", 2)
    vm = (await instances.create_instance(CTX, store, body("vm", type="g1", node="n1"))).body
    with pytest.raises(errors.Conflict, match="has GPUs passed through and cannot be resized while it is pending"):
        await instances.resize_instance(CTX, store, "vm", "g1.big")
    with pytest.raises(errors.Conflict, match="cannot be resized while"):
        await instances.resize_instance(CTX, store, "vm", "m1.small")
    # stopped: the shape may change, the GPUs may not
    record = await store.get(INSTANCE.name, vm.id)
    obj = INSTANCE.load(record)
    stopped = obj.replace(
        spec=msgspec.structs.replace(obj.spec, power="stopped"),
        status=msgspec.structs.replace(obj.status, state="stopped"),
    )
    from minicloud.state import Update

    await store.commit(Txn([Update(INSTANCE.dump(stopped), expect_revision=record.revision)]))
    with pytest.raises(errors.Conflict, match="has 1 GPU\\(s\\) and type g2 asks for 2: GPUs do not change"):
        await instances.resize_instance(CTX, store, "vm", "g2")
    resized = await instances.resize_instance(CTX, store, "vm", "g1.big")
    assert resized.body.type == "g1.big"
    # the node's teardown commits the record's removal: the GPU is free again
    await instances.delete_instance(CTX, store, "vm")
    obj = INSTANCE.load(await store.get(INSTANCE.name, vm.id))
    await store.commit(Txn(await instances.record_removal_ops(store, obj)))
    (free,) = await service.node_gpus(store, "n1")
    assert free.spec.instance == ""
    again = await instances.create_instance(CTX, store, body("vm2", type="g1"))
    assert await placed(store, again) == "n1"


async def test_an_instance_on_a_node_without_compute_releases_its_gpu_at_once(store):  # noqa: F811
    await service.publish(store, "n1", [gpu("n1")])
    await gpu_type(store, "g1", 1)
    vm = (await instances.create_instance(CTX, store, body("vm", type="g1"))).body
    from minicloud.compute.kinds import HYPERVISOR
    from minicloud.state import Delete

    hv = await store.get_by_name(HYPERVISOR.name, "", "n1")
    await store.commit(Txn([Delete(kind=HYPERVISOR.name, id=hv.id)]))
    assert (await instances.delete_instance(CTX, store, vm.id)).status == 204
    (free,) = await service.node_gpus(store, "n1")
    assert free.spec.instance == ""


async def test_a_gpu_that_leaves_the_inventory_during_a_create_makes_it_decide_again(store, monkeypatch):  # noqa: F811
    """The create read a GPU the node deleted before the create committed: the claim fails, and the create decides
    again on fresh records (409: no GPU), instead of answering 404."""
    await service.publish(store, "n1", [gpu("n1")])
    await gpu_type(store, "g1", 1)
    stale = await service.all_gpus(store)
    await service.publish(store, "n1", [])  # the node no longer finds it
    real = service.all_gpus
    calls = []

    async def once_stale(s):  # the first decision sees the GPU, the next ones what is there
        calls.append(1)
        return stale if len(calls) == 1 else await real(s)

    monkeypatch.setattr(service, "all_gpus", once_stale)
    with pytest.raises(errors.InsufficientCapacity, match="the node has no GPU"):
        await instances.create_instance(CTX, store, body("vm", type="g1"))
    assert len(calls) == 2
