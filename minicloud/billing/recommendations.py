"""Savings recommendations: idle instances, rightsizing, unattached volumes, old snapshots, unassociated floating IPs,
each with its evidence and the estimated monthly saving at the prices in force now.

The store-based ones read the project's records; the instance ones read the metrics over ``days`` days through the
node's query service (scoped to the project, like every metrics query):

- **idle**: a running instance whose average CPU (all vCPUs, % of its vCPUs) stayed under ``idle_cpu`` (5 %):
  stopping it saves its vCPU, memory and GPU hours;
- **rightsize**: a running instance whose p95 CPU and p95 memory in use (memory less what the guest leaves unused)
  fit a smaller instance type with 25 % headroom (CPU: p95 % x vCPUs x 1.25 <= the type's vCPUs; memory: p95 x 1.25
  <= the type's memory): the cheapest such type, saving the difference;
- **unattached-volume**: a volume attached to nothing (and no instance's root disk): its GiB-hours;
- **old-snapshot**: a snapshot older than ``snapshot_days`` (30): its GiB-hours;
- **unassociated-floating-ip**: a floating IP associated with no instance or port: its address-hours.

A month is 730 hours. Savings are decimals in the price's currency; a meter without a price saves 0 (shown as such).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from minicloud.billing import ledger
from minicloud.billing.costs import decimal_text
from minicloud.billing.meters import METERS, gpu_count, hour_floor, seconds
from minicloud.core.kinds import Obj
from minicloud.model.billing import Recommendation
from minicloud.state import Record

MONTH_HOURS = 730
HEADROOM = Decimal("1.25")


def monthly(prices: Sequence[Obj[Any, Any]], usage: dict[str, int], now: int) -> tuple[Decimal, str | None]:
    """The cost of ``usage`` (meter -> units, e.g. vCPUs) for a month at the prices in force at ``now``."""
    total = Decimal(0)
    currency = None
    for meter, units in usage.items():
        price = ledger.price_at(prices, meter, hour_floor(now))
        if price is None or not units:
            continue
        # units per second x seconds of a pricing-unit hour: vCPUs, GiB, addresses as they are; MiB / 1024
        pricing_units = Decimal(units) * 3600 / Decimal(METERS[meter].divisor)
        total += Decimal(price.spec.amount) * pricing_units * MONTH_HOURS
        currency = currency or price.spec.currency
    return total.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN), currency


def _rec(
    kind: str, record: Record, action: str, evidence: dict[str, Any], saving: tuple[Decimal, str | None]
) -> Recommendation:
    return Recommendation(
        kind=kind, resource_kind=record.kind, resource_id=record.id, resource_name=record.name, action=action,
        evidence=evidence, monthly_saving=decimal_text(saving[0]), currency=saving[1],
    )  # fmt: skip


def _compute_usage(spec: dict[str, Any]) -> dict[str, int]:
    return {
        "compute.vcpu-hour": int(spec.get("vcpus", 0)),
        "compute.memory-gib-hour": int(spec.get("memory_mib", 0)),
        "compute.gpu-hour": gpu_count(spec),
    }


def recommend(
    *, instances: Sequence[Record], volumes: Sequence[Record], snapshots: Sequence[Record],
    floating_ips: Sequence[Record], types: Sequence[Record], prices: Sequence[Obj[Any, Any]],
    metrics: dict[str, dict[str, float]] | None, now: _dt.datetime, days: int, idle_cpu: float = 5.0,
    snapshot_days: int = 30,
) -> list[Recommendation]:  # fmt: skip
    """Pure: the recommendations (see the module docstring). ``metrics``: instance id -> {avg_cpu, p95_cpu,
    p95_memory_bytes} over ``days`` days (None: metrics unavailable, no instance recommendations)."""
    t = int(now.timestamp())
    out: list[Recommendation] = []
    for inst in instances:
        spec = inst.spec
        if inst.status.get("state") != "running" or spec.get("deleted") or metrics is None:
            continue
        m = metrics.get(inst.id)
        if not m or "avg_cpu" not in m:
            continue
        now_cost = monthly(prices, _compute_usage(spec), t)
        if m["avg_cpu"] < idle_cpu:
            out.append(_rec("idle", inst, "stop it (or set an auto-stop policy)",
                            {"avg_cpu_percent": round(m["avg_cpu"], 2), "days": days}, now_cost))  # fmt: skip
            continue
        if "p95_cpu" not in m or "p95_memory_bytes" not in m:
            continue
        vcpus = int(spec.get("vcpus", 0))
        need_vcpus = math.ceil(Decimal(str(m["p95_cpu"])) / 100 * vcpus * HEADROOM) if vcpus else 0
        need_mib = math.ceil(Decimal(str(m["p95_memory_bytes"])) * HEADROOM / (1 << 20))
        fits = []
        for tr in types:
            ts = tr.spec
            if tr.name == spec.get("type") or ts.get("gpus", 0) != gpu_count(spec):
                continue
            smaller = ts["vcpus"] <= vcpus and ts["memory_mib"] <= int(spec.get("memory_mib", 0))
            if smaller and (ts["vcpus"], ts["memory_mib"]) != (vcpus, spec.get("memory_mib")) and \
                    ts["vcpus"] >= max(need_vcpus, 1) and ts["memory_mib"] >= need_mib and \
                    ts.get("disk_gib", 0) >= int(spec.get("disk_gib", 0)):  # fmt: skip
                fits.append(tr)
        if not fits:
            continue
        best = min(fits, key=lambda tr: (monthly(prices, _compute_usage(tr.spec), t)[0], tr.spec["vcpus"], tr.name))
        new_cost = monthly(prices, _compute_usage(best.spec), t)
        saving = (now_cost[0] - new_cost[0], now_cost[1] or new_cost[1])
        evidence = {"p95_cpu_percent": round(m["p95_cpu"], 2), "p95_memory_mib": round(m["p95_memory_bytes"] / 2**20),
                    "days": days, "type": spec.get("type", ""), "suggested_type": best.name}  # fmt: skip
        out.append(_rec("rightsize", inst, f"resize to {best.name}", evidence, saving))
    for vol in volumes:
        s = vol.spec
        if s.get("deleted") or s.get("attachment") or s.get("root_of"):
            continue
        size = int(s.get("size_gib", 0))
        out.append(_rec("unattached-volume", vol, "snapshot it if needed, then delete it",
                        {"size_gib": size, "since": vol.updated_at},
                        monthly(prices, {"storage.volume-gib-hour": size}, t)))  # fmt: skip
    for snap in snapshots:
        s = snap.spec
        age = (t - (seconds(snap.created_at) or t)) / 86400
        if s.get("deleted") or age < snapshot_days:
            continue
        size = int(s.get("size_gib", 0))
        out.append(_rec("old-snapshot", snap, "delete it if it is no longer needed",
                        {"age_days": int(age), "size_gib": size, "volume": s.get("volume_name") or s.get("volume", "")},
                        monthly(prices, {"storage.snapshot-gib-hour": size}, t)))  # fmt: skip
    for fip in floating_ips:
        s = fip.spec
        if s.get("instance") or s.get("port") or s.get("deleted"):
            continue
        out.append(_rec("unassociated-floating-ip", fip, "release it",
                        {"address": s.get("address", ""), "since": fip.updated_at},
                        monthly(prices, {"network.floating-ip-hour": 1}, t)))  # fmt: skip
    return sorted(out, key=lambda r: (-Decimal(r.monthly_saving), r.kind, r.resource_name))


#: PromQL over ``{days}`` days for the project's instances, by instance id.
QUERIES = {
    "avg_cpu": "avg_over_time((100 * rate(minicloud_instance_cpu_seconds_total[5m]) / "
    "minicloud_instance_vcpus)[{days}d:5m])",
    "p95_cpu": "quantile_over_time(0.95, (100 * rate(minicloud_instance_cpu_seconds_total[5m]) / "
    "minicloud_instance_vcpus)[{days}d:5m])",
    "p95_memory_bytes": "quantile_over_time(0.95, (minicloud_instance_memory_bytes - "
    "minicloud_instance_memory_unused_bytes)[{days}d:5m])",
}


def by_instance(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Pure: {figure: MetricsResult} -> instance id -> {figure: value}."""
    out: dict[str, dict[str, float]] = {}
    for figure, result in results.items():
        for series in result.result or []:
            iid = series.get("metric", {}).get("instance_id")
            value = series.get("value", [None, None])[1]
            if iid and value not in (None, "NaN"):
                out.setdefault(iid, {})[figure] = float(value)
    return out


async def instance_metrics(request: Any, project: str, days: int) -> tuple[dict[str, dict[str, float]] | None, str]:
    """The instance figures over ``days`` days through this node's query service (or a voting node's), scoped to
    ``project``; (None, why) when no metrics database answers."""
    from minicloud import errors
    from minicloud.api import metrics as metrics_api
    from minicloud.api.keys import STORE
    from minicloud.observe.scope import project_scope

    scope = await project_scope(request.app[STORE], project)
    service = request.app.get(metrics_api.QUERY)
    results = {}
    try:
        for figure, promql in QUERIES.items():
            q = promql.format(days=days)
            if service is not None:
                results[figure] = await service.query(q, project=scope)
            else:
                results[figure] = await metrics_api._forward(request, "query", {"query": q, "time": None}, scope)
    except errors.MinicloudError as exc:
        return None, f"unavailable: {exc}"
    return by_instance(results), "ok"


async def for_project(request: Any, project: str, *, days: int, snapshot_days: int, idle_cpu: float) -> Any:
    from minicloud.api.keys import STORE
    from minicloud.model.billing import Recommendations
    from minicloud.state import list_all

    store = request.app[STORE]
    listed = {kind: await list_all(store, kind, project=project)
              for kind in ("instance", "volume", "snapshot", "floatingip")}  # fmt: skip
    running = [r for r in listed["instance"] if r.status.get("state") == "running"]
    metrics, note = (await instance_metrics(request, project, days)) if running else ({}, "ok")
    items = recommend(
        instances=listed["instance"], volumes=listed["volume"], snapshots=listed["snapshot"],
        floating_ips=listed["floatingip"], types=await list_all(store, "instancetype"),
        prices=await ledger.load_prices(store), metrics=metrics, now=_dt.datetime.now(_dt.UTC), days=days,
        idle_cpu=idle_cpu, snapshot_days=snapshot_days,
    )  # fmt: skip
    totals: dict[str, Decimal] = {}
    for item in items:
        if item.currency:
            totals[item.currency] = totals.get(item.currency, Decimal(0)) + Decimal(item.monthly_saving)
    return Recommendations(project=project, days=days, metrics=note, items=items,
                           total_monthly_saving={c: decimal_text(v) for c, v in sorted(totals.items())})  # fmt: skip
