"""A pool is the volume type: its I/O limits are its volumes' unless their create says otherwise, limit by limit (the
compute reconciler puts a volume's limits into libvirt's ``<iotune>``)."""

from __future__ import annotations

from minicloud.model.storage import PoolCreate, QosLimits, VolumeCreate
from minicloud.storage import pools, volumes
from minicloud.storage.kinds import POOL, VOLUME
from tests.unit.storage.conftest import NODE


async def test_a_pools_limits_are_its_volumes_unless_the_create_says_otherwise(store, ctx):
    gold = QosLimits(read_iops_sec=500, write_iops_sec=200, write_bytes_sec=20 << 20)
    shown = (await pools.create_pool(ctx, store, PoolCreate(name="slow", driver="local", qos=gold))).body
    assert (shown.qos.read_iops_sec, shown.qos.write_iops_sec, shown.qos.write_bytes_sec) == (500, 200, 20 << 20)
    assert POOL.load(await store.get_by_name(POOL.name, "", "slow")).spec.qos.read_iops_sec == 500

    plain = (await volumes.create_volume(ctx, store, VolumeCreate(name="a", size_gib=1, pool="slow"), node=NODE)).body
    assert plain.qos == QosLimits(read_iops_sec=500, write_iops_sec=200, write_bytes_sec=20 << 20)
    body = VolumeCreate(name="b", size_gib=1, pool="slow", qos=QosLimits(read_iops_sec=50, read_bytes_sec=1 << 20))
    own = (await volumes.create_volume(ctx, store, body, node=NODE)).body
    assert own.qos == QosLimits(read_iops_sec=50, write_iops_sec=200, read_bytes_sec=1 << 20, write_bytes_sec=20 << 20)
    assert VOLUME.load(await store.get(VOLUME.name, own.id)).spec.qos.read_iops_sec == 50
    # a pool without limits leaves volumes without
    await pools.create_pool(ctx, store, PoolCreate(name="fast", driver="local"))
    fast = (await volumes.create_volume(ctx, store, VolumeCreate(name="c", size_gib=1, pool="fast"), node=NODE)).body
    assert fast.qos == QosLimits()
