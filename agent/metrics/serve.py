"""The node's metrics service, composed by ``agent.node``: where the collectors read instances and operations, whether
this node runs the TSDB, what it scrapes, and the cleanup context that runs them (see ``agent/tsdb.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from agent.metrics import NodeMetrics
from minicloud.api.keys import CONFIG, PKI, STORE


async def instance_labels(app: web.Application) -> dict[str, Any]:
    """This node's instances by domain uuid, with the labels their series carry (one indexed read, and one read per
    project they are in for its id: ``default`` has a fixed id and no record)."""
    from agent.metrics.instances import InstanceLabels
    from minicloud.compute.kinds import INSTANCE
    from minicloud.iam.kinds import PROJECT
    from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
    from minicloud.state import list_all

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
        out[inst.spec.uuid.lower()] = InstanceLabels(
            instance_id=record.id, name=record.name, project=record.project, project_id=project_id
        )
    return out


def running_operations(app: web.Application) -> int:
    from minicloud.api.keys import OPERATIONS

    ops = app.get(OPERATIONS)
    return len(getattr(ops, "_tasks", ())) if ops is not None else 0


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
    """Every agent's HTTPS ``host:port``: the cluster's node records, or this node alone (its listener as
    ``agent.json`` says, a wildcard address read as loopback)."""
    import json

    from minicloud.api.keys import CLUSTER
    from minicloud.cluster.kinds import NODE
    from minicloud.state import list_all

    cluster = app.get(CLUSTER)
    if cluster is not None and cluster.enabled:
        records = await list_all(app[STORE], NODE.name)
        return sorted({NODE.load(r).spec.https.removeprefix("https://") for r in records if r.spec.get("https")})
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


async def metrics_ctx(app: web.Application, metrics: NodeMetrics) -> AsyncIterator[None]:
    """The collectors' refresh loop and, where this node runs one, the TSDB (supervised) and its query service."""
    import asyncio
    import contextlib

    from agent.tsdb import Tsdb, TsdbConfig, TsdbSupervisor
    from minicloud.api.metrics import QUERY, write_token_file
    from minicloud.observe.query import Limits, QueryService

    config = app[CONFIG]
    refresh = asyncio.create_task(metrics.run(config.metrics.scrape_interval), name="metrics-refresh")
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

        supervisor = TsdbSupervisor(tsdb, targets, interval=config.metrics.scrape_interval)
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
    refresh.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await refresh
    metrics.close()
    if QUERY in app:
        await app[QUERY].close()
    if supervisor is not None:
        await supervisor.close()
