"""The node's metrics service, composed by ``agent.node``: where the collectors read instances and operations, whether
this node runs the TSDB, what it scrapes, and the cleanup context that runs them (see ``agent/tsdb.py``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from agent.metrics import NodeMetrics
from minicloud.api.keys import CONFIG, PKI, STORE

log = logging.getLogger("minicloud.metrics")


async def instance_labels(app: web.Application) -> dict[str, Any]:
    """This node's instances by domain uuid, with the labels their series carry (one indexed read, one read per
    project they are in for its id: ``default`` has a fixed id and no record; and each instance's ``diskslots``,
    a cached read by id, for the volumes its disks are)."""
    from agent.metrics.instances import InstanceLabels
    from minicloud.compute.kinds import INSTANCE
    from minicloud.iam.kinds import PROJECT
    from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
    from minicloud.state import list_all
    from minicloud.storage.kinds import DISK_SLOTS, slots_id

    store = app[STORE]
    project_ids: dict[str, str | None] = {DEFAULT_PROJECT: DEFAULT_PROJECT_ID}
    out: dict[str, Any] = {}
    for record in await list_all(store, INSTANCE.name, where={"node": app[CONFIG].node_name}):
        if record.project not in project_ids:
            found = await store.get_by_name(PROJECT.name, "", record.project)
            project_ids[record.project] = found.id if found is not None else None
        project_id = project_ids[record.project]
        if project_id is None:
            continue  # its project is gone (being torn down): no series nobody could read
        inst = INSTANCE.load(record)
        slots = await store.get(DISK_SLOTS.name, slots_id(record.id))
        out[inst.spec.uuid.lower()] = InstanceLabels(
            instance_id=record.id,
            name=record.name,
            project=record.project,
            project_id=project_id,
            volumes=dict(slots.spec.get("devices") or {}) if slots is not None else {},
        )
    return out


async def node_volumes(app: web.Application) -> list[Any]:
    """The volumes this node manages (one indexed read), with their project's id (one read per project)."""
    from agent.metrics.volumes import VolumeRow
    from minicloud.iam.kinds import PROJECT
    from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
    from minicloud.state import list_all
    from minicloud.storage.kinds import GIB, VOLUME

    store = app[STORE]
    project_ids: dict[str, str | None] = {DEFAULT_PROJECT: DEFAULT_PROJECT_ID}
    out = []
    for record in await list_all(store, VOLUME.name, where={"node": app[CONFIG].node_name}):
        if record.project not in project_ids:
            found = await store.get_by_name(PROJECT.name, "", record.project)
            project_ids[record.project] = found.id if found is not None else None
        project_id = project_ids[record.project]
        if project_id is None:
            continue
        vol = VOLUME.load(record)
        size = (vol.status.size_gib or vol.spec.size_gib) * GIB
        pool = vol.spec.pool_name or vol.spec.pool
        out.append(VolumeRow(record.id, record.name, record.project, project_id, pool, size, vol.status.state))
    return out


async def node_networks(app: web.Application) -> list[Any]:
    """The networks the network reconciler built on this node (its own map, no scan) with their labels: one read
    by id per network and per router with an external leg here (from what the router plumbing applied), one per
    project for its id. Empty before the reconciler starts or without one."""
    from agent.metrics.network import NetworkRow, RouterLeg
    from agent.node import NETWORK
    from minicloud.iam.kinds import PROJECT
    from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
    from minicloud.network.kinds import NETWORK as NETWORK_KIND
    from minicloud.network.kinds import ROUTER

    reconciler = app.get(NETWORK)
    if reconciler is None:
        return []
    store = app[STORE]
    project_ids: dict[str, str | None] = {DEFAULT_PROJECT: DEFAULT_PROJECT_ID}

    async def project_id(project: str) -> str | None:
        if project not in project_ids:
            found = await store.get_by_name(PROJECT.name, "", project)
            project_ids[project] = found.id if found is not None else None
        return project_ids[project]

    plumbing = reconciler.routers
    applied = plumbing.applied()  # namespace path -> the plan the node converged there
    routers: dict[str, tuple[str, str, str] | None] = {}
    out = []
    for network_id, vni in sorted(reconciler.built_vnis().items()):
        record = await store.get(NETWORK_KIND.name, network_id)
        if record is None or (pid := await project_id(record.project)) is None:
            continue
        netns = reconciler.services.path(vni)
        plan = applied.get(netns)
        legs = []
        for leg in plan.legs if plan is not None else ():
            if leg.router_id not in routers:
                rec = await store.get(ROUTER.name, leg.router_id)
                rpid = await project_id(rec.project) if rec is not None else None
                routers[leg.router_id] = (rec.name, rec.project, rpid) if rec is not None and rpid else None
            known = routers[leg.router_id]
            if known is None:
                continue
            fips = sum(1 for f in plan.floating if f.leg == leg.index)
            legs.append(RouterLeg(leg.router_id, known[0], known[1], known[2], leg.name, fips))
        out.append(NetworkRow(network_id, record.name, record.project, pid, vni, netns, tuple(legs)))
    return out


def running_operations(app: web.Application) -> int:
    from minicloud.api.keys import OPERATIONS

    ops = app.get(OPERATIONS)
    return ops.running if ops is not None else 0


def runs_tsdb(app: web.Application) -> bool:
    """Whether this node runs the TSDB: ``metrics.tsdb = on``, or ``auto`` on a single node or a voting member with
    a real hypervisor (the fake one is the unit tests')."""
    from minicloud.api.keys import CLUSTER

    config = app[CONFIG]
    if not config.metrics.enabled or config.metrics.tsdb == "off":
        return False
    if config.metrics.tsdb == "on":
        return True
    state = app[CLUSTER].state if CLUSTER in app else None
    return config.compute.driver != "fake" and (state is None or state.role != "learner")


async def scrape_targets(app: web.Application) -> list[str]:
    """Every agent's HTTPS ``host:port``: the cluster's node records (a node recorded without its HTTPS address, as
    joined nodes are, on this node's port), or this node alone (its listener as ``agent.json`` says, a wildcard
    address read as loopback)."""
    import json

    from minicloud.api.keys import CLUSTER
    from minicloud.cluster.kinds import NODE
    from minicloud.observe.log_access import https_of, own_https_port
    from minicloud.state import list_all

    cluster = app.get(CLUSTER)
    if cluster is not None and cluster.enabled:
        port = own_https_port(app[CONFIG].data_path)
        urls = [https_of(NODE.load(r).spec, port) for r in await list_all(app[STORE], NODE.name)]
        return sorted({u.removeprefix("https://") for u in urls if u})
    try:
        address = json.loads((app[CONFIG].data_path / "agent.json").read_text()).get("https")
    except (OSError, ValueError):
        return []
    if not address:
        return []
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = "127.0.0.1"
    return [f"{host}:{port}"]


async def ceph_targets(app: web.Application) -> list[str]:
    """Every Ceph MGR's metrics exporter, ``address:port``: MGRs run beside the MONs (the ``cephcluster`` record's
    ``mons``), their ``prometheus`` module bound to that address on ``storage.ceph_prometheus_port``. Empty where
    the cluster runs no Ceph."""
    import ipaddress

    from minicloud.storage.kinds import CEPH, CEPH_NAME

    record = await app[STORE].get_by_name(CEPH.name, "", CEPH_NAME)
    if record is None:
        return []
    port = app[CONFIG].storage.ceph_prometheus_port
    out = []
    for address in CEPH.load(record).spec.mons.values():
        text = address.strip()
        for candidate in (text, text.rsplit(":", 1)[0].strip("[]")):
            try:
                ip = ipaddress.ip_address(candidate)
            except ValueError:
                continue
            out.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
            break
    return sorted(set(out))


async def metrics_ctx(app: web.Application, metrics: NodeMetrics) -> AsyncIterator[None]:
    """The collectors' refresh loop and, where this node runs one, the TSDB (supervised) and its query service."""
    import asyncio
    import contextlib

    from agent.metrics.control import ControlPlaneMetrics
    from agent.metrics.network import NetworkMetrics
    from agent.metrics.volumes import VolumeMetrics
    from agent.tsdb import Tsdb, TsdbConfig, TsdbSupervisor
    from minicloud.api.keys import CLUSTER
    from minicloud.api.metrics import QUERY, REGISTRY, write_token_file
    from minicloud.observe.query import Limits, QueryService

    config = app[CONFIG]
    refresh = asyncio.create_task(metrics.run(config.metrics.scrape_interval), name="metrics-refresh")
    control = ControlPlaneMetrics(config.node_name, app[STORE], app.get(CLUSTER))
    volumes = VolumeMetrics(config.node_name, lambda: node_volumes(app))
    networks = NetworkMetrics(config.node_name, lambda: node_networks(app))
    for collector in (control, volumes, networks):
        app[REGISTRY].register(collector)  # type: ignore[arg-type]
    sources: tuple[Any, ...] = (control, volumes, networks)
    if config.billing.enabled:  # the routers' egress counters for the meter network.egress-gib (docs/billing.md)
        from agent.node import NETWORK
        from agent.reconcilers.egress import EgressReporter

        reconciler = lambda: getattr(app.get(NETWORK), "routers", None)  # noqa: E731
        sources += (EgressReporter(app[STORE], reconciler, config.node_name),)

    async def control_loop() -> None:
        while True:
            for source in sources:
                try:
                    await source.refresh()
                except Exception:
                    log.warning("collecting %s figures failed", type(source).__name__, exc_info=True)
            await asyncio.sleep(config.metrics.scrape_interval)

    control_task = asyncio.create_task(control_loop(), name="metrics-control-plane")
    supervisor: TsdbSupervisor | None = None
    if runs_tsdb(app):
        base = config.data_path / "metrics"
        tsdb = Tsdb(
            TsdbConfig(
                data_dir=base / "tsdb",
                port=config.metrics.tsdb_port,
                retention_days=config.metrics.retention_days,
                scrape_interval=config.metrics.scrape_interval,
                latency_offset=config.metrics.scrape_interval,
                token_file=write_token_file(app),
                ca_file=app[PKI].ca_cert,
            )
        )

        async def targets() -> list[str]:
            write_token_file(app)  # the derived token changes when the node joins a cluster (new session key)
            return await scrape_targets(app)

        supervisor = TsdbSupervisor(
            tsdb, targets, interval=config.metrics.scrape_interval, ceph_targets=lambda: ceph_targets(app)
        )
        await supervisor.start()
        m = config.metrics
        app[QUERY] = QueryService(
            lambda: tsdb.url,
            auth=tsdb.auth,
            limits=Limits(
                max_range=m.query_max_range_days * 86400, max_points=m.query_max_points, min_step=m.query_min_step
            ),
        )
    yield
    for task in (refresh, control_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for collector in (control, volumes, networks):
        app[REGISTRY].unregister(collector)  # type: ignore[arg-type]
    metrics.close()
    if QUERY in app:
        await app[QUERY].close()
    if supervisor is not None:
        await supervisor.close()
