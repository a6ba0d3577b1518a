"""Cluster-wide settings through the service on a real SQLite store: set, show, unset, compare-and-swap, bad input,
the node-config fallback, and the scheduler following ``scheduler-weigher`` on three nodes."""

from __future__ import annotations

import asyncio

import pytest

from minicloud import errors
from minicloud.cluster import settings
from minicloud.cluster.kinds import CLUSTER_SETTING, NODE, NodeSpec, NodeStatus
from minicloud.compute import instances
from minicloud.compute.kinds import HYPERVISOR, IMAGE, INSTANCE, HypervisorSpec, ImageSpec, ImageStatus
from minicloud.config import load as load_config
from minicloud.core.context import Context
from minicloud.model.compute import InstanceCreate
from minicloud.state import Create, SQLiteStore, Txn
from minicloud.storage.kinds import POOL, PoolSpec

ADMIN = Context.system("test", action="cluster:settings:update")
CREATE = Context.system("test", action="compute:instances:create")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "minicloud.toml"
    path.write_text('[compute]\nscheduler_weigher = "spread"\n')
    return load_config(path, env={})


@pytest.fixture
async def store(tmp_path):
    """Three nodes n1..n3 with the same room; a ready Ceph image 'deb' (runs anywhere)."""
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    ops = []
    for node in ("n1", "n2", "n3"):
        spec = HypervisorSpec(cpus=4, memory_mib=4096, disk_gib=100)
        ops.append(Create(HYPERVISOR.dump(HYPERVISOR.new(project="", name=node, spec=spec))))
        member = NODE.new(project="", name=node, spec=NodeSpec(address="10.0.0.1"), status=NodeStatus(state="online"))
        ops.append(Create(NODE.dump(member)))
    ceph = PoolSpec(driver="ceph", ceph_pool="minicloud", default=True)
    ops.append(Create(POOL.dump(POOL.new(project="", name="ceph", id="pool-ceph", spec=ceph))))
    spec = ImageSpec(boot="disk", format="qcow2", virtual_size_bytes=1 << 30, size_bytes=1, sha256="x", node="n1",
                     pool="pool-ceph", pool_driver="ceph")  # fmt: skip
    image = IMAGE.new(project="default", name="deb", spec=spec, status=ImageStatus(pool_state="ready"))
    ops.append(Create(IMAGE.dump(image)))
    await s.commit(Txn(ops))
    yield s
    await s.close()


async def test_set_show_unset_and_the_node_config_fallback(store, config):
    [shown] = await settings.list_settings(store, config)
    assert (shown.name, shown.value, shown.source, shown.config_key) == (
        "scheduler-weigher", "spread", "node-config", "compute.scheduler_weigher",
    )  # fmt: skip
    assert shown.choices == ["spread", "pack"] and shown.revision == 0
    written = await settings.set_setting(ADMIN, store, "scheduler-weigher", "pack")
    assert written.status == 200 and (written.body.value, written.body.source) == ("pack", "cluster")
    got = await settings.get_setting(store, config, "scheduler-weigher")
    assert (got.value, got.source, got.revision) == ("pack", "cluster", written.revision)
    # audited in the same transaction
    audit = [
        r for r in await store.list("audit", limit=100) if r.spec.get("target", {}).get("kind") == "clustersetting"
    ]
    assert audit, "the set was not audited"
    again = await settings.set_setting(ADMIN, store, "scheduler-weigher", "spread", expect=written.revision)
    assert again.body.value == "spread"
    assert len(await store.list(CLUSTER_SETTING.name)) == 1  # one record per setting
    assert (await settings.unset_setting(ADMIN, store, "scheduler-weigher")).status == 204
    back = await settings.get_setting(store, config, "scheduler-weigher")
    assert (back.source, back.value, back.id) == ("node-config", "spread", "")
    assert (await settings.unset_setting(ADMIN, store, "scheduler-weigher")).status == 204  # idempotent


async def test_bad_input_and_compare_and_swap(store, config):
    with pytest.raises(errors.NotFound, match="no cluster setting 'weigher'; the settings are scheduler-weigher"):
        await settings.set_setting(ADMIN, store, "weigher", "pack")
    with pytest.raises(errors.NotFound):
        await settings.get_setting(store, config, "nope")
    with pytest.raises(errors.ValidationFailed, match="'random' is not a value it takes: must be one of spread, pack"):
        await settings.set_setting(ADMIN, store, "scheduler-weigher", "random")
    first = await settings.set_setting(ADMIN, store, "scheduler-weigher", "pack", expect=0)  # only if never set
    with pytest.raises(errors.PreconditionFailed, match="is at revision"):
        await settings.set_setting(ADMIN, store, "scheduler-weigher", "spread", expect=0)
    with pytest.raises(errors.PreconditionFailed):
        await settings.unset_setting(ADMIN, store, "scheduler-weigher", expect=first.revision - 1)
    # concurrent sets without If-Match: each read-compare-swap retries; one record, the last writer's value
    results = await asyncio.gather(
        *(settings.set_setting(ADMIN, store, "scheduler-weigher", v) for v in ("spread", "pack", "spread", "pack"))
    )
    assert all(r.status == 200 for r in results)
    [record] = await store.list(CLUSTER_SETTING.name)
    assert record.spec["value"] == max(results, key=lambda r: r.revision).body.value


async def placed(store, written) -> str:
    return INSTANCE.load(await store.get(INSTANCE.name, written.body.id)).spec.node


async def test_the_scheduler_follows_the_cluster_setting_over_the_node_config(store):
    def body(name: str) -> InstanceCreate:
        return InstanceCreate(name=name, image="deb", type="m1.tiny")

    # the node's configuration says spread: three creates on three nodes
    first = await instances.create_instance(CREATE, store, body("vm1"), weigher="spread")
    assert await placed(store, first) == "n1"
    await settings.set_setting(ADMIN, store, "scheduler-weigher", "pack")
    # the cluster says pack, whatever this node's configuration: the fullest node that fits
    packed = await instances.create_instance(CREATE, store, body("vm2"), weigher="spread")
    assert await placed(store, packed) == "n1" and packed.body.status.placement.startswith("pack: ")
    await settings.unset_setting(ADMIN, store, "scheduler-weigher")
    spread = await instances.create_instance(CREATE, store, body("vm3"), weigher="spread")
    assert await placed(store, spread) == "n2" and spread.body.status.placement.startswith("spread: ")
    # unset: a node configured with pack packs again
    node_pack = await instances.create_instance(CREATE, store, body("vm4"), weigher="pack")
    assert await placed(store, node_pack) == "n1"
