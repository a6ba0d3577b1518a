"""Collectors: node figures from psutil's shapes, instance series from a libvirt bulk stats list (a fake one), and
the node collector end to end through a registry (the text a scrape gets)."""

from __future__ import annotations

from collections import namedtuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import NodeMetrics
from agent.metrics.instances import InstanceLabels, instance_families
from agent.metrics.node import NodeSnapshot, node_families
from minicloud.observe import names

# psutil's own result shapes
sdiskio = namedtuple("sdiskio", "read_count write_count read_bytes write_bytes read_time write_time")
snetio = namedtuple("snetio", "bytes_sent bytes_recv packets_sent packets_recv errin errout dropin dropout")


def _snapshot() -> NodeSnapshot:
    return NodeSnapshot(
        cpu_times={"user": 10.5, "system": 2.0, "idle": 100.0},
        cpu_count=4,
        load=(0.5, 0.25, 0.125),
        memory_total=8 << 30,
        memory_available=6 << 30,
        filesystems={"/": ("/dev/vda", 100 << 30, 40 << 30)},
        disks={"vda": sdiskio(3, 4, 4096, 8192, 0, 0)},
        nics={"eth0": snetio(1000, 2000, 10, 20, 0, 0, 1, 2)},
    )


def _samples(families) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in families:
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_node_figures_from_a_psutil_snapshot():
    got = _samples(node_families(_snapshot(), "n1"))
    assert got[("minicloud_node_cpu_seconds_total", frozenset({("node", "n1"), ("mode", "user")}))] == 10.5
    assert got[("minicloud_node_memory_used_bytes", frozenset({("node", "n1")}))] == 2 << 30
    assert got[("minicloud_node_load5", frozenset({("node", "n1")}))] == 0.25
    fs = frozenset({("node", "n1"), ("mountpoint", "/"), ("device", "/dev/vda")})
    assert got[("minicloud_node_filesystem_free_bytes", fs)] == 40 << 30
    assert got[("minicloud_node_disk_written_bytes_total", frozenset({("node", "n1"), ("device", "vda")}))] == 8192
    nic = frozenset({("node", "n1"), ("interface", "eth0")})
    assert got[("minicloud_node_network_receive_bytes_total", nic)] == 2000
    assert got[("minicloud_node_network_transmit_drop_total", nic)] == 2
    # every series is a declared metric with exactly its declared labels
    for name, labels in got:
        metric = names.BY_NAME[name]
        assert {k for k, _ in labels} == set(metric.labels), name


UUID_A = "11111111-1111-1111-1111-111111111111"
UUID_B = "22222222-2222-2222-2222-222222222222"
FOREIGN = "33333333-3333-3333-3333-333333333333"
STATS = [
    (
        UUID_A.upper(),
        {
            "state.state": 1,
            "cpu.time": 2_500_000_000,
            "vcpu.current": 2,
            "balloon.current": 1048576,
            "balloon.available": 1000000,
            "balloon.unused": 500000,
            "balloon.rss": 300000,
            "block.count": 1,
            "block.0.name": "vda",
            "block.0.rd.bytes": 1024,
            "block.0.wr.bytes": 2048,
            "block.0.rd.reqs": 1,
            "block.0.wr.reqs": 2,
            "net.count": 1,
            "net.0.name": "tap1",
            "net.0.rx.bytes": 100,
            "net.0.tx.bytes": 200,
            "net.0.rx.pkts": 3,
            "net.0.tx.pkts": 4,
            "net.0.rx.drop": 0,
            "net.0.tx.drop": 1,
        },
    ),
    (UUID_B, {"state.state": 5}),  # shut off: its state only
    (FOREIGN, {"state.state": 1, "cpu.time": 1}),  # not an instance of ours
]
LABELS = {
    UUID_A: InstanceLabels("i-a", "web", "pa", "prj-a"),
    UUID_B: InstanceLabels("i-b", "db", "pb", "prj-b"),
}


def test_instance_series_from_one_bulk_stats_list():
    got = _samples(instance_families(STATS, LABELS, "n1"))
    a = {("instance_id", "i-a"), ("name", "web"), ("project_id", "prj-a"), ("project", "pa"), ("node", "n1")}
    assert got[("minicloud_instance_cpu_seconds_total", frozenset(a))] == 2.5
    assert got[("minicloud_instance_vcpus", frozenset(a))] == 2
    assert got[("minicloud_instance_memory_bytes", frozenset(a))] == 1 << 30
    assert got[("minicloud_instance_memory_available_bytes", frozenset(a))] == 1000000 * 1024
    assert got[("minicloud_instance_disk_written_bytes_total", frozenset(a | {("device", "vda")}))] == 2048
    assert got[("minicloud_instance_network_transmit_bytes_total", frozenset(a | {("interface", "tap1")}))] == 200
    assert got[("minicloud_instance_state", frozenset(a | {("state", "running")}))] == 1
    assert got[("minicloud_instance_state", frozenset(a | {("state", "shutoff")}))] == 0
    b = {("instance_id", "i-b"), ("name", "db"), ("project_id", "prj-b"), ("project", "pb"), ("node", "n1")}
    assert got[("minicloud_instance_state", frozenset(b | {("state", "shutoff")}))] == 1
    # a stopped guest has no usage series; a foreign domain has none at all
    assert not any(
        dict(labels).get("instance_id") == "i-b" and name != "minicloud_instance_state" for name, labels in got
    )
    assert all(dict(labels).get("instance_id") in ("i-a", "i-b") for _, labels in got)
    for name, labels in got:
        assert {k for k, _ in labels} == set(names.BY_NAME[name].labels), name


class FakeStats:
    def __init__(self):
        self.calls = 0

    def read(self):
        self.calls += 1
        return STATS

    def close(self):
        pass


async def test_a_scrape_renders_the_last_refresh_and_makes_no_host_calls():
    registry = CollectorRegistry(auto_describe=False)
    stats = FakeStats()

    async def labels():
        return LABELS

    metrics = NodeMetrics(registry, "n1", stats=stats, instances=labels, operations=lambda: 2, read_node=_snapshot)
    metrics.observe_reconcile("compute", 0.02, True)
    metrics.observe_reconcile("compute", 0.5, False)
    await metrics.refresh()
    assert stats.calls == 1  # one bulk call per refresh, whatever the number of domains
    text = generate_latest(registry).decode()
    text2 = generate_latest(registry).decode()
    assert stats.calls == 1 and text == text2
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "minicloud_instance_cpu_seconds" in families  # the counter family (samples end in _total)
    passes = {
        (s.labels["result"], s.value) for s in families["minicloud_reconcile"].samples if s.name.endswith("_total")
    }
    assert passes == {("ok", 1.0), ("error", 1.0)}
    assert any(s.value == 2 for s in families["minicloud_operations"].samples)
    metrics.close()


async def test_a_failing_libvirt_drops_instance_series_and_counts_the_error():
    registry = CollectorRegistry(auto_describe=False)

    class Broken(FakeStats):
        def read(self):
            raise RuntimeError("libvirt is gone")

    async def labels():
        return LABELS

    metrics = NodeMetrics(registry, "n1", stats=Broken(), instances=labels, read_node=_snapshot)
    await metrics.refresh()
    text = generate_latest(registry).decode()
    assert "minicloud_instance_cpu_seconds_total{" not in text
    assert 'minicloud_metrics_collect_errors_total{node="n1",source="instances"} 1.0' in text
    metrics.close()


def test_every_metric_is_documented():
    from pathlib import Path

    doc = (Path(__file__).parents[3] / "docs" / "observability.md").read_text()
    missing = [m.name for m in names.ALL if f"`{m.name}`" not in doc]
    assert not missing, f"docs/observability.md does not list {missing}"
