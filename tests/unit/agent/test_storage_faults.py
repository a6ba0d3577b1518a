"""A crash at each of the storage reconciler's fault points (``storage.*`` in :mod:`agent.faults`) converges: a new
reconciler — a restarted agent: new engine object, new drivers map, same store, same pretend cluster and pools —
ends with exactly one MON bootstrap, one OSD per disk, one volume or snapshot per record, and nothing the records do
not name left in the fake pools.

The crash is the real fault point (``MINICLOUD_FAULT``), except that instead of SIGKILLing the test process it
raises a BaseException no handler of the reconciler catches — the same cut between two steps. The fake engine and
world are tests/unit/agent/test_storage_reconciler.py's."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent import faults
from agent.reconcilers.storage import ENGINE_KEY
from minicloud.cluster.kinds import NODE, NodeSpec, NodeStatus
from minicloud.compute.kinds import IMAGE, ImageSpec
from minicloud.state.sqlite import SQLiteStore
from minicloud.storage.kinds import (
    CEPH,
    CEPH_NAME,
    GIB,
    SNAPSHOT,
    STORAGE_DISK,
    VOLUME,
    Attachment,
    RevertRequest,
    SnapshotSpec,
    VolumeSource,
)
from tests.unit.agent.test_storage_reconciler import World, change, create, enable, load, volume


class Killed(BaseException):
    """What SIGKILL would have done at the fault point: nothing of ours runs after it."""


@pytest.fixture
def crash_at(monkeypatch):
    """``crash_at(name)``: the next time the reconciler reaches fault point ``name`` it dies (once)."""
    real = faults.point

    def point(name: str) -> None:
        if os.environ.get("MINICLOUD_FAULT") == name:
            monkeypatch.delenv("MINICLOUD_FAULT")
            raise Killed(name)
        real(name)

    monkeypatch.setattr(faults, "point", point)

    def arm(name: str) -> None:
        monkeypatch.setenv("MINICLOUD_FAULT", name)

    return arm


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def cluster():
    return {}


@pytest.fixture
async def agents(tmp_path, store, cluster):
    """``agents()`` starts an agent of node n1 (again); all are closed at the end."""
    started: list[World] = []

    async def start() -> World:
        w = World(tmp_path, store, cluster)
        await w.r.start(w.enqueued.append)
        started.append(w)
        return w

    yield start
    for w in started:
        await w.r.close()


async def _crash(world: World, rounds: int = 3) -> str:
    """Run passes until the armed fault point kills the agent; the point's name."""
    with pytest.raises(Killed) as info:
        await world.pass_(rounds=rounds)
    assert "MINICLOUD_FAULT" not in os.environ, "the armed point was reached"
    return str(info.value)


async def _ready(agents) -> World:
    first = await agents()
    await enable(first.store)
    await first.pass_()
    return first


def _pool(world: World):
    return world.drivers["minicloud"]


def _calls(world: World, method: str) -> list[tuple]:
    return [c for c in _pool(world).calls if c[0] == method]


async def _leftovers(world: World) -> list[str]:
    """Pool contents no record names."""
    out = []
    for name in await _pool(world).list():
        kind = IMAGE if name.startswith("img-") else VOLUME
        if await world.store.get(kind.name, name) is None:
            out.append(name)
    return out


# -- the engine and disks ------------------------------------------------------------------------------------------
async def test_crash_after_bootstrap_before_the_keys_are_recorded(agents, crash_at, cluster):
    first = await agents()
    await enable(first.store)
    crash_at("storage.ceph.after_bootstrap")
    with pytest.raises(Killed):
        await first.r.reconcile(ENGINE_KEY)
    assert not CEPH.load(await first.store.get_by_name(CEPH.name, "", CEPH_NAME)).spec.keys
    again = await agents()
    await again.pass_()
    ceph = CEPH.load(await first.store.get_by_name(CEPH.name, "", CEPH_NAME))
    assert cluster["bootstrapped"] == 1 and ceph.status.state == "ready"
    assert again.keystore.decrypt(ceph.spec.keys["mon."], b"mon.") == b"bW9u"  # the MON made before the crash
    assert list(cluster["osds"]) == [0]


async def test_crash_after_an_osd_is_made_before_it_is_recorded(agents, crash_at, cluster):
    first = await agents()
    await enable(first.store)
    crash_at("storage.disk.after_add")
    await _crash(first)
    assert (await load(first.store, STORAGE_DISK, "sd-1")).status.osd_id is None
    again = await agents()
    await again.pass_()
    disk = await load(first.store, STORAGE_DISK, "sd-1")
    assert (disk.status.osd_id, disk.status.state) == (0, "up")
    assert list(cluster["osds"]) == [0] and cluster["next_osd"] == 1  # one OSD for one disk


async def test_crash_after_an_osd_is_removed_before_its_record_is(agents, crash_at, cluster):
    first = await _ready(agents)
    await change(first.store, STORAGE_DISK, "sd-1", remove=True)
    crash_at("storage.disk.after_remove")
    await _crash(first)
    assert await first.store.get(STORAGE_DISK.name, "sd-1") is not None and cluster["osds"] == {}
    again = await agents()
    await again.pass_()
    assert await first.store.get(STORAGE_DISK.name, "sd-1") is None
    assert cluster["osds"] == {} and not (again.r.intents_dir / "sd-1.json").exists()


# -- volumes -------------------------------------------------------------------------------------------------------
async def test_crash_after_a_fence_before_it_is_recorded(agents, crash_at, cluster):
    first = await _ready(agents)
    await create(first.store, NODE, "n2", NodeSpec(address="10.0.0.2"), status=NodeStatus(state="offline"))
    vid = await volume(first.store, previous_node="n2")
    crash_at("storage.volume.after_fence")
    await _crash(first)
    assert cluster["blocklist"] == ["10.0.0.2"] and vid not in _pool(first).vols  # fenced, nothing written yet
    again = await agents()
    await again.pass_()
    vol = await load(first.store, VOLUME, vid)
    assert (vol.spec.previous_node, vol.status.state) == ("", "available")
    assert set(cluster["blocklist"]) == {"10.0.0.2"}  # fenced again (idempotent) before anything wrote the volume
    assert len(_calls(again, "create")) == 1


@pytest.mark.parametrize("source", ["blank", "image", "snapshot"])
async def test_crash_after_a_volume_is_made_before_it_is_recorded(agents, crash_at, source):
    first = await _ready(agents)
    src = VolumeSource()
    if source == "image":
        files = first.config.data_path / "images" / "img-1"
        files.mkdir(parents=True)
        (files / "disk").write_bytes(b"image bytes")
        spec = ImageSpec(boot="disk", format="raw", size_bytes=11, sha256="x", node="n1", pool="pool-ceph", pool_driver="ceph")  # fmt: skip
        await create(first.store, IMAGE, "guest", spec, id="img-1")
        await first.pass_()
        src = VolumeSource(type="image", id="img-1")
    elif source == "snapshot":
        parent = await volume(first.store, "parent")
        await first.pass_()
        _pool(first).write(parent, b"snapshot bytes")
        sid = await create(first.store, SNAPSHOT, "s1", SnapshotSpec(volume=parent, pool="pool-ceph", node="n1"))
        await first.pass_()
        src = VolumeSource(type="snapshot", id=sid)
    vid = await volume(first.store, "v", size=2, source=src)
    crash_at("storage.volume.after_create")
    await _crash(first)
    assert vid in _pool(first).vols and (await load(first.store, VOLUME, vid)).status.state == "creating"
    again = await agents()
    await again.pass_()
    vol = await load(first.store, VOLUME, vid)
    assert (vol.status.state, vol.status.size_gib) == ("available", 2)
    made = [c for c in _pool(first).calls if c[0] in ("create", "clone") and vid in c]
    assert len(made) == 1, made  # made once: the restarted agent found it
    if source != "blank":
        assert _pool(first).read(vid) == (b"image bytes" if source == "image" else b"snapshot bytes")
    assert await _leftovers(again) == []


async def test_crash_after_a_resize_before_it_is_recorded(agents, crash_at):
    first = await _ready(agents)
    vid = await volume(first.store)
    await first.pass_()
    await change(first.store, VOLUME, vid, size_gib=3)
    crash_at("storage.volume.after_resize")
    await _crash(first)
    assert _pool(first).vols[vid].size == 3 * GIB and (await load(first.store, VOLUME, vid)).status.size_gib == 1
    again = await agents()
    await again.pass_()
    assert (await load(first.store, VOLUME, vid)).status.size_gib == 3
    assert _calls(again, "resize") == [("resize", vid, 3 * GIB)]  # not resized twice


async def test_crash_after_a_revert_before_it_is_recorded(agents, crash_at):
    """The rollback is done again (it is idempotent: the volume is detached and nothing wrote it since), then
    recorded; a later pass does not roll back a third time."""
    first = await _ready(agents)
    vid = await volume(first.store)
    await first.pass_()
    pool = _pool(first)
    pool.write(vid, b"before")
    sid = await create(first.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node="n1"))
    await first.pass_()
    pool.write(vid, b"after")
    await change(first.store, VOLUME, vid, revert=RevertRequest(snapshot=sid, seq=1))
    crash_at("storage.volume.after_revert")
    await _crash(first)
    vol = await load(first.store, VOLUME, vid)
    assert pool.read(vid) == b"before" and (vol.status.state, vol.status.revert_seq) == ("reverting", 0)
    again = await agents()
    await again.pass_()
    vol = await load(first.store, VOLUME, vid)
    assert (vol.status.state, vol.status.revert_seq) == ("available", 1) and pool.read(vid) == b"before"
    pool.write(vid, b"later")
    await again.pass_()
    assert pool.read(vid) == b"later" and len(_calls(again, "rollback")) == 2


async def test_crash_after_a_volume_is_deleted_before_its_record_is(agents, crash_at):
    first = await _ready(agents)
    vid = await volume(first.store)
    await first.pass_()
    sid = await create(first.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node="n1"))
    await first.pass_()
    await change(first.store, SNAPSHOT, sid, deleted=True)
    await change(first.store, VOLUME, vid, deleted=True)
    crash_at("storage.volume.after_delete")
    await _crash(first)
    assert vid not in _pool(first).vols and await first.store.get(VOLUME.name, vid) is not None
    again = await agents()
    await again.pass_()
    assert await first.store.get(VOLUME.name, vid) is None and await first.store.get(SNAPSHOT.name, sid) is None
    assert await _pool(again).list() == []


async def test_a_restarted_agent_does_not_delete_a_volume_still_attached(agents):
    """A volume marked deleted while still attached waits for the compute reconciler's unplug: a restarted agent's
    first passes do not delete it under the guest."""
    first = await _ready(agents)
    vid = await volume(first.store)
    await first.pass_()
    await change(first.store, VOLUME, vid, deleted=True, attachment=Attachment(instance="i-1", device="vdb"))
    again = await agents()
    await again.pass_()
    assert vid in _pool(first).vols and await first.store.get(VOLUME.name, vid) is not None


# -- snapshots -----------------------------------------------------------------------------------------------------
async def test_crash_after_a_snapshot_is_taken_before_it_is_recorded(agents, crash_at):
    first = await _ready(agents)
    vid = await volume(first.store)
    await first.pass_()
    sid = await create(first.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node="n1"))
    crash_at("storage.snapshot.after_create")
    await _crash(first)
    assert list(_pool(first).vols[vid].snaps) == [sid]
    assert (await load(first.store, SNAPSHOT, sid)).status.state == "creating"
    again = await agents()
    await again.pass_()
    assert (await load(first.store, SNAPSHOT, sid)).status.state == "available"
    assert list(_pool(first).vols[vid].snaps) == [sid]  # one snapshot for one record


async def test_crash_after_a_snapshot_is_deleted_before_its_record_is(agents, crash_at):
    first = await _ready(agents)
    vid = await volume(first.store)
    await first.pass_()
    sid = await create(first.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node="n1"))
    await first.pass_()
    await change(first.store, SNAPSHOT, sid, deleted=True)
    crash_at("storage.snapshot.after_delete")
    await _crash(first)
    assert _pool(first).vols[vid].snaps == {} and await first.store.get(SNAPSHOT.name, sid) is not None
    again = await agents()
    await again.pass_()
    assert await first.store.get(SNAPSHOT.name, sid) is None
    assert (await load(first.store, VOLUME, vid)).status.state == "available"


# -- images --------------------------------------------------------------------------------------------------------
async def test_crash_after_an_image_is_imported_before_its_base_snapshot(agents, crash_at):
    first = await _ready(agents)
    files = first.config.data_path / "images" / "img-1"
    files.mkdir(parents=True)
    (files / "disk").write_bytes(b"image bytes")
    spec = ImageSpec(boot="disk", format="raw", size_bytes=11, sha256="x", node="n1", pool="pool-ceph", pool_driver="ceph")  # fmt: skip
    await create(first.store, IMAGE, "guest", spec, id="img-1")
    crash_at("storage.image.after_import")
    await _crash(first)
    pool = _pool(first)
    assert pool.vols["img-1"].snaps == {} and (await load(first.store, IMAGE, "img-1")).status.pool_state == "importing"
    again = await agents()
    await again.pass_()
    image = await load(first.store, IMAGE, "img-1")
    assert image.status.pool_state == "ready" and pool.vols["img-1"].snaps["base"].protected
    assert sorted(pool.vols) == ["img-1"] and pool.read("img-1") == b"image bytes"


def test_every_fault_point_of_the_reconciler_is_crashed_here():
    """A fault point added to the reconciler without a crash test here fails this test."""
    source = Path(__file__).parents[3] / "agent" / "reconcilers" / "storage.py"
    points = set(re.findall(r'faults\.point\("([^"]+)"\)', source.read_text()))
    tested = set(re.findall(r'crash_at\("([^"]+)"\)', Path(__file__).read_text()))
    assert points and points <= tested, sorted(points - tested)


async def test_a_crash_after_a_root_disk_revert_reverts_again_and_then_records_it(agents, crash_at):
    """Rolled back, not recorded: the restarted agent rolls back once more (the instance is still stopped: the same
    content) and records it; later passes do nothing."""
    from minicloud.compute.kinds import INSTANCE, InstanceObserved, InstanceSpec

    first = await _ready(agents)
    spec = InstanceSpec(uuid="u-1", image_id="img-x", image_name="x", type="t", vcpus=1, memory_mib=64, disk_gib=1,
                        node="n1", pool="pool-ceph", pool_driver="ceph", power="stopped")  # fmt: skip
    iid = await create(first.store, INSTANCE, "web", spec, status=InstanceObserved(state="stopped"))
    pool = _pool(first)
    root = f"{iid}-root"
    await pool.create(root, GIB)
    pool.write(root, b"before")
    sid = await create(first.store, SNAPSHOT, "s", SnapshotSpec(volume="", instance=iid, pool="pool-ceph", node="n1"))
    await first.pass_()
    pool.write(root, b"after")
    await change(first.store, SNAPSHOT, sid, revert_seq=1)
    crash_at("storage.snapshot.after_root_revert")
    await _crash(first)
    assert pool.read(root) == b"before"
    assert (await load(first.store, SNAPSHOT, sid)).status.revert_seq == 0
    again = await agents()
    await again.pass_()
    assert pool.read(root) == b"before" and (await load(again.store, SNAPSHOT, sid)).status.revert_seq == 1
    rollbacks = len(_calls(again, "rollback"))
    await again.pass_()
    assert len(_calls(again, "rollback")) == rollbacks == 2


async def test_a_crash_after_a_flatten_before_it_is_recorded_records_it_once(agents, crash_at):
    """Flattened, not recorded (the snapshot still lists the clone): the restarted agent flattens again — a volume
    without a parent is done already — and releases the snapshot; later passes do nothing."""
    first = await _ready(agents)
    vid = await volume(first.store)
    await first.pass_()
    sid = await create(first.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node="n1"))
    await first.pass_()
    cid = await volume(first.store, "clone", source=VolumeSource(type="snapshot", id=sid))
    await change(first.store, SNAPSHOT, sid, clones=[cid])
    await first.pass_()
    await change(first.store, VOLUME, cid, flatten=True)
    crash_at("storage.volume.after_flatten")
    await _crash(first)
    assert _pool(first).vols[cid].parent is None
    assert (await load(first.store, SNAPSHOT, sid)).spec.clones == [cid]
    assert not (await load(first.store, VOLUME, cid)).status.flattened
    again = await agents()
    await again.pass_(rounds=3)
    assert (await load(first.store, VOLUME, cid)).status.flattened
    assert (await load(first.store, SNAPSHOT, sid)).spec.clones == []
    assert len(_calls(again, "flatten")) == 2
