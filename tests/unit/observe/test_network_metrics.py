"""Network series: per network built on the node (its bridge, VXLAN device and service port, by the names
``agent.net`` gives them) and per router external leg, from a fake interface reader behind the real one's
``read(netns)``; the labels from the network reconciler's own map and the local store (``node_networks``)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics.network import (
    Counters,
    NetworkMetrics,
    NetworkRow,
    ProcNetDev,
    RouterLeg,
    devices,
    parse_net_dev,
)
from agent.net.overlay import bridge_name, vxlan_name
from agent.net.service import veth_name
from minicloud.observe import names

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
mcb-00002a: 5000   50    0    1    0     0          0         0     6000      60    0    2    0     0       0          0
"""


class FakeInterfaces:
    """The reader's interface: counters per namespace (None: the node's), and the namespaces asked for."""

    def __init__(self, by_ns: dict[str | None, dict[str, Counters]]) -> None:
        self.by_ns = by_ns
        self.asked: list[str | None] = []

    def read(self, netns: str | None = None) -> dict[str, Counters]:
        self.asked.append(netns)
        if netns not in self.by_ns:
            raise FileNotFoundError(netns)
        return self.by_ns[netns]


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_proc_net_dev_is_parsed_and_the_real_reader_reads_this_namespace():
    got = parse_net_dev(NET_DEV)
    assert got["mcb-00002a"] == Counters(5000, 6000, 50, 60, 1, 2)
    assert got["lo"].rx_bytes == 1000
    assert "lo" in ProcNetDev().read(None)  # the real reader, the agent's own namespace
    assert [name for _, name in devices(42)] == [bridge_name(42), vxlan_name(42), veth_name(42)]


async def test_network_and_router_series_from_a_fake_reader():
    vni, ns = 0x2A, "/run/netns/mcs-00002a"
    reader = FakeInterfaces(
        {
            None: {
                bridge_name(vni): Counters(1, 2, 3, 4, 5, 6),
                vxlan_name(vni): Counters(100, 200, 10, 20, 0, 1),
                veth_name(vni): Counters(7, 8, 9, 10, 0, 0),
                "eth0": Counters(9, 9, 9, 9, 9, 9),  # not a network's: no network series
            },
            ns: {"mce0": Counters(300, 400, 30, 40, 2, 3), "mcs0": Counters(1, 1, 1, 1, 1, 1)},
        }
    )
    rows = [
        NetworkRow(
            "net-a", "web", "pa", "prj-a", vni, ns, (RouterLeg("rtr-1", "edge", "pa", "prj-a", "mce0", floating_ips=2),)
        ),
        NetworkRow("net-b", "db", "pb", "prj-b", 0x2B, "/run/netns/mcs-00002b"),  # no device there yet: no series
    ]

    async def read() -> list[NetworkRow]:
        return rows

    metrics = NetworkMetrics("n1", read, reader)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    await metrics.refresh()
    got = _samples(registry)
    # the node's namespace once, and only the namespaces that hold an external leg
    assert reader.asked == [None, ns]
    net = {("network_id", "net-a"), ("name", "web"), ("project_id", "prj-a"), ("project", "pa"), ("node", "n1")}
    vx = frozenset(net | {("device", "vxlan"), ("interface", vxlan_name(vni))})
    assert got[("minicloud_network_transmit_bytes_total", vx)] == 200
    assert got[("minicloud_network_receive_packets_total", vx)] == 10
    assert got[("minicloud_network_transmit_drop_total", vx)] == 1
    br = frozenset(net | {("device", "bridge"), ("interface", bridge_name(vni))})
    assert got[("minicloud_network_receive_drop_total", br)] == 5
    svc = frozenset(net | {("device", "service"), ("interface", veth_name(vni))})
    assert got[("minicloud_network_receive_bytes_total", svc)] == 7
    rtr = {("router_id", "rtr-1"), ("name", "edge"), ("project_id", "prj-a"), ("project", "pa")}
    rtr |= {("network_id", "net-a"), ("node", "n1")}
    leg = frozenset(rtr | {("interface", "mce0")})
    assert got[("minicloud_router_external_receive_bytes_total", leg)] == 300
    assert got[("minicloud_router_external_transmit_packets_total", leg)] == 40
    assert got[("minicloud_router_external_transmit_drop_total", leg)] == 3
    assert got[("minicloud_router_floating_ips", frozenset(rtr))] == 2
    # nothing of net-b (its devices are not there) nor of interfaces that are no network's
    assert not any(dict(lb).get("network_id") == "net-b" for _, lb in got)
    assert not any(dict(lb).get("interface") in ("eth0", "mcs0") for _, lb in got)
    # every series is declared, with its declared labels, and carries the project id the query API enforces
    for name, labels in got:
        assert {k for k, _ in labels} == set(names.BY_NAME[name].labels), name
        assert dict(labels)[names.PROJECT_ID_LABEL].startswith("prj-")
    # a namespace that went between the records and the read: that leg has no counters, the rest stays
    reader.by_ns.pop(ns)
    await metrics.refresh()
    got = _samples(registry)
    assert ("minicloud_router_external_receive_bytes_total", leg) not in got
    assert got[("minicloud_network_transmit_bytes_total", vx)] == 200


async def test_node_networks_reads_the_reconcilers_map_and_the_store(tmp_path):
    """Labels come from the networks the reconciler built here (no scan of the cluster's networks), by id: their
    name and project (its id), and each router with an external leg there (what the router plumbing applied);
    a network whose record or project is gone has no series."""
    import ipaddress

    from aiohttp import web

    from agent.metrics.serve import node_networks
    from agent.net.router import ExternalLeg, FakeRouterPlumbing, FloatingLeg, RouterPlan
    from agent.net.service import FakeServiceNamespaces
    from agent.node import NETWORK
    from minicloud import ids
    from minicloud.api.keys import CONFIG, STORE
    from minicloud.network.kinds import NETWORK as NETWORK_KIND
    from minicloud.network.kinds import ROUTER, NetworkSpec, RouterSpec
    from minicloud.state import Create, Txn
    from minicloud.state.handle import StoreHandle
    from minicloud.state.sqlite import SQLiteStore
    from tests.unit.api.conftest import make_config

    app = web.Application()
    app[CONFIG] = make_config(tmp_path)
    app[STORE] = store = StoreHandle(SQLiteStore(tmp_path / "state.db"))
    await store.open()
    try:
        assert await node_networks(app) == []  # no reconciler (yet): nothing
        stamp = ids.now()
        here = NETWORK_KIND.new(
            project="default", name="web", spec=NetworkSpec(cidr="10.0.0.0/24", vni=5), labels={}, stamp=stamp
        )
        orphan = NETWORK_KIND.new(
            project="gone", name="x", spec=NetworkSpec(cidr="10.1.0.0/24", vni=6), labels={}, stamp=stamp
        )
        elsewhere = NETWORK_KIND.new(
            project="default", name="far", spec=NetworkSpec(cidr="10.2.0.0/24", vni=7), labels={}, stamp=stamp
        )
        router = ROUTER.new(project="default", name="edge", spec=RouterSpec(), labels={}, stamp=stamp)
        await store.commit(
            Txn(
                [
                    Create(K.dump(o))
                    for K, o in (
                        (NETWORK_KIND, here),
                        (NETWORK_KIND, orphan),
                        (NETWORK_KIND, elsewhere),
                        (ROUTER, router),
                    )
                ]
            )
        )
        services, plumbing = FakeServiceNamespaces(), FakeRouterPlumbing()
        leg = ExternalLeg(
            router.id, "eth1", ipaddress.IPv4Interface("192.0.2.5/24"), ipaddress.IPv4Address("192.0.2.1"), ()
        )
        fip = FloatingLeg("fip-1", ipaddress.IPv4Address("192.0.2.9"), ipaddress.IPv4Address("10.0.0.5"), 0)
        plumbing.plans[services.path(5)] = RouterPlan(vni=5, external=leg, floating=(fip,))
        # built here: web and the orphan (not "far", which only another node has); a deleted network too
        app[NETWORK] = SimpleNamespace(
            built_vnis=lambda: {here.id: 5, orphan.id: 6, "net-deleted": 8}, services=services, routers=plumbing
        )
        rows = await node_networks(app)
    finally:
        await store.close()
    assert [(r.network_id, r.name, r.project, r.project_id, r.vni) for r in rows] == [
        (here.id, "web", "default", "prj-default", 5)
    ]
    assert rows[0].netns == services.path(5)
    assert rows[0].legs == (RouterLeg(router.id, "edge", "default", "prj-default", "mce0", 1),)
