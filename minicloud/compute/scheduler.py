"""Placement: which node gets an instance. Pure functions over a snapshot; the instance service
(:mod:`minicloud.compute.instances`) gathers the snapshot and commits the decision.

A decision is **filters, then weighers** (as in OpenStack's filter scheduler):

1. Every node that published its compute capacity is a :class:`NodeView` (capacity, what its instances take, zone,
   cordon/liveness state, the server-group members on it).
2. Each filter of :data:`FILTERS` is called as ``filter(request, node)`` and returns ``None`` when the node may take
   the instance, or a short reason why not (``"cordoned"``, ``"not in zone 'b'"``, ``"not enough memory (…)"``).
   The first reason refuses the node; the reasons of all refused nodes make the 409 when none is left.
3. The nodes left are ordered by the weighers: :func:`weigh_spread` (the most free memory after placement: the
   default) or :func:`weigh_pack` (the least: fill nodes up first) — the cluster setting ``scheduler-weigher``, else
   the answering node's ``[compute] scheduler_weigher`` —
   after the soft-anti-affinity weigher (fewest members of the instance's group first). Ties go to the name.

The decision comes back as a :class:`Decision` with a one-line ``reason`` that the instance records (``instance
show``: why this node).

**Extension point.** A filter is any ``Callable[[SchedRequest, NodeView], str | None]``; add it to :data:`FILTERS`
(or pass ``filters=`` to :func:`schedule`). What it needs goes into the two dataclasses as a new field *with a
default* (a GPU count wanted on :class:`SchedRequest`, the free GPUs on :class:`NodeView`), filled in by
:func:`minicloud.compute.instances.sched_nodes` / ``create_instance``. Filters must be pure and fast (30 nodes x a
few filters per decision; the bench in ``bench/scheduler_bench.py`` keeps the whole decision under 20 ms p99).

Capacity per node comes from the ``hypervisor`` record each agent publishes (host CPUs, memory and disk, and the
node's allocation ratios); usage is the sum of the instances assigned to the node, whatever their power state (a
stopped instance keeps its place, as on AWS and OpenStack). vCPUs are over-committed by ``cpu_allocation_ratio``,
memory by ``ram_allocation_ratio`` (1.0 by default: none), disk never: root disks are counted at their full size.
A root disk in a ``ceph`` pool or a boot volume takes nothing of the node's own disk; an image or volume that is
local to one node pins the instance there (the image filter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from minicloud import errors
from minicloud.compute.kinds import HypervisorSpec, InstanceSpec
from minicloud.gpu import placement as gpu_placement
from minicloud.gpu.kinds import GpuSpec

Weigher = Literal["spread", "pack"]
Policy = Literal["anti-affinity", "affinity", "soft-anti-affinity"]
Scope = Literal["node", "zone"]
#: A decision's reason is recorded on the instance: bounded.
MAX_REASON = 480


@dataclass(frozen=True)
class Demand:
    vcpus: int
    memory_mib: int
    disk_gib: int

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.vcpus + other.vcpus, self.memory_mib + other.memory_mib, self.disk_gib + other.disk_gib)

    def __sub__(self, other: Demand) -> Demand:
        return Demand(self.vcpus - other.vcpus, self.memory_mib - other.memory_mib, self.disk_gib - other.disk_gib)


ZERO = Demand(0, 0, 0)


@dataclass(frozen=True)
class NodeCapacity:
    """What a node can hand out (already multiplied by its ratios, reservations taken off)."""

    name: str
    vcpus: int
    memory_mib: int
    disk_gib: int

    @classmethod
    def of(cls, name: str, spec: HypervisorSpec) -> NodeCapacity:
        """The capacity a node's ``hypervisor`` record offers."""
        return cls(
            name=name,
            vcpus=int(spec.cpus * spec.cpu_allocation_ratio),
            memory_mib=int(max(0, spec.memory_mib * spec.ram_allocation_ratio - spec.reserved_memory_mib)),
            disk_gib=max(0, spec.disk_gib - spec.reserved_disk_gib),
        )


def demand_of(spec: InstanceSpec) -> Demand:
    """What an instance takes of its node: its vCPUs and memory, and its root disk when that is a file in the node's
    ``instances`` directory (not an RBD clone, not a volume)."""
    on_node = spec.pool_driver in ("", "local") and not spec.root_volume
    return Demand(spec.vcpus, spec.memory_mib, spec.disk_gib if on_node else 0)


def usage(instances: Iterable[tuple[str, Demand]]) -> dict[str, Demand]:
    """Sum of demands per node from ``(node, demand)`` pairs."""
    out: dict[str, Demand] = {}
    for node, demand in instances:
        out[node] = out.get(node, ZERO) + demand
    return out


def shortfall(demand: Demand, cap: NodeCapacity, used: Demand) -> list[str]:
    """What ``cap`` lacks to take ``demand`` on top of ``used``; empty when it fits."""
    short = []
    if used.vcpus + demand.vcpus > cap.vcpus:
        short.append(f"vCPUs ({cap.vcpus - used.vcpus} of {cap.vcpus} free, {demand.vcpus} needed)")
    if used.memory_mib + demand.memory_mib > cap.memory_mib:
        short.append(
            f"memory ({cap.memory_mib - used.memory_mib} of {cap.memory_mib} MiB free, {demand.memory_mib} needed)"
        )
    if used.disk_gib + demand.disk_gib > cap.disk_gib:
        short.append(f"disk ({cap.disk_gib - used.disk_gib} of {cap.disk_gib} GiB free, {demand.disk_gib} needed)")
    return short


# -- the snapshot a decision is made on ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """The server group an instance joins: its policy and where its other members are."""

    name: str
    policy: Policy
    scope: Scope = "node"
    #: The nodes of its members (one entry per member: a node with two members appears twice).
    member_nodes: tuple[str, ...] = ()
    #: The zones of its members ("" for a node without a zone), one per member.
    member_zones: tuple[str, ...] = ()


@dataclass(frozen=True)
class SchedRequest:
    """What is being placed and the constraints on it."""

    demand: Demand
    #: The only node the root disk allows (a local image or volume), or None: any node.
    pinned: str | None = None
    #: ``--zone``: only nodes of this zone.
    zone: str | None = None
    #: ``--node`` (admin): only this node.
    node: str | None = None
    group: Group | None = None
    #: Nodes that must not be chosen (a migration's source, for instance).
    exclude: frozenset[str] = frozenset()
    #: GPUs wanted (the type's ``gpus``) and the model pattern they must match ("" any).
    gpus: int = 0
    gpu_model: str = ""


@dataclass(frozen=True)
class NodeView:
    """One node as the scheduler sees it."""

    capacity: NodeCapacity
    used: Demand = ZERO
    zone: str = ""
    #: Cordoned by an operator (``node cordon``): takes no new instances.
    cordoned: bool = False
    #: The cluster's services leader saw its heartbeat lapse.
    offline: bool = False
    #: Its GPU records' specs (filled in only when the request wants GPUs).
    gpus: tuple[GpuSpec, ...] = ()

    @property
    def name(self) -> str:
        return self.capacity.name

    def free_memory_after(self, demand: Demand) -> int:
        return self.capacity.memory_mib - self.used.memory_mib - demand.memory_mib


@dataclass(frozen=True)
class Decision:
    node: str
    #: Why this node, in one line (recorded on the instance).
    reason: str


Filter = Callable[[SchedRequest, NodeView], "str | None"]


# -- filters -------------------------------------------------------------------------------------------------------
def node_state_filter(req: SchedRequest, node: NodeView) -> str | None:
    """A cordoned or offline node takes nothing new."""
    if node.cordoned:
        return "cordoned (`minicloud node uncordon` lifts it)"
    if node.offline:
        return "offline"
    return None


def image_filter(req: SchedRequest, node: NodeView) -> str | None:
    """A root disk on one node's own storage (a local image or volume) runs only there."""
    if req.pinned is not None and node.name != req.pinned:
        return f"the image or boot volume is on node {req.pinned} only"
    return None


def node_filter(req: SchedRequest, node: NodeView) -> str | None:
    """``--node``: that node only; ``exclude``: never these."""
    if req.node is not None and node.name != req.node:
        return f"not the node asked for ({req.node})"
    if node.name in req.exclude:
        return "excluded"
    return None


def zone_filter(req: SchedRequest, node: NodeView) -> str | None:
    """``--zone``: only the nodes of that zone."""
    if req.zone is not None and node.zone != req.zone:
        return f"in zone '{node.zone}', not '{req.zone}'" if node.zone else f"has no zone, not '{req.zone}'"
    return None


def capacity_filter(req: SchedRequest, node: NodeView) -> str | None:
    """Room for the instance's vCPUs, memory and node-local disk."""
    short = shortfall(req.demand, node.capacity, node.used)
    return f"not enough {', '.join(short)}" if short else None


def gpu_filter(req: SchedRequest, node: NodeView) -> str | None:
    """``gpus`` free, passthrough-capable GPUs matching ``gpu_model`` (:mod:`minicloud.gpu.placement`)."""
    return gpu_placement.shortage(node.gpus, req.gpus, req.gpu_model)


def server_group_filter(req: SchedRequest, node: NodeView) -> str | None:
    """anti-affinity: no node (or zone, ``scope=zone``) that holds a member; affinity: the members' node (zone)
    once there is one. soft-anti-affinity never refuses (it weighs)."""
    g = req.group
    if g is None or g.policy == "soft-anti-affinity":
        return None
    if g.scope == "zone":
        here, members, where = node.zone, g.member_zones, f"zone '{node.zone}'"
    else:
        here, members, where = node.name, g.member_nodes, "this node"
    if g.policy == "anti-affinity":
        if here in members:
            return f"anti-affinity group '{g.name}' already has a member in {where}"
        return None
    if members and here not in members:
        return f"affinity group '{g.name}' has its members in {' and '.join(sorted(set(members)))}"
    return None


#: The filters every decision runs, in order (the first reason refuses a node). Append to extend.
FILTERS: list[Filter] = [
    node_state_filter,
    node_filter,
    image_filter,
    zone_filter,
    server_group_filter,
    capacity_filter,
    gpu_filter,
]


# -- weighers ------------------------------------------------------------------------------------------------------
def weigh_spread(req: SchedRequest, node: NodeView) -> float:
    """Higher for more free memory left after the placement (spreads instances over the nodes)."""
    return float(node.free_memory_after(req.demand))


def weigh_pack(req: SchedRequest, node: NodeView) -> float:
    """Higher for less free memory left (fills a node before the next: fewer nodes busy)."""
    return -float(node.free_memory_after(req.demand))


WEIGHERS: dict[str, Callable[[SchedRequest, NodeView], float]] = {"spread": weigh_spread, "pack": weigh_pack}


def group_members_on(req: SchedRequest, node: NodeView) -> int:
    """How many members of the request's soft-anti-affinity group are on the node (or in its zone)."""
    g = req.group
    if g is None or g.policy != "soft-anti-affinity":
        return 0
    return g.member_zones.count(node.zone) if g.scope == "zone" else g.member_nodes.count(node.name)


# -- the decision --------------------------------------------------------------------------------------------------
def _clip(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def schedule(
    req: SchedRequest,
    nodes: Sequence[NodeView],
    *,
    weigher: str = "spread",
    filters: Sequence[Filter] | None = None,
) -> Decision:
    """The node for ``req`` among ``nodes`` and why; ``InsufficientCapacity`` (409) saying why each node was
    refused when none is left."""
    if weigher not in WEIGHERS:
        raise errors.ValidationFailed(f"unknown scheduler weigher '{weigher}': use spread or pack")
    if not nodes:
        raise errors.InsufficientCapacity(
            "no node can run this instance: there is no compute node yet (a node that has not registered its compute "
            "capacity takes no instances: is an agent running with compute enabled?)"
        )
    if req.pinned is not None and all(n.name != req.pinned for n in nodes):
        raise errors.InsufficientCapacity(
            f"no node can run this instance: the node holding its image or disk ({req.pinned}) has not registered "
            "its compute capacity (is its agent running with compute enabled?)"
        )
    chosen_filters = FILTERS if filters is None else filters
    passed: list[NodeView] = []
    refused: list[str] = []
    for node in nodes:
        for f in chosen_filters:
            why = f(req, node)
            if why is not None:
                refused.append(f"{node.name}: {why}")
                break
        else:
            passed.append(node)
    if not passed:
        raise errors.InsufficientCapacity(
            _clip("no node has room for this instance: " + "; ".join(refused) + ".", 1800) + _advice(req, refused)
        )
    weigh = WEIGHERS[weigher]
    best = min(passed, key=lambda n: (group_members_on(req, n), -weigh(req, n), n.name))
    free = best.free_memory_after(req.demand)
    why = f"{weigher}: {free} MiB free after placement, best of {len(passed)} of {len(nodes)} nodes"
    if req.group is not None:
        why += f"; group '{req.group.name}' ({req.group.policy}"
        why += ", by zone)" if req.group.scope == "zone" else ")"
    constraints = [
        f"zone {req.zone}" if req.zone else "",
        f"node {req.node} asked for" if req.node else "",
        f"disk on {req.pinned}" if req.pinned else "",
    ]
    if any(constraints):
        why += "; " + ", ".join(c for c in constraints if c)
    if refused:
        why += "; refused " + "; ".join(refused)
    return Decision(node=best.name, reason=_clip(why))


def _advice(req: SchedRequest, refused: list[str]) -> str:
    if req.gpus and any("GPU" in r for r in refused):
        return (
            " Delete an instance that holds a GPU, ask for fewer GPUs or another --gpu-model, or add a node with "
            "GPUs (`minicloud gpu list` shows each GPU, whether it can be passed through and who holds it)"
        )
    if req.group is not None and req.group.policy == "anti-affinity" and any("anti-affinity" in r for r in refused):
        return (
            f" Group '{req.group.name}' allows one member per {req.group.scope}: add a node"
            + (" in another zone" if req.group.scope == "zone" else "")
            + ", delete a member, or use a soft-anti-affinity group"
        )
    return (
        " Pick a smaller type, delete or stop instances you no longer need (stopped ones keep their place), "
        "uncordon or add a node"
    )


def place(demand: Demand, candidates: list[NodeCapacity], used: dict[str, Demand]) -> str:
    """The capacity check alone (``instance resize`` on its own node): the candidate with the most free memory
    after placement; ``InsufficientCapacity`` saying why each was refused otherwise."""
    views = [NodeView(capacity=c, used=used.get(c.name, ZERO)) for c in candidates]
    return schedule(SchedRequest(demand=demand), views, filters=[capacity_filter]).node
