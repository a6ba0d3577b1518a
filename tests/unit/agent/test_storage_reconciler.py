"""The storage reconciler against a fake Ceph engine and the fake volume driver, with a real SQLite store.

Tests drive whole passes by hand (every key the reconciler lists, one after the other: ``world.pass_()``) so the
steps are deterministic; one runs it under the framework's controller. The real engine and drivers are exercised by
tests/integration/test_storage_node.py."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import msgspec
import pytest

from agent.reconcile import Controller
from agent.reconcilers.storage import CLIENT, ENGINE_KEY, FENCE_GRACE, NODE_KEY, StorageReconciler
from agent.storage.ceph import CephError, CephKeys
from agent.storage.ceph_status import CephStatus, MonInfo, OsdInfo
from agent.storage.driver import FakeVolumeDriver
from agent.storage.node import NodeStorage
from minicloud import config as cfgmod
from minicloud.cluster.kinds import NODE, NodeSpec, NodeStatus
from minicloud.compute.kinds import IMAGE, ImageSpec, ImageStatus
from minicloud.iam.keystore import KeyStore
from minicloud.state import Create, Delete, Txn, Update
from minicloud.state.sqlite import SQLiteStore
from minicloud.storage.kinds import (
    CEPH,
    CEPH_NAME,
    GIB,
    POOL,
    SNAPSHOT,
    STORAGE_DISK,
    VOLUME,
    Attachment,
    CephSpec,
    PoolSpec,
    RevertRequest,
    SnapshotSpec,
    StorageDiskSpec,
    VolumeSource,
    VolumeSpec,
)

ME = "n1"


# -- a fake engine with CephEngine's interface (unit tests only) -------------------------------------------------------
class FakeEngine:
    """The state of one node's part of a pretend cluster; ``cluster`` (a dict shared by the engines of one test)
    holds what the cluster knows: OSDs, pools, blocklist, auth."""

    def __init__(
        self, cluster: dict, *, root: Path, fsid: str, node: str, address: str, mon_hosts: dict, zone: str = ""
    ) -> None:
        self.cluster = cluster
        self.settings = type("S", (), {"mon_hosts": dict(mon_hosts), "mon_port": 3300, "address": address,
                                       "zone": zone})()  # fmt: skip
        self.root, self.fsid, self.node = Path(root), fsid, node
        self.conf_path = self.root / "ceph.conf"
        self.admin_keyring = self.root / "client.admin.keyring"
        self.bootstrap_osd_keyring = self.root / "client.bootstrap-osd.keyring"
        self.running: set[str] = set()
        self.calls: list[tuple] = []
        self.fail: set[str] = set()

    def mon_dir(self) -> Path:
        return self.root / "mon" / f"ceph-{self.node}"

    def _osd_dirs(self) -> Path:
        return self.root / "osd"

    def daemons(self):
        out = []
        if self.mon_dir().exists():
            out.append(type("D", (), {"type": "mon", "id": self.node})())
        d = self._osd_dirs()
        if d.is_dir():
            out += [type("D", (), {"type": "osd", "id": p.name})() for p in sorted(d.iterdir()) if p.name.isdigit()]
        return out

    def _check(self, name: str) -> None:
        self.calls.append((name,))
        if name in self.fail:
            raise CephError(f"fake {name} failure")

    async def bootstrap(self) -> CephKeys:
        self._check("bootstrap")
        if self.mon_dir().exists():
            raise CephError("exists")
        self.mon_dir().mkdir(parents=True)
        keys = CephKeys(mon="bW9u", admin="YWRtaW4=", bootstrap_osd="b3Nk")
        (self.mon_dir() / "keyring").write_text(f"[mon.]\n\tkey = {keys.mon}\n")
        await self.install_keys(keys)
        self.cluster["bootstrapped"] = self.cluster.get("bootstrapped", 0) + 1
        self.cluster.setdefault("monmap", {})[self.node] = True
        self.running.add("mon")
        return keys

    def has_mon(self) -> bool:
        return self.mon_dir().exists()

    def mon_running(self) -> bool:
        return f"mon.{self.node}" in self.running or "mon" in self.running

    async def mon_names(self) -> list[str]:
        return list(self.cluster.get("monmap", {}))

    async def mon_bound_address(self) -> str | None:
        if not self.mon_running():
            return None
        return self.cluster.setdefault("mon_addr", {}).setdefault(self.node, self.settings.address)

    async def readdress_mon(self) -> bool:
        self._check("readdress_mon")
        if await self.mon_bound_address() in (None, self.settings.address):
            return False
        self.cluster["mon_addr"][self.node] = self.settings.address
        self.cluster["mon_moves"] = self.cluster.get("mon_moves", 0) + 1
        return True

    async def add_mon(self, keys: CephKeys) -> None:
        self._check("add_mon")
        assert keys.mon == "bW9u"  # the shared mon. key, unsealed from the record
        self.mon_dir().mkdir(parents=True, exist_ok=True)
        self.cluster.setdefault("monmap", {})[self.node] = True
        self.running.add(f"mon.{self.node}")

    async def remove_mon(self, name: str) -> None:
        self._check("remove_mon")
        self.cluster.get("monmap", {}).pop(name, None)
        if name == self.node:
            shutil.rmtree(self.mon_dir(), ignore_errors=True)
            self.running.discard(f"mon.{name}")

    async def install_keys(self, keys: CephKeys) -> None:
        self._check("install_keys")
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(f"fsid = {self.fsid}\n")
        self.admin_keyring.write_text(f"[client.admin]\n\tkey = {keys.admin}\n")
        self.bootstrap_osd_keyring.write_text(f"[client.bootstrap-osd]\n\tkey = {keys.bootstrap_osd}\n")

    async def ensure_running(self) -> list[str]:
        self._check("ensure_running")
        want = {f"{d.type}.{d.id}" for d in self.daemons()}
        started = sorted(want - self.running)
        self.running |= want
        return started

    async def ceph(self, *args: str, entity: str = "client.admin", timeout=None):
        self._check("ceph")
        self.calls.append(("ceph", *args))
        if args[:2] == ("auth", "get-or-create-key"):
            auth = self.cluster.setdefault("auth", {})
            auth.setdefault(args[2], "Y2xpZW50LWtleQ==")
            return {"key": auth[args[2]]}
        return None

    async def add_osd_file(self, size_bytes: int) -> int:
        self._check("add_osd")
        osd_id = self.cluster.setdefault("next_osd", 0)
        self.cluster["next_osd"] += 1
        (self._osd_dirs() / str(osd_id)).mkdir(parents=True)
        self.cluster.setdefault("osds", {})[osd_id] = OsdInfo(id=osd_id, node=self.node, up=True, in_=True)
        self.running.add(f"osd.{osd_id}")
        return osd_id

    async def add_osd_device(self, path: str) -> int:
        return await self.add_osd_file(0)

    async def remove_osd(self, osd_id: int) -> None:
        self._check("remove_osd")
        self.cluster.get("osds", {}).pop(osd_id, None)
        d = self._osd_dirs() / str(osd_id)
        if d.exists():
            d.rmdir()

    async def ensure_pool(self, name: str, **_) -> None:
        self._check("ensure_pool")
        self.cluster.setdefault("pools", set()).add(name)

    async def set_replicas(self, size: int) -> None:
        self._check("set_replicas")
        self.cluster["replicas"] = size

    async def status(self):
        self._check("status")
        osds = list(self.cluster.get("osds", {}).values())
        mons = [MonInfo(name=n, address="", in_quorum=up) for n, up in self.cluster.get("monmap", {}).items()]
        ready = bool(osds) and all(o.up for o in osds) and all(m.in_quorum for m in mons)
        return CephStatus(health="HEALTH_OK", summary="fake", ready=ready, osds=osds, mons=mons)

    async def blocklist_add(self, addr: str, **_) -> None:
        self._check("blocklist_add")
        self.cluster.setdefault("blocklist", []).append(addr)


# -- the world -----------------------------------------------------------------------------------------------------------
def _config(tmp_path: Path, node: str = ME):
    f = tmp_path / "minicloud.toml"
    f.write_text('[compute]\ndriver = "fake"\n')
    return cfgmod.load(f, env={}, overrides={"agent.data_dir": str(tmp_path / node), "agent.node_name": node})


class World:
    def __init__(self, tmp_path: Path, store, cluster: dict, node: str = ME) -> None:
        self.config = _config(tmp_path, node)
        self.config.data_path.mkdir(parents=True, exist_ok=True)
        self.store, self.cluster = store, cluster
        self.storage = NodeStorage()
        self.engines: list[FakeEngine] = []
        self.drivers: dict[str, FakeVolumeDriver] = cluster.setdefault("drivers", {})
        self.enqueued: list[str] = []
        self.keystore = cluster.setdefault("keystore", KeyStore(tmp_path / "keys"))
        self.r = StorageReconciler(
            store=store,
            config=self.config,
            storage=self.storage,
            keystore=self.keystore,
            engine_factory=self._engine,
            driver_factory=self._driver,
        )

    def _engine(self, **settings) -> FakeEngine:
        engine = FakeEngine(self.cluster, **settings)
        self.engines.append(engine)
        return engine

    def _driver(self, driver: str, **settings) -> FakeVolumeDriver:
        # one fake per pool: a ceph pool is shared by every node, a local one is per node
        key = settings.get("pool") or str(settings.get("root"))
        fake = self.drivers.setdefault(key, FakeVolumeDriver(driver))
        fake.name = driver
        return fake

    @property
    def engine(self) -> FakeEngine:
        return self.engines[-1]

    async def pass_(self, rounds: int = 2) -> None:
        """Reconcile every key the reconciler lists, one after the other, ``rounds`` times (and what it queued)."""
        for _ in range(rounds):
            for key in await self.r.all_keys():
                await self.r.reconcile(key)
            await asyncio.sleep(0)  # let the engine-ready task queue its keys
            queued, self.enqueued[:] = list(dict.fromkeys(self.enqueued)), []
            for key in queued:
                await self.r.reconcile(key)


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def world(tmp_path, store):
    w = World(tmp_path, store, {})
    await w.r.start(w.enqueued.append)
    yield w
    await w.r.close()


async def create(store, kind, name: str, spec, *, project: str = "p1", id: str | None = None, status=None):
    obj = kind.new(project=project, name=name, spec=spec, id=id, status=status)
    await store.commit(Txn([Create(kind.dump(obj))]))
    return obj.id


async def load(store, kind, id_: str):
    record = await store.get(kind.name, id_)
    return kind.load(record) if record is not None else None


async def change(store, kind, id_: str, **spec_changes) -> None:
    record = await store.get(kind.name, id_)
    obj = kind.load(record)
    new = obj.replace(spec=msgspec.structs.replace(obj.spec, **spec_changes))
    await store.commit(Txn([Update(kind.dump(new), expect_revision=record.revision)]))


async def enable(store, *, node: str = ME, disk: bool = True) -> None:
    await create(store, CEPH, CEPH_NAME, CephSpec(fsid="f-1", bootstrap_node=node, mons={node: "127.0.0.1"}, pools=["minicloud"]))  # fmt: skip
    await create(store, POOL, "ceph", PoolSpec(driver="ceph", ceph_pool="minicloud", default=True), id="pool-ceph")
    await create(store, POOL, "local", PoolSpec(driver="local"), id="pool-local")
    if disk:
        await create(store, STORAGE_DISK, f"{node}-file", StorageDiskSpec(node=node, source="file", size_bytes=GIB), id="sd-1")  # fmt: skip


async def volume(store, name="v1", *, pool="pool-ceph", size=1, source=None, node=ME, **more) -> str:
    spec = VolumeSpec(size_gib=size, pool=pool, node=node, source=source or VolumeSource(), **more)
    return await create(store, VOLUME, name, spec)


# -- the engine --------------------------------------------------------------------------------------------------------
async def test_bootstrap_seals_the_keys_into_the_record_and_the_cluster_becomes_ready(world):
    await enable(world.store)
    await world.pass_()
    ceph = CEPH.load(await world.store.get_by_name(CEPH.name, "", CEPH_NAME))
    assert set(ceph.spec.keys) == {"mon.", "client.admin", "client.bootstrap-osd", CLIENT}
    assert all(v.startswith("v1.") for v in ceph.spec.keys.values())  # sealed, not the keys themselves
    assert world.keystore.decrypt(ceph.spec.keys["client.admin"], b"client.admin") == b"YWRtaW4="
    assert world.cluster["bootstrapped"] == 1 and world.cluster["pools"] == {"minicloud"}
    assert ("ceph", "auth", "get-or-create-key", CLIENT, "mon", "profile rbd", "osd", "profile rbd pool=minicloud", "mgr", "profile rbd") in world.engine.calls  # fmt: skip
    secret = world.storage.ceph_secret()
    assert secret is not None and secret.key == b"client-key" and secret.user == "minicloud"
    assert world.storage.driver("pool-ceph") is not None and world.storage.driver("pool-local") is not None
    disk = await load(world.store, STORAGE_DISK, "sd-1")
    assert (disk.status.osd_id, disk.status.state) == (0, "up")
    assert ceph.status.state == "ready" and [o.id for o in ceph.status.osds] == [0]
    assert ceph.spec.replicas == 1 and world.cluster["replicas"] == 1


async def test_a_second_node_installs_the_keys_from_the_record_and_never_bootstraps(tmp_path, world):
    await enable(world.store)
    await world.pass_()
    other = World(tmp_path, world.store, world.cluster, node="n2")
    await other.r.start(other.enqueued.append)
    await other.pass_()
    assert world.cluster["bootstrapped"] == 1
    assert ("install_keys",) in other.engine.calls and ("bootstrap",) not in other.engine.calls
    assert other.storage.ceph_secret() == world.storage.ceph_secret()
    assert other.storage.driver("pool-ceph") is not None
    assert ("status",) not in other.engine.calls  # n1 leads while it is online
    ceph = await world.store.get_by_name(CEPH.name, "", CEPH_NAME)
    await change(world.store, CEPH, ceph.id, mons={ME: "127.0.0.1", "n2": "127.0.0.2"})
    await create(world.store, NODE, ME, NodeSpec(address="10.0.0.1"), status=NodeStatus(state="offline"))
    await other.pass_(rounds=1)
    assert ("status",) in other.engine.calls  # n1 is lost: n2, the next MON node, writes the status
    await other.r.close()


async def test_a_node_named_in_the_records_mons_becomes_a_mon_and_stops_being_one_when_it_is_no_longer(tmp_path, world):
    await enable(world.store)
    await world.pass_()
    other = World(tmp_path, world.store, world.cluster, node="n2")
    await other.r.start(other.enqueued.append)
    await other.pass_()
    assert ("add_mon",) not in other.engine.calls and not other.engine.has_mon()
    ceph = await world.store.get_by_name(CEPH.name, "", CEPH_NAME)
    await change(world.store, CEPH, ceph.id, mons={ME: "127.0.0.1", "n2": "127.0.0.2"})
    await other.pass_(rounds=1)
    assert other.engine.has_mon() and set(world.cluster["monmap"]) == {ME, "n2"}
    # every node's ceph.conf names the record's MONs (the engine is made again with them)
    assert other.engine.settings.mon_hosts == {ME: "127.0.0.1", "n2": "127.0.0.2"}
    await other.pass_(rounds=1)
    assert other.engine.calls.count(("add_mon",)) == 1  # once
    ceph = await world.store.get_by_name(CEPH.name, "", CEPH_NAME)
    await change(world.store, CEPH, ceph.id, mons={ME: "127.0.0.1"})
    await other.pass_(rounds=1)
    assert not other.engine.has_mon() and set(world.cluster["monmap"]) == {ME}
    await other.r.close()


async def test_a_lone_mon_on_loopback_moves_to_the_address_the_record_gives_it_once(world):
    """Storage enabled before ``cluster enable``: the MON is on 127.0.0.1; the services leader moves the record's
    MON to the node's cluster address and the node re-addresses its MON (once: then it is where the record says)."""
    await enable(world.store)
    await world.pass_()
    assert world.cluster["mon_addr"] == {ME: "127.0.0.1"}
    assert "mon_moves" not in world.cluster  # already where the record says
    looked = world.engine.calls.count(("readdress_mon",))
    await world.pass_()
    assert world.engine.calls.count(("readdress_mon",)) == looked  # found in place: not looked at again
    ceph = await world.store.get_by_name(CEPH.name, "", CEPH_NAME)
    await change(world.store, CEPH, ceph.id, mons={ME: "10.0.0.1"})
    await world.pass_()
    assert world.cluster["mon_addr"] == {ME: "10.0.0.1"}
    assert world.engine.settings.address == "10.0.0.1" and world.engine.settings.mon_hosts == {ME: "10.0.0.1"}
    assert world.cluster["mon_moves"] == 1
    looked = world.engine.calls.count(("readdress_mon",))
    await world.pass_()
    assert world.cluster["mon_moves"] == 1 and world.engine.calls.count(("readdress_mon",)) == looked


async def test_the_leading_node_takes_out_the_mon_of_a_lost_node_the_record_no_longer_names(world):
    await enable(world.store)
    for name in (ME, "n2"):
        await create(world.store, NODE, name, NodeSpec(address="10.0.0.1"), status=NodeStatus(state="online"))
    await world.pass_()
    # n2's MON joined (in quorum) and the record this pass read does not name it yet: it stays
    world.cluster["monmap"]["n2"] = True
    await world.pass_(rounds=1)
    assert set(world.cluster["monmap"]) == {ME, "n2"} and ("remove_mon",) not in world.engine.calls
    # n3 left the cluster (no node record) and its MON is out of quorum: the leading node takes it out
    world.cluster["monmap"]["n3"] = False
    await world.pass_(rounds=1)
    assert set(world.cluster["monmap"]) == {ME, "n2"} and ("remove_mon",) in world.engine.calls


async def test_replicas_follow_the_hosts_holding_data_and_a_lost_node_is_explained(world):
    await enable(world.store)
    for name, state in ((ME, "online"), ("n2", "online"), ("n3", "offline")):
        await create(world.store, NODE, name, NodeSpec(address=f"10.0.0.{name[1]}"), status=NodeStatus(state=state))
    await world.pass_()
    osds = world.cluster["osds"]
    osds[1] = OsdInfo(id=1, node="n2", up=True, in_=True)
    osds[2] = OsdInfo(id=2, node="n3", up=True, in_=True)
    world.cluster["monmap"].update({"n2": True, "n3": True})
    ceph = await world.store.get_by_name(CEPH.name, "", CEPH_NAME)
    await change(world.store, CEPH, ceph.id, mons={ME: "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"})
    await world.pass_(rounds=1)
    assert world.cluster["replicas"] == 3
    # n3 is lost: its OSD is down but still in (for the down-out interval), its MON out of quorum
    osds[2] = OsdInfo(id=2, node="n3", up=False, in_=True)
    world.cluster["monmap"]["n3"] = False
    await world.pass_(rounds=1)
    ceph = CEPH.load(await world.store.get_by_name(CEPH.name, "", CEPH_NAME))
    assert world.cluster["replicas"] == 3 and ceph.status.state == "error"
    assert ceph.status.summary.startswith(
        "Node n3 is lost (offline): its monitor is out of quorum (2 of 3 monitors keep the quorum); osd.2 is down; "
        "Ceph marks it out 60 s after it went down"
    )
    # marked out: two hosts hold the data, two copies
    osds[2] = OsdInfo(id=2, node="n3", up=False, in_=False)
    await world.pass_(rounds=1)
    assert world.cluster["replicas"] == 2


async def test_a_restarted_agent_adopts_the_cluster_and_restarts_a_dead_daemon(tmp_path, world):
    await enable(world.store)
    await world.pass_()
    again = World(tmp_path, world.store, world.cluster)
    await again.r.start(again.enqueued.append)
    await again.pass_()
    assert world.cluster["bootstrapped"] == 1
    assert ("install_keys",) in again.engine.calls and ("bootstrap",) not in again.engine.calls
    # the new engine object found nothing running: supervision started this node's daemons
    assert again.engine.running == {"mon." + ME, "osd.0"}
    disk = await load(world.store, STORAGE_DISK, "sd-1")
    assert disk.status.osd_id == 0 and world.cluster["next_osd"] == 1  # no second OSD for the disk
    await again.r.close()


async def test_a_crash_between_bootstrap_and_recording_the_keys_recovers_them_from_the_node(tmp_path, world):
    await enable(world.store, disk=False)
    world.keystore.encrypt = _crash_once(world.keystore.encrypt)  # the agent dies before the keys are sealed
    with pytest.raises(_Crash):
        await world.r.reconcile(ENGINE_KEY)
    assert not CEPH.load(await world.store.get_by_name(CEPH.name, "", CEPH_NAME)).spec.keys
    again = World(tmp_path, world.store, world.cluster)
    await again.r.start(again.enqueued.append)
    await again.pass_()
    ceph = CEPH.load(await world.store.get_by_name(CEPH.name, "", CEPH_NAME))
    assert world.cluster["bootstrapped"] == 1  # the MON made before the crash is the cluster
    assert world.keystore.decrypt(ceph.spec.keys["mon."], b"mon.") == b"bW9u"
    await again.r.close()


class _Crash(BaseException):  # like SIGKILL: no handler of ours runs
    pass


def _crash_once(fn):
    state = {"crashed": False}

    def wrapped(*args, **kwargs):
        if not state["crashed"]:
            state["crashed"] = True
            raise _Crash()
        return fn(*args, **kwargs)

    return wrapped


# -- disks ---------------------------------------------------------------------------------------------------------------
async def test_a_disk_whose_osd_was_made_but_not_recorded_is_found_again(tmp_path, world):
    await enable(world.store)
    world.r._set_status = _fail_for(world.r._set_status, STORAGE_DISK, "osd_id")  # dies before recording the id
    await world.r.reconcile(ENGINE_KEY)
    with pytest.raises(_Crash):
        await world.r.reconcile("sd-1")
    (world.r.intents_dir / "sd-1.json").write_text('{"before": []}')  # as if it died before writing the id too
    again = World(tmp_path, world.store, world.cluster)
    await again.r.start(again.enqueued.append)
    await again.pass_()
    disk = await load(world.store, STORAGE_DISK, "sd-1")
    assert (disk.status.osd_id, disk.status.state) == (0, "up")
    assert list(world.cluster["osds"]) == [0]  # one OSD for one disk
    await again.r.close()


def _fail_for(fn, kind, field):
    async def wrapped(k, id_, **fields):
        if k is kind and field in fields:
            raise _Crash()
        return await fn(k, id_, **fields)

    return wrapped


async def test_removing_a_disk_drains_its_osd_then_deletes_the_record(world):
    await enable(world.store)
    await world.pass_()
    await change(world.store, STORAGE_DISK, "sd-1", remove=True)
    await world.pass_()
    assert await world.store.get(STORAGE_DISK.name, "sd-1") is None
    assert ("remove_osd",) in world.engine.calls and world.cluster["osds"] == {}
    assert not (world.r.intents_dir / "sd-1.json").exists()


async def test_a_failing_osd_creation_is_the_disks_error(world):
    await enable(world.store)
    await world.r.reconcile(ENGINE_KEY)
    world.engine.fail.add("add_osd")
    await world.r.reconcile("sd-1")
    disk = await load(world.store, STORAGE_DISK, "sd-1")
    assert disk.status.state == "error" and "fake add_osd failure" in disk.status.reason
    world.engine.fail.clear()
    await world.r.reconcile("sd-1")
    assert (await load(world.store, STORAGE_DISK, "sd-1")).status.state == "up"


# -- volumes -------------------------------------------------------------------------------------------------------------
@pytest.fixture
async def ready(world):
    await enable(world.store)
    await world.pass_()
    return world


def _pool(world, name="minicloud") -> FakeVolumeDriver:
    return world.drivers[name]


async def test_a_blank_volume_is_created_and_becomes_available(ready):
    vid = await volume(ready.store, size=2)
    await ready.pass_()
    vol = await load(ready.store, VOLUME, vid)
    assert (vol.status.state, vol.status.size_gib, vol.status.reason) == ("available", 2, "")
    assert _pool(ready).vols[vid].size == 2 * GIB


async def test_a_volume_waits_for_its_pool_and_is_made_once_it_is_usable(world):
    vid = await volume(world.store)
    await world.r.reconcile(vid)  # no pool driver yet: nothing happens, the key waits
    assert (await load(world.store, VOLUME, vid)).status.state == "creating"
    await enable(world.store)
    await world.pass_()
    assert (await load(world.store, VOLUME, vid)).status.state == "available"


async def test_volumes_from_an_image_and_from_a_snapshot_are_clones(ready):
    spec = ImageSpec(boot="disk", format="raw", size_bytes=4, sha256="x", node=ME, pool="pool-ceph", pool_driver="ceph")  # fmt: skip
    files = ready.config.data_path / "images" / "img-1"
    files.mkdir(parents=True)
    (files / "disk").write_bytes(b"data")
    await create(ready.store, IMAGE, "guest", spec, id="img-1")
    from_image = await volume(ready.store, "from-image", source=VolumeSource(type="image", id="img-1"))
    await ready.pass_(rounds=3)
    pool = _pool(ready)
    image = await load(ready.store, IMAGE, "img-1")
    assert image.status.pool_state == "ready" and pool.vols["img-1"].snaps["base"].protected
    assert pool.vols[from_image].parent == ("img-1", "base") and pool.read(from_image) == b"data"
    assert (await load(ready.store, VOLUME, from_image)).status.state == "available"
    sid = await create(ready.store, SNAPSHOT, "s1", SnapshotSpec(volume=from_image, pool="pool-ceph", node=ME))
    await ready.pass_()
    assert (await load(ready.store, SNAPSHOT, sid)).status.state == "available"
    from_snap = await volume(ready.store, "from-snap", size=2, source=VolumeSource(type="snapshot", id=sid))
    await ready.pass_()
    assert pool.vols[from_snap].parent == (from_image, sid) and pool.vols[from_snap].size == 2 * GIB


async def test_a_volume_from_an_image_not_in_its_pool_is_an_error(ready):
    spec = ImageSpec(boot="disk", format="raw", size_bytes=4, sha256="x", node=ME, pool="pool-local", pool_driver="local")  # fmt: skip
    await create(ready.store, IMAGE, "guest", spec, id="img-2", status=ImageStatus(pool_state="ready"))
    vid = await volume(ready.store, source=VolumeSource(type="image", id="img-2", name="guest"))
    await ready.pass_()
    vol = await load(ready.store, VOLUME, vid)
    assert vol.status.state == "error" and "not in pool" in vol.status.reason


async def test_growing_a_volume_resizes_it_and_reports_the_size(ready):
    vid = await volume(ready.store)
    await ready.pass_()
    await change(ready.store, VOLUME, vid, size_gib=3)
    await ready.pass_()
    vol = await load(ready.store, VOLUME, vid)
    assert (vol.status.size_gib, vol.status.state) == (3, "available")
    assert _pool(ready).vols[vid].size == 3 * GIB


async def test_an_attached_volume_grows_without_its_attachment_state_being_touched(ready):
    vid = await volume(ready.store)
    await ready.pass_()
    att = Attachment(instance="i-1", node=ME, device="vdb")
    await change(ready.store, VOLUME, vid, attachment=att)
    await ready.r._set_status(VOLUME, vid, state="in-use", device="vdb")
    await change(ready.store, VOLUME, vid, size_gib=2)
    await ready.pass_()
    vol = await load(ready.store, VOLUME, vid)
    assert (vol.status.size_gib, vol.status.state) == (2, "in-use")


async def test_revert_rolls_back_once_per_request_and_only_when_detached(ready):
    vid = await volume(ready.store)
    await ready.pass_()
    pool = _pool(ready)
    pool.write(vid, b"before")
    sid = await create(ready.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node=ME))
    await ready.pass_()
    pool.write(vid, b"after")
    await change(ready.store, VOLUME, vid, revert=RevertRequest(snapshot=sid, seq=1), attachment=Attachment(instance="i-1", device="vdb"))  # fmt: skip
    await ready.pass_()
    assert pool.read(vid) == b"after" and (await load(ready.store, VOLUME, vid)).status.revert_seq == 0
    await change(ready.store, VOLUME, vid, attachment=None)
    await ready.pass_()
    vol = await load(ready.store, VOLUME, vid)
    assert pool.read(vid) == b"before" and (vol.status.revert_seq, vol.status.state) == (1, "available")
    pool.write(vid, b"later")
    await ready.pass_()
    assert pool.read(vid) == b"later"  # done once per seq


async def test_deleting_a_volume_removes_its_data_and_snapshots_then_the_records(ready):
    vid = await volume(ready.store)
    await ready.pass_()
    sid = await create(ready.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node=ME))
    await ready.pass_()
    await change(ready.store, SNAPSHOT, sid, deleted=True)
    await change(ready.store, VOLUME, vid, deleted=True)
    await ready.pass_()
    assert vid not in _pool(ready).vols
    assert await ready.store.get(VOLUME.name, vid) is None and await ready.store.get(SNAPSHOT.name, sid) is None


async def test_a_volume_whose_snapshot_has_clones_is_not_deleted_and_says_why(ready):
    vid = await volume(ready.store)
    await ready.pass_()
    sid = await create(ready.store, SNAPSHOT, "s1", SnapshotSpec(volume=vid, pool="pool-ceph", node=ME))
    await ready.pass_()
    clone = await volume(ready.store, "clone", source=VolumeSource(type="snapshot", id=sid))
    await ready.pass_()
    await change(ready.store, VOLUME, vid, deleted=True)
    await change(ready.store, SNAPSHOT, sid, deleted=True)
    await ready.pass_()
    vol, snap = await load(ready.store, VOLUME, vid), await load(ready.store, SNAPSHOT, sid)
    assert vol.status.state == "error" and clone in vol.status.reason
    assert snap.status.state == "error" and clone in snap.status.reason
    await change(ready.store, VOLUME, clone, deleted=True)
    await ready.pass_()
    assert await ready.store.get(VOLUME.name, vid) is None and await ready.store.get(SNAPSHOT.name, sid) is None


async def test_a_crash_between_two_steps_converges(ready):
    """After the data is made but before the status says so, and after it is removed but before the record is:
    the next pass finishes the job without a second create."""
    vid = await volume(ready.store)
    ready.r._set_status = _fail_for(ready.r._set_status, VOLUME, "size_gib")
    with pytest.raises(_Crash):
        await ready.r.reconcile(vid)
    assert vid in _pool(ready).vols
    del ready.r._set_status
    await ready.pass_()
    assert (await load(ready.store, VOLUME, vid)).status.state == "available"
    assert [c for c in _pool(ready).calls if c[0] == "create"] == [("create", vid, GIB)]
    await change(ready.store, VOLUME, vid, deleted=True)
    ready.r._delete_record = _raise_crash
    with pytest.raises(_Crash):
        await ready.r.reconcile(vid)
    del ready.r._delete_record
    await ready.pass_()
    assert await ready.store.get(VOLUME.name, vid) is None


async def _raise_crash(*args, **kwargs):
    raise _Crash()


async def test_a_driver_failure_is_the_volumes_error_and_is_retried(ready):
    _pool(ready).fail_next.add("create")
    vid = await volume(ready.store)
    await ready.r.reconcile(vid)
    vol = await load(ready.store, VOLUME, vid)
    assert vol.status.state == "error" and "fake create failure" in vol.status.reason
    await ready.r.reconcile(vid)
    assert (await load(ready.store, VOLUME, vid)).status.state == "available"


# -- fencing -------------------------------------------------------------------------------------------------------------
async def test_a_volume_moved_from_a_lost_node_blocklists_it_before_anything_else(ready):
    await create(ready.store, NODE, "n2", NodeSpec(address="10.0.0.2:8443"), status=NodeStatus(state="offline"))
    vid = await volume(ready.store, previous_node="n2", node=ME)
    await ready.pass_()
    assert ready.cluster["blocklist"] == ["10.0.0.2"]
    calls = [c[0] for c in _pool(ready).calls]
    assert calls and calls[0] == "create"  # made after the fence
    vol = await load(ready.store, VOLUME, vid)
    assert vol.spec.previous_node == "" and vol.status.state == "available"


async def test_a_volume_moved_from_a_live_node_is_not_fenced(ready):
    await create(ready.store, NODE, "n2", NodeSpec(address="10.0.0.2"), status=NodeStatus(state="online"))
    vid = await volume(ready.store, previous_node="n2")
    await ready.pass_()
    assert "blocklist" not in ready.cluster
    assert (await load(ready.store, VOLUME, vid)).spec.previous_node == ""


async def test_a_node_offline_for_a_moment_is_not_fenced_and_one_offline_past_the_grace_is(ready):
    """A missed heartbeat under load marks a node offline after 5 s: fencing it then would cut its guests' disks."""
    import datetime as dt

    def ago(seconds: float) -> str:
        return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    blip = NodeStatus(state="offline", last_contact=ago(5))
    await create(ready.store, NODE, "n2", NodeSpec(address="10.0.0.2"), status=blip)
    vid = await volume(ready.store, previous_node="n2")
    assert (await ready.r.reconcile(vid)).requeue_after  # looked at again, nothing done yet
    assert "blocklist" not in ready.cluster and (await load(ready.store, VOLUME, vid)).spec.previous_node == "n2"
    record = await ready.store.get_by_name(NODE.name, "", "n2")  # back within the grace: never fenced
    await ready.store.commit(Txn([Update(NODE.dump(NODE.load(record).replace(status=NodeStatus(state="online"))),
                                         expect_revision=record.revision)]))  # fmt: skip
    await ready.pass_()
    assert "blocklist" not in ready.cluster and (await load(ready.store, VOLUME, vid)).status.state == "available"
    # offline for longer than the grace: fenced before the volume is touched
    gone = NodeStatus(state="offline", last_contact=ago(FENCE_GRACE + 1))
    await create(ready.store, NODE, "n3", NodeSpec(address="10.0.0.3"), status=gone)
    other = await volume(ready.store, "v2", previous_node="n3")
    await ready.pass_()
    assert ready.cluster["blocklist"] == ["10.0.0.3"]
    assert (await load(ready.store, VOLUME, other)).spec.previous_node == ""


async def test_a_lost_node_that_cannot_be_fenced_blocks_the_volume(ready):
    await create(ready.store, NODE, "n2", NodeSpec(address="127.0.0.1"), status=NodeStatus(state="offline"))
    vid = await volume(ready.store, previous_node="n2")
    await ready.pass_()
    vol = await load(ready.store, VOLUME, vid)
    assert vol.status.state == "error" and "cannot be fenced" in vol.status.reason
    assert vid not in _pool(ready).vols


# -- local pools, images, sweep ------------------------------------------------------------------------------------------
async def test_local_pool_volumes_without_ceph(world):
    await create(world.store, POOL, "local", PoolSpec(driver="local"), id="pool-local")
    vid = await volume(world.store, pool="pool-local")
    await world.pass_()
    assert (await load(world.store, VOLUME, vid)).status.state == "available"
    assert world.storage.driver("pool-ceph") is None and world.storage.ceph_secret() is None
    assert vid in world.drivers[str(world.config.data_path / "storage" / "pool-local")].vols


async def test_an_image_with_a_missing_file_is_an_error_not_a_loop(ready):
    spec = ImageSpec(boot="disk", format="raw", size_bytes=4, sha256="x", node=ME, pool="pool-ceph")
    await create(ready.store, IMAGE, "gone", spec, id="img-9")
    await ready.pass_()
    image = await load(ready.store, IMAGE, "img-9")
    assert image.status.pool_state == "error" and "missing" in image.status.reason


async def test_the_sweep_removes_pool_data_no_record_names(ready):
    pool = _pool(ready)
    await pool.create("vol-orphan", GIB)
    await pool.import_file(Path(__file__), "img-orphan")
    await pool.create("i-1-root", GIB)  # an instance's root disk: the compute reconciler's
    keep = await volume(ready.store)
    await ready.pass_()
    await ready.r.reconcile(NODE_KEY)
    assert sorted(pool.vols) == sorted(["i-1-root", keep])


# -- under the controller ------------------------------------------------------------------------------------------------
async def test_under_the_controller_a_volume_goes_from_creating_to_available(world):
    controller = Controller(world.store, world.r, workers=2, resync_interval=3600)
    world.r._enqueue = controller.enqueue
    # start() calls r.start again (a second listener is harmless)
    await controller.start()
    try:
        await enable(world.store)
        vid = await volume(world.store)
        for _ in range(400):
            vol = await load(world.store, VOLUME, vid)
            if vol.status.state == "available":
                break
            await asyncio.sleep(0.01)
        assert vol.status.state == "available"
    finally:
        await controller.close()


# -- root-disk snapshots ---------------------------------------------------------------------------------------------
async def _root_instance(store, *, power: str = "running", state: str = "running") -> str:
    from minicloud.compute.kinds import INSTANCE, InstanceObserved, InstanceSpec

    spec = InstanceSpec(uuid="u-1", image_id="img-x", image_name="x", type="t", vcpus=1, memory_mib=64, disk_gib=1,
                        node=ME, pool="pool-ceph", pool_driver="ceph", power=power)  # fmt: skip
    return await create(store, INSTANCE, "web", spec, status=InstanceObserved(state=state))


async def test_a_root_disk_snapshot_is_of_the_instances_root_image_and_reverts_it_while_stopped(ready):
    from minicloud.compute.kinds import INSTANCE

    iid = await _root_instance(ready.store, power="stopped", state="stopped")
    pool = _pool(ready)
    root = f"{iid}-root"
    await pool.create(root, GIB)
    pool.write(root, b"v1")
    spec = SnapshotSpec(volume="", instance=iid, instance_name="web", pool="pool-ceph", node=ME, size_gib=1)
    sid = await create(ready.store, SNAPSHOT, "s", spec)
    await ready.pass_()
    assert (await load(ready.store, SNAPSHOT, sid)).status.state == "available"
    assert ("snapshot", root, sid) in [c[:3] for c in pool.calls]
    # a volume made from it has its data and its own copy (it outlives the instance)
    vid = await volume(ready.store, "copy", source=VolumeSource(type="snapshot", id=sid))
    await ready.pass_()
    assert pool.read(vid) == b"v1" and ("flatten", vid) in pool.calls
    # revert (asked while stopped): the root disk goes back, once
    pool.write(root, b"v2")
    await change(ready.store, SNAPSHOT, sid, revert_seq=1)
    await ready.pass_()
    snap = await load(ready.store, SNAPSHOT, sid)
    assert pool.read(root) == b"v1" and (snap.status.revert_seq, snap.status.reason) == (1, "")
    pool.write(root, b"v3")
    await ready.pass_()
    assert pool.read(root) == b"v3"
    # an instance started before its node reverted: not reverted, said so, the snapshot stays available
    inst = await load(ready.store, INSTANCE, iid)
    await change(ready.store, INSTANCE, iid, power="running")
    await change(ready.store, SNAPSHOT, sid, revert_seq=2)
    await ready.pass_()
    snap = await load(ready.store, SNAPSHOT, sid)
    assert pool.read(root) == b"v3" and snap.status.state == "available" and snap.status.revert_seq == 2
    assert "started first" in snap.status.reason
    # the instance is deleted (its root disk, snapshots and all, with it): the record goes, the quota is released
    await ready.store.commit(Txn([Delete(kind=INSTANCE.name, id=iid, expect_revision=(await ready.store.get(INSTANCE.name, inst.id)).revision)]))  # fmt: skip
    await ready.r.reconcile(sid)
    assert await ready.store.get(SNAPSHOT.name, sid) is None
