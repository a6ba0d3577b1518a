"""``create_app(config)``: the aiohttp application of one node, with one cleanup context per long-lived resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from minicloud import errors, ids
from minicloud.api import (
    accesskeys,
    admin,
    alarms,
    apikeys,
    audit,
    billing,
    buckets,
    cluster,
    cluster_settings,
    events,
    floating_ips,
    gpus,
    images,
    instance_types,
    instances,
    keypairs,
    login,
    logs,
    metrics,
    migration,
    networks,
    openapi,
    operations,
    pools,
    projects,
    routers,
    s3,
    security_groups,
    server_groups,
    snapshots,
    storage,
    subnets,
    system,
    users,
    volume_backups,
    volumes,
    whoami,
)
from minicloud.api.auth import DIRECTORY, LAST_USED, RATE_LIMITER, VERIFIED_KEYS
from minicloud.api.keys import BACKUP_GATE, CLUSTER, CONFIG, HOST, LEADER_LOOPS, OPERATIONS, PKI, STORE, TLS
from minicloud.api.middleware import audit_middleware, auth_middleware, problem_middleware, refusals_ctx
from minicloud.api.routing import set_max_body
from minicloud.backups import BackupGate
from minicloud.cluster.leader import LeaderLoops, services_leadership
from minicloud.cluster.node import LEADER_TTL, ClusterNode
from minicloud.config import Config
from minicloud.iam import users as iam_users
from minicloud.iam.apikeys import LastUsed
from minicloud.iam.directory import Directory
from minicloud.iam.keystore import KeyStore
from minicloud.iam.principals import upgrade_refs
from minicloud.iam.ratelimit import LoginThrottle, RateLimiter
from minicloud.iam.sessions import SessionKey
from minicloud.observe.alarm_loop import alarm_loops
from minicloud.operations import Operations
from minicloud.pki import NodePKI, ensure_node_pki, write_private
from minicloud.retention import retention_loops
from minicloud.state import Store
from minicloud.state.handle import StoreHandle
from minicloud.state.sqlite import SQLiteStore
from minicloud.storage.mons import MonPlacement

if TYPE_CHECKING:
    from minicloud.api.keys import HostFactsSource

log = logging.getLogger("minicloud.agent")
ROUTE_TABLES = [
    system.routes,
    keypairs.routes,
    operations.routes,
    events.routes,
    apikeys.routes,
    admin.routes,
    cluster.routes,
    cluster_settings.routes,
    projects.routes,
    audit.routes,
    users.routes,
    login.routes,
    accesskeys.routes,
    images.routes,
    instance_types.routes,
    instances.routes,
    migration.routes,
    server_groups.routes,
    networks.routes,
    subnets.routes,
    security_groups.routes,
    routers.routes,
    floating_ips.routes,
    storage.routes,
    gpus.routes,
    buckets.routes,
    s3.routes,
    pools.routes,
    volumes.routes,
    snapshots.routes,
    volume_backups.routes,
    whoami.routes,
    metrics.routes,
    alarms.routes,
    logs.routes,
    billing.routes,
]
HOUSEKEEPING_INTERVAL = 60.0


def create_app(config: Config, *, host: HostFactsSource | None = None) -> web.Application:
    """Build the node's API application. Opening the store and starting loops happen in the app's cleanup contexts,
    so the same app works under ``web.run_app``, an ``AppRunner`` or aiohttp's test client. The node's own services
    (host facts, drivers, reconcilers) are not the API's: ``agent.node.attach_node_services(app)`` adds them; ``host``
    sets stand-in host facts (tests)."""
    app = web.Application(
        middlewares=[metrics.metrics_middleware, audit_middleware, problem_middleware, auth_middleware],
        client_max_size=config.api.max_body_bytes,
    )
    app[CONFIG] = config
    set_max_body(app, config.api.max_body_bytes)
    config.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    app[PKI] = ensure_node_pki(config.data_path, config.node_name)
    app[TLS] = server_ssl_context(app[PKI])
    if host is not None:
        app[HOST] = host  # else the node's own: agent.node.attach_node_services
    app[login.SESSION_KEY] = login.SessionSigner(load_session_key(config.data_path / "pki" / "session.key"))
    app[login.THROTTLE] = LoginThrottle()
    app[accesskeys.KEYSTORE] = KeyStore(config.data_path / "keys")
    app[accesskeys.KEYSTORE].current_key_id()  # create the master key now, not while serving
    app[RATE_LIMITER] = RateLimiter(config.api.rate_limit_rps, config.api.rate_limit_burst)
    app[LAST_USED] = LastUsed()
    app[VERIFIED_KEYS] = {}
    app[instances.PLACEMENT_LOCKS] = instances.NodeLocks()
    app[BACKUP_GATE] = BackupGate()
    metrics.install(app)  # the registry /metrics serves; agent.node adds the node's collectors
    openapi.install(app)
    for table in ROUTE_TABLES:
        table.register(app)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(refusals_ctx)  # after the store: its last flush writes before the store closes
    app.cleanup_ctx.append(_cluster_ctx)
    app.cleanup_ctx.append(_bootstrap_ctx)
    app.cleanup_ctx.append(_operations_ctx)
    app.cleanup_ctx.append(_housekeeping_ctx)
    app.cleanup_ctx.append(logs.logs_ctx)  # this node's log retention and forwarding (docs/observability.md)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = StoreHandle(SQLiteStore(config.data_path / "state.db", retain_changes=config.api.retain_changes))
    await store.open()
    app[STORE] = store
    app[DIRECTORY] = Directory(store)
    log.info("store open", extra={"path": str(config.data_path / "state.db"), "revision": store.revision})
    yield
    await store.close()


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    node = ClusterNode(app[CONFIG], app[PKI], app[STORE], app[TLS])  # type: ignore[arg-type]

    def adopt_session_key(pem: bytes) -> None:
        app[login.SESSION_KEY].key = SessionKey.load(pem)

    node.on_session_key = adopt_session_key
    node.on_keystore = app[accesskeys.KEYSTORE].adopt
    app[CLUSTER] = node
    await node.start()
    yield
    await node.close()


def load_session_key(path: Path) -> SessionKey:
    """The node's Ed25519 key for session tokens, created on first start (0600). In a cluster every node holds the
    same one: `join` copies it like the CA key, so any node accepts any node's sessions."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, SessionKey.generate().private_pem())
    return SessionKey.load(path.read_bytes())


def server_ssl_context(pki: NodePKI) -> ssl.SSLContext:
    """TLS for the HTTPS listener. Kept in the app so that joining a cluster can load the new certificate into it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    # Node-to-node mutual TLS: a client may present a certificate of the cluster CA (other nodes do, asking for their
    # logs); clients without one are served as before. Joining a cluster loads its CA here too.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=str(pki.ca_cert))
    return ctx


async def bootstrap_admin(store: Store) -> bool:
    """Make sure the ``admin`` user exists and holds the ``admin`` role cluster-wide (``minicloud.iam.users``)."""
    return await iam_users.bootstrap_admin(store, ids.now())


async def _bootstrap_ctx(app: web.Application) -> AsyncIterator[None]:
    await bootstrap_admin(app[STORE])
    try:  # credentials and bindings of databases written when principals were named by name
        await upgrade_refs(app[STORE])
    except errors.MinicloudError:
        log.warning("IAM references not upgraded (no quorum?); the next start tries again")
    yield


async def _operations_ctx(app: web.Application) -> AsyncIterator[None]:
    ops = Operations(app[STORE], app[CONFIG].node_name)
    app[OPERATIONS] = ops
    recovered = await ops.recover()
    if recovered:
        log.warning("operations interrupted by the last stop were marked failed", extra={"count": recovered})
    yield
    await ops.close()


def leader_loops(app: web.Application) -> LeaderLoops:
    """Every duty of the services leader, registered in this one place (see docs/ARCHITECTURE.md, "Leader loops")."""
    cluster = app[CLUSTER]
    loops = LeaderLoops(
        services_leadership(cluster),
        # A leadership just gained waits out the lease of the previous holder, whose loops stop when it loses it.
        settle=lambda: float(LEADER_TTL) if cluster.enabled else 0.0,
    )
    loops.register(*retention_loops(app[STORE], app[CONFIG]))

    async def etcd_members() -> list[dict[str, Any]] | None:
        """The etcd members (who votes), or None on a node that is not clustered."""
        if not cluster.enabled or cluster.client is None:
            return None
        return await cluster.client.member_list()

    loops.register(MonPlacement(app[STORE], etcd_members))  # Ceph MONs on voting nodes (docs/storage.md)
    # alarms (docs/observability.md): evaluated through this node's TSDB, whose query service agent.node adds
    loops.register(*alarm_loops(app[STORE], app[CONFIG], lambda: app.get(metrics.QUERY), app[accesskeys.KEYSTORE]))
    from minicloud.storage.backup_schedules import BackupScheduler

    loops.register(BackupScheduler(app[STORE], app[CONFIG], app[accesskeys.KEYSTORE]))  # backups on a schedule
    from minicloud.billing.metering import billing_loops

    # metering, budgets, auto-stop policies (idleness through this node's TSDB), retention (docs/billing.md)
    loops.register(*billing_loops(app[STORE], app[CONFIG], lambda: app.get(metrics.QUERY)))
    return loops


async def _housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    """The leader loops (cluster-wide duties: retention) and this node's own periodic work (change-log compaction,
    API key use)."""
    from minicloud.billing.metering import compaction_hold

    store = app[STORE]
    app[LEADER_LOOPS] = leaders = leader_loops(app)
    await leaders.start()

    async def loop() -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                # this node's own change log, held back at the billing meter's cursor (docs/billing.md)
                await store.compact(hold=await compaction_hold(store, app[CONFIG]))
            except Exception:
                log.exception("housekeeping failed; will retry")

    async def last_used() -> None:
        while True:
            await asyncio.sleep(app[LAST_USED].interval)
            try:
                await app[LAST_USED].flush(store)
            except Exception:
                log.exception("recording API key use failed; will retry")

    tasks = [
        asyncio.create_task(loop(), name="housekeeping"),
        asyncio.create_task(last_used(), name="apikey-last-used"),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await leaders.close()
    with contextlib.suppress(Exception):
        await app[LAST_USED].flush(store)  # what this node saw since the last flush
