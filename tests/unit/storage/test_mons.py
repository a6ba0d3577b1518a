"""Where the Ceph MONs go: the pure placement (:func:`place_mons`) and the services leader's loop writing the
``cephcluster`` record's ``mons`` through the store."""

from __future__ import annotations

import datetime as _dt

import msgspec

from minicloud.cluster.kinds import NODE, NodeSpec, NodeStatus
from minicloud.state import Create, Txn, Update
from minicloud.storage.kinds import CEPH, CEPH_NAME, CephSpec
from minicloud.storage.mons import REPLACE_AFTER, MonPlacement, NodeFacts, ip_of, place_mons

NOW = _dt.datetime(2026, 1, 1, 12, tzinfo=_dt.UTC)
UP = {f"n{i}": NodeFacts(address=f"10.0.0.{i}", online=True) for i in range(1, 6)}


def nodes(n: int, **changes: NodeFacts) -> dict[str, NodeFacts]:
    return {**{k: v for k, v in UP.items() if int(k[1:]) <= n}, **changes}


def test_mons_go_to_up_to_three_online_voters_by_name() -> None:
    placed = place_mons({"n1": "10.0.0.1"}, nodes(5), {"n1", "n2", "n3", "n4", "n5"}, NOW)
    assert placed == ({"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}, "adding n2, n3")
    assert place_mons(placed[0], nodes(5), {"n1", "n2", "n3", "n4", "n5"}, NOW) is None  # stable


def test_learners_and_offline_nodes_get_no_mon() -> None:
    down = NodeFacts(address="10.0.0.2", online=False, offline_since=NOW)
    placed = place_mons({"n1": "10.0.0.1"}, nodes(4, n2=down), {"n1", "n2", "n4"}, NOW)  # n3 is a learner
    assert placed == ({"n1": "10.0.0.1", "n4": "10.0.0.4"}, "adding n4")


def test_a_lost_mon_stays_until_another_voter_can_take_its_place() -> None:
    mons = {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}
    lost = NodeFacts(address="10.0.0.3", online=False, offline_since=NOW - 2 * REPLACE_AFTER)
    assert place_mons(mons, nodes(3, n3=lost), {"n1", "n2", "n3"}, NOW) is None  # no one else: it keeps counting
    recent = NodeFacts(address="10.0.0.3", online=False, offline_since=NOW - REPLACE_AFTER / 2)
    voters = {"n1", "n2", "n3", "n4"}
    assert place_mons(mons, nodes(4, n3=recent), voters, NOW) is None  # not for a short absence
    # long enough, and n4 can take over: first n3 goes (the others keep quorum), then n4 comes
    dropped, why = place_mons(mons, nodes(4, n3=lost), voters, NOW)  # type: ignore[misc]
    assert dropped == {"n1": "10.0.0.1", "n2": "10.0.0.2"} and "n3" in why
    assert place_mons(dropped, nodes(4, n3=lost), voters, NOW) == ({**dropped, "n4": "10.0.0.4"}, "adding n4")


def test_a_removed_nodes_mon_goes_at_once_but_never_the_last() -> None:
    mons = {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    assert place_mons(mons, nodes(1), {"n1"}, NOW) == ({"n1": "10.0.0.1"}, "node n2 left the cluster")
    assert place_mons({"n9": "10.0.0.9"}, nodes(2), {"n1", "n2"}, NOW) is None


def test_nothing_moves_on_a_single_node_or_with_a_loopback_mon() -> None:
    assert place_mons({"n1": "127.0.0.1"}, {}, set(), NOW) is None
    assert place_mons({"n1": "127.0.0.1"}, nodes(3), {"n1", "n2", "n3"}, NOW) is None


def test_node_addresses_become_ips() -> None:
    assert ip_of("10.0.0.1:8443") == "10.0.0.1" and ip_of("[fd00::1]:8443") == "fd00::1" and ip_of("10.0.0.1")


async def _enable(store, *, keys: bool = True) -> None:
    spec = CephSpec(fsid="f", bootstrap_node="n1", mons={"n1": "10.0.0.1"}, keys={"mon.": "sealed"} if keys else {})
    ops = [Create(CEPH.dump(CEPH.new(project="", name=CEPH_NAME, spec=spec)))]
    for i in (1, 2, 3):
        node = NODE.new(
            project="", name=f"n{i}", spec=NodeSpec(address=f"10.0.0.{i}:8443"), status=NodeStatus(state="online")
        )
        ops.append(Create(NODE.dump(node)))
    await store.commit(Txn(ops))


async def cycle(loop: MonPlacement):
    """One cycle of the loop as the leader runs it: snapshot, the pure decision, and the write when there is one."""
    plan = loop.decide(await loop.snapshot(), NOW)
    return await loop.act(plan) if plan else None


async def _mons(store) -> dict[str, str]:
    return dict(CEPH.load(await store.get_by_name(CEPH.name, "", CEPH_NAME)).spec.mons)


async def test_the_leader_loop_writes_the_mons_once_the_cluster_is_bootstrapped(store) -> None:
    members = [{"name": "n1"}, {"name": "n2"}, {"name": "n3", "isLearner": True}]

    async def etcd() -> list[dict]:
        return members

    loop = MonPlacement(store, etcd)
    assert await cycle(loop) is None  # storage not enabled: nothing to do
    await _enable(store, keys=False)
    assert await cycle(loop) is None  # not bootstrapped yet
    ceph = CEPH.load(await store.get_by_name(CEPH.name, "", CEPH_NAME))
    bootstrapped = ceph.replace(spec=msgspec.structs.replace(ceph.spec, keys={"mon.": "sealed"}))  # the bootstrap
    await store.commit(Txn([Update(CEPH.dump(bootstrapped), expect_revision=ceph.revision)]))
    outcome = await cycle(loop)
    assert outcome is not None and await _mons(store) == {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    members[2] = {"name": "n3"}  # promoted
    await cycle(loop)
    assert await _mons(store) == {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}
    assert await cycle(loop) is None


async def test_a_node_that_is_not_clustered_places_nothing(store) -> None:
    async def alone() -> None:
        return None

    await _enable(store)
    loop = MonPlacement(store, alone)
    assert await cycle(loop) is None and await _mons(store) == {"n1": "10.0.0.1"}
