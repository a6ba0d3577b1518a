"""Placement: which node gets an instance. Pure functions over a snapshot; the instance service
(:mod:`minicloud.compute.instances`) commits the decision.

Capacity per node comes from the ``hypervisor`` record each agent publishes (host CPUs, memory and disk, and the
node's allocation ratios); usage is the sum of the instances assigned to the node, whatever their power state (a
stopped instance keeps its place, as on AWS and OpenStack). vCPUs are over-committed by ``cpu_allocation_ratio``,
memory by ``ram_allocation_ratio`` (1.0 by default: none), disk never: root disks are counted at their full size.

Which nodes are candidates is the instance service's decision (:func:`minicloud.compute.instances.candidate_nodes`):
an image in a ``ceph`` pool (or a Ceph boot volume) can run on every node, a local image or volume only on its node.
A root disk in a ``ceph`` pool or a boot volume takes nothing of the node's own disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from minicloud import errors
from minicloud.compute.kinds import HypervisorSpec, InstanceSpec


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


def place(demand: Demand, candidates: list[NodeCapacity], used: dict[str, Demand]) -> str:
    """The candidate with the most free memory after placement that fits; ``InsufficientCapacity`` saying why each
    candidate was refused otherwise."""
    if not candidates:
        raise errors.InsufficientCapacity(
            "no node can run this instance: the node holding its image or disk has not registered its compute "
            "capacity (is its agent running with compute enabled?)"
        )
    fitting = []
    reasons = []
    for cap in candidates:
        short = shortfall(demand, cap, used.get(cap.name, ZERO))
        if short:
            reasons.append(f"{cap.name}: not enough {', '.join(short)}")
        else:
            fitting.append((cap.memory_mib - used.get(cap.name, ZERO).memory_mib, cap.name))
    if not fitting:
        raise errors.InsufficientCapacity(
            "no node has room for this instance: " + "; ".join(reasons) + ". Pick a smaller type, delete or stop "
            "instances you no longer need (stopped ones keep their place), or add a node"
        )
    return max(fitting)[1]
