"""Placement decisions: pure functions over capacities and usage."""

from __future__ import annotations

import pytest

from minicloud import errors
from minicloud.compute.kinds import HYPERVISOR, HypervisorSpec, InstanceSpec
from minicloud.compute.scheduler import Demand, NodeCapacity, demand_of, place, usage
from minicloud.state import Record

TINY = Demand(1, 128, 1)


def cap(name: str, vcpus: int = 4, memory_mib: int = 1024, disk_gib: int = 10) -> NodeCapacity:
    return NodeCapacity(name, vcpus, memory_mib, disk_gib)


def test_capacity_applies_ratios_and_reservations():
    spec = HypervisorSpec(cpus=2, memory_mib=4096, disk_gib=100, cpu_allocation_ratio=4.0, ram_allocation_ratio=1.5,
                          reserved_memory_mib=512, reserved_disk_gib=10)  # fmt: skip
    assert NodeCapacity.of("n1", spec) == NodeCapacity("n1", 8, 4096 * 3 // 2 - 512, 90)


def test_a_hypervisor_record_of_an_older_agent_reads_with_defaults():
    record = Record(kind="hypervisor", id="hv-1", project="", name="n1", spec={"cpus": 2, "memory_mib": 1024,
                    "disk_gib": 10}, created_at="t", updated_at="t")  # fmt: skip
    assert NodeCapacity.of("n1", HYPERVISOR.load(record).spec) == NodeCapacity("n1", 2, 1024, 10)


def test_an_instance_demands_its_shape():
    spec = InstanceSpec(uuid="u", image_id="img-1", image_name="g", type="t", vcpus=2, memory_mib=256, disk_gib=3)
    assert demand_of(spec) == Demand(2, 256, 3)


def test_the_fitting_node_with_the_most_free_memory_wins():
    nodes = [cap("a", memory_mib=1024), cap("b", memory_mib=2048), cap("c", memory_mib=4096)]
    used = {"c": Demand(0, 3500, 0)}
    assert place(TINY, nodes, used) == "b"


def test_every_dimension_must_fit_and_the_refusal_says_what_is_short():
    nodes = [cap("a", vcpus=1), cap("b", disk_gib=1)]
    used = {"a": Demand(1, 0, 0), "b": Demand(0, 0, 1)}
    with pytest.raises(errors.InsufficientCapacity) as exc:
        place(TINY, nodes, used)
    assert "a: not enough vCPUs (0 of 1 free, 1 needed)" in exc.value.detail
    assert "b: not enough disk (0 of 1 GiB free, 1 needed)" in exc.value.detail


def test_exactly_full_fits_and_one_more_does_not():
    node = cap("a", vcpus=2, memory_mib=256, disk_gib=2)
    assert place(TINY, [node], {"a": TINY}) == "a"
    with pytest.raises(errors.InsufficientCapacity):
        place(TINY, [node], {"a": TINY + TINY})


def test_no_candidates_is_a_clear_refusal():
    with pytest.raises(errors.InsufficientCapacity, match="has not registered its compute capacity"):
        place(TINY, [], {})


def test_usage_sums_per_node():
    assert usage([("a", TINY), ("b", TINY), ("a", Demand(2, 256, 5))]) == {"a": Demand(3, 384, 6), "b": TINY}
