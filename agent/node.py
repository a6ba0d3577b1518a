"""The node's services, composed onto the API application: host facts, drivers, reconcilers.

``minicloud/api/`` builds the HTTP application and knows nothing of the node's drivers; the daemon calls
:func:`attach_node_services` on that application before serving, and so does any test that needs compute. Each
long-lived service is one ``cleanup_ctx`` (CONVENTIONS 14), appended after the application's own, so the store is
open before a reconciler starts and still open after it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.compute.driver import make_driver
from agent.host import HostFacts, choose_virt, detect_virt
from agent.metrics import NodeMetrics
from agent.net.default import DRIVERS as NETWORK_DRIVERS
from agent.net.default import NetworkDriver, NetworkSpec, parse_leases
from agent.net.nodenetworks import NodeNetworks
from agent.reconcile import Controller
from agent.reconcilers.compute import ComputeReconciler
from agent.reconcilers.network import NetworkReconciler
from agent.reconcilers.storage import StorageReconciler
from agent.storage.node import NodeStorage
from minicloud.api.keys import CONFIG, HOST, STORE
from minicloud.config import Config
from minicloud.errors import MinicloudError
from minicloud.network import default_vpc

log = logging.getLogger(__name__)

#: This node's compute reconciler (absent with ``compute.driver = none``); tests reach the fake hypervisor through it.
COMPUTE = web.AppKey("compute", ComputeReconciler)
#: Which VPC networks are built on this node: the network reconciler fills it, the compute reconciler reads it.
NODE_NETWORKS = web.AppKey("node_networks", NodeNetworks)
#: How many instances the compute reconciler converges at once (each key is still one at a time).
COMPUTE_WORKERS = 4
#: This node's network reconciler (absent with ``compute.driver = none``).
NETWORK = web.AppKey("network", NetworkReconciler)
#: The default bridge's driver (None: no default network), shared by the compute and network reconcilers.
DEFAULT_NETWORK = web.AppKey("default_network", "NetworkDriver | None")
#: How many networks the network reconciler converges at once.
NETWORK_WORKERS = 4
#: This node's storage reconciler (Ceph engine, pools, volumes, snapshots, images in pools).
STORAGE = web.AppKey("storage", StorageReconciler)
#: Which storage pools this node can use: the storage reconciler fills it, the compute reconciler reads it.
NODE_STORAGE = web.AppKey("node_storage", NodeStorage)
#: How many storage records the storage reconciler converges at once (each key is still one at a time).
STORAGE_WORKERS = 4
#: This node's collectors (``/metrics``); reconcile passes are reported to it.
NODE_METRICS = web.AppKey("node_metrics", NodeMetrics)
#: This node's GPU reconciler (``gpu.enabled`` and a compute driver): discovery and the ``gpu`` records.
GPUS = web.AppKey("gpus", "GpuReconciler")


def attach_node_services(app: web.Application) -> web.Application:
    """Add this node's services to an application made by ``minicloud.api.app.create_app``: the host facts
    ``GET /v1/node`` shows (unless the caller already set stand-ins) and, unless ``compute.driver = none``, the
    compute reconciler with its hypervisor driver and default network. Call it before the application starts.
    Returns ``app``."""
    config = app[CONFIG]
    if HOST not in app:
        app[HOST] = HostFacts(config.node_name, virt_setting=config.compute.virt_type)
    if NODE_NETWORKS not in app:
        app[NODE_NETWORKS] = NodeNetworks()
    if NODE_STORAGE not in app:
        app[NODE_STORAGE] = NodeStorage()
    gpus_on = config.gpu.enabled and config.compute.driver != "none"
    if gpus_on and GPUS not in app:
        app[GPUS] = gpu_reconciler(app)
    if config.metrics.enabled and NODE_METRICS not in app:
        from agent.metrics.instances import LibvirtStats
        from agent.metrics.serve import instance_labels, running_operations
        from minicloud.api.metrics import REGISTRY

        stats = LibvirtStats(config.compute.libvirt_uri) if config.compute.driver == "libvirt" else None
        app[NODE_METRICS] = NodeMetrics(
            app[REGISTRY],
            config.node_name,
            stats=stats,
            instances=lambda: instance_labels(app),
            operations=lambda: running_operations(app),
            gpus=app[GPUS].discover if GPUS in app else None,
        )
        app.cleanup_ctx.append(_metrics_ctx)
    # storage first, whatever the compute driver: it fills NODE_STORAGE, which the compute reconciler reads
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_backups_ctx)  # volume backups and restores: reads NODE_STORAGE's drivers
    if config.compute.driver != "none":
        if default_vpc_on(config):
            app.cleanup_ctx.append(_default_vpc_ctx)  # before either reconciler: the host network, DHCP pins
        # the network reconciler first: it fills NODE_NETWORKS, which the compute reconciler waits on
        app.cleanup_ctx.append(_network_ctx)
        app.cleanup_ctx.append(_compute_ctx)
    if GPUS in app:
        app.cleanup_ctx.append(_gpu_ctx)
    if config.objects.enabled:
        app.cleanup_ctx.append(_objects_ctx)  # after storage: the gateway needs the cluster's keys
    return app


def network_reconciler(config: Config, store: Any, node_networks: NodeNetworks) -> NetworkReconciler:
    """The VPC network reconciler with the real drivers in the agent's namespace (fakes with the fake hypervisor)."""
    from agent.net.dhcp import DhcpServer, FakeDhcpServer
    from agent.net.firewall import FakeFirewall, NftFirewall
    from agent.net.metadata import FakeMetadataServer, MetadataServer
    from agent.net.overlay import FakeOverlay, LinuxOverlay
    from agent.net.router import FakeRouterPlumbing, RouterPlumbing
    from agent.net.service import FakeServiceNamespaces, ServiceNamespaces

    fake = config.compute.driver == "fake"
    return NetworkReconciler(
        store=store,
        node=config.node_name,
        underlay_address=config.network.underlay_address,
        overlay=FakeOverlay() if fake else LinuxOverlay(),
        services=FakeServiceNamespaces() if fake else ServiceNamespaces(prefix=config.network.service_namespace_prefix),
        firewall=FakeFirewall() if fake else NftFirewall(),
        node_networks=node_networks,
        state_dir=config.data_path / "vpc",
        # user=root: the data directory is 0700 (it holds keys), so dnsmasq's own account could not re-read its hosts
        # and DNS files there on SIGHUP; it runs inside the network's service namespace only.
        dhcp_factory=(
            lambda spec, d, ns: (
                FakeDhcpServer(spec, d, netns=ns) if fake else DhcpServer(spec, d, netns=ns, user="root")
            )
        ),
        metadata_factory=(lambda ns, lookup: (FakeMetadataServer if fake else MetadataServer)(ns, lookup)),
        routers=FakeRouterPlumbing() if fake else RouterPlumbing(),
        providers=node_providers(config),
    )


def gpu_reconciler(app: web.Application) -> Any:
    """The GPU reconciler with the real NVML and ``gpu.sysfs_root``; each discovery updates ``node show``."""
    from agent.gpu.inventory import summary
    from agent.gpu.nvml import PynvmlSource
    from agent.gpu.sysfs import Sysfs
    from agent.reconcilers.gpu import GpuReconciler

    config, host = app[CONFIG], app[HOST]

    def on_inventory(inv: Any) -> None:
        if hasattr(host, "gpus"):
            host.gpus = summary(inv)

    return GpuReconciler(
        None, config.node_name, PynvmlSource(), Sysfs(config.gpu.sysfs_root), on_inventory=on_inventory
    )


async def _gpu_ctx(app: web.Application) -> AsyncIterator[None]:
    reconciler = app[GPUS]
    reconciler.store = app[STORE]  # opened by the application's own context, after attach_node_services
    async with _controlled(app, reconciler, 1):
        yield


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    # The ``local`` pool record is made by the storage services on first use (``ensure_local_pool``), not here: a
    # node that never stores anything writes nothing.
    from minicloud.api.accesskeys import KEYSTORE

    config = app[CONFIG]
    reconciler = StorageReconciler(store=app[STORE], config=config, storage=app[NODE_STORAGE], keystore=app[KEYSTORE])
    async with _controlled(app, reconciler, STORAGE_WORKERS):
        app[STORAGE] = reconciler
        yield


async def _backups_ctx(app: web.Application) -> AsyncIterator[None]:
    """Volume backups into buckets and restores from them, for the volumes this node manages."""
    from agent.storage.backup import BackupReconciler
    from minicloud.api.accesskeys import KEYSTORE

    config = app[CONFIG]
    reconciler = BackupReconciler(store=app[STORE], config=config, storage=app[NODE_STORAGE], keystore=app[KEYSTORE])
    async with _controlled(app, reconciler, 2):
        yield


async def _objects_ctx(app: web.Application) -> AsyncIterator[None]:
    """This node's S3 gateway and, on the node that leads, RGW's users, keys and buckets made to match IAM."""
    from agent.reconcilers.objects import ObjectsReconciler
    from minicloud.api.accesskeys import KEYSTORE
    from minicloud.api.auth import DIRECTORY

    config = app[CONFIG]
    reconciler = ObjectsReconciler(store=app[STORE], config=config, keystore=app[KEYSTORE], directory=app[DIRECTORY])
    async with _controlled(app, reconciler, 4):
        yield


async def _network_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # The default bridge's driver, made once for both reconcilers (after _default_vpc_ctx: it reads the pins): the
    # compute side gives its guests their fixed addresses, the network side pins their taps to them.
    app[DEFAULT_NETWORK] = default = default_network(config)
    if default is not None:
        app[NODE_NETWORKS].use_default_bridge(default.spec.bridge, default.assignments)
    reconciler = network_reconciler(config, app[STORE], app[NODE_NETWORKS])
    async with _controlled(app, reconciler, NETWORK_WORKERS):
        app[NETWORK] = reconciler
        yield


def default_vpc_on(config: Config) -> bool:
    """Whether this node takes part in default VPCs: ``[network] default_vpc`` with its default bridge built for
    real guests (not with the network off or the fake hypervisor: no host network there)."""
    return config.network.default_vpc and config.network.enabled and config.compute.driver not in ("none", "fake")


def node_providers(config: Config) -> dict[str, str]:
    """``[network.providers]``, with ``host`` (the default bridges' external network) mapped to this node's default
    bridge unless the operator mapped it."""
    providers = dict(config.network.providers)
    if default_vpc_on(config):
        providers.setdefault(default_vpc.HOST_PROVIDER, config.network.bridge)
    return providers


def _default_dir(config: Config) -> Path:
    return config.data_path / "networks" / "default"


def default_bridge_pins(config: Config) -> dict[str, str]:
    """MAC -> address of the guests whose lease was in the ``host`` pool when this node first turned default VPCs
    on (read from the lease file then and kept in ``pinned.json``): dnsmasq keeps giving them that address though
    its range now ends below the pool, so no running guest changes address."""
    pinned = _default_dir(config) / "pinned.json"
    try:
        return dict(json.loads(pinned.read_text()))
    except FileNotFoundError:
        pass
    try:
        leases = parse_leases((_default_dir(config) / "leases").read_text(errors="replace"))
    except FileNotFoundError:
        leases = {}
    pins = {mac: ip for mac, ip in sorted(leases.items()) if default_vpc.in_pool(config.network.cidr, ip)}
    pinned.parent.mkdir(parents=True, exist_ok=True)
    tmp = pinned.with_suffix(".tmp")
    tmp.write_text(json.dumps(pins, indent=1) + "\n")
    tmp.replace(pinned)
    return pins


def prune_default_bridge_pins(config: Config, live_macs: set[str]) -> dict[str, str]:
    """Drop the pins of guests no instance of this node has any more (``live_macs``: the default-bridge MACs of
    this node's instances) from ``pinned.json``; returns the dropped MAC -> address."""
    pins = default_bridge_pins(config)
    gone = {mac: ip for mac, ip in pins.items() if mac not in live_macs}
    if gone:
        pinned = _default_dir(config) / "pinned.json"
        tmp = pinned.with_suffix(".tmp")
        tmp.write_text(json.dumps({m: ip for m, ip in pins.items() if m not in gone}, indent=1) + "\n")
        tmp.replace(pinned)
    return gone


async def _default_vpc_ctx(app: web.Application) -> AsyncIterator[None]:
    """The migration of the default bridge into the default-VPC model (every start; idempotent): the ``host``
    external network exists, and the pinned guests' addresses are held in its pool so no router takes them. Pins
    of guests whose instance has left this node (deleted, moved) are dropped and their addresses given back to the
    pool, before the default bridge's dnsmasq is configured."""
    from agent.compute.design import mac_for
    from minicloud.compute.kinds import INSTANCE
    from minicloud.state import list_all

    config = app[CONFIG]
    try:
        await asyncio.to_thread(default_bridge_pins, config)  # pinned on the first start with default VPCs
        live = {mac_for(r.id, 0) for r in await list_all(app[STORE], INSTANCE.name, where={"node": config.node_name})}
        for mac, ip in (await asyncio.to_thread(prune_default_bridge_pins, config, live)).items():
            await default_vpc.release_lease(app[STORE], config.node_name, mac, ip)
            log.info("default bridge: guest %s is gone from this node; %s goes back to the host pool", mac, ip)
        pins = await asyncio.to_thread(default_bridge_pins, config)
        await default_vpc.ensure_host_network(app[STORE], config.network.cidr)
        for mac, ip in pins.items():
            if not await default_vpc.reserve_lease(app[STORE], config.node_name, mac, ip):
                log.warning(
                    "guest %s keeps %s on the default bridge, but the host network's pool gave that address to "
                    "something else: a router's SNAT through this node may clash with it",
                    mac,
                    ip,
                )
    except (OSError, ValueError, MinicloudError) as exc:
        log.error("default VPCs: migrating the default bridge failed: %s", exc)
    yield


def default_network(config: Config) -> NetworkDriver | None:
    """The node's default network driver (a fake one with the fake hypervisor), or None when it is disabled. With
    default VPCs on, DHCP ends below the ``host`` network's pool and pinned guests keep their addresses."""
    if not config.network.enabled:
        return None
    extra: dict[str, Any] = {}
    if default_vpc_on(config):
        start, end = default_vpc.dhcp_range(config.network.cidr)
        pins = default_bridge_pins(config)
        extra = {"dhcp_start": start, "dhcp_end": end, "static_hosts": tuple(pins.items())}
    spec = NetworkSpec(
        name="default",
        bridge=config.network.bridge,
        cidr=ipaddress.IPv4Network(config.network.cidr),
        masquerade=config.network.masquerade,
        **extra,
    )
    kind = "fake" if config.compute.driver == "fake" else "bridge"
    return NETWORK_DRIVERS[kind](spec, config.data_path / "networks" / "default")


async def _compute_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    virt_type, reason = choose_virt(config.compute.virt_type, detect_virt())
    reconciler = ComputeReconciler(
        store=app[STORE],
        config=config,
        driver=make_driver(config.compute.driver, config.compute.libvirt_uri),
        network=app[DEFAULT_NETWORK] if DEFAULT_NETWORK in app else default_network(config),
        virt_type=virt_type,
        virt_reason=reason,
        networks=app[NODE_NETWORKS],
        storage=app[NODE_STORAGE],
    )
    async with _controlled(app, reconciler, COMPUTE_WORKERS):
        app[COMPUTE] = reconciler
        yield


@contextlib.asynccontextmanager
async def _controlled(app: web.Application, reconciler: Any, workers: int) -> AsyncIterator[None]:
    """A Controller running ``reconciler`` with ``workers`` workers for the duration, its passes reported to the
    node's metrics when they are on."""
    metrics = app.get(NODE_METRICS)
    controller = Controller(
        app[STORE],
        reconciler,
        workers=workers,
        resync_interval=app[CONFIG].compute.resync_interval,
        observe=metrics.observe_reconcile if metrics is not None else None,
    )
    await controller.start()
    try:
        yield
    finally:
        await controller.close()


def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    from agent.metrics.serve import metrics_ctx

    return metrics_ctx(app, app[NODE_METRICS])
