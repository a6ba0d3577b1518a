"""``volume flatten`` on the node: the storage reconciler copies the parent snapshot's data into the clone once
(the fake driver), then releases the snapshot through :func:`minicloud.storage.volumes.flattened`, so the
snapshot's data can be removed while the clone keeps its own. The world and helpers are
tests/unit/agent/test_storage_reconciler.py's; the crash between the two steps is in test_storage_faults.py."""

from __future__ import annotations

import pytest

from minicloud.state.sqlite import SQLiteStore
from minicloud.storage.kinds import SNAPSHOT, VOLUME, Attachment, SnapshotSpec, VolumeSource
from tests.unit.agent.test_storage_reconciler import ME, World, change, create, enable, load, volume


@pytest.fixture
async def ready(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    w = World(tmp_path, store, {})
    await w.r.start(w.enqueued.append)
    await enable(store)
    await w.pass_()
    yield w
    await w.r.close()
    await store.close()


async def _clone(world) -> tuple[str, str, str]:
    """A volume holding b"v1", its snapshot and a clone of it listed in the snapshot's ``clones`` (as the
    services keep it), all made by the node."""
    vid = await volume(world.store)
    await world.pass_()
    pool = world.drivers["minicloud"]
    pool.write(vid, b"v1")
    sid = await create(world.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node=ME))
    await world.pass_()
    cid = await volume(world.store, "clone", source=VolumeSource(type="snapshot", id=sid, name="s1"))
    await change(world.store, SNAPSHOT, sid, clones=[cid])
    await world.pass_()
    assert pool.vols[cid].parent == (vid, sid) and pool.read(cid) == b"v1"
    return vid, sid, cid


def _flattens(world, vol_id: str) -> int:
    return world.drivers["minicloud"].calls.count(("flatten", vol_id))


async def test_a_flatten_is_done_once_and_releases_the_snapshot(ready):
    vid, sid, cid = await _clone(ready)
    pool = ready.drivers["minicloud"]
    await change(ready.store, VOLUME, cid, flatten=True)
    await ready.pass_()
    vol, snap = await load(ready.store, VOLUME, cid), await load(ready.store, SNAPSHOT, sid)
    assert pool.vols[cid].parent is None and (vol.status.flattened, vol.status.state) == (True, "available")
    assert snap.spec.clones == [] and _flattens(ready, cid) == 1
    await ready.pass_()
    assert _flattens(ready, cid) == 1  # recorded: never again
    # the snapshot's data can go now, the clone keeps its own
    await change(ready.store, SNAPSHOT, sid, deleted=True)
    await ready.pass_()
    assert await ready.store.get(SNAPSHOT.name, sid) is None and sid not in pool.vols[vid].snaps
    assert pool.read(cid) == b"v1"


async def test_a_failed_flatten_is_the_volumes_error_and_is_retried(ready):
    _, sid, cid = await _clone(ready)
    ready.drivers["minicloud"].fail_next.add("flatten")
    await change(ready.store, VOLUME, cid, flatten=True)
    await ready.r.reconcile(cid)
    vol = await load(ready.store, VOLUME, cid)
    assert (vol.status.state, vol.status.flattened) == ("error", False) and "fake flatten failure" in vol.status.reason
    assert (await load(ready.store, SNAPSHOT, sid)).spec.clones == [cid]  # not released before the data is copied
    await ready.r.reconcile(cid)
    vol = await load(ready.store, VOLUME, cid)
    assert (vol.status.state, vol.status.reason, vol.status.flattened) == ("available", "", True)
    assert (await load(ready.store, SNAPSHOT, sid)).spec.clones == []


async def test_an_attached_clone_is_flattened_without_its_attachment_state_being_touched(ready):
    _, sid, cid = await _clone(ready)
    await change(ready.store, VOLUME, cid, attachment=Attachment(instance="i-1", node=ME, device="vdb"))
    await ready.r._set_status(VOLUME, cid, state="in-use", device="vdb")
    await change(ready.store, VOLUME, cid, flatten=True)
    await ready.pass_()
    vol = await load(ready.store, VOLUME, cid)
    assert (vol.status.state, vol.status.flattened) == ("in-use", True)
    assert (await load(ready.store, SNAPSHOT, sid)).spec.clones == []


async def test_a_clone_being_deleted_is_not_flattened(ready):
    _, _, cid = await _clone(ready)
    await change(ready.store, VOLUME, cid, flatten=True, deleted=True)
    await ready.pass_()
    assert await ready.store.get(VOLUME.name, cid) is None and _flattens(ready, cid) == 0
