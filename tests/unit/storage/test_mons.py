"""Where the Ceph MONs go: the pure placement (:func:`place_mons`) and the services leader's loop writing the
``cephcluster`` record's ``mons`` through the store."""

from __future__ import annotations

import datetime as _dt

import msgspec

from minicloud.cluster.kinds import NODE, NodeSpec, NodeStatus
from minicloud.state import Create, Txn, Update
from minicloud.storage.kinds import CEPH, CEPH_NAME, CephSpec
from minicloud.storage.mons import REPLACE_AFTER, MonPlacement, NodeFacts, ip_of, place_mons, wanted

NOW = _dt.datetime(2026, 1, 1, 12, tzinfo=_dt.UTC)
UP = {f"n{i}": NodeFacts(address=f"10.0.0.{i}", online=True) for i in range(1, 6)}


def nodes(n: int, **changes: NodeFacts) -> dict[str, NodeFacts]:
    return {**{k: v for k, v in UP.items() if int(k[1:]) <= n}, **changes}


def test_mons_go_to_up_to_three_online_voters_by_name() -> None:
    placed = place_mons({"n1": "10.0.0.1"}, nodes(4), {"n1", "n2", "n3", "n4"}, NOW)
    assert placed == ({"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}, "adding n2, n3")
    assert place_mons(placed[0], nodes(4), {"n1", "n2", "n3", "n4"}, NOW) is None  # stable


def test_five_voters_run_five_mons() -> None:
    assert (wanted(1), wanted(2), wanted(3), wanted(4), wanted(5), wanted(7)) == (1, 1, 3, 3, 5, 5)
    three = {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}
    placed = place_mons(three, nodes(5), {"n1", "n2", "n3", "n4", "n5"}, NOW)
    assert placed == ({**three, "n4": "10.0.0.4", "n5": "10.0.0.5"}, "adding n4, n5")
    # a learner does not count: four voters keep three
    assert place_mons(three, nodes(5), {"n1", "n2", "n3", "n4"}, NOW) is None


def test_mons_spread_over_zones_first() -> None:
    zoned = {
        n: NodeFacts(address=f"10.0.0.{i}", online=True, zone=z)
        for i, (n, z) in enumerate((("n1", "a"), ("n2", "a"), ("n3", "a"), ("n4", "b"), ("n5", "c")), 1)
    }
    placed = place_mons({"n1": "10.0.0.1"}, zoned, {"n1", "n2", "n3", "n4"}, NOW)
    # by name it would be n2, n3 (all in zone a): n4 (zone b) first, then a second node of zone a
    assert placed == ({"n1": "10.0.0.1", "n4": "10.0.0.4", "n2": "10.0.0.2"}, "adding n4, n2")
    five = place_mons({"n1": "10.0.0.1"}, zoned, set(zoned), NOW)
    assert five is not None and set(five[0]) == set(zoned) and five[1] == "adding n4, n5, n2, n3"


def test_a_lone_loopback_mon_moves_to_its_nodes_cluster_address_first() -> None:
    moved = place_mons({"n1": "127.0.0.1"}, nodes(3), {"n1", "n2", "n3"}, NOW)
    assert moved == ({"n1": "10.0.0.1"}, "moving the monitor of n1 from 127.0.0.1 to 10.0.0.1")
    assert place_mons(moved[0], nodes(3), {"n1", "n2", "n3"}, NOW) == (  # type: ignore[index]
        {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"},
        "adding n2, n3",
    )
    # not while its node is offline or has no cluster address of its own
    down = NodeFacts(address="10.0.0.1", online=False, offline_since=NOW)
    assert place_mons({"n1": "127.0.0.1"}, nodes(3, n1=down), {"n1", "n2", "n3"}, NOW) is None
    lo = NodeFacts(address="127.0.0.1", online=True)
    assert place_mons({"n1": "127.0.0.1"}, nodes(3, n1=lo), {"n1", "n2", "n3"}, NOW) is None


def test_learners_and_offline_nodes_get_no_mon() -> None:
    down = NodeFacts(address="10.0.0.2", online=False, offline_since=NOW)
    # n3 is a learner, n2 offline: n4 alone would make two MONs, both needed for a quorum: none added yet
    assert place_mons({"n1": "10.0.0.1"}, nodes(4, n2=down), {"n1", "n2", "n4"}, NOW) is None
    placed = place_mons({"n1": "10.0.0.1"}, nodes(4), {"n1", "n2", "n4"}, NOW)
    assert placed == ({"n1": "10.0.0.1", "n2": "10.0.0.2", "n4": "10.0.0.4"}, "adding n2, n4")


def test_always_an_odd_number_of_mons() -> None:
    # two voting nodes: one MON (the other node may be lost); from three, three
    assert place_mons({"n1": "10.0.0.1"}, nodes(2), {"n1", "n2"}, NOW) is None
    # two MONs left after a voter was removed: one goes (both online)
    two = {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    assert place_mons(two, nodes(2), {"n1", "n2"}, NOW) == (
        {"n1": "10.0.0.1"},
        "an odd number of monitors: dropping n2",
    )
    # not while one of them is offline (removing a MON needs a quorum)
    down = NodeFacts(address="10.0.0.2", online=False, offline_since=NOW)
    assert place_mons(two, nodes(2, n2=down), {"n1", "n2"}, NOW) is None


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


def test_nothing_moves_on_a_single_node_or_with_several_mons_one_on_loopback() -> None:
    assert place_mons({"n1": "127.0.0.1"}, {}, set(), NOW) is None
    assert place_mons({"n1": "127.0.0.1", "n2": "10.0.0.2"}, nodes(3), {"n1", "n2", "n3"}, NOW) is None


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
    assert await cycle(loop) is None  # two voters: one MON (two would both be needed for a quorum)
    members[2] = {"name": "n3"}  # promoted
    outcome = await cycle(loop)
    assert outcome is not None
    assert await _mons(store) == {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}
    assert await cycle(loop) is None


async def test_a_node_that_is_not_clustered_places_nothing(store) -> None:
    async def alone() -> None:
        return None

    await _enable(store)
    loop = MonPlacement(store, alone)
    assert await cycle(loop) is None and await _mons(store) == {"n1": "10.0.0.1"}
