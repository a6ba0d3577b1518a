"""The network reconciler: the pure desired-state computation (peers, FDB, neighbours, DHCP hosts, DNS records,
the security-group compiler's inputs) and the reconciler against fake drivers and a real SQLite store. The real
drivers are exercised by tests/integration/test_network_node.py."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.net.dhcp import DhcpHost, DnsRecord, hosts_file
from agent.net.metadata import make_app
from agent.net.nodenetworks import NodeNetworks
from agent.net.overlay import FakeOverlay, FdbEntry, Neighbour
from agent.net.service import FakeServiceNamespaces, provider_key, provider_mac, service_mac
from agent.reconcile import Controller
from agent.reconcilers.network import (
    NODE_KEY,
    NetworkReconciler,
    compile_inputs,
    desired_external,
    desired_network,
    dns_label,
    external_zone,
    tap_name,
    underlay_addresses,
)
from minicloud import ids
from minicloud.cluster.kinds import NODE, NodeSpec
from minicloud.compute.kinds import INSTANCE, InstanceSpec
from minicloud.network import ipam
from minicloud.network import networks as networks_service
from minicloud.network.kinds import (
    NETWORK,
    PORT,
    ROUTER,
    SECURITY_GROUP,
    SUBNET,
    NetworkSpec,
    PortSpec,
    RouterSpec,
    RuleSpec,
    SecurityGroupSpec,
    SubnetSpec,
)
from minicloud.state import Create, Delete, Record, Txn, Update
from minicloud.state.sqlite import SQLiteStore

ME = "n1"
A = ipaddress.IPv4Address


def _net(vni: int = 42) -> NetworkSpec:
    return NetworkSpec(cidr="10.0.0.0/16", vni=vni, mtu=1450, subnets={"sub-a": "10.0.1.0/24"})


def _subnet(cidr: str = "10.0.1.0/24", gw: str = "10.0.1.1", **kw: Any) -> SubnetSpec:
    net = ipaddress.IPv4Network(cidr)
    return SubnetSpec(
        network="net-1", cidr=cidr, gateway=gw, allocation_start=str(net[2]), allocation_end=str(net[-2]), **kw
    )


def _port(ip: str, mac: str, node: str, instance: str = "", index: int = 0, groups=(), subnet="sub-a") -> PortSpec:
    return PortSpec(
        network="net-1",
        subnet=subnet,
        address=ip,
        mac=mac,
        node=node,
        instance=instance,
        index=index,
        security_groups=list(groups),
    )


UNDERLAY = {"n1": A("10.254.0.1"), "n2": A("10.254.0.2"), "n3": A("10.254.0.3")}


# -- pure ----------------------------------------------------------------------------------------------------------
def test_peers_fdb_and_neighbours_name_every_remote_port_and_only_other_nodes():
    ports = [
        ("port-1", _port("10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")),
        ("port-2", _port("10.0.1.11", "52:54:00:00:00:02", "n2", "i-2")),
        ("port-3", _port("10.0.1.12", "52:54:00:00:00:03", "n3", "i-3")),
        ("port-4", _port("10.0.1.13", "52:54:00:00:00:04", "n2", "i-4")),
        ("port-5", _port("10.0.1.14", "52:54:00:00:00:05", "", "i-5")),  # not placed yet
    ]
    want = desired_network("net-1", _net(), "vpc", {"sub-a": _subnet()}, ports, {}, ME, UNDERLAY["n1"], UNDERLAY)
    assert want is not None
    assert want.overlay.vni == 42 and want.overlay.local == A("10.254.0.1") and want.overlay.mtu == 1450
    assert want.peers == {A("10.254.0.2"), A("10.254.0.3")}
    assert set(want.fdb) == {
        FdbEntry("52:54:00:00:00:02", A("10.254.0.2")),
        FdbEntry("52:54:00:00:00:03", A("10.254.0.3")),
        FdbEntry("52:54:00:00:00:04", A("10.254.0.2")),
    }
    # remote ports, and the gateway answered by this node's own service port (same MAC everywhere)
    assert set(want.neighbours) == {
        Neighbour("10.0.1.11", "52:54:00:00:00:02"),
        Neighbour("10.0.1.12", "52:54:00:00:00:03"),
        Neighbour("10.0.1.13", "52:54:00:00:00:04"),
        Neighbour("10.0.1.1", service_mac(42)),
    }


def test_a_network_without_a_port_here_is_not_wanted_here():
    ports = [("port-2", _port("10.0.1.11", "52:54:00:00:00:02", "n2"))]
    assert (
        desired_network("net-1", _net(), "vpc", {"sub-a": _subnet()}, ports, {}, ME, UNDERLAY["n1"], UNDERLAY) is None
    )
    ext = msgspec.structs.replace(_net(), vni=None, external=True)
    mine = [("port-1", _port("10.0.1.10", "52:54:00:00:00:01", "n1"))]
    assert desired_network("net-1", ext, "vpc", {}, mine, {}, ME, UNDERLAY["n1"], UNDERLAY) is None


def test_dhcp_serves_only_this_nodes_ports_and_dns_names_every_port():
    ports = [
        ("port-1", _port("10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")),
        ("port-1b", _port("10.0.1.20", "52:54:00:00:00:0b", "n1", "i-1", index=1)),
        ("port-2", _port("10.0.1.11", "52:54:00:00:00:02", "n2", "i-2")),
    ]
    names = {"i-1": "Web_1", "i-2": "db"}
    sub = _subnet(dns_servers=["1.1.1.1"])
    want = desired_network("net-1", _net(), "VPC", {"sub-a": sub}, ports, names, ME, UNDERLAY["n1"], UNDERLAY)
    assert want is not None and want.dhcp is not None
    assert want.dhcp.network == "vpc" and want.dhcp.interface == "mcs0"
    assert want.dhcp.server == ipaddress.IPv4Interface("10.0.1.1/24") and want.dhcp.router == A("10.0.1.1")
    assert want.dhcp.mtu == 1450 and want.dhcp.upstream_dns == ("1.1.1.1",)
    assert set(want.hosts) == {
        DhcpHost("52:54:00:00:00:01", "10.0.1.10", "web-1"),
        DhcpHost("52:54:00:00:00:0b", "10.0.1.20", "web-1-1"),
    }
    assert set(want.records) == {
        DnsRecord("web-1", "10.0.1.10"),
        DnsRecord("web-1-1", "10.0.1.20"),
        DnsRecord("db", "10.0.1.11"),
    }
    assert want.service.addresses == (ipaddress.IPv4Interface("10.0.1.1/24"),)
    assert ipaddress.IPv4Interface("169.254.169.254/32") in want.service.want_addresses


def test_every_subnet_gateway_is_on_the_service_port_and_a_node_without_an_address_is_reported():
    subnets = {"sub-a": _subnet(), "sub-b": _subnet("10.0.2.0/24", "10.0.2.254"), "sub-c": _subnet("10.0.3.0/24", "10.0.3.1", deleting=True)}  # fmt: skip
    ports = [
        ("port-1", _port("10.0.2.10", "52:54:00:00:00:01", "n1", subnet="sub-b")),
        ("port-9", _port("10.0.1.99", "52:54:00:00:00:09", "n9")),
    ]
    want = desired_network("net-1", _net(), "vpc", subnets, ports, {}, ME, UNDERLAY["n1"], UNDERLAY)
    assert want is not None
    assert want.service.addresses == (ipaddress.IPv4Interface("10.0.1.1/24"), ipaddress.IPv4Interface("10.0.2.254/24"))
    assert want.dhcp is not None and want.dhcp.server == ipaddress.IPv4Interface("10.0.2.254/24")
    assert want.unreachable == ("port-9",) and not want.fdb


def test_one_dnsmasq_serves_every_subnet_with_a_port_on_this_node_each_with_its_own_gateway():
    subnets = {
        "sub-a": _subnet(dns_servers=["1.1.1.1"]),
        "sub-b": _subnet("10.0.2.0/24", "10.0.2.254", dns_servers=["9.9.9.9", "1.1.1.1"]),
        "sub-c": _subnet("10.0.3.0/24", "10.0.3.1"),  # a port elsewhere only: not served here
    }
    ports = [
        ("port-1", _port("10.0.1.10", "52:54:00:00:00:01", "n1")),
        ("port-2", _port("10.0.2.10", "52:54:00:00:00:02", "n1", subnet="sub-b")),
        ("port-3", _port("10.0.3.10", "52:54:00:00:00:03", "n2", subnet="sub-c")),
    ]
    want = desired_network("net-1", _net(), "vpc", subnets, ports, {}, ME, UNDERLAY["n1"], UNDERLAY)
    assert want is not None and want.dhcp is not None
    assert [(s.server, s.router) for s in want.dhcp.subnets] == [
        (ipaddress.IPv4Interface("10.0.1.1/24"), A("10.0.1.1")),
        (ipaddress.IPv4Interface("10.0.2.254/24"), A("10.0.2.254")),
    ]
    assert want.dhcp.upstream_dns == ("1.1.1.1", "9.9.9.9")
    assert {(h.mac, str(h.ip)) for h in want.hosts} == {
        ("52:54:00:00:00:01", "10.0.1.10"),
        ("52:54:00:00:00:02", "10.0.2.10"),
    }
    hosts_file(want.dhcp, want.hosts)  # both subnets' hosts are valid for the one dnsmasq


def test_underlay_addresses_come_from_config_label_or_node_address():
    def node(name: str, address: str, labels=None) -> Record:
        return NODE.dump(NODE.new(project="", name=name, spec=NodeSpec(address=address), labels=labels))

    nodes = [node("n1", "192.0.2.1:7001"), node("n2", "192.0.2.2", {"underlay": "10.9.0.2"}), node("n3", "host:1")]
    local, out = underlay_addresses(nodes, "n1", "")
    assert local == A("192.0.2.1") and out == {"n1": A("192.0.2.1"), "n2": A("10.9.0.2")}
    local, out = underlay_addresses(nodes, "n1", "10.9.0.1")
    assert local == A("10.9.0.1") and out["n1"] == A("10.9.0.1")
    local, out = underlay_addresses([], "solo", "")
    assert local == A("127.0.0.1") and out == {"solo": A("127.0.0.1")}


def test_compile_inputs_take_members_cluster_wide_and_only_this_nodes_ports():
    web = SecurityGroupSpec(rules=[RuleSpec(id="r1", direction="ingress", protocol="tcp", port_min=80)])
    db = SecurityGroupSpec(
        rules=[
            RuleSpec(id="r2", direction="ingress", protocol="tcp", port_min=5432, remote_group="sg-web"),
            RuleSpec(id="r3", direction="ingress", remote_group="sg-gone"),
        ]
    )
    ports = [
        ("port-1", _port("10.0.1.10", "52:54:00:00:00:01", "n1", groups=["sg-web", "sg-gone"])),
        ("port-2", _port("10.0.1.11", "52:54:00:00:00:02", "n2", groups=["sg-web"])),
        ("port-3", _port("10.0.1.12", "52:54:00:00:00:03", "n1", groups=["sg-db"])),
    ]
    other = msgspec.structs.replace(_port("10.0.1.10", "52:54:00:00:00:04", "n2", groups=["sg-db"]), network="net-2")
    ports.append(("port-4", other))  # the same address in a network of the same CIDR, routed with net-3
    bridges = {"net-1": "mcb-1", "net-2": "mcb-2", "net-3": "mcb-3"}
    routed = {"net-2": {"net-3"}, "net-3": {"net-2"}}
    groups, local = compile_inputs([("sg-web", web), ("sg-db", db)], ports, ME, bridges, routed=routed)
    by_id = {g.id: g for g in groups}
    # members are (bridge, address): 10.0.1.10 of net-1 is in sg-web, 10.0.1.10 of net-2 (and routed net-3) in sg-db
    assert by_id["sg-web"].members == (("mcb-1", "10.0.1.10"), ("mcb-1", "10.0.1.11"))
    assert by_id["sg-db"].members == (("mcb-1", "10.0.1.12"), ("mcb-2", "10.0.1.10"), ("mcb-3", "10.0.1.10"))
    assert [r.remote_group for r in by_id["sg-db"].rules] == ["sg-web"]  # the rule naming a deleted group is gone
    assert [(p.id, p.device, p.groups) for p in local] == [
        ("port-1", tap_name("port-1"), ("sg-web",)),
        ("port-3", tap_name("port-3"), ("sg-db",)),
    ]
    assert len(tap_name("port-1")) <= 15


def test_a_port_arriving_by_migration_is_plugged_on_its_target_and_still_reached_on_its_node_elsewhere():
    arriving = msgspec.structs.replace(
        _port("10.0.1.10", "52:54:00:00:00:01", "n2", "i-1", groups=["sg-1"]), arriving="n1"
    )
    ports = [("port-1", arriving), ("port-2", _port("10.0.1.11", "52:54:00:00:00:02", "n3", "i-2"))]
    # the target (n1, this node): the network, the NIC's DHCP host and firewall chain, before the guest comes; no
    # static FDB entry for it (frames flood to n2 until it runs here, then the bridge learns it on its tap)
    want = desired_network("net-1", _net(), "vpc", {"sub-a": _subnet()}, ports, {}, ME, UNDERLAY["n1"], UNDERLAY)
    assert want is not None
    assert [h.mac for h in want.hosts] == ["52:54:00:00:00:01"]
    assert want.peers == {A("10.254.0.2"), A("10.254.0.3")}
    assert set(want.fdb) == {FdbEntry("52:54:00:00:00:02", A("10.254.0.3"))}
    assert Neighbour("10.0.1.10", "52:54:00:00:00:01") in want.neighbours
    _, local = compile_inputs([("sg-1", SecurityGroupSpec())], ports, ME, {"net-1": "mcb-1"})
    assert [(p.id, p.device, p.ips) for p in local] == [("port-1", tap_name("port-1"), ("10.0.1.10",))]
    # a third node sends to where it runs (n2) until the migration ends
    other = desired_network("net-1", _net(), "vpc", {"sub-a": _subnet()}, ports, {}, "n3", UNDERLAY["n3"], UNDERLAY)
    assert other is not None and FdbEntry("52:54:00:00:00:01", A("10.254.0.2")) in other.fdb
    # an unplaced port never arrives anywhere
    unplaced = [("port-1", msgspec.structs.replace(arriving, node=""))]
    assert (
        desired_network("net-1", _net(), "vpc", {"sub-a": _subnet()}, unplaced, {}, ME, UNDERLAY["n1"], UNDERLAY)
        is None
    )


def test_dns_label():
    assert dns_label("Web_Server.1") == "web-server-1"
    assert dns_label("__") is None


# -- the reconciler ------------------------------------------------------------------------------------------------
class FakeFirewall:
    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.deleted: list[Any] = []
        self.refuse: str | None = None  # a script containing this fails, as nft refuses a change on drifted tables

    async def apply(self, script: str) -> None:
        from agent.net.common import NetworkError

        if self.refuse is not None and self.refuse in script:
            raise NetworkError("nftables: could not apply the ruleset: No such file or directory")
        self.scripts.append(script)

    async def enable_bridge_netfilter(self) -> None:
        self.bridge_netfilter = True

    async def list_tables(self, prefix: str = "minicloud"):
        from agent.net.firewall import NftTable

        return [NftTable("bridge", "minicloud_sg"), NftTable("inet", "minicloud_sg")] if self.scripts else []

    async def delete_tables(self, tables) -> None:
        self.deleted.extend(tables)


class FakeDhcp:
    running: dict[Path, FakeDhcp] = {}

    def __init__(self, spec, state_dir: Path, netns: str) -> None:
        self.spec, self.state_dir, self.netns = spec, state_dir, netns
        self.hosts: tuple = ()
        self.records: tuple = ()
        self.ensures = 0

    async def ensure(self, hosts, records) -> bool:
        self.hosts, self.records = tuple(hosts), tuple(records)
        self.ensures += 1
        FakeDhcp.running[self.state_dir] = self
        return True

    async def stop(self) -> None:
        FakeDhcp.running.pop(self.state_dir, None)


class FakeMetadata:
    def __init__(self, netns: str, lookup) -> None:
        self.netns, self.lookup, self.running = netns, lookup, False

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False


class World:
    def __init__(self, store: SQLiteStore, tmp_path: Path) -> None:
        self.store = store
        self.overlay = FakeOverlay()
        self.services = FakeServiceNamespaces()
        self.firewall = FakeFirewall()
        self.nn = NodeNetworks()
        self.metadata: list[FakeMetadata] = []
        FakeDhcp.running = {}
        self.r = self.make(tmp_path)
        self.enqueued: list[str] = []

    def make(self, tmp_path: Path) -> NetworkReconciler:
        def md(ns, lookup):
            m = FakeMetadata(ns, lookup)
            self.metadata.append(m)
            return m

        return NetworkReconciler(
            store=self.store,
            node=ME,
            underlay_address="",
            overlay=self.overlay,
            services=self.services,
            firewall=self.firewall,
            node_networks=self.nn,
            state_dir=tmp_path / "networks",
            dhcp_factory=FakeDhcp,
            metadata_factory=md,
        )

    async def create(self, kind, obj) -> None:
        await self.store.commit(Txn([Create(kind.dump(obj))]))

    async def pass_(self) -> None:
        for key in await self.r.all_keys():
            await self.r.reconcile(key)


@pytest.fixture
async def world(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    w = World(store, tmp_path)
    await w.r.start(w.enqueued.append)
    await w.create(NODE, NODE.new(project="", name="n1", spec=NodeSpec(address="10.254.0.1")))
    await w.create(NODE, NODE.new(project="", name="n2", spec=NodeSpec(address="10.254.0.2")))
    await w.create(NETWORK, NETWORK.new(project="p", name="vpc", id="net-1", spec=_net()))
    await w.create(SUBNET, SUBNET.new(project="p", name="web", id="sub-a", spec=_subnet()))
    await w.create(SECURITY_GROUP, SECURITY_GROUP.new(project="p", name="default", id="sg-1", spec=SecurityGroupSpec(
        rules=[RuleSpec(id="r1", direction="egress"), RuleSpec(id="r2", direction="ingress", remote_group="sg-1")])))  # fmt: skip
    for iid, name in (("i-1", "web"), ("i-2", "db")):
        spec = InstanceSpec(uuid=iid, image_id="img", image_name="img", type="t", vcpus=1, memory_mib=64, disk_gib=1,
                            public_keys=["ssh-ed25519 AAAA me"], user_data="#cloud-config\n")  # fmt: skip
        await w.create(INSTANCE, INSTANCE.new(project="p", name=name, id=iid, spec=spec))
    yield w
    await w.r.close()
    await store.close()


async def _add_port(w: World, pid: str, ip: str, mac: str, node: str, instance: str) -> None:
    spec = _port(ip, mac, node, instance, groups=["sg-1"])
    await w.create(PORT, PORT.new(project="p", name=f"{instance}/0", id=pid, spec=spec))


async def test_a_local_port_builds_the_network_and_a_second_pass_changes_nothing(world):
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await _add_port(world, "port-2", "10.0.1.11", "52:54:00:00:00:02", "n2", "i-2")
    assert set(world.r.keys_for(await _change(world, PORT, "port-1"))) == {"net-1", NODE_KEY}
    await world.pass_()
    net = world.overlay.networks[42]
    assert net.peers == {A("10.254.0.2"): None}
    assert net.fdb == {"52:54:00:00:00:02": A("10.254.0.2")}
    assert net.neighbours[A("10.0.1.11")] == "52:54:00:00:00:02"
    assert world.services.spaces[42].addresses == (ipaddress.IPv4Interface("10.0.1.1/24"),)
    assert world.nn.bridge_for("net-1") == "mcb-00002a"
    dhcp = FakeDhcp.running[world.r.state_dir / "net-1"]
    assert [h.name for h in dhcp.hosts] == ["web"] and {r.name for r in dhcp.records} == {"web", "db"}
    assert world.metadata[0].running and world.metadata[0].netns.endswith("mcs-00002a")
    script = world.firewall.scripts[-1]
    assert f'"{tap_name("port-1")}" : jump o_port_1' in script and tap_name("port-2") not in script
    assert 'elements = { "mcb-00002a" . 10.0.1.10, "mcb-00002a" . 10.0.1.11 }' in script  # members cluster-wide
    assert '"mcb-00002a" . 10.0.1.10 : jump i_port_1' in script and world.firewall.bridge_netfilter
    changes, scripts = world.overlay.changes, len(world.firewall.scripts)
    indexes = (net.bridge_index, net.vxlan_index)
    await world.pass_()
    assert world.overlay.changes == changes and len(world.firewall.scripts) == scripts
    assert (world.overlay.networks[42].bridge_index, world.overlay.networks[42].vxlan_index) == indexes
    assert len(world.metadata) == 1


async def test_security_group_changes_are_applied_as_deltas_and_the_whole_ruleset_on_start_drift_and_refusal(world):
    now = [1000.0]
    world.r.clock = lambda: now[0]
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await world.r.reconcile(NODE_KEY)
    assert world.firewall.scripts[-1].startswith("table bridge minicloud_sg {}\ndelete table")  # start-up: whole
    await _add_port(world, "port-3", "10.0.1.12", "52:54:00:00:00:03", "n1", "i-2")
    await world.r.reconcile(NODE_KEY)
    delta = world.firewall.scripts[-1]  # only the new port: its chains, its map and set elements, the group's set
    assert "delete table" not in delta and "port_1" not in delta and "flush" not in delta
    assert f'add element bridge minicloud_sg spoof {{ "{tap_name("port-3")}" : jump o_port_3 }}' in delta
    assert 'add element inet minicloud_sg into { "mcb-00002a" . 10.0.1.12 : jump i_port_3 }' in delta
    assert 'add element inet minicloud_sg g_sg_1 { "mcb-00002a" . 10.0.1.12 }' in delta
    # a rule change touches that group's chains only
    rec = await world.store.get(SECURITY_GROUP.name, "sg-1")
    spec = SECURITY_GROUP.load(rec).spec
    rules = [*spec.rules, RuleSpec(id="r9", direction="ingress", protocol="tcp", port_min=22)]
    changed = msgspec.structs.replace(rec, spec=msgspec.to_builtins(msgspec.structs.replace(spec, rules=rules)))
    await world.store.commit(Txn([Update(changed, expect_revision=rec.revision)]))
    await world.r.reconcile(NODE_KEY)
    assert world.firewall.scripts[-1] == (
        "flush chain inet minicloud_sg gi_sg_1\n"
        "add rule inet minicloud_sg gi_sg_1 iifname . ip saddr @g_sg_1 accept\n"
        "add rule inet minicloud_sg gi_sg_1 tcp dport 22 accept\n"
    )
    scripts = len(world.firewall.scripts)
    await world.r.reconcile(NODE_KEY)  # nothing changed: nothing applied
    assert len(world.firewall.scripts) == scripts
    # a change nft refuses (our tables were flushed by hand, say) is followed by the whole ruleset
    world.firewall.refuse = "add element"
    spec4 = _port("10.0.1.13", "52:54:00:00:00:04", "n1", "i-2", index=1, groups=["sg-1"])
    await world.create(PORT, PORT.new(project="p", name="i-2/1", id="port-4", spec=spec4))
    await world.r.reconcile(NODE_KEY)
    world.firewall.refuse = None
    assert world.firewall.scripts[-1].startswith("table bridge") and "jump o_port_4" in world.firewall.scripts[-1]
    # and without any change, every drift_repair_interval
    scripts = len(world.firewall.scripts)
    now[0] += world.r.drift_repair_interval - 1
    await world.r.reconcile(NODE_KEY)
    assert len(world.firewall.scripts) == scripts
    now[0] += 1
    await world.r.reconcile(NODE_KEY)
    assert len(world.firewall.scripts) == scripts + 1 and world.firewall.scripts[-1].startswith("table bridge")


async def test_a_router_makes_a_members_address_count_on_the_bridges_of_the_networks_it_connects(world):
    """Group sets hold bridge . address: a member of net-1 is a member on net-1's bridge; once a router connects
    net-1 and net-2, on net-2's bridge too (routed traffic reaches net-2's bridge with its address), and the
    router change queues the node's ruleset."""
    await world.create(NETWORK, NETWORK.new(project="p", name="vpc-2", id="net-2", spec=_net(43)))
    sub_b = msgspec.structs.replace(_subnet("10.1.1.0/24", "10.1.1.1"), network="net-2")
    await world.create(SUBNET, SUBNET.new(project="p", name="db", id="sub-b", spec=sub_b))
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await world.r.reconcile(NODE_KEY)
    assert 'elements = { "mcb-00002a" . 10.0.1.10 }' in world.firewall.scripts[-1]
    await world.create(
        ROUTER, ROUTER.new(project="p", name="r", id="rt-1", spec=RouterSpec(subnets=["sub-a", "sub-b"]))
    )
    assert NODE_KEY in set(world.r.keys_for(await _change(world, ROUTER, "rt-1")))
    await world.r.reconcile(NODE_KEY)
    assert world.firewall.scripts[-1] == 'add element inet minicloud_sg g_sg_1 { "mcb-00002b" . 10.0.1.10 }\n'


async def test_a_router_of_two_networks_builds_the_peer_here_and_links_their_namespaces_both_ways(world):
    """East-west between networks: a NIC of net-1 here and one of net-2 on n2, one router on both subnets: net-2 is
    built here as well (no DHCP host of its own), each namespace's plan links to the other with its subnets and a
    static route whose next hop is on the peer; a net-1 port change queues net-2; the NIC leaving takes both."""
    from agent.net.router import PeerLink
    from minicloud.network.kinds import RouteSpec

    await world.create(NETWORK, NETWORK.new(project="p", name="vpc-2", id="net-2", spec=_net(43)))
    sub_a = await world.store.get(SUBNET.name, "sub-a")
    await world.store.commit(Txn([Update(msgspec.structs.replace(sub_a, spec={**sub_a.spec, "router": "rt-1"}),
                                         expect_revision=sub_a.revision)]))  # fmt: skip
    sub_b = msgspec.structs.replace(_subnet("10.1.1.0/24", "10.1.1.1"), network="net-2", router="rt-1")
    await world.create(SUBNET, SUBNET.new(project="p", name="db", id="sub-b", spec=sub_b))
    routes = [RouteSpec(destination="10.9.0.0/16", nexthop="10.1.1.254")]
    await world.create(ROUTER, ROUTER.new(project="p", name="r", id="rt-1",
                                          spec=RouterSpec(subnets=["sub-a", "sub-b"], routes=routes)))  # fmt: skip
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await world.create(PORT, PORT.new(project="p", name="i-2/0", id="port-2", spec=msgspec.structs.replace(
        _port("10.1.1.10", "52:54:00:00:00:02", "n2", "i-2"), network="net-2", subnet="sub-b")))  # fmt: skip
    await world.pass_()
    for key in world.enqueued:  # net-1 built here queued net-2
        await world.r.reconcile(key)
    assert {42, 43} <= set(world.overlay.networks)
    assert world.overlay.networks[43].fdb == {"52:54:00:00:00:02": A("10.254.0.2")}
    assert (world.r.state_dir / "net-2") not in FakeDhcp.running  # no NIC of its own here: no DHCP host
    plans = world.r.routers.plans
    to_b = PeerLink(43, world.services.path(43), A("10.1.1.1"),
                    (ipaddress.IPv4Network("10.1.1.0/24"), ipaddress.IPv4Network("10.9.0.0/16")))  # fmt: skip
    assert plans[world.services.path(42)].peers == (to_b,)
    assert plans[world.services.path(43)].peers == (PeerLink(42, world.services.path(42), A("10.0.1.1"),
                                                             (ipaddress.IPv4Network("10.0.1.0/24"),)),)  # fmt: skip
    assert "net-2" in set(world.r.keys_for(await _change(world, PORT, "port-1")))
    fresh = world.make(world.r.state_dir.parent)  # a restarted agent: its sweep keeps net-2 (net-1 has a NIC here)
    await fresh.start(world.enqueued.append)
    await fresh.reconcile(NODE_KEY)
    assert {42, 43} <= set(world.overlay.networks)
    rec = await world.store.get(PORT.name, "port-1")
    await world.store.commit(Txn([Delete(kind=PORT.name, id=rec.id, expect_revision=rec.revision)]))
    for key in ("net-1", "net-2", NODE_KEY):
        await world.r.reconcile(key)
    assert 42 not in world.overlay.networks and 43 not in world.overlay.networks


async def test_a_guest_arriving_by_live_migration_gets_its_floating_ip_snat_then_all_of_it_once_it_runs_here(world):
    """On the target: while the guest is on its way, its floating IP's SNAT only (the router's leg is this node's
    own); once the compute side says its domain resumed here (NodeNetworks.landed), the floating IP's leg and DNAT
    at once, ahead of the migration's last transaction; the record catching up forgets the hint."""
    from minicloud.core.context import Context
    from minicloud.network.kinds import FLOATING_IP, FloatingIpSpec

    ext = NetworkSpec(cidr="198.51.100.0/24", mtu=1500, external=True, provider="lan", subnets={"sub-x": "x"})
    await world.create(NETWORK, NETWORK.new(project="p", name="public", id="net-x", spec=ext))
    sub_x = SubnetSpec(network="net-x", cidr="198.51.100.0/24", gateway="198.51.100.1",
                       allocation_start="198.51.100.100", allocation_end="198.51.100.199")  # fmt: skip
    await world.create(SUBNET, SUBNET.new(project="p", name="public", id="sub-x", spec=sub_x))
    edge = RouterSpec(subnets=["sub-a"], external_network="net-x", external_subnet="sub-x",
                      external_address="198.51.100.100", node_addresses={"n2": "198.51.100.100"})  # fmt: skip
    router = ROUTER.new(project="p", name="edge", id="rt-1", spec=edge)
    held = ipam.reserve(Context.system("test"), "sub-x", "198.51.100.100", "router/rt-1")
    await world.store.commit(Txn([Create(ROUTER.dump(router)), held]))
    sub_a = await world.store.get(SUBNET.name, "sub-a")
    await world.store.commit(Txn([Update(msgspec.structs.replace(sub_a, spec={**sub_a.spec, "router": "rt-1"}),
                                         expect_revision=sub_a.revision)]))  # fmt: skip
    world.r.providers = {"lan": "eth1"}
    port = msgspec.structs.replace(_port("10.0.1.10", "52:54:00:00:00:01", "n2", "i-1", groups=["sg-1"]), arriving=ME)
    await world.create(PORT, PORT.new(project="p", name="i-1/0", id="port-1", spec=port))
    fip = FloatingIpSpec(network="net-x", subnet="sub-x", address="198.51.100.150", instance="i-1", port="port-1",
                         fixed_address="10.0.1.10", port_network="net-1")  # fmt: skip
    await world.create(FLOATING_IP, FLOATING_IP.new(project="p", name="198.51.100.150", id="fip-1", spec=fip))
    await world.r.reconcile("net-1")
    plan = world.r.routers.plans[world.services.path(42)]
    assert plan.external is not None and str(plan.external.address.ip) != "198.51.100.100"  # this node's own
    assert [str(f.address) for f in plan.arriving] == ["198.51.100.150"] and plan.floating == ()
    world.enqueued.clear()
    world.nn.landed({"port-1": "net-1"})  # its domain resumed here
    assert world.enqueued == ["net-1"]
    await world.r.reconcile("net-1")
    plan = world.r.routers.plans[world.services.path(42)]
    assert [str(f.address) for f in plan.floating] == ["198.51.100.150"] and plan.arriving == ()
    # the migration's end moves the port here: the hint is forgotten, the floating IP stays
    rec = await world.store.get(PORT.name, "port-1")
    moved = msgspec.structs.replace(rec, spec={**rec.spec, "node": ME, "arriving": ""})
    await world.store.commit(Txn([Update(moved, expect_revision=rec.revision)]))
    await world.r.reconcile("net-1")
    assert not world.nn.is_landed("port-1")
    assert [str(f.address) for f in world.r.routers.plans[world.services.path(42)].floating] == ["198.51.100.150"]


async def test_a_change_of_a_routers_status_alone_queues_nothing(world):
    """Nodes report routers' egress counters in the router's status (once a minute while traffic flows): that must not
    re-run every node's network reconciles; a change of its spec still does, and so does its deletion."""
    await world.create(NETWORK, NETWORK.new(project="p", name="vpc-2", id="net-2", spec=_net(43)))
    await world.create(ROUTER, ROUTER.new(project="p", name="r", id="rt-1", spec=RouterSpec(subnets=["sub-a"])))
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await world.pass_()
    assert NODE_KEY in set(world.r.keys_for(await _change(world, ROUTER, "rt-1")))
    rec = await world.store.get(ROUTER.name, "rt-1")
    reported = msgspec.structs.replace(rec, status={"egress": {"n1/42": {"since": 1, "bytes": 1800}}})
    change = await _change(world, ROUTER, "rt-1")
    assert list(world.r.keys_for(msgspec.structs.replace(change, type="updated", record=reported))) == []
    moved = msgspec.structs.replace(reported, spec={**reported.spec, "description": "edge"})
    assert NODE_KEY in set(world.r.keys_for(msgspec.structs.replace(change, type="updated", record=moved)))
    assert NODE_KEY in set(world.r.keys_for(msgspec.structs.replace(change, type="deleted", record=moved)))


async def test_the_metadata_lookup_answers_only_for_a_local_port_of_the_network(world):
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await _add_port(world, "port-2", "10.0.1.11", "52:54:00:00:00:02", "n2", "i-2")
    meta = await world.r.metadata_for("net-1", "10.0.1.10")
    assert meta is not None and meta.instance_id == "i-1" and meta.hostname == "web" and meta.mac == "52:54:00:00:00:01"
    assert meta.public_keys == ("ssh-ed25519 AAAA me",) and meta.user_data == b"#cloud-config\n"
    assert await world.r.metadata_for("net-1", "10.0.1.11") is None  # on another node
    assert await world.r.metadata_for("net-2", "10.0.1.10") is None


async def test_deleting_the_last_local_port_removes_everything_of_the_network(world):
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await world.pass_()
    assert 42 in world.overlay.networks
    rec = await world.store.get(PORT.name, "port-1")
    await world.store.commit(Txn([Delete(kind=PORT.name, id="port-1", expect_revision=rec.revision)]))
    await world.r.reconcile("net-1")
    await world.r.reconcile(NODE_KEY)
    assert world.overlay.networks == {} and world.services.spaces == {} and FakeDhcp.running == {}
    assert not world.metadata[0].running and world.nn.bridge_for("net-1") is None
    assert [str(t) for t in world.firewall.deleted] == ["bridge minicloud_sg", "inet minicloud_sg"]


async def test_a_restarted_reconciler_adopts_and_sweeps_what_no_record_wants(world, tmp_path):
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await world.pass_()
    # a leftover of a network deleted while the agent was down
    from agent.net.overlay import OverlaySpec
    from agent.net.service import ServiceSpec

    await world.overlay.ensure_network(OverlaySpec(vni=77, local=A("10.254.0.1")))
    await world.services.ensure(ServiceSpec(vni=77, mtu=1450))
    changes = world.overlay.changes
    fresh = world.make(tmp_path)  # same drivers (what the host has), new process state
    await fresh.start(world.enqueued.append)
    for key in await fresh.all_keys():
        await fresh.reconcile(key)
    assert set(world.overlay.networks) == {42} and set(world.services.spaces) == {42}
    assert world.overlay.changes == changes + 2  # only the stray network's two devices went
    assert world.nn.bridge_for("net-1") == "mcb-00002a"


async def test_the_network_of_a_guest_arriving_by_migration_is_built_and_not_swept_until_it_ends(world, tmp_path):
    await _add_port(world, "port-2", "10.0.1.11", "52:54:00:00:00:02", "n2", "i-2")
    await world.pass_()
    assert 42 not in world.overlay.networks  # no port here

    async def set_port(**changes: str) -> None:
        rec = await world.store.get(PORT.name, "port-2")
        port = PORT.load(rec)
        new = port.replace(spec=msgspec.structs.replace(port.spec, **changes), updated_at=ids.now())
        await world.store.commit(Txn([Update(PORT.dump(new), expect_revision=rec.revision)]))

    await set_port(arriving="n1")  # i-2 migrates from n2 to n1
    await world.pass_()
    assert world.nn.bridge_for("net-1") == "mcb-00002a" and world.overlay.networks[42].fdb == {}
    assert tap_name("port-2") in world.firewall.scripts[-1]
    fresh = world.make(tmp_path)  # a restarted agent's sweep keeps it
    await fresh.start(world.enqueued.append)
    await fresh.reconcile(NODE_KEY)
    assert 42 in world.overlay.networks
    await set_port(arriving="")  # the migration failed: nothing here needs the network any more
    await world.pass_()
    assert 42 not in world.overlay.networks and world.nn.bridge_for("net-1") is None


async def test_a_moved_port_updates_the_fdb_and_under_a_controller_the_network_is_built(world):
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    await _add_port(world, "port-2", "10.0.1.11", "52:54:00:00:00:02", "n2", "i-2")
    controller = Controller(world.store, world.r, workers=2, resync_interval=3600)
    await controller.start()
    try:
        await _until(lambda: world.nn.bridge_for("net-1") == "mcb-00002a")
        await world.create(NODE, NODE.new(project="", name="n3", spec=NodeSpec(address="10.254.0.3")))
        rec = await world.store.get(PORT.name, "port-2")
        port = PORT.load(rec)
        moved = port.replace(spec=msgspec.structs.replace(port.spec, node="n3"), updated_at=ids.now())
        await world.store.commit(Txn([Update(PORT.dump(moved), expect_revision=rec.revision)]))
        await _until(lambda: world.overlay.networks[42].fdb == {"52:54:00:00:00:02": A("10.254.0.3")})
        assert world.overlay.networks[42].peers == {A("10.254.0.3"): None}
    finally:
        await controller.close()


async def test_the_metadata_app_serves_ec2_paths_for_the_asking_port():
    from aiohttp.test_utils import TestClient, TestServer

    from agent.net.metadata import InstanceMetadata

    meta = InstanceMetadata("i-1", "web", "127.0.0.1", "52:54:00:00:00:01", ("ssh-ed25519 AAAA me",), b"#!/bin/sh\n")

    async def lookup(ip: str):
        return meta if ip == "127.0.0.1" else None

    macs = {"127.0.0.1": "52:54:00:00:00:01"}

    async def mac_of(ip: str):
        return macs.get(ip)

    async with TestClient(TestServer(make_app(lookup, mac_of))) as client:

        async def get(path: str) -> tuple[int, str]:
            resp = await client.get(path)
            return resp.status, await resp.text()

        assert await get("/latest/meta-data/instance-id") == (200, "i-1")
        assert await get("/latest/meta-data/local-ipv4") == (200, "127.0.0.1")
        assert await get("/2009-04-04/meta-data/hostname") == (200, "web")
        assert await get("/latest/meta-data/public-keys/") == (200, "0=key0\n")
        assert await get("/latest/meta-data/public-keys/0/openssh-key") == (200, "ssh-ed25519 AAAA me\n")
        assert await get("/latest/user-data") == (200, "#!/bin/sh\n")
        assert (await get("/latest/meta-data/"))[1].splitlines()[0] == "hostname"
        assert (await get("/latest/meta-data/nothing"))[0] == 404
        macs["127.0.0.1"] = "52:54:00:00:00:99"  # the address, but another MAC: refused
        assert (await get("/latest/meta-data/instance-id"))[0] == 403


async def _change(w: World, kind, id_: str):
    from minicloud.state import Change

    rec = await w.store.get(kind.name, id_)
    return Change(revision=rec.revision, type="created", kind=kind.name, id=id_, project=rec.project, record=rec)


async def _until(cond, timeout: float = 10.0) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_the_default_bridges_guests_are_pinned_while_they_run_and_their_rules_go_when_they_stop_or_go(world):
    """Guests of the node's default bridge (instances here without NICs) are ports of the same compiler, anti-spoofing
    only: their tap pinned to their MAC and the fixed address the compute side gave them, from then until they
    are stopped; the compute side learns what is in place (``guarded``) before it starts one."""
    from agent.compute.design import mac_for
    from agent.net.default import guest_tap
    from minicloud.state import Change

    addresses: dict[str, str] = {}
    world.nn.use_default_bridge("mcbr0", lambda: addresses)
    await world.r.start(world.enqueued.append)  # as the agent starts it: the default bridge known first
    spec = InstanceSpec(uuid="u-g", image_id="img", image_name="img", type="t", vcpus=1, memory_mib=64, disk_gib=1, node=ME)  # fmt: skip
    await world.create(INSTANCE, INSTANCE.new(project="p", name="g", id="i-g", spec=spec))
    mac, tap = mac_for("i-g", 0), guest_tap("i-g")
    assert list(world.r.keys_for(await _change(world, INSTANCE, "i-g"))) == [NODE_KEY]
    assert list(world.r.keys_for(await _change(world, INSTANCE, "i-g"))) == []  # nothing of interest changed
    assert list(world.r.keys_for(await _change(world, INSTANCE, "i-1"))) == []  # another node's
    await world.r.reconcile(NODE_KEY)  # no address here yet: not pinned to none (a guest migrated in runs already)
    assert not any(tap in script for script in world.firewall.scripts) and not world.nn.guarded(tap, "10.213.0.10")
    addresses[mac] = "10.213.0.10"
    world.nn.guests_changed()  # the compute side gave it its address
    assert world.enqueued[-1] == NODE_KEY
    await world.r.reconcile(NODE_KEY)
    script = world.firewall.scripts[-1]
    assert f'"{tap}" : jump o_i_g' in script and "ip saddr != { 10.213.0.10 } drop" in script
    assert f"ether saddr != {mac} drop" in script and "mcbr0" not in script  # nothing stateful for it
    assert not getattr(world.firewall, "bridge_netfilter", False)  # not needed for the guests alone
    assert world.nn.guarded(tap, "10.213.0.10") and not world.nn.guarded(tap, "10.213.0.11")
    # stopped: its rules go (a delta removing its chain and elements; here the last port: the tables go)
    rec = await world.store.get(INSTANCE.name, "i-g")
    inst = INSTANCE.load(rec)
    stopped = inst.replace(spec=msgspec.structs.replace(inst.spec, power="stopped"), status=msgspec.structs.replace(inst.status, state="stopped"))  # fmt: skip
    await world.store.commit(Txn([Update(INSTANCE.dump(stopped), expect_revision=rec.revision)]))
    assert list(world.r.keys_for(await _change(world, INSTANCE, "i-g"))) == [NODE_KEY]
    await world.r.reconcile(NODE_KEY)
    assert [str(t) for t in world.firewall.deleted] == ["bridge minicloud_sg", "inet minicloud_sg"]
    assert not world.nn.guarded(tap, "10.213.0.10")
    # with a VPC port next to it, started again, then its record removed: a delta each
    await _add_port(world, "port-1", "10.0.1.10", "52:54:00:00:00:01", "n1", "i-1")
    rec = await world.store.get(INSTANCE.name, "i-g")
    await world.store.commit(Txn([Update(INSTANCE.dump(inst.replace(revision=rec.revision)), expect_revision=rec.revision)]))  # fmt: skip
    assert list(world.r.keys_for(await _change(world, INSTANCE, "i-g"))) == [NODE_KEY]
    await world.r.reconcile(NODE_KEY)
    assert f'"{tap}" : jump o_i_g' in world.firewall.scripts[-1] and world.nn.guarded(tap, "10.213.0.10")
    rec = await world.store.get(INSTANCE.name, "i-g")
    await world.store.commit(Txn([Delete(INSTANCE.name, "i-g", expect_revision=rec.revision)]))
    gone = Change(revision=rec.revision + 1, type="deleted", kind=INSTANCE.name, id="i-g", project="p", record=rec)
    assert list(world.r.keys_for(gone)) == [NODE_KEY]
    await world.r.reconcile(NODE_KEY)
    assert world.firewall.scripts[-1] == (
        f'delete element bridge minicloud_sg spoof {{ "{tap}" }}\n'
        f'delete element bridge minicloud_sg taps {{ "{tap}" }}\n'
        "delete chain bridge minicloud_sg o_i_g\n"
    )
    assert not world.nn.guarded(tap, "10.213.0.10")


# -- NICs straight on an external network's LAN (tests/cluster/test_routers.py runs the real devices) -------------
LAN = "net-lan"


def _lan(provider: str = "lan") -> NetworkSpec:
    return NetworkSpec(cidr="192.0.2.0/24", mtu=1500, external=True, provider=provider, subnets={"sub-lan": "x"})


def _lan_subnet(**kw) -> SubnetSpec:
    return SubnetSpec(
        network=LAN,
        cidr="192.0.2.0/24",
        gateway="192.0.2.1",
        allocation_start="192.0.2.100",
        allocation_end="192.0.2.199",
        **kw,
    )


def _lan_port(ip: str, mac: str, node: str, instance: str = "i-1") -> PortSpec:
    return PortSpec(
        network=LAN, subnet="sub-lan", address=ip, mac=mac, node=node, instance=instance, security_groups=["sg-1"]
    )


def test_the_plan_serves_this_nodes_nics_on_the_provider_bridge_with_the_lans_gateway_and_name_servers():
    ports = [("p1", _lan_port("192.0.2.150", "52:54:00:00:00:01", "n1")), ("p2", _lan_port("192.0.2.151", "52:54:00:00:00:02", "n2"))]  # fmt: skip
    subnets = {"sub-lan": _lan_subnet(dns_servers=["192.0.2.53"])}
    want, reason = desired_external(LAN, _lan(), "public", subnets, ports, {"i-1": "web"}, "n1", {"lan": "lanbr"})
    assert reason is None and want is not None
    assert want.bridge == "lanbr" and want.gateway == ipaddress.IPv4Address("192.0.2.1") and want.mtu == 1500
    assert [(h.mac, str(h.ip), h.name) for h in want.hosts] == [("52:54:00:00:00:01", "192.0.2.150", "web")]
    assert want.dns == ("192.0.2.53",)
    # without name servers of its own the subnet's gateway is the guests' resolver (a home router)
    want, _ = desired_external(LAN, _lan(), "public", {"sub-lan": _lan_subnet()}, ports, {}, "n1", {"lan": "lanbr"})
    assert want is not None and want.dns == ("192.0.2.1",)


def test_no_nic_here_wants_nothing_and_a_node_without_the_provider_or_on_host_says_why():
    ports = [("p2", _lan_port("192.0.2.151", "52:54:00:00:00:02", "n2"))]
    subnets = {"sub-lan": _lan_subnet()}
    assert desired_external(LAN, _lan(), "public", subnets, ports, {}, "n1", {"lan": "lanbr"}) == (None, None)
    mine = [("p1", _lan_port("192.0.2.150", "52:54:00:00:00:01", "n1"))]
    want, reason = desired_external(LAN, _lan(), "public", subnets, mine, {}, "n1", {"other": "br9"})
    assert want is None and reason is not None
    assert "node n1 has no provider 'lan' of external network public" in reason and "[network.providers]" in reason
    want, reason = desired_external(LAN, _lan("host"), "host", subnets, mine, {}, "n1", {"host": "mcbr0"})
    assert want is None and reason is not None and "without --nic" in reason


def test_external_zones_stay_above_the_vnis_zones():
    zones = {external_zone(f"net-{i}") for i in range(200)}
    assert all(61440 <= z <= 65535 for z in zones) and len(zones) > 150


async def _lan_world(world: World, providers: dict[str, str]) -> None:
    world.r.providers = providers
    await world.create(NETWORK, NETWORK.new(project="p", name="public", id=LAN, spec=_lan()))
    await world.create(SUBNET, SUBNET.new(project="p", name="public", id="sub-lan", spec=_lan_subnet()))


async def test_a_nic_on_the_lan_gets_a_dhcp_port_on_the_provider_bridge_and_its_anti_spoofing_there(world):
    await _lan_world(world, {"lan": "lanbr"})
    await world.create(PORT, PORT.new(project="p", name="i-1/0", id="port-l1", spec=_lan_port("192.0.2.150", "52:54:00:00:00:0a", ME)))  # fmt: skip
    await world.pass_()
    assert world.nn.bridge_for(LAN) == "lanbr" and world.nn.failure(LAN) is None
    port = world.services.providers[provider_key(LAN)]
    assert port.bridge == "lanbr" and port.mac == provider_mac(LAN, ME) and port.mtu == 1500
    # the node's DHCP address: the subnet's lowest free one, held in IPAM for this node
    assert str(port.address) == "192.0.2.100/24"
    held = {a.spec.address: a.spec.holder for a in await ipam.allocations(world.store, "sub-lan")}
    assert held == {"192.0.2.100": networks_service.dhcp_holder(LAN, ME)}
    dhcp = FakeDhcp.running[world.r.state_dir / LAN]
    assert dhcp.spec.dns is False and str(dhcp.spec.router) == "192.0.2.1" and dhcp.spec.upstream_dns == ("192.0.2.1",)
    assert [(h.mac, str(h.ip)) for h in dhcp.hosts] == [("52:54:00:00:00:0a", "192.0.2.150")] and dhcp.records == ()
    script = world.firewall.scripts[-1]  # pinned to its MAC and address on the provider bridge, in its own zone
    assert f'"{tap_name("port-l1")}" : jump o_port_l1' in script
    assert '"lanbr" . 192.0.2.150 : jump i_port_l1' in script
    assert f'"lanbr" : {external_zone(LAN)}' in script
    # a second pass changes nothing; the address stays the node's
    changes = world.services.changes
    await world.pass_()
    assert world.services.changes == changes
    assert str(world.services.providers[provider_key(LAN)].address) == "192.0.2.100/24"


async def test_the_last_nic_leaving_removes_the_dhcp_port_and_gives_its_address_back(world):
    await _lan_world(world, {"lan": "lanbr"})
    await world.create(PORT, PORT.new(project="p", name="i-1/0", id="port-l1", spec=_lan_port("192.0.2.150", "52:54:00:00:00:0a", ME)))  # fmt: skip
    await world.pass_()
    rec = await world.store.get(PORT.name, "port-l1")
    await world.store.commit(Txn([Delete(kind=PORT.name, id=rec.id, expect_revision=rec.revision)]))
    for key in (LAN, NODE_KEY):
        await world.r.reconcile(key)
    assert world.services.providers == {} and world.nn.bridge_for(LAN) is None
    assert (world.r.state_dir / LAN) not in FakeDhcp.running and not (world.r.state_dir / LAN).exists()
    assert await ipam.allocations(world.store, "sub-lan") == []


async def test_a_node_whose_provider_is_missing_or_not_a_bridge_fails_the_network_with_the_reason(world):
    await _lan_world(world, {})
    await world.create(PORT, PORT.new(project="p", name="i-1/0", id="port-l1", spec=_lan_port("192.0.2.150", "52:54:00:00:00:0a", ME)))  # fmt: skip
    await world.pass_()
    assert world.nn.bridge_for(LAN) is None and "has no provider 'lan'" in (world.nn.failure(LAN) or "")
    assert await ipam.allocations(world.store, "sub-lan") == []  # nothing taken for a network not built
    world.r.providers = {"lan": "eth1"}
    world.services.bridges = {"lanbr"}  # eth1 is a plain interface
    await world.pass_()
    assert "provider 'eth1' of external network public on node n1: eth1 is not a Linux bridge" in (
        world.nn.failure(LAN) or ""
    )
    world.r.providers = {"lan": "lanbr"}
    await world.pass_()
    assert world.nn.failure(LAN) is None and world.nn.bridge_for(LAN) == "lanbr"


async def test_a_restarted_agent_sweeps_a_dhcp_port_no_nic_here_needs(world, tmp_path):
    await _lan_world(world, {"lan": "lanbr"})
    world.services.providers[provider_key("net-gone")] = object()  # left by a network deleted while we were down
    await world.r.reconcile(NODE_KEY)
    assert world.services.providers == {}


@pytest.mark.parametrize("nodes", [("n1",), ("n1", "n2", "n3")])
async def test_the_subnets_delete_releases_every_nodes_dhcp_address(world, nodes):
    from minicloud.core.context import Context
    from minicloud.network import subnets as subnets_service

    await _lan_world(world, {"lan": "lanbr"})
    got = [await networks_service.node_dhcp_address(world.store, LAN, n) for n in nodes]
    assert len({str(a) for a in got}) == len(nodes)  # one each, never shared
    assert await networks_service.node_dhcp_address(world.store, LAN, nodes[0]) == got[0]  # kept
    ctx = Context.system("test", project="p")
    await subnets_service.delete_subnet(ctx, world.store, "sub-lan")
    assert await ipam.allocations(world.store, "sub-lan") == []
