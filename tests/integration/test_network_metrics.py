"""Network series from real devices: a network built by the overlay driver on two "nodes" (network namespaces, the
lab of ``test_overlay``), guests pinging across it, and the real interface reader (``ProcNetDev``, entering the
namespaces with ``setns``) giving the VXLAN device's and the bridge's counters; a router's external leg (a veth
``mce0`` in a namespace standing for the network's service namespace) read inside that namespace; and the
agent's labels (``node_networks``) for a network the real reconciler of ``test_network_node`` built. Needs what those
tests need (root, ``ip netns``, ``nsenter``, busybox; nft and dnsmasq for the second)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics.network import Counters, NetworkMetrics, NetworkRow, ProcNetDev, RouterLeg
from agent.net.overlay import bridge_name, vxlan_name
from tests.integration.test_network_node import MISSING as NODE_MISSING
from tests.integration.test_network_node import node  # noqa: F401
from tests.integration.test_overlay import Lab, connect, lab, nodes, ns_run, ping, pytestmark  # noqa: F401

VNI = 0x31


class NodeReader:
    """The real reader, with "the agent's own namespace" being the lab node's."""

    def __init__(self, node_ns: str) -> None:
        self.node_ns = node_ns
        self.real = ProcNetDev()

    def read(self, netns: str | None = None) -> dict[str, Counters]:
        return self.real.read(netns or self.node_ns)


async def test_a_real_networks_device_counters_and_a_router_leg_appear(lab: Lab, nodes: tuple) -> None:  # noqa: F811
    a, _b, da, db = nodes
    await connect(da, db, VNI)
    ea = lab.endpoint(a, bridge_name(VNI), "10.31.0.1", "ea")
    lab.endpoint(_b, bridge_name(VNI), "10.31.0.2", "eb")
    assert ping(ea, "10.31.0.2", count=3)
    svc = lab.netns("sv")  # stands for the network's service namespace, holding a router's external leg
    ns_run(svc, "ip", "link", "add", "mce0", "type", "veth", "peer", "name", "mcx0")
    ns_run(svc, "ip", "link", "set", "mcx0", "up")
    ns_run(svc, "ip", "addr", "add", "192.0.2.5/24", "dev", "mce0")
    ns_run(svc, "ip", "link", "set", "mce0", "up")
    ns_run(svc, "/bin/busybox", "ping", "-c", "2", "-W", "1", "192.0.2.9", check=False)  # ARP requests out of the leg
    svc_path = f"/run/netns/{svc}"
    row = NetworkRow(
        "net-1", "web", "pa", "prj-a", VNI, svc_path, (RouterLeg("rtr-1", "edge", "pa", "prj-a", "mce0", 1),)
    )

    async def rows() -> list[NetworkRow]:
        return [row]

    metrics = NetworkMetrics("n1", rows, NodeReader(f"/run/netns/{a}"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    await metrics.refresh()
    got: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            got[(s.name, s.labels.get("interface", ""))] = s.value
            assert s.labels["project_id"] == "prj-a"
    # the guests' pings crossed the VXLAN device of node a, both ways
    assert got[("minicloud_network_transmit_packets_total", vxlan_name(VNI))] >= 3
    assert got[("minicloud_network_receive_bytes_total", vxlan_name(VNI))] > 0
    assert ("minicloud_network_receive_bytes_total", bridge_name(VNI)) in got
    assert got[("minicloud_router_external_transmit_packets_total", "mce0")] >= 2
    assert got[("minicloud_router_floating_ips", "")] == 1


@pytest.mark.skipif(NODE_MISSING is not None, reason=NODE_MISSING or "")
async def test_the_agents_labels_for_a_network_the_real_reconciler_built(node) -> None:  # noqa: F811
    """With the network reconciler of ``test_network_node`` building a network for real (bridge, VXLAN device,
    service namespace, dnsmasq) and a guest leasing its address by DHCP: ``node_networks`` labels it from the
    reconciler's own map and the store, and the service port's counters moved with the DHCP exchange."""
    import asyncio

    from aiohttp import web

    from agent.metrics.serve import node_networks
    from agent.node import NETWORK
    from minicloud.api.keys import STORE
    from minicloud.iam.kinds import PROJECT, ProjectSpec
    from minicloud.state import Create, Txn
    from tests.integration.test_network_node import VNI as NODE_VNI
    from tests.integration.test_network_node import _guest, _records, _udhcpc

    await _records(node.store)
    project = PROJECT.new(project="", name="p", spec=ProjectSpec())
    await node.store.commit(Txn([Create(PROJECT.dump(project))]))
    r = node.reconciler()
    await r.start(lambda key: None)
    try:
        await node.pass_(r)
        g = _guest(node)
        assert await asyncio.to_thread(_udhcpc, g, node.tmp) is not None
        app = web.Application()
        app[STORE] = node.store
        app[NETWORK] = r
        rows = await node_networks(app)
        assert [(row.network_id, row.project, row.project_id, row.vni) for row in rows] == [
            ("net-1", "p", project.id, NODE_VNI)
        ]
        metrics = NetworkMetrics("n1", lambda: node_networks(app), NodeReader(f"/run/netns/{node.ns}"))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(metrics)
        await metrics.refresh()
    finally:
        await r.close()
    got = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            assert s.labels["network_id"] == "net-1" and s.labels["project_id"] == project.id
            got[(s.name, s.labels["device"])] = s.value
    assert {d for _, d in got} == {"bridge", "vxlan", "service"}
    # the guest's DHCP request went to the service namespace, its answer came back
    assert got[("minicloud_network_transmit_packets_total", "service")] > 0
    assert got[("minicloud_network_receive_packets_total", "service")] > 0
