"""Network series: the devices of every VPC network built on this node and the routers' external legs there.

Per network the network reconciler built here (its own ``network id → VNI`` map: no store scan), the counters of the
network's three devices by their names (``agent.net``): the bridge (``bridge_name(vni)``: what the node itself sends
and receives on it), the VXLAN device (``vxlan_name(vni)``: the network's traffic between nodes) and the service
port's node end (``service.veth_name(vni)``: DHCP, DNS, metadata and routed traffic), labelled ``device`` =
``bridge`` / ``vxlan`` / ``service`` and ``interface`` = the name, and the network's ``network_id``, ``name``,
``project_id``, ``project`` and ``node``. Per router external leg in a network's service namespace (what the router
plumbing applied there: ``mce0``, ``mce1`` …) its counters, labelled ``router_id``, the router's ``name``,
``project_id``, ``project``, ``network_id`` and ``node``; and the floating IPs NATed on that leg on this node.

Counters are read from ``/proc/<thread>/net/dev`` (the kernel's per-interface counters, what psutil reads too): once
for the node's namespace and once per service namespace that holds an external leg, each read on a short-lived
thread that enters the namespace (the thread ends with it, so nothing has to leave it). :class:`ProcNetDev` is the
real reader; tests give :class:`NetworkMetrics` a fake one behind the same ``read(netns)``. The labels come from a
read of the local store per refresh (by id, one per network and router built here), done by ``agent.metrics.serve``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from minicloud.observe import names as n


class Counters(NamedTuple):
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    rx_drop: int
    tx_drop: int


class InterfaceReader(Protocol):
    def read(self, netns: str | None = None) -> dict[str, Counters]:
        """Every interface's counters in ``netns`` (a namespace file's path; None: the agent's own). Blocking."""
        ...


def parse_net_dev(text: str) -> dict[str, Counters]:
    """``/proc/net/dev``'s table: ``name: rx bytes packets errs drop fifo frame compressed multicast tx bytes
    packets errs drop …``."""
    out: dict[str, Counters] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        f = rest.split()
        if len(f) < 12:
            continue
        out[name.strip()] = Counters(int(f[0]), int(f[8]), int(f[1]), int(f[9]), int(f[3]), int(f[11]))
    return out


_CLONE_NEWNET = 0x40000000


class ProcNetDev:
    """The kernel's per-interface counters (``/proc/thread-self/net/dev``). Another namespace is read on a new
    thread that enters it with ``setns(2)`` (only that thread moves, and it ends after the read)."""

    def read(self, netns: str | None = None) -> dict[str, Counters]:
        if netns is None:
            with open("/proc/thread-self/net/dev") as f:
                return parse_net_dev(f.read())
        result: list[Any] = []

        def inside() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {netns}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                with open("/proc/thread-self/net/dev") as f:
                    result.append(parse_net_dev(f.read()))
            except BaseException as exc:  # handed to the caller's thread
                result.append(exc)

        thread = threading.Thread(target=inside, name="metrics-netns", daemon=True)
        thread.start()
        thread.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]


@dataclass(frozen=True)
class RouterLeg:
    router_id: str
    name: str
    project: str
    project_id: str
    #: The leg's interface in the network's service namespace (``mce0`` …) and the floating IPs NATed on it here.
    interface: str
    floating_ips: int = 0


@dataclass(frozen=True)
class NetworkRow:
    network_id: str
    name: str
    project: str
    project_id: str
    vni: int
    #: The network's service namespace (a path) and the routers' external legs in it.
    netns: str = ""
    legs: tuple[RouterLeg, ...] = ()


def devices(vni: int) -> tuple[tuple[str, str], ...]:
    """(``device`` label, interface name) of network ``vni``'s devices on a node, named as ``agent.net`` names them."""
    from agent.net.overlay import bridge_name, vxlan_name
    from agent.net.service import veth_name

    return (("bridge", bridge_name(vni)), ("vxlan", vxlan_name(vni)), ("service", veth_name(vni)))


_NET = (
    (n.NETWORK_RX_BYTES, "rx_bytes"),
    (n.NETWORK_TX_BYTES, "tx_bytes"),
    (n.NETWORK_RX_PACKETS, "rx_packets"),
    (n.NETWORK_TX_PACKETS, "tx_packets"),
    (n.NETWORK_RX_DROP, "rx_drop"),
    (n.NETWORK_TX_DROP, "tx_drop"),
)
_ROUTER = (
    (n.ROUTER_EXTERNAL_RX_BYTES, "rx_bytes"),
    (n.ROUTER_EXTERNAL_TX_BYTES, "tx_bytes"),
    (n.ROUTER_EXTERNAL_RX_PACKETS, "rx_packets"),
    (n.ROUTER_EXTERNAL_TX_PACKETS, "tx_packets"),
    (n.ROUTER_EXTERNAL_RX_DROP, "rx_drop"),
    (n.ROUTER_EXTERNAL_TX_DROP, "tx_drop"),
)


def network_families(
    rows: list[NetworkRow], host: Mapping[str, Counters], inside: Mapping[str, Mapping[str, Counters]], node: str
) -> Iterator[Metric]:
    """The families for one refresh (pure): ``host`` the node namespace's counters by interface, ``inside`` each
    service namespace's by path. A device that is not there (yet) has no series."""
    fams = {m.name: CounterMetricFamily(m.family, m.help, labels=list(m.labels)) for m, _ in (*_NET, *_ROUTER)}
    fips = GaugeMetricFamily(
        n.ROUTER_FLOATING_IPS.family, n.ROUTER_FLOATING_IPS.help, labels=list(n.ROUTER_FLOATING_IPS.labels)
    )
    for r in rows:
        base = [r.network_id, r.name, r.project_id, r.project, node]
        for device, ifname in devices(r.vni):
            c = host.get(ifname)
            if c is None:
                continue
            for metric, attr in _NET:
                fams[metric.name].add_metric([*base, device, ifname], getattr(c, attr))
        there = inside.get(r.netns, {})
        for leg in r.legs:
            labels = [leg.router_id, leg.name, leg.project_id, leg.project, r.network_id, node, leg.interface]
            fips.add_metric(labels[:-1], leg.floating_ips)
            c = there.get(leg.interface)
            if c is None:
                continue
            for metric, attr in _ROUTER:
                fams[metric.name].add_metric(labels, getattr(c, attr))
    yield from fams.values()
    yield fips


class NetworkMetrics:
    """A collector: ``read`` gives the networks built here with their labels (``agent.metrics.serve``);
    ``reader`` the interface counters. :meth:`refresh` reads both off the event loop; a scrape renders the last."""

    def __init__(
        self, node: str, read: Callable[[], Awaitable[list[NetworkRow]]], reader: InterfaceReader | None = None
    ) -> None:
        self.node = node
        self.read = read
        self.reader: InterfaceReader = reader if reader is not None else ProcNetDev()
        self.rows: list[NetworkRow] = []
        self.host: dict[str, Counters] = {}
        self.inside: dict[str, dict[str, Counters]] = {}

    def _read_counters(self, rows: list[NetworkRow]) -> tuple[dict[str, Counters], dict[str, dict[str, Counters]]]:
        host = self.reader.read(None) if rows else {}
        inside: dict[str, dict[str, Counters]] = {}
        for r in rows:
            if r.legs and r.netns and r.netns not in inside:
                try:
                    inside[r.netns] = self.reader.read(r.netns)
                except OSError:
                    inside[r.netns] = {}  # the namespace went between the records and the read
        return host, inside

    async def refresh(self) -> None:
        rows = await self.read()
        self.host, self.inside = await asyncio.to_thread(self._read_counters, rows)
        self.rows = rows

    def collect(self) -> Iterator[Metric]:
        yield from network_families(self.rows, self.host, self.inside, self.node)
