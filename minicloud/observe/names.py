"""Every metric minicloud exports, with its type, help and labels: the single list the collectors
(``agent/metrics/``), the docs (``docs/observability.md``, checked by a test) and dashboards read.

Naming follows Prometheus' conventions as Incus's ``/1.0/metrics`` and the libvirt exporter apply them: a
``minicloud_`` prefix, then the subject (``node``, ``instance``, ``api``, ``reconcile``), base units in the name
(``_bytes``, ``_seconds``), ``_total`` on counters. Labels:

- ``node`` on every series (the node that collected it; set by the collector, not the scraper);
- ``project_id`` and ``project`` only on series that belong to a project (instances, volumes, networks, routers): the query API enforces
  ``project_id`` (the project's id: a project re-created under an old name is a new id and sees none of the old one's
  history), so a series without it is visible to cluster administrators only (``?scope=cluster``); ``project`` is
  the project's name, for display;
- instance series carry ``instance_id`` (stable), ``name`` (may be reused after a delete), ``project_id`` and
  ``project``; disk series also ``device`` and ``volume_id`` (the attached volume's id; empty for the root disk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricType = Literal["counter", "gauge", "histogram"]

#: The label the query service enforces (``extra_label=project_id=<caller's project id>``).
PROJECT_ID_LABEL = "project_id"
#: The project's name: shown, never enforced on (a name can be reused after a project is deleted).
PROJECT_LABEL = "project"
NODE_LABEL = "node"
INSTANCE_LABELS = ("instance_id", "name", "project_id", "project", "node")


@dataclass(frozen=True)
class Metric:
    #: Full name as exported, without the ``_total``/``_bucket`` suffixes prometheus-client adds for counters and
    #: histograms: ``name`` is what users query (a counter ``minicloud_x_total`` is declared as ``minicloud_x_total``).
    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...]

    @property
    def family(self) -> str:
        """The name prometheus-client's metric families take (counters without ``_total``)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name


def _m(name: str, type_: MetricType, help_: str, *labels: str) -> Metric:
    return Metric(name, type_, help_, tuple(labels))


# -- node (psutil) -------------------------------------------------------------------------------------------------
NODE_CPU_SECONDS = _m(
    "minicloud_node_cpu_seconds_total", "counter", "CPU time spent by the node in each mode.", "node", "mode"
)
NODE_CPUS = _m("minicloud_node_cpus", "gauge", "Logical CPUs of the node.", "node")
NODE_LOAD1 = _m("minicloud_node_load1", "gauge", "1-minute load average.", "node")
NODE_LOAD5 = _m("minicloud_node_load5", "gauge", "5-minute load average.", "node")
NODE_LOAD15 = _m("minicloud_node_load15", "gauge", "15-minute load average.", "node")
NODE_MEMORY_TOTAL = _m("minicloud_node_memory_total_bytes", "gauge", "Physical memory of the node.", "node")
NODE_MEMORY_AVAILABLE = _m(
    "minicloud_node_memory_available_bytes", "gauge", "Memory available for new work without swapping.", "node"
)
NODE_MEMORY_USED = _m("minicloud_node_memory_used_bytes", "gauge", "Memory in use (total - available).", "node")
NODE_FS_SIZE = _m(
    "minicloud_node_filesystem_size_bytes", "gauge", "Size of a mounted filesystem.", "node", "mountpoint", "device"
)
NODE_FS_FREE = _m(
    "minicloud_node_filesystem_free_bytes",
    "gauge",
    "Free space of a mounted filesystem.",
    "node",
    "mountpoint",
    "device",
)
NODE_DISK_READ_BYTES = _m(
    "minicloud_node_disk_read_bytes_total", "counter", "Bytes read from a disk.", "node", "device"
)
NODE_DISK_WRITTEN_BYTES = _m(
    "minicloud_node_disk_written_bytes_total", "counter", "Bytes written to a disk.", "node", "device"
)
NODE_DISK_READS = _m("minicloud_node_disk_reads_total", "counter", "Reads completed on a disk.", "node", "device")
NODE_DISK_WRITES = _m("minicloud_node_disk_writes_total", "counter", "Writes completed on a disk.", "node", "device")
NODE_NET_RX_BYTES = _m(
    "minicloud_node_network_receive_bytes_total", "counter", "Bytes received on an interface.", "node", "interface"
)
NODE_NET_TX_BYTES = _m(
    "minicloud_node_network_transmit_bytes_total", "counter", "Bytes sent on an interface.", "node", "interface"
)
NODE_NET_RX_PACKETS = _m(
    "minicloud_node_network_receive_packets_total", "counter", "Packets received on an interface.", "node", "interface"
)
NODE_NET_TX_PACKETS = _m(
    "minicloud_node_network_transmit_packets_total", "counter", "Packets sent on an interface.", "node", "interface"
)
NODE_NET_RX_DROP = _m(
    "minicloud_node_network_receive_drop_total",
    "counter",
    "Incoming packets dropped on an interface.",
    "node",
    "interface",
)
NODE_NET_TX_DROP = _m(
    "minicloud_node_network_transmit_drop_total",
    "counter",
    "Outgoing packets dropped on an interface.",
    "node",
    "interface",
)

# -- instances (libvirt bulk domain stats) -----------------------------------------------------------------------
_I = INSTANCE_LABELS
INSTANCE_STATE = _m(
    "minicloud_instance_state", "gauge", "1 for the state the instance's domain is in (running, paused, shutoff, "
    "crashed, other).", *_I, "state",
)  # fmt: skip
INSTANCE_CPU_SECONDS = _m(
    "minicloud_instance_cpu_seconds_total", "counter", "CPU time used by the guest (all vCPUs).", *_I
)
INSTANCE_VCPUS = _m("minicloud_instance_vcpus", "gauge", "vCPUs the guest has now.", *_I)
INSTANCE_MEMORY = _m("minicloud_instance_memory_bytes", "gauge", "Memory the guest has now (balloon current).", *_I)
INSTANCE_MEMORY_AVAILABLE = _m(
    "minicloud_instance_memory_available_bytes", "gauge", "Memory the guest OS sees as usable (balloon driver).", *_I
)
INSTANCE_MEMORY_UNUSED = _m(
    "minicloud_instance_memory_unused_bytes", "gauge", "Memory the guest OS leaves unused (balloon driver).", *_I
)
INSTANCE_MEMORY_RSS = _m("minicloud_instance_memory_rss_bytes", "gauge", "Host memory the QEMU process uses.", *_I)
INSTANCE_DISK_READ_BYTES = _m(
    "minicloud_instance_disk_read_bytes_total",
    "counter",
    "Bytes the guest read from a disk.",
    *_I,
    "device",
    "volume_id",
)
INSTANCE_DISK_WRITTEN_BYTES = _m(
    "minicloud_instance_disk_written_bytes_total",
    "counter",
    "Bytes the guest wrote to a disk.",
    *_I,
    "device",
    "volume_id",
)
INSTANCE_DISK_READS = _m(
    "minicloud_instance_disk_reads_total",
    "counter",
    "Read requests of the guest on a disk.",
    *_I,
    "device",
    "volume_id",
)
INSTANCE_DISK_WRITES = _m(
    "minicloud_instance_disk_writes_total",
    "counter",
    "Write requests of the guest on a disk.",
    *_I,
    "device",
    "volume_id",
)
INSTANCE_NET_RX_BYTES = _m(
    "minicloud_instance_network_receive_bytes_total", "counter", "Bytes the guest received on a NIC.", *_I, "interface"
)
INSTANCE_NET_TX_BYTES = _m(
    "minicloud_instance_network_transmit_bytes_total", "counter", "Bytes the guest sent on a NIC.", *_I, "interface"
)
INSTANCE_NET_RX_PACKETS = _m(
    "minicloud_instance_network_receive_packets_total", "counter", "Packets the guest received.", *_I, "interface"
)
INSTANCE_NET_TX_PACKETS = _m(
    "minicloud_instance_network_transmit_packets_total", "counter", "Packets the guest sent.", *_I, "interface"
)
INSTANCE_NET_RX_DROP = _m(
    "minicloud_instance_network_receive_drop_total", "counter", "Packets to the guest dropped.", *_I, "interface"
)
INSTANCE_NET_TX_DROP = _m(
    "minicloud_instance_network_transmit_drop_total", "counter", "Packets from the guest dropped.", *_I, "interface"
)

# -- volumes (the node that manages each) ---------------------------------------------------------------------------
_V = ("volume_id", "name", "project_id", "project", "pool", "node")
VOLUME_SIZE = _m("minicloud_volume_size_bytes", "gauge", "Size of the volume (what its pool holds).", *_V)
VOLUME_STATE = _m(
    "minicloud_volume_state", "gauge", "1 for the state the volume is in (creating, available, attaching, in-use, "
    "detaching, extending, reverting, deleting, error).", *_V, "state",
)  # fmt: skip

# -- networks (the devices of each network built on the node) and routers' external legs ------------------------------
_N = ("network_id", "name", "project_id", "project", "node", "device", "interface")
NETWORK_RX_BYTES = _m(
    "minicloud_network_receive_bytes_total", "counter", "Bytes received on a device of the network on the node "
    "(device: bridge, vxlan (between nodes) or service (DHCP, DNS, metadata, routed)).", *_N,
)  # fmt: skip
NETWORK_TX_BYTES = _m(
    "minicloud_network_transmit_bytes_total", "counter", "Bytes sent on a device of the network on the node.", *_N
)
NETWORK_RX_PACKETS = _m(
    "minicloud_network_receive_packets_total", "counter", "Packets received on a device of the network.", *_N
)
NETWORK_TX_PACKETS = _m(
    "minicloud_network_transmit_packets_total", "counter", "Packets sent on a device of the network.", *_N
)
NETWORK_RX_DROP = _m(
    "minicloud_network_receive_drop_total", "counter", "Incoming packets dropped on a device of the network.", *_N
)
NETWORK_TX_DROP = _m(
    "minicloud_network_transmit_drop_total", "counter", "Outgoing packets dropped on a device of the network.", *_N
)
_R = ("router_id", "name", "project_id", "project", "network_id", "node")
ROUTER_EXTERNAL_RX_BYTES = _m(
    "minicloud_router_external_receive_bytes_total", "counter", "Bytes received on a router's external leg in a "
    "network's service namespace on the node.", *_R, "interface",
)  # fmt: skip
ROUTER_EXTERNAL_TX_BYTES = _m(
    "minicloud_router_external_transmit_bytes_total", "counter", "Bytes sent on a router's external leg.", *_R,
    "interface",
)  # fmt: skip
ROUTER_EXTERNAL_RX_PACKETS = _m(
    "minicloud_router_external_receive_packets_total", "counter", "Packets received on a router's external leg.",
    *_R, "interface",
)  # fmt: skip
ROUTER_EXTERNAL_TX_PACKETS = _m(
    "minicloud_router_external_transmit_packets_total", "counter", "Packets sent on a router's external leg.", *_R,
    "interface",
)  # fmt: skip
ROUTER_EXTERNAL_RX_DROP = _m(
    "minicloud_router_external_receive_drop_total", "counter", "Incoming packets dropped on a router's external "
    "leg.", *_R, "interface",
)  # fmt: skip
ROUTER_EXTERNAL_TX_DROP = _m(
    "minicloud_router_external_transmit_drop_total", "counter", "Outgoing packets dropped on a router's external "
    "leg.", *_R, "interface",
)  # fmt: skip
ROUTER_FLOATING_IPS = _m(
    "minicloud_router_floating_ips", "gauge", "Floating IPs NATed on the node by a router's external leg (those of "
    "the node's NICs in the network).", *_R,
)  # fmt: skip

# -- minicloud itself ----------------------------------------------------------------------------------------------
API_REQUESTS = _m(
    "minicloud_api_requests_total", "counter", "API requests answered, by route template and status.",
    "node", "method", "route", "status",
)  # fmt: skip
API_REQUEST_DURATION = _m(
    "minicloud_api_request_duration_seconds", "histogram", "Time to answer an API request (until the handler returns; "
    "streams count until they start).", "node", "method", "route",
)  # fmt: skip
RECONCILE_PASSES = _m(
    "minicloud_reconcile_total", "counter", "Reconcile passes per reconciler and result (ok or error).",
    "node", "reconciler", "result",
)  # fmt: skip
RECONCILE_DURATION = _m(
    "minicloud_reconcile_duration_seconds", "histogram", "Time one reconcile pass took.", "node", "reconciler"
)
OPERATIONS = _m(
    "minicloud_operations", "gauge", "Long-running operations this node runs now, by state.", "node", "state"
)
STORE_COMMIT_DURATION = _m(
    "minicloud_store_commit_duration_seconds", "histogram", "Time a state store commit took as its caller saw it "
    "(group commit and fsync on one node; etcd and the local replica in a cluster).", "node",
)  # fmt: skip
STORE_COMMIT_BATCH = _m(
    "minicloud_store_commit_batch_size", "histogram", "Transactions written per SQLite transaction (one fsync each).",
    "node",
)  # fmt: skip
STORE_REVISION = _m("minicloud_store_revision", "gauge", "The revision of this node's copy of the state.", "node")
STORE_STALE = _m(
    "minicloud_store_stale", "gauge", "1 while this node's replica has not heard from etcd for too long.", "node"
)
SERVICES_LEADER = _m(
    "minicloud_cluster_services_leader", "gauge", "1 on the node holding the cluster services leadership (leader "
    "loops: alarms, billing, retention).", "node",
)  # fmt: skip
ETCD_UP = _m("minicloud_etcd_up", "gauge", "1 when this voting node's etcd member answered its status call.", "node")
ETCD_IS_LEADER = _m("minicloud_etcd_is_leader", "gauge", "1 when this node's etcd member leads Raft.", "node")
ETCD_HAS_LEADER = _m("minicloud_etcd_has_leader", "gauge", "1 when this node's etcd member knows a leader.", "node")
ETCD_LEADER_CHANGES = _m(
    "minicloud_etcd_leader_changes_total", "counter", "Raft leader changes this agent has seen since it started "
    "(one status call per interval).", "node",
)  # fmt: skip
ETCD_DB_SIZE = _m("minicloud_etcd_db_size_bytes", "gauge", "Size of this node's etcd database file.", "node")
COLLECT_DURATION = _m(
    "minicloud_metrics_collect_duration_seconds", "gauge", "Time the last collection of a source took (node: psutil, "
    "instances: one libvirt bulk stats call).", "node", "source",
)  # fmt: skip
COLLECT_ERRORS = _m(
    "minicloud_metrics_collect_errors_total", "counter", "Collections of a source that failed.", "node", "source"
)

# -- GPUs (NVML; docs/gpus.md) ---------------------------------------------------------------------------------------
GPU_LABELS = ("node", "gpu", "pci_address", "model")
GPU_UTILIZATION = _m("minicloud_gpu_utilization_ratio", "gauge", "GPU busy time (0-1), from NVML.", *GPU_LABELS)
GPU_MEMORY_USED = _m("minicloud_gpu_memory_used_bytes", "gauge", "GPU memory in use, from NVML.", *GPU_LABELS)
GPU_MEMORY_TOTAL = _m("minicloud_gpu_memory_total_bytes", "gauge", "GPU memory, from NVML.", *GPU_LABELS)
GPU_TEMPERATURE = _m("minicloud_gpu_temperature_celsius", "gauge", "GPU core temperature, from NVML.", *GPU_LABELS)
GPU_POWER = _m("minicloud_gpu_power_watts", "gauge", "GPU power draw, from NVML.", *GPU_LABELS)
GPU_POWER_LIMIT = _m("minicloud_gpu_power_limit_watts", "gauge", "GPU power limit, from NVML.", *GPU_LABELS)
GPU_INFO = _m(
    "minicloud_gpu_info", "gauge", "1 per GPU the node found (NVML or sysfs), with its driver and whether it can be "
    "passed through.", *GPU_LABELS, "driver", "capable",
)  # fmt: skip

#: Latency buckets (seconds) of the histograms: API requests and reconcile passes.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Every metric, in documentation order.
ALL: tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))
BY_NAME: dict[str, Metric] = {m.name: m for m in ALL}

#: ``minicloud metrics show instance NAME --metric X``: what each choice queries, as (column title, PromQL with
#: ``{sel}`` for the instance's selector and ``{w}`` for the rate window).
INSTANCE_VIEWS: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (("cpu %", "100 * rate(minicloud_instance_cpu_seconds_total{sel}[{w}])"),),
    "memory": (
        ("memory MiB", "minicloud_instance_memory_bytes{sel} / 1048576"),
        ("available MiB", "minicloud_instance_memory_available_bytes{sel} / 1048576"),
        ("unused MiB", "minicloud_instance_memory_unused_bytes{sel} / 1048576"),
    ),
    "disk": (
        ("read B/s", "sum(rate(minicloud_instance_disk_read_bytes_total{sel}[{w}]))"),
        ("write B/s", "sum(rate(minicloud_instance_disk_written_bytes_total{sel}[{w}]))"),
    ),
    "net": (
        ("rx B/s", "sum(rate(minicloud_instance_network_receive_bytes_total{sel}[{w}]))"),
        ("tx B/s", "sum(rate(minicloud_instance_network_transmit_bytes_total{sel}[{w}]))"),
    ),
}

#: ``minicloud top``: one instant query per column, each answering one value per instance (by ``instance_id``), as
#: (column title, PromQL with ``{sel}`` for the node selector and ``{w}`` for the rate window).
TOP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("cpu %", "100 * rate(minicloud_instance_cpu_seconds_total{sel}[{w}])"),
    ("mem MiB", "minicloud_instance_memory_bytes{sel} / 1048576"),
    ("rss MiB", "minicloud_instance_memory_rss_bytes{sel} / 1048576"),
    ("disk r B/s", "sum by (instance_id) (rate(minicloud_instance_disk_read_bytes_total{sel}[{w}]))"),
    ("disk w B/s", "sum by (instance_id) (rate(minicloud_instance_disk_written_bytes_total{sel}[{w}]))"),
    ("net rx B/s", "sum by (instance_id) (rate(minicloud_instance_network_receive_bytes_total{sel}[{w}]))"),
    ("net tx B/s", "sum by (instance_id) (rate(minicloud_instance_network_transmit_bytes_total{sel}[{w}]))"),
)
#: The series that names each instance in ``top`` (its labels and its state).
TOP_STATE = "minicloud_instance_state{sel} == 1"
