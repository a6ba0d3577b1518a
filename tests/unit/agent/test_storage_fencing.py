"""Fencing a lost node until it is back and clean: the blocklist entry as good as never expires, it is recorded in the
``cephcluster`` record, and the node lifts it itself once its compute reconciler has swept its stale guests (or a
new node with a removed node's address does). The fake engine and world are test_storage_reconciler.py's."""

from __future__ import annotations

import msgspec
import pytest

from agent.reconcilers import storage as storage_mod
from agent.reconcilers.compute import NODE_KEY as COMPUTE_NODE_KEY
from minicloud.cluster.kinds import NODE, NodeSpec, NodeStatus
from minicloud.state import Delete, Txn, Update
from minicloud.state.sqlite import SQLiteStore
from minicloud.storage.kinds import CEPH, CEPH_NAME, VOLUME
from tests.unit.agent import test_storage_reconciler as base
from tests.unit.agent.test_compute_storage import add, ready, world  # noqa: F401  (the compute world fixture)
from tests.unit.agent.test_storage_reconciler import World, create, enable, load, volume

TEN_YEARS = 10 * 365 * 24 * 3600


class FencingEngine(base.FakeEngine):
    """The fake engine with the blocklist's expiry and ``blocklist rm``."""

    async def blocklist_add(self, addr: str, *, expire_seconds: float = 3600) -> None:
        await super().blocklist_add(addr)
        self.cluster.setdefault("expiry", {})[addr] = expire_seconds

    async def blocklist_rm(self, addr: str) -> None:
        self._check("blocklist_rm")
        self.cluster["blocklist"] = [a for a in self.cluster.get("blocklist", []) if a != addr]
        self.cluster.setdefault("expiry", {}).pop(addr, None)
        self.cluster.setdefault("removed", []).append(addr)


@pytest.fixture
async def n1(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "FakeEngine", FencingEngine)
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    w = World(tmp_path, store, {})
    await w.r.start(w.enqueued.append)
    await create(store, NODE, "n1", NodeSpec(address="10.0.0.1"), status=NodeStatus(state="online"))
    await enable(store)
    await w.pass_()
    yield w
    await w.r.close()
    await store.close()


async def _node(store, name: str, address: str, state: str) -> None:
    await create(store, NODE, name, NodeSpec(address=address), status=NodeStatus(state=state))


async def _set_node_state(store, name: str, state: str) -> None:
    record = await store.get_by_name(NODE.name, "", name)
    obj = NODE.load(record)
    new = obj.replace(status=NodeStatus(state=state))
    await store.commit(Txn([Update(NODE.dump(new), expect_revision=record.revision)]))


async def _ceph(store):
    return CEPH.load(await store.get_by_name(CEPH.name, "", CEPH_NAME))


async def _fence_n2(w: World) -> None:
    await _node(w.store, "n2", "10.0.0.2:8443", "offline")
    vid = await volume(w.store, previous_node="n2")
    await w.pass_()
    assert (await load(w.store, VOLUME, vid)).spec.previous_node == ""


async def _join(tmp_path, w: World, name: str) -> World:
    other = World(tmp_path, w.store, w.cluster, node=name)
    await other.r.start(other.enqueued.append)
    return other


async def test_a_lost_nodes_fence_does_not_expire_and_is_recorded(n1):
    """The blocklist entry had the engine's default hour: a half-dead node alive after it could write again."""
    await _fence_n2(n1)
    assert n1.cluster["blocklist"] == ["10.0.0.2"]
    assert n1.cluster["expiry"]["10.0.0.2"] >= TEN_YEARS == storage_mod.FENCE_SECONDS
    fence = (await _ceph(n1.store)).spec.fenced["n2"]
    assert (fence.address, fence.by) == ("10.0.0.2", "n1") and fence.since


async def test_a_fenced_node_lifts_its_fence_only_once_its_stale_guests_are_swept(tmp_path, n1):
    await _fence_n2(n1)
    await _set_node_state(n1.store, "n2", "online")  # n2's agent is back
    n2 = await _join(tmp_path, n1, "n2")
    try:
        await n2.pass_()
        assert n1.cluster["blocklist"] == ["10.0.0.2"] and "n2" in (await _ceph(n1.store)).spec.fenced
        n2.storage.set_guests_checked()  # what its compute reconciler says after its first sweep
        await n2.pass_()
        assert n1.cluster["blocklist"] == [] and n1.cluster["removed"] == ["10.0.0.2"]
        assert (await _ceph(n1.store)).spec.fenced == {}
        await n2.pass_()
        assert n1.cluster["removed"] == ["10.0.0.2"]  # once
    finally:
        await n2.r.close()


async def test_a_node_without_compute_has_no_guests_to_wait_for(tmp_path, n1):
    await _fence_n2(n1)
    await _set_node_state(n1.store, "n2", "online")
    n2 = await _join(tmp_path, n1, "n2")
    n2.config.compute.driver = "none"
    try:
        await n2.pass_()
        assert n1.cluster["blocklist"] == [] and (await _ceph(n1.store)).spec.fenced == {}
    finally:
        await n2.r.close()


async def test_a_removed_nodes_fence_is_lifted_by_the_node_that_takes_its_address(tmp_path, n1):
    await _fence_n2(n1)
    record = await n1.store.get_by_name(NODE.name, "", "n2")
    await n1.store.commit(Txn([Delete(kind=NODE.name, id=record.id)]))  # `cluster remove n2`
    n1.storage.set_guests_checked()
    await n1.pass_()
    assert n1.cluster["blocklist"] == ["10.0.0.2"]  # not n1's address: stays
    await _node(n1.store, "n3", "10.0.0.2", "online")  # a new machine on n2's old address
    n3 = await _join(tmp_path, n1, "n3")
    n3.storage.set_guests_checked()
    try:
        await n3.pass_()
        assert n1.cluster["blocklist"] == [] and (await _ceph(n1.store)).spec.fenced == {}
    finally:
        await n3.r.close()


async def test_a_fence_written_while_it_is_lifted_stays(tmp_path, n1, monkeypatch):
    await _fence_n2(n1)
    await _set_node_state(n1.store, "n2", "online")
    n2 = await _join(tmp_path, n1, "n2")
    n2.storage.set_guests_checked()
    real = FencingEngine.blocklist_rm

    async def rm_then_fenced_again(self, addr: str) -> None:
        await real(self, addr)
        # another node fenced n2 again meanwhile (it was seen lost once more): a newer fence
        await self.blocklist_add(addr, expire_seconds=storage_mod.FENCE_SECONDS)
        record = await n1.store.get_by_name(CEPH.name, "", CEPH_NAME)
        ceph = CEPH.load(record)
        newer = {"n2": msgspec.structs.replace(ceph.spec.fenced["n2"], since="later", by="n3")}
        new = ceph.replace(spec=msgspec.structs.replace(ceph.spec, fenced=newer))
        await n1.store.commit(Txn([Update(CEPH.dump(new), expect_revision=record.revision)]))

    monkeypatch.setattr(FencingEngine, "blocklist_rm", rm_then_fenced_again)
    try:
        await n2.r.reconcile(storage_mod.ENGINE_KEY)
        assert (await _ceph(n1.store)).spec.fenced["n2"].by == "n3"  # not dropped with the old one
    finally:
        await n2.r.close()


# -- the compute side ------------------------------------------------------------------------------------------------
async def test_compute_says_its_guests_are_checked_once_stale_domains_are_destroyed(world):  # noqa: F811
    ready(world)
    inst = await add(world)
    moved = await add(world, "moved")
    await world.pass_()
    assert world.domain(moved) is not None
    world.storage._guests_checked = False  # a freshly started agent
    await world.change_spec(moved, node="n9")  # placed elsewhere while this node was away
    await world.r.reconcile(COMPUTE_NODE_KEY)
    assert world.domain(moved) is None and world.domain(inst) is not None
    assert world.storage.guests_checked
