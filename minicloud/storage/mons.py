"""Where the Ceph MONs run: a services-leader loop (:mod:`minicloud.cluster.leader`) that keeps the ``cephcluster``
record's ``mons`` (node → address) on up to :data:`WANT` voting nodes. It is the record's one writer of ``mons``
after ``storage enable`` (which names the bootstrap node); each node's storage reconciler follows it (a node named
there makes and starts its MON, one no longer named takes its own out, the leading node takes out the MONs of nodes
that cannot), and every node's ``ceph.conf`` lists the record's MONs.

Why the services leader: it is the one place that knows which nodes vote (etcd's membership: learners are not
voters) as well as the node records (address, online or offline since when). The storage reconcilers' leading node
only sees node records, whose ``role`` is what was asked for at join time, not etcd's truth.

The policy (:func:`place_mons`, pure):

- MONs go to voting nodes, online ones first, spread over zones (a node in a zone without a MON first), then by
  name; up to :func:`wanted` of them: 3 (a quorum survives one lost node), or 5 once five nodes vote (it survives
  two, or a whole zone of up to two nodes); always an odd number (two voters: one MON — two would both be needed).
- A MON whose node left the cluster (no node record) is dropped at once; one whose node has been offline for
  :data:`REPLACE_AFTER` is dropped only when an online voter can take its place (the next cycle adds it), so a lost
  node's MON keeps counting towards the quorum as long as nothing better exists — like etcd's dead voter.
- Nothing changes until the cluster has been bootstrapped (the record has keys). A lone MON on a loopback address
  (storage enabled before the cluster was formed: other nodes cannot reach it) is first moved to its node's cluster
  address once that node has one (the node re-addresses its MON: :meth:`agent.storage.ceph.CephEngine.readdress_mon`);
  only then do other nodes get MONs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from minicloud.cluster.kinds import NODE
from minicloud.cluster.leader import LeaderLoop, Outcome
from minicloud.state import Store, Txn, TxnFailed, Update
from minicloud.storage.kinds import CEPH, CEPH_NAME

log = logging.getLogger("minicloud.storage.mons")

#: How many MONs a cluster with enough voting nodes runs; :data:`WANT_LARGE` from :data:`LARGE_FROM` voters on.
WANT = 3
WANT_LARGE = 5
LARGE_FROM = 5
#: How long a MON's node must have been offline before the MON moves to another voting node.
REPLACE_AFTER = _dt.timedelta(minutes=10)


@dataclass(frozen=True)
class NodeFacts:
    """What placement needs of one node record."""

    address: str  # its cluster IP
    online: bool
    offline_since: _dt.datetime | None = None  # its last contact, when offline
    zone: str = ""  # its ``zone`` label ("" none)


@dataclass(frozen=True)
class MonSnapshot:
    record_id: str
    revision: int
    mons: dict[str, str]
    bootstrapped: bool
    nodes: dict[str, NodeFacts]
    voters: frozenset[str]


@dataclass(frozen=True)
class MonPlan:
    record_id: str
    revision: int
    mons: dict[str, str] = field(default_factory=dict)
    why: str = ""

    def __bool__(self) -> bool:
        return bool(self.mons)


def ip_of(address: str) -> str:
    """The IP of a node record's address (``IP`` or ``IP:port``, IPv6 in brackets); the text when neither."""
    text = address.strip()
    for candidate in (text, text.rsplit(":", 1)[0].strip("[]")):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(candidate))
    return text


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(ip_of(address)).is_loopback
    except ValueError:
        return False


def wanted(voters: int) -> int:
    """How many MONs ``voters`` voting nodes run: 5 from five voters on, 3 from three, else 1 (two MONs would need
    both nodes for a quorum: one MON survives the loss of the other node)."""
    return WANT_LARGE if voters >= LARGE_FROM else WANT if voters >= WANT else 1


def _spread(candidates: list[str], keep: dict[str, str], nodes: dict[str, NodeFacts]) -> list[str]:
    """``candidates`` in the order they get MONs: each next one in the zone with the fewest MONs so far (nodes
    without a zone count as one zone each), then by name."""
    count: dict[str, int] = {}
    for n in keep:
        zone = nodes[n].zone or f"node:{n}"
        count[zone] = count.get(zone, 0) + 1
    order, left = [], sorted(candidates)
    while left:
        pick = min(left, key=lambda n: (count.get(nodes[n].zone or f"node:{n}", 0), n))
        order.append(pick)
        left.remove(pick)
        zone = nodes[pick].zone or f"node:{pick}"
        count[zone] = count.get(zone, 0) + 1
    return order


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def place_mons(
    current: dict[str, str],
    nodes: dict[str, NodeFacts],
    voters: frozenset[str] | set[str],
    now: _dt.datetime,
    *,
    want: int | None = None,
    replace_after: _dt.timedelta = REPLACE_AFTER,
) -> tuple[dict[str, str], str] | None:
    """The MONs (node → address) the record should name, and why; None when it should stay as it is. ``want``:
    :func:`wanted` of the voters with node records unless given. Pure."""
    if not current or not nodes:
        return None  # not enabled, or a single node without node records: the bootstrap MON is all there is
    if any(_loopback(a) for a in current.values()):
        # storage enabled before the cluster was formed: its MON is unreachable from other nodes; move it to its
        # node's cluster address (the node re-addresses it) before anything else
        if len(current) != 1:
            return None
        ((name, address),) = current.items()
        facts = nodes.get(name)
        if facts is None or not facts.online or _loopback(facts.address) or not _is_ip(facts.address):
            return None
        return {name: facts.address}, f"moving the monitor of {name} from {ip_of(address)} to {facts.address}"
    if want is None:
        want = wanted(sum(1 for n in voters if n in nodes))
    keep = {n: a for n, a in current.items() if n in nodes}
    gone = sorted(set(current) - set(keep))
    candidates = _spread([n for n in voters if n in nodes and n not in keep and nodes[n].online], keep, nodes)
    if not keep:
        return None  # never leave the record without a MON (the cluster's MONs are all gone: an operator's matter)
    if gone:
        return keep, f"node {', '.join(gone)} left the cluster"
    stale = sorted(
        n
        for n in keep
        if not nodes[n].online and nodes[n].offline_since is not None and now - nodes[n].offline_since >= replace_after
    )
    if stale and candidates and len(keep) > 1:
        # one at a time: drop the lost node's MON (the others keep quorum), the next cycle adds an online voter
        dropped = stale[0]
        return {n: a for n, a in keep.items() if n != dropped}, f"node {dropped} is offline for long; replacing"
    if len(keep) < want and candidates:
        # an odd number: 2 MONs need both for a quorum (either node lost stops storage), 1 needs only its own
        reach = min(want, len(keep) + len(candidates))
        reach -= 1 - reach % 2
        if reach > len(keep):
            added = candidates[: reach - len(keep)]
            return {**keep, **{n: nodes[n].address for n in added}}, f"adding {', '.join(added)}"
    if len(keep) > want and len(keep) % 2 == 0 and all(nodes[n].online for n in keep):
        # an even number left (a voter was removed): one fewer keeps as many node losses survivable, or more
        dropped = sorted(keep)[-1]
        return {n: a for n, a in keep.items() if n != dropped}, f"an odd number of monitors: dropping {dropped}"
    return None


def _parse_time(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.UTC)


class MonPlacement(LeaderLoop[MonSnapshot | None, MonPlan]):
    """The services leader's loop keeping the ``cephcluster`` record's ``mons`` on voting nodes (module docstring).

    ``members``: etcd's members (``name``, ``isLearner``), or None when this node is not clustered."""

    name = "storage-mons"
    interval = 10.0

    def __init__(self, store: Store, members: Callable[[], Awaitable[list[dict[str, Any]] | None]]) -> None:
        self.store = store
        self.members = members

    async def snapshot(self) -> MonSnapshot | None:
        record = await self.store.get_by_name(CEPH.name, "", CEPH_NAME)
        if record is None:
            return None
        members = await self.members()
        if members is None:
            return None
        ceph = CEPH.load(record)
        nodes = {}
        for r in await self.store.list(NODE.name, project="", limit=10_000):
            node = NODE.load(r)
            offline = node.status.state == "offline"
            nodes[node.name] = NodeFacts(
                address=ip_of(node.spec.address),
                online=node.status.state == "online",
                offline_since=_parse_time(node.status.last_contact) if offline else None,
                zone=node.labels.get("zone", ""),
            )
        voters = frozenset(str(m.get("name", "")) for m in members if not m.get("isLearner"))
        return MonSnapshot(
            record_id=record.id,
            revision=record.revision,
            mons=dict(ceph.spec.mons),
            bootstrapped=bool(ceph.spec.keys),
            nodes=nodes,
            voters=voters,
        )

    def decide(self, snapshot: MonSnapshot | None, now: _dt.datetime) -> MonPlan:
        if snapshot is None or not snapshot.bootstrapped:
            return MonPlan("", 0)
        placed = place_mons(snapshot.mons, snapshot.nodes, snapshot.voters, now)
        if placed is None:
            return MonPlan("", 0)
        mons, why = placed
        return MonPlan(snapshot.record_id, snapshot.revision, mons, why)

    def describe(self, plan: MonPlan) -> str:
        return f"MONs on {', '.join(sorted(plan.mons))} ({plan.why})"

    async def act(self, plan: MonPlan) -> Outcome:
        record = await self.store.get(CEPH.name, plan.record_id)
        if record is None or record.revision != plan.revision:
            return Outcome("nothing: the storage cluster record changed meanwhile", more=True)
        ceph = CEPH.load(record)
        new = ceph.replace(spec=msgspec.structs.replace(ceph.spec, mons=dict(plan.mons)))
        try:
            await self.store.commit(Txn([Update(CEPH.dump(new), expect_revision=record.revision)]))
        except TxnFailed:
            return Outcome("nothing: the storage cluster record changed meanwhile", more=True)
        log.warning("Ceph monitors placed", extra={"mons": sorted(plan.mons), "why": plan.why})
        return Outcome(f"MONs now on {', '.join(sorted(plan.mons))}")


__all__ = ["MonPlacement", "NodeFacts", "place_mons", "wanted"]
