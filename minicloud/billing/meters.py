"""The meter catalogue and what a stored record consumes (pure: no I/O, no clock).

A meter's quantity is an integer count of unit-seconds (vCPU-seconds, MiB-seconds, GiB-seconds, byte-seconds,
address-seconds), so usage adds up exactly; its price is per hour of a pricing unit (``divisor`` unit-seconds).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from minicloud import ids
from minicloud.state import Record

HOUR = 3600


@dataclass(frozen=True)
class Meter:
    name: str
    #: FOCUS ServiceCategory-ish grouping and the service name used by reports.
    service: str
    #: What one unit of quantity is.
    unit: str
    #: What a price is per.
    pricing_unit: str
    #: Quantity per pricing unit.
    divisor: int
    description: str
    #: A count that only grows (requests, bytes): usage is the increase between two observations, in the hour of
    #: the later one, instead of a rate over time.
    counter: bool = False


METERS: dict[str, Meter] = {
    m.name: m
    for m in (
        Meter("compute.vcpu-hour", "compute", "vCPU-second", "vCPU-hour", HOUR, "vCPUs of a running instance"),
        Meter(
            "compute.memory-gib-hour", "compute", "MiB-second", "GiB-hour", HOUR * 1024, "memory of a running instance"
        ),
        Meter(
            "compute.root-disk-gib-hour", "storage", "GiB-second", "GiB-hour", HOUR,
            "an instance's root disk (made from its image), while the instance exists",
        ),
        Meter("storage.volume-gib-hour", "storage", "GiB-second", "GiB-hour", HOUR, "a volume's size, by pool"),
        Meter("storage.snapshot-gib-hour", "storage", "GiB-second", "GiB-hour", HOUR, "a snapshot's size"),
        Meter(
            "network.floating-ip-hour", "network", "address-second", "address-hour", HOUR,
            "an allocated floating IP, associated or not",
        ),
        Meter(
            "objects.storage-gib-hour", "objects", "byte-second", "GiB-hour", HOUR * (1 << 30),
            "bytes stored in a bucket (its status' size_bytes)",
        ),
        Meter("compute.gpu-hour", "compute", "GPU-second", "GPU-hour", HOUR, "GPUs passed through to a running instance"),
        Meter(
            "objects.requests", "objects", "request", "1000 requests", 1000,
            "S3 requests to a bucket (RGW's usage log)", counter=True,
        ),
        Meter(
            "objects.egress-gib", "objects", "byte", "GiB", 1 << 30,
            "bytes a bucket sent out (RGW's usage log)", counter=True,
        ),
        Meter(
            "network.egress-gib", "network", "byte", "GiB", 1 << 30,
            "bytes a router sent out of its external legs (nftables counters, every node's)", counter=True,
        ),
    )
}  # fmt: skip

#: The kinds whose records are metered.
METERED_KINDS = frozenset({"instance", "volume", "snapshot", "floatingip", "bucket", "router"})


def unknown_meter(name: str) -> str:
    return f"unknown meter {name!r}; the meters are: {', '.join(sorted(METERS))}"


def seconds(stamp: str | None) -> int | None:
    """An RFC 3339 stamp as whole epoch seconds (floored), None for None."""
    if not stamp:
        return None
    return int(ids.parse_time(stamp).timestamp() // 1)


def hour_floor(t: int) -> int:
    return t - t % HOUR


def hour_text(t: int) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Consumption:
    rates: dict[str, int]
    attrs: dict[str, str]
    #: Cumulative counts by counter meter (a bucket's requests and bytes sent since it was made).
    counters: dict[str, int] = field(default_factory=dict)


def gpu_count(spec: dict[str, Any]) -> int:
    """How many GPUs an instance has: ``gpus`` as a count, a list of devices or ``{"count": n}`` (tolerant of how
    the GPU feature records them; 0 when absent or unreadable)."""
    value = spec.get("gpus", spec.get("gpu_count", 0))
    if isinstance(value, list | tuple):
        return len(value)
    if isinstance(value, dict):
        value = value.get("count", 0)
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def consumption(record: Record) -> Consumption:
    """What ``record`` (a metered kind, as stored) consumes per second now."""
    spec: dict[str, Any] = record.spec
    status: dict[str, Any] = record.status
    rates: dict[str, int] = {}
    attrs: dict[str, str] = {}
    deleted = bool(spec.get("deleted"))
    if record.kind == "instance":
        attrs = {
            "type": str(spec.get("type", "")),
            "node": str(spec.get("node", "")),
            "pool": spec.get("pool") or "local",
        }
        if gpu_count(spec):
            attrs["gpu_model"] = str(spec.get("gpu_model", ""))
        if status.get("state") == "running" and not deleted:
            rates["compute.vcpu-hour"] = int(spec.get("vcpus", 0))
            rates["compute.memory-gib-hour"] = int(spec.get("memory_mib", 0))
            rates["compute.gpu-hour"] = gpu_count(spec)
        if not deleted and not spec.get("root_volume") and status.get("state") not in ("pending", "scheduling"):
            rates["compute.root-disk-gib-hour"] = int(spec.get("disk_gib", 0))
    elif record.kind == "volume":
        attrs = {"pool": str(spec.get("pool_name") or spec.get("pool", "")), "driver": str(spec.get("driver", ""))}
        if not deleted:
            rates["storage.volume-gib-hour"] = int(spec.get("size_gib", 0))
    elif record.kind == "snapshot":
        attrs = {"pool": str(spec.get("pool", "")), "volume": str(spec.get("volume", ""))}
        if not deleted:
            rates["storage.snapshot-gib-hour"] = int(spec.get("size_gib", 0))
    elif record.kind == "floatingip":
        attrs = {"network": str(spec.get("network", "")), "address": str(spec.get("address", ""))}
        rates["network.floating-ip-hour"] = 1
    elif record.kind == "bucket":
        if not deleted:
            rates["objects.storage-gib-hour"] = int(status.get("size_bytes", 0))
        counters = {"objects.requests": int(status.get("requests", 0) or 0),
                    "objects.egress-gib": int(status.get("bytes_out", 0) or 0)}  # fmt: skip
        return Consumption({m: r for m, r in rates.items() if r > 0}, attrs, {m: v for m, v in counters.items() if v})
    elif record.kind == "router":
        attrs = {"external_network": str(spec.get("external_network", ""))}
        return Consumption({}, attrs, egress_counters(status))
    return Consumption({m: r for m, r in rates.items() if r > 0}, attrs)


#: A router's egress counters in its status: ``egress`` = {node: {"since": counter epoch, "bytes": cumulative}}.
EGRESS_FIELD = "egress"


def egress_key(node: str, since: int) -> str:
    """The counter key of one node's egress counter that started at ``since``: ``network.egress-gib@node@since``. A
    counter that starts again (the agent rewrote its nft table) has a new ``since``: a new key, counted from 0."""
    return f"network.egress-gib@{node}@{since}"


def egress_counters(status: dict[str, Any]) -> dict[str, int]:
    """Pure: a router status' per-node egress counters as counter keys (:func:`egress_key`); malformed entries are
    left out."""
    out: dict[str, int] = {}
    raw = status.get(EGRESS_FIELD)
    if not isinstance(raw, dict):
        return out
    for node, entry in raw.items():
        if not isinstance(entry, dict) or "@" in str(node):
            continue
        try:
            since, value = int(entry.get("since", 0) or 0), int(entry.get("bytes", 0) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            out[egress_key(str(node), since)] = value
    return out


def counter_meter(key: str) -> str:
    """The meter of a counter key (``meter`` or ``meter@node@since``)."""
    return key.partition("@")[0]


def effective_time(record: Record, before: dict[str, int], after: dict[str, int], stamp: int) -> int:
    """When a change of ``record`` from rates ``before`` to ``after`` took effect: an instance says when its guest
    started (``launched_at``) or stopped (``stopped_at``), which may be earlier than the commit (a node that reports
    late); otherwise the change's own stamp."""
    if record.kind == "instance":
        was, now = "compute.vcpu-hour" in before, "compute.vcpu-hour" in after
        if now and not was:
            return seconds(record.status.get("launched_at")) or stamp
        if was and not now and record.status.get("state") == "stopped":
            return seconds(record.status.get("stopped_at")) or stamp
    return stamp
