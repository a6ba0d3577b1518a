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
            "block.count": 2,
            "block.0.name": "vda",
            "block.0.rd.bytes": 1024,
            "block.0.wr.bytes": 2048,
            "block.0.rd.reqs": 1,
            "block.0.wr.reqs": 2,
            "block.1.name": "vdb",
            "block.1.rd.bytes": 4096,
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
    UUID_A: InstanceLabels("i-a", "web", "pa", "prj-a", volumes={"vdb": "vol-data"}),
    UUID_B: InstanceLabels("i-b", "db", "pb", "prj-b"),
}


def test_instance_series_from_one_bulk_stats_list():
    got = _samples(instance_families(STATS, LABELS, "n1"))
    a = {("instance_id", "i-a"), ("name", "web"), ("project_id", "prj-a"), ("project", "pa"), ("node", "n1")}
    assert got[("minicloud_instance_cpu_seconds_total", frozenset(a))] == 2.5
    assert got[("minicloud_instance_vcpus", frozenset(a))] == 2
    assert got[("minicloud_instance_memory_bytes", frozenset(a))] == 1 << 30
    assert got[("minicloud_instance_memory_available_bytes", frozenset(a))] == 1000000 * 1024
    root = {("device", "vda"), ("volume_id", "")}
    assert got[("minicloud_instance_disk_written_bytes_total", frozenset(a | root))] == 2048
    data = {("device", "vdb"), ("volume_id", "vol-data")}  # an attached volume: its id on its disk's series
    assert got[("minicloud_instance_disk_read_bytes_total", frozenset(a | data))] == 4096
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


async def test_control_plane_series_from_the_store_and_etcd(tmp_path):
    """The store's commit latency and batch sizes come from the store itself; etcd's from one status call to this
    node's member per refresh: up, leading, a leader change counted, a member that stops answering is up 0."""
    from types import SimpleNamespace

    from agent.metrics.control import ControlPlaneMetrics
    from minicloud.state import Create, Record, Txn
    from minicloud.state.handle import StoreHandle
    from minicloud.state.sqlite import SQLiteStore

    store = StoreHandle(SQLiteStore(tmp_path / "state.db"))
    await store.open()
    try:
        for i in range(3):
            await store.commit(
                Txn(
                    [Create(Record(kind="note", id=f"n-{i}", name=f"n{i}", project="", created_at="t", updated_at="t"))]
                )
            )
        answers: list[object] = [
            {"header": {"member_id": "11"}, "leader": "11", "dbSize": 4096},
            {"header": {"member_id": "11"}, "leader": "22", "dbSize": 8192},
            OSError("connection refused"),
        ]

        async def status(url: str) -> dict:
            assert url == "https://10.0.0.1:2379"
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[return-value]

        cluster = SimpleNamespace(
            enabled=True,
            is_leader=True,
            client=SimpleNamespace(status=status),
            state=SimpleNamespace(role="voter", client_url="https://10.0.0.1:2379"),
        )
        registry = CollectorRegistry(auto_describe=False)
        control = ControlPlaneMetrics("n1", store, cluster)
        registry.register(control)

        def scrape() -> dict:
            return _samples(text_string_to_metric_families(generate_latest(registry).decode()))

        node = frozenset({("node", "n1")})
        await control.refresh()
        s = scrape()
        assert s[("minicloud_store_commit_duration_seconds_count", node)] == 3
        assert s[("minicloud_store_commit_batch_size_count", node)] >= 1
        assert s[("minicloud_store_revision", node)] == store.revision > 0
        assert s[("minicloud_etcd_up", node)] == 1 and s[("minicloud_etcd_is_leader", node)] == 1
        assert s[("minicloud_etcd_db_size_bytes", node)] == 4096
        assert s[("minicloud_cluster_services_leader", node)] == 1
        await control.refresh()
        s = scrape()
        assert s[("minicloud_etcd_is_leader", node)] == 0 and s[("minicloud_etcd_leader_changes_total", node)] == 1
        await control.refresh()
        s = scrape()
        assert s[("minicloud_etcd_up", node)] == 0 and ("minicloud_etcd_is_leader", node) not in s
        # a single node: the store's series only
        single = CollectorRegistry(auto_describe=False)
        single.register(ControlPlaneMetrics("n1", store, None))
        text = generate_latest(single).decode()
        assert "minicloud_store_commit_duration_seconds_bucket" in text and "minicloud_etcd_up" not in text
    finally:
        await store.close()


async def test_volume_series_for_the_volumes_this_node_manages(tmp_path):
    """Each volume is exported by the node its record names (one indexed read), with its size, state and pool; a
    volume of another node, or of a project being torn down, is not."""
    import msgspec
    from aiohttp import web

    from agent.metrics.serve import node_volumes
    from agent.metrics.volumes import VolumeMetrics
    from minicloud import ids
    from minicloud.api.keys import CONFIG, STORE
    from minicloud.state import Create, Txn
    from minicloud.state.handle import StoreHandle
    from minicloud.state.sqlite import SQLiteStore
    from minicloud.storage.kinds import VOLUME, VolumeSpec
    from tests.unit.api.conftest import make_config

    app = web.Application()
    app[CONFIG] = make_config(tmp_path)  # node n1
    app[STORE] = store = StoreHandle(SQLiteStore(tmp_path / "state.db"))
    await store.open()
    try:
        ops = []
        for name, project, node, state in (
            ("data", "default", "n1", "in-use"),
            ("far", "default", "n2", "available"),
            ("orphan", "gone", "n1", "available"),
        ):
            spec = VolumeSpec(size_gib=2, pool="pool-1", pool_name="scratch", node=node)
            record = VOLUME.dump(VOLUME.new(project=project, name=name, spec=spec, labels={}, stamp=ids.now()))
            ops.append(Create(msgspec.structs.replace(record, status={"state": state, "size_gib": 3})))
        await store.commit(Txn(ops))
        registry = CollectorRegistry(auto_describe=False)
        volumes = VolumeMetrics("n1", lambda: node_volumes(app))
        registry.register(volumes)
        await volumes.refresh()
        got = _samples(text_string_to_metric_families(generate_latest(registry).decode()))
    finally:
        await store.close()
    sizes = {
        dict(labels)["name"]: (v, dict(labels)) for (name, labels), v in got.items() if name == names.VOLUME_SIZE.name
    }
    assert list(sizes) == ["data"]
    value, labels = sizes["data"]
    assert value == 3 << 30 and labels["project_id"] == "prj-default" and labels["pool"] == "scratch"
    assert labels["node"] == "n1" and labels["volume_id"].startswith("vol-")
    states = {dict(lb)["state"]: v for (name, lb), v in got.items() if name == names.VOLUME_STATE.name}
    assert states["in-use"] == 1 and states["available"] == 0
    for name, labels in got:
        assert {k for k, _ in labels} == set(names.BY_NAME[name].labels), name
