"""The agent's configuration: one schema with defaults, layered built-in defaults < file < environment < flags.

The file is TOML (``/etc/minicloud/minicloud.toml`` unless ``--config``/``MINICLOUD_CONFIG`` says otherwise); a missing
default file is fine, a missing file that was asked for is an error. Unknown keys are errors, so a typo never silently
falls back to a default. ``minicloud config validate`` runs exactly this loader.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from minicloud.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/minicloud/minicloud.toml")
DEFAULT_SOCKET = "/run/minicloud/minicloud.sock"
DEFAULT_DATA_DIR = "/var/lib/minicloud"
DEFAULT_LISTEN = "0.0.0.0:8443"

_LISTEN_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]*):(?P<port>\d{1,5})$")


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[agent]``: where the daemon keeps its state and where it listens."""

    #: State, CA and certificates. Related: ``socket``.
    data_dir: str = DEFAULT_DATA_DIR
    #: Unix socket for local root (trusted, no token needed). Related: ``listen``.
    socket: str = DEFAULT_SOCKET
    #: HTTPS address for remote clients and other nodes, ``HOST:PORT``; port 0 picks a free port. Empty disables it.
    listen: str = DEFAULT_LISTEN
    #: This node's name in the cluster; defaults to the host name.
    node_name: str = ""
    #: ``debug``, ``info``, ``warning`` or ``error``. Related: ``access_log``.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Log one line per HTTP request at ``info``.
    access_log: bool = True


class ApiConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[api]``: limits applied to every request."""

    #: Largest accepted request body in bytes (image uploads are streamed and have their own bound,
    #: ``compute.image_upload_max_bytes``).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    #: How long an ``Idempotency-Key`` is remembered, in seconds.
    idempotency_ttl: Annotated[int, msgspec.Meta(ge=60)] = 24 * 3600
    #: The most revisions of change history kept for resuming ``GET /v1/events``.
    retain_changes: Annotated[int, msgspec.Meta(ge=1000)] = 100_000
    #: Requests per second each principal may make over HTTPS (token bucket; 429 with Retry-After beyond it).
    #: Related: ``rate_limit_burst``. The root Unix socket is not limited.
    rate_limit_rps: Annotated[float, msgspec.Meta(gt=0)] = 200.0
    #: How many requests a principal may make at once before ``rate_limit_rps`` applies.
    rate_limit_burst: Annotated[int, msgspec.Meta(ge=1)] = 400
    #: Failed authentications (401) per second a source address may make; once its burst is spent, every request
    #: from it over HTTPS is 429 *before* authentication. Related: ``auth_failure_burst``, ``rate_limit_rps``.
    auth_failure_rps: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    #: How many failed authentications a source address may make at once before ``auth_failure_rps`` applies.
    auth_failure_burst: Annotated[int, msgspec.Meta(ge=1)] = 30
    #: Seconds a connection may take to send a request's headers (from its first byte; for a new connection, from
    #: the TLS handshake) before it is closed. Related: ``body_timeout``.
    header_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    #: Seconds a request body may take to arrive after its headers before the connection is closed (image uploads
    #: are bounded by ``compute.image_upload_idle_timeout`` and ``image_upload_min_rate`` instead).
    #: Related: ``max_body_bytes``, ``header_timeout``.
    body_timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[cluster]``: how this node takes part in a cluster (see `minicloud cluster enable` and `minicloud join`)."""

    #: The address other nodes reach this one on. Default: the ``agent.listen`` host when it is a specific
    #: address, else the host's first non-loopback IPv4 address.
    address: str = ""
    #: etcd's client port (mutual TLS, cluster CA only). Related: ``etcd_peer_port``.
    etcd_client_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 2379
    #: etcd's peer port (mutual TLS, cluster CA only).
    etcd_peer_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 2380
    #: etcd's ``--quota-backend-bytes``: past it the cluster refuses writes (NOSPACE) until space is freed.
    #: `minicloud cluster show` warns at 80 %. Default 2 GiB; etcd advises at most 8 GiB.
    etcd_quota_bytes: Annotated[int, msgspec.Meta(ge=64 << 20, le=8 << 30)] = 2 << 30
    #: etcd keeps this many revisions of history (``--auto-compaction-retention``, revision mode): a node that was
    #: away longer reloads a snapshot instead of replaying. Related: ``etcd_quota_bytes``.
    etcd_history_revisions: Annotated[int, msgspec.Meta(ge=1000)] = 100_000


class ComputeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[compute]``: virtual machines on this node (see docs/compute.md)."""

    #: ``libvirt`` runs real guests; ``fake`` keeps domains in memory (unit tests and API demos, nothing boots);
    #: ``none`` runs no compute reconciler on this node (it still serves the API). Related: ``libvirt_uri``.
    driver: Literal["libvirt", "fake", "none"] = "libvirt"
    #: The libvirt connection the driver opens.
    libvirt_uri: str = "qemu:///system"
    #: ``auto`` uses KVM only when /dev/kvm opens and the CPU shows vmx/svm, TCG emulation (``qemu``) otherwise.
    #: `minicloud node show` says which and why.
    virt_type: Literal["auto", "kvm", "qemu"] = "auto"
    #: How the scheduler orders the nodes that can take an instance: ``spread`` (the most free memory first: an even
    #: load, the default) or ``pack`` (the least: fill one node before the next). The cluster setting
    #: ``scheduler-weigher`` (``minicloud cluster set``) overrides it on every node; while it is not set, the node
    #: answering a create decides with this value. Related: ``cpu_allocation_ratio``.
    scheduler_weigher: Literal["spread", "pack"] = "spread"
    #: Virtual CPUs per host CPU the scheduler hands out. Related: ``ram_allocation_ratio``.
    cpu_allocation_ratio: Annotated[float, msgspec.Meta(gt=0, le=64)] = 4.0
    #: Guest memory per byte of host memory (1.0: no over-commit). Related: ``reserved_memory_mib``.
    ram_allocation_ratio: Annotated[float, msgspec.Meta(gt=0, le=16)] = 1.0
    #: Host memory kept back for the host itself and the agent.
    reserved_memory_mib: Annotated[int, msgspec.Meta(ge=0)] = 512
    #: Disk space (of the data directory's filesystem) kept back, in GiB. Root disks are counted at full size.
    reserved_disk_gib: Annotated[int, msgspec.Meta(ge=0)] = 1
    #: Directories on the node that ``image import --path/--kernel/--initrd`` may read from (resolved, no symlinks
    #: out). Related: ``agent.data_dir`` (``<data_dir>/import`` is always allowed).
    image_dirs: list[str] = msgspec.field(default_factory=lambda: ["/var/lib/minicloud/import"])
    #: Internal addresses ``image import NAME URL`` may download from: CIDRs (``10.1.0.0/16``, ``127.0.0.1/32``) or
    #: host names as written in the URL (``mirror.lan``: whatever it resolves to). Without an entry, loopback,
    #: link-local, private, shared, multicast, unspecified and reserved addresses and the node's own are refused.
    #: Related: ``image_url_max_bytes``.
    image_url_allow: list[str] = msgspec.field(default_factory=list)
    #: The largest image a URL import downloads, in bytes (default 20 GiB). Related: ``image_url_allow``.
    image_url_max_bytes: Annotated[int, msgspec.Meta(ge=1)] = 20 << 30
    #: The largest image ``PUT /v1/images/{name}/file`` (``image import NAME ./disk.qcow2`` over a remote) accepts, in
    #: bytes (default 20 GiB); a larger ``Content-Length`` is refused (413) before a byte is read.
    #: Related: ``image_upload_min_rate``.
    image_upload_max_bytes: Annotated[int, msgspec.Meta(ge=1)] = 20 << 30
    #: An upload's body is not bound by ``api.body_timeout``: it may take ``image_upload_idle_timeout`` +
    #: size / ``image_upload_min_rate`` seconds (bytes per second; default 128 KiB/s, about 1 Mbit/s), and is cut
    #: off, keeping nothing, when no byte arrives for ``image_upload_idle_timeout`` seconds.
    image_upload_min_rate: Annotated[int, msgspec.Meta(ge=1024)] = 128 << 10
    #: Seconds an upload may send nothing before it is cut off (under the 10 minutes after which abandoned image
    #: files are collected). Related: ``image_upload_min_rate``.
    image_upload_idle_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 60.0
    #: Seconds a graceful stop (ACPI power button) may take before the guest is powered off.
    stop_timeout: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 60.0
    #: How often the reconciler re-checks every instance even when nothing changed, in seconds.
    resync_interval: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0


IfName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.@-]{1,15}$")]


class NetworkConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[network]``: the node's default network (a bridge with DHCP/DNS and NAT) that instances are attached to."""

    #: Build the default network at all (``driver = none`` in ``[compute]`` also skips it).
    enabled: bool = True
    #: The Linux bridge (at most 15 characters). Related: ``cidr``.
    bridge: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,15}$")] = "mcbr0"
    #: The subnet; the bridge gets its first address, DHCP hands out the rest.
    cidr: str = "10.213.0.0/24"
    #: NAT (masquerade) traffic from the subnet to the node's other interfaces.
    masquerade: bool = True
    #: Instances created without ``--nic`` get their project's default VPC (network, subnet and router ``default``,
    #: SNAT through the ``host`` external network: this bridge). At start the agent makes the ``host`` network,
    #: maps provider ``host`` to ``bridge`` and keeps DHCP below ``host``'s pool (docs/networking.md, "Default
    #: VPC"). False: they sit on this bridge. Related: ``providers``.
    default_vpc: bool = False
    #: The MTU of the links between nodes; VPC networks get 50 bytes less (VXLAN headers). Read where a network is
    #: created, so keep it equal on every node.
    underlay_mtu: Annotated[int, msgspec.Meta(ge=1280, le=9216)] = 1500
    #: This node's IPv4 address on the links between nodes: the local end of its VXLAN devices, which other nodes
    #: send to (published on its ``node`` record). "" uses the node's cluster address (127.0.0.1 on a single node).
    #: Related: ``underlay_mtu``.
    underlay_address: Annotated[str, msgspec.Meta(pattern=r"^$|^[0-9]{1,3}(\.[0-9]{1,3}){3}$")] = ""
    #: The names of the per-network service namespaces are this + the VNI in six hex digits (``ip netns`` lists
    #: them). Only test clusters whose nodes share one ``/run/netns`` need another per node.
    service_namespace_prefix: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,20}$")] = "mcs-"
    #: ``[network.providers]``: PHYSNET = "ifname", the host interface or bridge of this node that an external network
    #: created with ``--provider PHYSNET`` maps to (routers' SNAT leaves through it). Related: ``network create
    #: --external``.
    providers: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], IfName] = {}


Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[storage]``: how this node runs its part of the Ceph cluster (``minicloud storage enable``; see
    docs/storage.md). The MON ports must be the same on every node."""

    #: The port a MON on this node listens on (msgr2), and the older protocol's (msgr1). Related: ``ceph_mon_port_v1``.
    ceph_mon_port: Port = 3300
    ceph_mon_port_v1: Port = 6789
    #: The MGR's Prometheus exporter, bound to the node's cluster address only.
    ceph_prometheus_port: Port = 9283
    #: Bytes of memory each OSD of this node aims to use (``osd_memory_target``; caches shrink to fit). An idle OSD
    #: needs ~100 MiB, a busy one grows toward this. Default 1 GiB.
    ceph_osd_memory_target: Annotated[int, msgspec.Meta(ge=512 << 20)] = 1 << 30
    #: Size in bytes of the sparse file an OSD gets from ``storage disk add --file`` without ``--size``
    #: (under ``<data_dir>/ceph/osd/``; it takes disk space as data is written). Default 10 GiB.
    ceph_file_osd_size: Annotated[int, msgspec.Meta(ge=1 << 30)] = 10 << 30
    #: Per-project quotas, read where volumes and snapshots are created (keep them equal on every node): volumes,
    #: GiB of volumes and snapshots a project may hold; 0 = unlimited. Related: ``quota_volume_gib``.
    quota_volumes: Annotated[int, msgspec.Meta(ge=0)] = 50
    quota_volume_gib: Annotated[int, msgspec.Meta(ge=0)] = 2048
    quota_snapshots: Annotated[int, msgspec.Meta(ge=0)] = 100


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[metrics]``: the agent's ``/metrics``, the time-series database it runs (VictoriaMetrics, on voting nodes and
    single nodes) and the query API's limits (see docs/observability.md)."""

    #: Collect and serve ``/metrics``, run the TSDB and answer ``/v1/metrics/*``. Related: ``tsdb``.
    enabled: bool = True
    #: Run the TSDB on this node: ``auto`` = a single node or a voting member (not with the fake hypervisor, which
    #: the unit tests use), ``on``, ``off``. Related: ``tsdb_port``.
    tsdb: Literal["auto", "on", "off"] = "auto"
    #: The TSDB's HTTP port, bound to 127.0.0.1 only (the agent is its only client, with a password); 0: a free port
    #: chosen at each start.
    tsdb_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    #: Days of history kept. Related: ``query_max_range_days``.
    retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 15
    #: Seconds between two scrapes of every agent (and between two collections of node and instance figures).
    scrape_interval: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0
    #: A file holding the bearer token scrapers (ours and yours) present to ``GET /metrics``; the same on every
    #: node. Empty: a token derived from the cluster's session key, written to ``DATA_DIR/metrics/token`` (0600).
    token_file: str = ""
    #: Limits of ``/v1/metrics/query_range``: the longest range in days, the most points per series, the smallest
    #: step in seconds. Related: ``retention_days``.
    query_max_range_days: Annotated[float, msgspec.Meta(gt=0, le=3650)] = 15.0
    query_max_points: Annotated[int, msgspec.Meta(ge=10, le=100_000)] = 11_000
    query_min_step: Annotated[float, msgspec.Meta(ge=0.001, le=86400)] = 1.0


class ObjectsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[objects]``: the S3 endpoint, an RGW on every node with Ceph (see docs/object-storage.md)."""

    #: Run the S3 gateway on this node once storage is enabled. Related: ``port``.
    enabled: bool = True
    #: The gateway's HTTPS port, on the node's cluster address (the same on every node).
    port: Port = 8444
    #: ``DOMAIN`` for virtual-hosted-style addressing (``BUCKET.s3.DOMAIN``); "" : path style only.
    domain: Annotated[
        str, msgspec.Meta(pattern=r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)?$")
    ] = ""
    #: Per-project quota on everything its buckets hold, bytes and objects; 0 = unlimited. Related: ``quota_objects``.
    quota_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    quota_objects: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Days of RGW's usage log kept: older hourly bins are folded into each bucket's totals, then trimmed from RGW.
    usage_keep_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 31


class AlarmsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[alarms]``: how the services leader evaluates alarms and sends their webhooks (see docs/observability.md,
    "Alarms")."""

    #: Seconds between two evaluations of every alarm (and two delivery rounds). Related: ``batch``.
    interval: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0
    #: The most alarms evaluated per cycle (the next cycle goes on from there).
    batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 500
    #: The most alarms a project may have.
    quota_per_project: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    #: Addresses webhooks may be sent to although loopback, private, link-local or the node's own (CIDRs, or host
    #: names as written in the URL): the rule of ``compute.image_url_allow``.
    webhook_allow: list[str] = msgspec.field(default_factory=list)
    #: Seconds a webhook receiver has to answer one attempt.
    webhook_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    #: Attempts per notification before it is marked failed. Related: ``webhook_backoff``.
    webhook_attempts: Annotated[int, msgspec.Meta(ge=1, le=50)] = 6
    #: Seconds before the first retry, doubling after each failed attempt up to ``webhook_backoff_max``.
    webhook_backoff: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 10.0
    webhook_backoff_max: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 600.0
    #: Days an alarm's history entries (state changes, delivery attempts) are kept.
    history_days: Annotated[float, msgspec.Meta(gt=0)] = 14.0


class GpuConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[gpu]``: GPU discovery and passthrough on this node (see docs/gpus.md)."""

    #: Discover this node's NVIDIA GPUs (NVML and sysfs) and publish them as ``gpu`` records. Related:
    #: ``manage_binding``.
    enabled: bool = True
    #: Let the node bind a GPU's PCI functions to ``vfio-pci`` when an instance gets it and give them back to their
    #: drivers when the instance is deleted; false: the operator binds them (docs/gpus.md) and the node only checks.
    manage_binding: bool = False
    #: Where sysfs is mounted (tests point it at a fake tree).
    sysfs_root: str = "/sys"


class LogsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[logs]``: the logs each node keeps (its agent's, its instances' consoles, the daemons it runs), how long, and
    where they are forwarded (see docs/observability.md, "Logs")."""

    #: A log file is rotated once it passes this size (the agent's own log by its handler; consoles and daemons' logs
    #: by copy-truncate every ``rotate_interval``). Related: ``backups``.
    max_bytes: Annotated[int, msgspec.Meta(ge=65536, le=1 << 34)] = 10 * 1024 * 1024
    #: Rotated copies kept per file (``agent.log.1`` … ``agent.log.N``); the oldest is removed.
    backups: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    #: Days a rotated copy is kept, whatever ``backups`` allows.
    max_age_days: Annotated[float, msgspec.Meta(gt=0, le=3650)] = 14.0
    #: Seconds between two passes of the node's log retention (rotation by size, removal by age) and between two
    #: time stamps of the consoles (a console line's time is when the agent first saw it, within this interval).
    rotate_interval: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 5.0
    #: The most lines one ``GET /v1/logs`` answers (the newest ones). Related: ``grep_timeout``.
    query_max_lines: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    #: Seconds a ``grep`` filter may take on one node before the query is refused (422).
    grep_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    #: Forward this node's lines to a syslog collector (RFC 5424, octet-counted, over TCP): ``tcp://HOST:PORT`` or
    #: ``tls://HOST:PORT``; empty: no forwarding. Related: ``forward_ca_file``, ``forward_services``.
    forward: Annotated[str, msgspec.Meta(pattern=r"^((tcp|tls)://\S+:\d{1,5})?$")] = ""
    #: The CA file the collector's certificate is checked against (``tls://``); empty: the system's CAs.
    forward_ca_file: str = ""
    #: Services forwarded (agent, etcd, tsdb, ceph, rgw, dnsmasq, console); empty: all of them.
    forward_services: list[str] = msgspec.field(default_factory=list)
    #: Lines waiting for the collector at most; beyond it the oldest are dropped (and counted in the agent's log).
    forward_queue: Annotated[int, msgspec.Meta(ge=100, le=10_000_000)] = 100_000


class BillingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[billing]``: metering and charging by the services leader (see docs/billing.md)."""

    enabled: bool = True
    #: Seconds between two cycles of the meter (fold the change log) and of the hour closing.
    interval: Annotated[float, msgspec.Meta(ge=1, le=600)] = 30.0
    #: Change-log entries folded per cycle (the next cycle follows after a second while behind).
    batch: Annotated[int, msgspec.Meta(ge=100, le=100_000)] = 2000
    #: Meter states closed per cycle.
    close_batch: Annotated[int, msgspec.Meta(ge=10, le=100_000)] = 500
    #: Seconds after an hour ends before it is closed (later transitions of it become correction records).
    close_delay: Annotated[int, msgspec.Meta(ge=0, le=86400)] = 300
    #: The currency of ``price set`` without ``--currency`` (ISO 4217).
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")] = "EUR"
    #: Days an hourly usage record is kept (its charge, with the same figures, stays in the ledger).
    usage_days: Annotated[float, msgspec.Meta(gt=0)] = 400.0
    #: Months after which ledger entries settled by closed invoices are pruned (the chain keeps a checkpoint).
    ledger_months: Annotated[int, msgspec.Meta(ge=1, le=1200)] = 24


class RetentionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[retention]``: how long records that accumulate are kept (see docs/operations.md, "Retention"). The leader
    deletes what expired in bounded batches; idempotency records keep ``api.idempotency_ttl``."""

    #: Days an audit entry is kept. Related: ``batch``.
    audit_days: Annotated[float, msgspec.Meta(gt=0)] = 90.0
    #: Days a finished (succeeded or failed) operation is kept; running ones are never deleted.
    operations_days: Annotated[float, msgspec.Meta(gt=0)] = 7.0
    #: Backup files kept on each node (the newest; older ones are deleted after each backup).
    #: Related: ``backup_min_interval``.
    backups_keep: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    #: Seconds that must pass between the starts of two backups on one node (429 with Retry-After before).
    #: One backup runs at a time per node whatever this says (409). 0: no minimum.
    backup_min_interval: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 60.0
    #: Seconds between two retention cycles of each kind. Related: ``batch``, ``scan``.
    interval: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0
    #: The most records of one kind deleted per cycle; a cycle that hits it runs again after a second.
    batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    #: The most records of one kind read per cycle for kinds whose ids are not time-ordered (sessions, operations,
    #: idempotency records): they are scanned in pages from where the last cycle stopped.
    scan: Annotated[int, msgspec.Meta(ge=100, le=1_000_000)] = 10_000


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    alarms: AlarmsConfig = msgspec.field(default_factory=AlarmsConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    billing: BillingConfig = msgspec.field(default_factory=BillingConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    compute: ComputeConfig = msgspec.field(default_factory=ComputeConfig)
    gpu: GpuConfig = msgspec.field(default_factory=GpuConfig)
    logs: LogsConfig = msgspec.field(default_factory=LogsConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    network: NetworkConfig = msgspec.field(default_factory=NetworkConfig)
    objects: ObjectsConfig = msgspec.field(default_factory=ObjectsConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)

    # -- derived -----------------------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(self.agent.data_dir)

    @property
    def node_name(self) -> str:
        return self.agent.node_name or socket.gethostname()

    def listen_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the HTTPS listener, or None when disabled."""
        if not self.agent.listen:
            return None
        m = _LISTEN_RE.match(self.agent.listen)
        assert m is not None  # checked in load()
        return m["host"].strip("[]") or "0.0.0.0", int(m["port"])


#: Environment variables and the option each one sets.
ENV_VARS: dict[str, tuple[str, str]] = {
    "MINICLOUD_DATA_DIR": ("agent", "data_dir"),
    "MINICLOUD_SOCKET": ("agent", "socket"),
    "MINICLOUD_LISTEN": ("agent", "listen"),
    "MINICLOUD_NODE_NAME": ("agent", "node_name"),
    "MINICLOUD_LOG_LEVEL": ("agent", "log_level"),
    "MINICLOUD_CLUSTER_ADDRESS": ("cluster", "address"),
}


def _check(cfg: Config) -> None:
    if cfg.agent.listen:
        m = _LISTEN_RE.match(cfg.agent.listen)
        if m is None or int(m["port"]) > 65535:
            raise ConfigError(
                f"agent.listen = {cfg.agent.listen!r} is not HOST:PORT; use e.g. '0.0.0.0:8443', '[::]:8443', "
                "'127.0.0.1:0' for a free port, or '' to disable HTTPS"
            )
    try:
        net = ipaddress.IPv4Network(cfg.network.cidr)
    except ValueError as exc:
        raise ConfigError(
            f"network.cidr = {cfg.network.cidr!r} is not an IPv4 subnet ({exc}); use e.g. '10.213.0.0/24'"
        ) from None
    if net.prefixlen > 28:
        raise ConfigError(f"network.cidr = {cfg.network.cidr!r} is too small for DHCP; use a /28 or larger")
    from minicloud.compute.url_policy import parse_allow

    try:
        parse_allow(cfg.compute.image_url_allow)
    except ValueError as exc:
        raise ConfigError(f"compute.image_url_allow: {exc}") from None
    try:
        parse_allow(cfg.alarms.webhook_allow)
    except ValueError as exc:
        raise ConfigError(f"alarms.webhook_allow: {exc}") from None
    for d in cfg.compute.image_dirs:
        if not os.path.isabs(d):
            raise ConfigError(f"compute.image_dirs entry {d!r} must be an absolute path")
    for key in ("data_dir", "socket"):
        value = getattr(cfg.agent, key)
        if not value or not os.path.isabs(value):
            raise ConfigError(f"agent.{key} = {value!r} must be an absolute path")


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration. ``overrides`` are ``{"agent.listen": value}`` from command-line flags.

    Raises :class:`ConfigError` that names the offending key and what would be valid.
    """
    env = os.environ if env is None else env
    explicit = path or env.get("MINICLOUD_CONFIG")
    file = Path(explicit) if explicit else DEFAULT_CONFIG_FILE
    data: dict[str, Any] = {}
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    elif explicit:
        raise ConfigError(f"config file {file} does not exist; create it or leave out --config/MINICLOUD_CONFIG")

    layered: list[tuple[str, str, Any]] = []
    for var, (section, key) in ENV_VARS.items():
        if var in env:
            layered.append((section, key, env[var]))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            layered.append((section, key, value))
    for section, key, value in layered:
        data.setdefault(section, {})[key] = value

    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{file if file.exists() else 'configuration'}: {_explain(exc)}") from None
    _check(cfg)
    return cfg


def _explain(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    # msgspec says "... - at `$.agent.listen`"; make the path read like the TOML key.
    return re.sub(r" - at `\$\.?([^`]*)`", lambda m: f" (at {m[1] or 'top level'})", message)


def dump(cfg: Config) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)
