"""The network reconciler with its real drivers, on one "node" that is a network namespace: a port record becomes a
bridge + VXLAN device, a service namespace (gateway, 169.254.169.254, the VNI's MAC, its nft table), a dnsmasq that
gives the port its IPAM address, a metadata service that answers that port's guest, and the security-group table;
a restarted reconciler adopts all of it (same ifindexes, same dnsmasq); deleting the port leaves nothing.

Everything lives in namespaces named ``mcn`` + a random tag (node, guest) and service namespaces ``mcs<tag>-<vni>``;
all are deleted afterwards, with any dnsmasq of the test. Needs root, iproute2, nsenter, dnsmasq, nft and busybox.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.net.common import NetworkError
from agent.net.dhcp import DhcpServer
from agent.net.firewall import NftFirewall
from agent.net.nodenetworks import NodeNetworks
from agent.net.overlay import LinuxOverlay, bridge_name, vxlan_name
from agent.net.router import (
    ExternalLeg,
    FloatingLeg,
    PeerLink,
    RouterPlan,
    RouterPlumbing,
    StaticRoute,
    ensure_routes,
    link_mac,
    link_name,
)
from agent.net.service import INNER_NAME, ServiceNamespaces, service_mac, veth_name
from agent.reconcilers.network import NODE_KEY, NetworkReconciler, tap_name
from minicloud.compute.kinds import INSTANCE, InstanceSpec
from minicloud.network.kinds import (
    NETWORK,
    PORT,
    SECURITY_GROUP,
    SUBNET,
    NetworkSpec,
    PortSpec,
    RuleSpec,
    SecurityGroupSpec,
    SubnetSpec,
)
from minicloud.state import Create, Delete, Txn
from minicloud.state.sqlite import SQLiteStore

BUSYBOX = "/bin/busybox"
VNI = 0x4242
MAC = "52:54:00:4d:00:01"
IP = "10.77.1.10"


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, netlink, nftables)"
    for tool in ("ip", "nsenter", "nft", "dnsmasq"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, util-linux, nftables, dnsmasq-base)"
    if not os.access(BUSYBOX, os.X_OK):
        return "needs /bin/busybox (busybox-static) for udhcpc and wget"
    probe = f"mcnprobe{secrets.token_hex(2)}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"needs network namespaces: ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


MISSING = _missing()


def _bridge_conntrack() -> bool:
    """Whether nftables can match conntrack state in the bridge family here (CONFIG_NF_CONNTRACK_BRIDGE)."""
    if MISSING is not None:
        return False
    probe = f"mcnprobe{secrets.token_hex(2)}"
    sh("ip", "netns", "add", probe)
    try:
        rules = "table bridge t {\n chain f {\n  type filter hook forward priority 0\n  ct state established accept\n }\n}\n"
        done = subprocess.run(["nsenter", f"--net=/run/netns/{probe}", "--", "nft", "-f", "-"], input=rules, capture_output=True, text=True)  # fmt: skip
        return done.returncode == 0
    finally:
        sh("ip", "netns", "del", probe, check=False)


BRIDGE_CONNTRACK = _bridge_conntrack()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def ns_run(ns: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    path = ns if "/" in ns else f"/run/netns/{ns}"
    return sh("nsenter", f"--net={path}", "--", *args, check=check, timeout=timeout)


def ifindex(ns: str, name: str) -> int | None:
    out = ns_run(ns, "ip", "-o", "link", "show", name, check=False)
    return int(out.stdout.split(":")[0]) if out.returncode == 0 else None


def links(ns: str) -> set[str]:
    return {line.split()[1].split("@")[0].rstrip(":") for line in ns_run(ns, "ip", "-o", "link").stdout.splitlines()}


@dataclass
class Node:
    tag: str
    ns: str
    store: SQLiteStore
    tmp: Path
    namespaces: list[str]

    @property
    def prefix(self) -> str:
        return f"mcs{self.tag}-"

    @property
    def service_ns(self) -> str:
        return f"{self.prefix}{VNI:06x}"

    def reconciler(self) -> NetworkReconciler:
        return NetworkReconciler(
            store=self.store,
            node="n1",
            underlay_address="10.254.7.1",
            overlay=LinuxOverlay(netns=self.ns),
            services=ServiceNamespaces(self.ns, prefix=self.prefix),
            firewall=NftFirewall(self.ns),
            node_networks=NodeNetworks(),
            state_dir=self.tmp / "networks",
            # user=root: pytest's tmp_path lies under a 0700 directory dnsmasq's own account could not traverse
            dhcp_factory=lambda spec, d, netns: DhcpServer(spec, d, netns=netns, user="root"),
        )

    async def pass_(self, r: NetworkReconciler) -> None:
        for key in await r.all_keys():
            try:
                await r.reconcile(key)
            except NetworkError as exc:
                # Kernels without nf_conntrack_bridge (CI's) refuse the security-group ruleset's `ct state`
                # in the bridge family; everything else must work there.
                if key != NODE_KEY or BRIDGE_CONNTRACK or "ct state" not in str(exc):
                    raise


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    tag = secrets.token_hex(2)
    ns = f"mcn{tag}node"
    sh("ip", "netns", "add", ns)
    namespaces = [ns]
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    n = Node(tag, ns, store, tmp_path, namespaces)
    try:
        ns_run(ns, "ip", "link", "set", "lo", "up")
        ns_run(ns, "ip", "addr", "add", "10.254.7.1/32", "dev", "lo")
        yield n
    finally:
        await store.close()
        for d in (tmp_path / "networks").glob("*"):
            await DhcpServer(_any_spec(), d).stop()
        for name in [*namespaces, n.service_ns]:
            sh("ip", "netns", "del", name, check=False)


def _any_spec():
    import ipaddress

    from agent.net.dhcp import DhcpSpec

    return DhcpSpec(network="x", interface="x", server=ipaddress.IPv4Interface("10.0.0.1/24"), mtu=1450)


async def _records(store: SQLiteStore) -> None:
    objs = [
        (
            NETWORK,
            NETWORK.new(
                project="p",
                name="vpc",
                id="net-1",
                spec=NetworkSpec(cidr="10.77.0.0/16", vni=VNI, mtu=1450, subnets={"sub-1": "10.77.1.0/24"}),
            ),
        ),
        (
            SUBNET,
            SUBNET.new(
                project="p",
                name="web",
                id="sub-1",
                spec=SubnetSpec(
                    network="net-1",
                    cidr="10.77.1.0/24",
                    gateway="10.77.1.1",
                    allocation_start="10.77.1.2",
                    allocation_end="10.77.1.254",
                ),
            ),
        ),
        (
            SECURITY_GROUP,
            SECURITY_GROUP.new(
                project="p",
                name="default",
                id="sg-1",
                spec=SecurityGroupSpec(
                    rules=[
                        RuleSpec(id="r1", direction="egress"),
                        RuleSpec(id="r2", direction="ingress", remote_group="sg-1"),
                    ]
                ),
            ),
        ),
        (
            INSTANCE,
            INSTANCE.new(
                project="p",
                name="web",
                id="i-1",
                spec=InstanceSpec(
                    uuid="u",
                    image_id="img",
                    image_name="img",
                    type="t",
                    vcpus=1,
                    memory_mib=64,
                    disk_gib=1,
                    public_keys=["ssh-ed25519 AAAA me"],
                    user_data="#cloud-config\n",
                    node="n1",
                ),
            ),
        ),
        (
            PORT,
            PORT.new(
                project="p",
                name="i-1/0",
                id="port-1",
                spec=PortSpec(
                    network="net-1",
                    subnet="sub-1",
                    address=IP,
                    mac=MAC,
                    instance="i-1",
                    node="n1",
                    security_groups=["sg-1"],
                ),
            ),
        ),
    ]
    await store.commit(Txn([Create(kind.dump(obj)) for kind, obj in objs]))


def _guest(node: Node) -> str:
    """A guest stand-in: a namespace whose eth0 (the port's MAC) is a veth into the bridge, host side named as the
    compute side names a port's tap."""
    g = f"mcn{node.tag}g"
    sh("ip", "netns", "add", g)
    node.namespaces.append(g)
    tap = tap_name("port-1")
    sh("ip", "-n", node.ns, "link", "add", tap, "mtu", "1450", "type", "veth", "peer", "name", "eth0", "netns", g)
    ns_run(node.ns, "ip", "link", "set", tap, "master", bridge_name(VNI), "up")
    ns_run(g, "ip", "link", "set", "lo", "up")
    ns_run(g, "ip", "link", "set", "eth0", "address", MAC, "mtu", "1450", "up")
    return g


def _udhcpc(g: str, tmp: Path) -> dict[str, str] | None:
    env_file, script = tmp / "lease.env", tmp / "lease.sh"
    script.write_text(f'#!{BUSYBOX} sh\n[ "$1" = bound ] && env > "{env_file}"\nexit 0\n')
    script.chmod(0o755)
    done = ns_run(g, BUSYBOX, "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-O", "mtu", "-i", "eth0", "-s", str(script), check=False)  # fmt: skip
    if done.returncode != 0 or not env_file.exists():
        return None
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)


async def _http(ns: str, url: str) -> str:
    """GET ``url`` from inside ``ns`` (a Python client: busybox-static's wget crashes on some hosts)."""
    code = f"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    done = await asyncio.to_thread(ns_run, ns, sys.executable, "-c", code)
    return done.stdout


async def test_a_port_record_builds_the_network_a_restart_adopts_it_and_deleting_it_leaves_nothing(node: Node):
    await _records(node.store)
    r = node.reconciler()
    await r.start(lambda key: None)
    try:
        await node.pass_(r)
        assert r.node_networks.bridge_for("net-1") == bridge_name(VNI)
        assert {bridge_name(VNI), vxlan_name(VNI), veth_name(VNI)} <= links(node.ns)
        inside = ns_run(node.service_ns, "ip", "-o", "addr", "show", "dev", INNER_NAME).stdout
        assert "10.77.1.1/24" in inside and "169.254.169.254/32" in inside
        assert service_mac(VNI) in ns_run(node.service_ns, "ip", "link", "show", INNER_NAME).stdout
        tables = ns_run(node.ns, "nft", "list", "tables").stdout
        assert f"bridge minicloud_svc_{VNI:06x}" in tables
        assert "bridge minicloud_sg" in tables and "inet minicloud_sg" in tables  # anti-spoofing, stateful rules

        # the guest gets its IPAM address by DHCP (through the security-group chains) and its own metadata
        g = _guest(node)
        lease = await asyncio.to_thread(_udhcpc, g, node.tmp)
        assert lease is not None, (node.tmp / "networks" / "net-1" / "dnsmasq.log").read_text()
        assert lease["ip"] == IP and lease["router"] == "10.77.1.1" and lease["mtu"] == "1450"
        ns_run(g, "ip", "addr", "add", f"{IP}/24", "dev", "eth0")
        ns_run(g, "ip", "route", "add", "default", "via", "10.77.1.1")
        got = await _http(g, "http://169.254.169.254/latest/meta-data/instance-id")
        assert got == "i-1"
        keys = await _http(g, "http://169.254.169.254/latest/meta-data/public-keys/0/openssh-key")
        assert keys == "ssh-ed25519 AAAA me\n"

        before = {name: ifindex(node.ns, name) for name in (bridge_name(VNI), vxlan_name(VNI), veth_name(VNI))}
        before["inner"] = ifindex(node.service_ns, INNER_NAME)
        pid = DhcpServer(_any_spec(), node.tmp / "networks" / "net-1").pid()
        assert pid is not None
    finally:
        await r.close()  # the agent stops: devices, namespace and dnsmasq stay

    r2 = node.reconciler()
    await r2.start(lambda key: None)
    try:
        await node.pass_(r2)
        after = {name: ifindex(node.ns, name) for name in (bridge_name(VNI), vxlan_name(VNI), veth_name(VNI))}
        after["inner"] = ifindex(node.service_ns, INNER_NAME)
        assert after == before  # nothing recreated
        assert DhcpServer(_any_spec(), node.tmp / "networks" / "net-1").pid() == pid
        got = await _http(g, "http://169.254.169.254/latest/meta-data/local-ipv4")
        assert got == IP

        port = await node.store.get(PORT.name, "port-1")
        await node.store.commit(Txn([Delete(kind=PORT.name, id="port-1", expect_revision=port.revision)]))
        await node.pass_(r2)
        await r2.reconcile("net-1")
        left = links(node.ns)
        assert not {bridge_name(VNI), vxlan_name(VNI), veth_name(VNI)} & left
        assert node.service_ns not in sh("ip", "netns", "list").stdout
        assert DhcpServer(_any_spec(), node.tmp / "networks" / "net-1").pid() is None
        assert "minicloud" not in ns_run(node.ns, "nft", "list", "tables").stdout
        assert r2.node_networks.bridge_for("net-1") is None
    finally:
        await r2.close()


def _reconciler(store: SQLiteStore, ns: str, name: str, underlay: str, prefix: str, state: Path) -> NetworkReconciler:
    return NetworkReconciler(
        store=store,
        node=name,
        underlay_address=underlay,
        overlay=LinuxOverlay(netns=ns),
        services=ServiceNamespaces(ns, prefix=prefix),
        firewall=NftFirewall(ns),
        node_networks=NodeNetworks(),
        state_dir=state,
        dhcp_factory=lambda spec, d, netns: DhcpServer(spec, d, netns=netns, user="root"),
    )


def _dns_query(name: str, server: str) -> str:
    """Python source that asks ``server`` for the A record of ``name`` and prints the address (no DNS tool needed)."""
    return (
        "import socket,struct\n"
        f"q=struct.pack('>HHHHHH',7,0x100,1,0,0,0)+b''.join(bytes([len(p)])+p.encode() for p in {name!r}.split('.'))"
        "+b'\\0'+struct.pack('>HH',1,1)\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n"
        f"s.sendto(q,({server!r},53));r=s.recv(512)\n"
        "print(socket.inet_ntoa(r[-4:]) if struct.unpack('>H',r[6:8])[0] else 'NXDOMAIN')\n"
    )


async def test_two_nodes_carry_one_network_guests_reach_and_resolve_each_other(tmp_path: Path):
    """Two node namespaces on a veth underlay, each with its own reconciler and a port of one network: the guests
    (one per node) ping each other across the VXLAN and resolve each other's name; each node learnt the other's
    port (FDB, neighbour) and floods only to it; the service MAC never crossed (each node answers its own gateway)."""
    tag = secrets.token_hex(2)
    a, b, ga, gb = (f"mcn{tag}{s}" for s in ("a", "b", "ga", "gb"))
    created: list[str] = []
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    rs: list[NetworkReconciler] = []
    try:
        for ns in (a, b, ga, gb):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            ns_run(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "under", "type", "veth", "peer", "name", "under", "netns", b)
        for ns, addr in ((a, "10.254.8.1"), (b, "10.254.8.2")):
            ns_run(ns, "ip", "addr", "add", f"{addr}/24", "dev", "under")
            ns_run(ns, "ip", "link", "set", "under", "up")
        await _records(store)  # port-1 (i-1 "web", 10.77.1.10) on n1
        from minicloud.cluster.kinds import NODE, NodeSpec

        second = [
            (NODE, NODE.new(project="", name="n1", spec=NodeSpec(address="10.254.8.1"))),
            (NODE, NODE.new(project="", name="n2", spec=NodeSpec(address="10.254.8.2:7443"))),
            (
                INSTANCE,
                INSTANCE.new(
                    project="p",
                    name="db",
                    id="i-2",
                    spec=InstanceSpec(
                        uuid="u2",
                        image_id="img",
                        image_name="img",
                        type="t",
                        vcpus=1,
                        memory_mib=64,
                        disk_gib=1,
                        node="n2",
                    ),
                ),
            ),
            (
                PORT,
                PORT.new(
                    project="p",
                    name="i-2/0",
                    id="port-2",
                    spec=PortSpec(
                        network="net-1",
                        subnet="sub-1",
                        address="10.77.1.11",
                        mac="52:54:00:4d:00:02",
                        instance="i-2",
                        node="n2",
                        security_groups=["sg-1"],
                    ),
                ),
            ),
        ]
        await store.commit(Txn([Create(kind.dump(obj)) for kind, obj in second]))
        rs = [
            _reconciler(store, a, "n1", "", f"mcs{tag}a-", tmp_path / "na"),
            _reconciler(store, b, "n2", "", f"mcs{tag}b-", tmp_path / "nb"),
        ]
        for r in rs:
            await r.start(lambda key: None)
            for key in await r.all_keys():
                try:
                    await r.reconcile(key)
                except NetworkError:
                    if key != NODE_KEY or BRIDGE_CONNTRACK:
                        raise
        # guests: eth0 with the port's MAC and address, on its node's bridge, through the tap the compute side names
        for node_ns, g, port, mac, ip in (
            (a, ga, "port-1", MAC, IP),
            (b, gb, "port-2", "52:54:00:4d:00:02", "10.77.1.11"),
        ):
            tap = tap_name(port)
            sh(
                "ip",
                "-n",
                node_ns,
                "link",
                "add",
                tap,
                "mtu",
                "1450",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                g,
            )
            ns_run(node_ns, "ip", "link", "set", tap, "master", bridge_name(VNI), "up")
            ns_run(g, "ip", "link", "set", "eth0", "address", mac, "mtu", "1450", "up")
            ns_run(g, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            ns_run(g, "ip", "route", "add", "default", "via", "10.77.1.1")
        fdb = ns_run(a, "bridge", "fdb", "show", "dev", vxlan_name(VNI)).stdout
        assert "52:54:00:4d:00:02 dst 10.254.8.2" in fdb and "00:00:00:00:00:00 dst 10.254.8.2" in fdb
        assert (
            "10.77.1.11 lladdr 52:54:00:4d:00:02 PERMANENT"
            in ns_run(a, "ip", "neigh", "show", "dev", bridge_name(VNI)).stdout
        )
        ping = await asyncio.to_thread(ns_run, ga, BUSYBOX, "ping", "-c", "3", "-W", "2", "10.77.1.11", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # both nodes' gateways answer with the same MAC, each locally
        for g in (ga, gb):
            done = await asyncio.to_thread(ns_run, g, BUSYBOX, "ping", "-c", "1", "-W", "2", "10.77.1.1", check=False)
            assert done.returncode == 0
            assert service_mac(VNI) in ns_run(g, "ip", "neigh", "show", "10.77.1.1").stdout
        got = await asyncio.to_thread(ns_run, ga, sys.executable, "-c", _dns_query("db.vpc.internal", "10.77.1.1"))
        assert got.stdout.strip() == "10.77.1.11"
        got = await asyncio.to_thread(ns_run, gb, sys.executable, "-c", _dns_query("web.vpc.internal", "10.77.1.1"))
        assert got.stdout.strip() == IP
        # the other node's metadata is not the guest's: node b's service answers only for b's own port
        md = await _http(gb, "http://169.254.169.254/latest/meta-data/instance-id")
        assert md == "i-2"
    finally:
        for r in rs:
            await r.close()
        await store.close()
        for d in [*(tmp_path / "na").glob("*"), *(tmp_path / "nb").glob("*")]:
            await DhcpServer(_any_spec(), d).stop()
        for ns in [*created, f"mcs{tag}a-{VNI:06x}", f"mcs{tag}b-{VNI:06x}"]:
            sh("ip", "netns", "del", ns, check=False)


async def test_router_static_routes_are_programmed_in_the_service_namespace_by_netlink_and_removed():
    """``router route add`` on a node: the route in the network's service namespace (protocol 77, next to the
    kernel's connected routes, which stay), unchanged by a second ensure or a restarted agent, its next hop replaced
    in place, gone with ``route remove`` and with the router; an off-link next hop is refused."""
    tag = secrets.token_hex(2)
    vni = 0x5A5A
    node, svc = f"mcr{tag}n", f"mcr{tag}s-{vni:06x}"
    path = f"/run/netns/{svc}"

    def r(dst: str, via: str) -> StaticRoute:
        return StaticRoute(ipaddress.IPv4Network(dst), ipaddress.IPv4Address(via))

    def ours() -> list[str]:
        return [line.strip() for line in ns_run(svc, "ip", "route", "show", "proto", "77").stdout.splitlines()]

    try:
        for ns in (node, svc):
            sh("ip", "netns", "add", ns)
        ns_run(svc, "ip", "link", "add", INNER_NAME, "type", "veth", "peer", "name", "peer0")
        ns_run(svc, "ip", "link", "set", "peer0", "up")
        ns_run(svc, "ip", "addr", "add", "10.0.1.1/24", "dev", INNER_NAME)
        ns_run(svc, "ip", "link", "set", INNER_NAME, "up")
        plumbing = RouterPlumbing(netns=node)
        await plumbing.ensure(path, RouterPlan(vni, routes=(r("10.9.0.0/16", "10.0.1.254"),)))
        assert ours() == ["10.9.0.0/16 via 10.0.1.254 dev mcs0"]
        assert ns_run(svc, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
        assert await ensure_routes(path, [r("10.9.0.0/16", "10.0.1.254")]) == ([], [])  # a restarted agent

        await plumbing.ensure(
            path, RouterPlan(vni, routes=(r("10.9.0.0/16", "10.0.1.253"), r("192.0.2.0/24", "10.0.1.9")))
        )
        assert ours() == ["10.9.0.0/16 via 10.0.1.253 dev mcs0", "192.0.2.0/24 via 10.0.1.9 dev mcs0"]
        await plumbing.ensure(path, RouterPlan(vni, routes=(r("192.0.2.0/24", "10.0.1.9"),)))
        assert ours() == ["192.0.2.0/24 via 10.0.1.9 dev mcs0"]
        connected = ns_run(svc, "ip", "route", "show", "proto", "kernel").stdout
        assert "10.0.1.0/24 dev mcs0" in connected

        with pytest.raises(NetworkError, match=r"10\.6\.0\.0/16 via 10\.5\.0\.1"):
            await ensure_routes(path, [r("10.6.0.0/16", "10.5.0.1")])
        await plumbing.ensure(path, None)  # no router any more
        assert ours() == [] and "10.0.1.0/24 dev mcs0" in ns_run(svc, "ip", "route").stdout
        assert ns_run(svc, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    finally:
        for ns in (node, svc):
            sh("ip", "netns", "del", ns, check=False)


async def test_a_router_of_two_networks_links_their_service_namespaces_and_routes_between_them():
    """A router with subnets in two networks, on one node: a veth between the two service namespaces (``mcr-<peer
    VNI>`` each side, no addresses, permanent neighbours), routes to the peer's subnets and to a static route's
    destination via the peer; a guest of each network reaches the other's; a second ensure changes nothing; the
    peer leaving the plan takes the link (both ends) and the routes."""
    tag = secrets.token_hex(2)
    va, vb = 0x5B01, 0x5B02
    node = f"mcr{tag}n"
    sa, sb = f"mcr{tag}s-{va:06x}", f"mcr{tag}s-{vb:06x}"
    ga, gb = f"mcr{tag}a", f"mcr{tag}b"
    pa, pb = f"/run/netns/{sa}", f"/run/netns/{sb}"
    names = (node, sa, sb, ga, gb)
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
        for svc, guest, prefix in ((sa, ga, "10.1.0"), (sb, gb, "10.2.0")):
            ns_run(svc, "ip", "link", "add", INNER_NAME, "type", "veth", "peer", "name", "eth0", "netns", guest)
            ns_run(svc, "ip", "addr", "add", f"{prefix}.1/24", "dev", INNER_NAME)
            ns_run(svc, "ip", "link", "set", INNER_NAME, "up")
            ns_run(guest, "ip", "addr", "add", f"{prefix}.10/24", "dev", "eth0")
            ns_run(guest, "ip", "link", "set", "eth0", "up")
            ns_run(guest, "ip", "route", "add", "default", "via", f"{prefix}.1")
        net = ipaddress.IPv4Network
        to_b = PeerLink(vb, pb, ipaddress.IPv4Address("10.2.0.1"), (net("10.2.0.0/24"), net("10.9.0.0/16")))
        to_a = PeerLink(va, pa, ipaddress.IPv4Address("10.1.0.1"), (net("10.1.0.0/24"),))
        plumbing = RouterPlumbing(netns=node)
        await plumbing.ensure(pa, RouterPlan(va, peers=(to_b,)))
        await plumbing.ensure(pb, RouterPlan(vb, peers=(to_a,)))
        a_routes = ns_run(sa, "ip", "route", "show", "proto", "77").stdout
        assert f"10.2.0.0/24 via 10.2.0.1 dev {link_name(vb)} onlink" in a_routes
        assert f"10.9.0.0/16 via 10.2.0.1 dev {link_name(vb)} onlink" in a_routes
        assert (
            f"10.1.0.0/24 via 10.1.0.1 dev {link_name(va)} onlink"
            in ns_run(sb, "ip", "route", "show", "proto", "77").stdout
        )
        assert link_mac(vb, va) in ns_run(sa, "ip", "neigh", "show", "dev", link_name(vb)).stdout
        assert not ns_run(sa, "ip", "-4", "addr", "show", "dev", link_name(vb)).stdout.strip()  # no address on it
        ping = ns_run(ga, BUSYBOX, "ping", "-c", "2", "-W", "2", "10.2.0.10", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert await ensure_routes(pa, [*to_b.routes()]) == ([], [])  # as a restarted agent finds it

        await plumbing.ensure(pa, RouterPlan(va))  # the router left network B
        assert link_name(vb) not in ns_run(sa, "ip", "link").stdout
        assert link_name(va) not in ns_run(sb, "ip", "link").stdout  # the veth's other end went too
        assert not ns_run(sa, "ip", "route", "show", "proto", "77").stdout.strip()
        assert ns_run(ga, BUSYBOX, "ping", "-c", "1", "-W", "1", "10.2.0.10", check=False).returncode != 0
    finally:
        for ns in names:
            sh("ip", "netns", "del", ns, check=False)


async def test_a_floating_ip_answers_the_lan_and_hairpinned_a_nic_of_its_own_network_on_the_node():
    """A router's external leg and one floating IP on a bridge provider: the LAN reaches the guest through the
    floating IP, and so does another guest of the same network on the node (hairpin NAT: DNATed back inside and
    masqueraded to the gateway, so the answer returns through the router and comes from the floating IP)."""
    tag = secrets.token_hex(2)
    vni = 0x5B5B
    node, svc, g1, g2 = f"mch{tag}n", f"mch{tag}s-{vni:06x}", f"mch{tag}g1", f"mch{tag}g2"
    path = f"/run/netns/{svc}"
    code = "import socket,sys; c=socket.create_connection((sys.argv[1], 8080), timeout=3); print(c.recv(64).decode())"
    serve = (
        "import socket\ns=socket.create_server(('0.0.0.0', 8080))\n"
        "while 1:\n c,a=s.accept(); c.sendall(('from '+a[0]).encode()); c.close()"
    )
    server = None
    try:
        for ns in (node, svc, g1, g2):
            sh("ip", "netns", "add", ns)
        # the node: the network's "bridge" (plain here) and the provider bridge holding the LAN's gateway
        ns_run(node, "ip", "link", "add", "br-in", "type", "bridge")
        ns_run(
            node, "ip", "link", "add", "pub0", "address", "02:00:00:00:00:01", "type", "bridge"
        )  # a fixed MAC, as a real one
        ns_run(node, "ip", "addr", "add", "192.0.2.1/24", "dev", "pub0")
        for dev in ("br-in", "pub0"):
            ns_run(node, "ip", "link", "set", dev, "up")
        ns_run(node, "ip", "link", "add", "sv0", "type", "veth", "peer", "name", INNER_NAME, "netns", path)
        ns_run(node, "ip", "link", "set", "sv0", "master", "br-in", "up")
        ns_run(svc, "ip", "addr", "add", "10.0.1.1/24", "dev", INNER_NAME)
        ns_run(svc, "ip", "link", "set", INNER_NAME, "up")
        for i, g in enumerate((g1, g2), start=1):
            ns_run(
                node, "ip", "link", "add", f"gv{i}", "type", "veth", "peer", "name", "eth0", "netns", f"/run/netns/{g}"
            )
            ns_run(node, "ip", "link", "set", f"gv{i}", "master", "br-in", "up")
            ns_run(g, "ip", "addr", "add", f"10.0.1.1{i}/24", "dev", "eth0")
            ns_run(g, "ip", "link", "set", "eth0", "up")
            ns_run(g, "ip", "link", "set", "lo", "up")
            ns_run(g, "ip", "route", "add", "default", "via", "10.0.1.1")
        leg = ExternalLeg(
            router_id="rtr-hairpin",
            interface="pub0",
            address=ipaddress.IPv4Interface("192.0.2.10/24"),
            gateway=ipaddress.IPv4Address("192.0.2.1"),
            sources=(ipaddress.IPv4Network("10.0.1.0/24"),),
        )
        fip = FloatingLeg("fip-hairpin", ipaddress.IPv4Address("192.0.2.50"), ipaddress.IPv4Address("10.0.1.12"))
        plumbing = RouterPlumbing(netns=node)
        await plumbing.ensure(path, RouterPlan(vni, leg, (fip,)))
        server = await asyncio.create_subprocess_exec(
            "nsenter", f"--net=/run/netns/{g2}", "--", sys.executable, "-c", serve
        )
        for _ in range(50):  # the server is listening once its socket shows up
            if ":8080" in ns_run(g2, "ss", "-ltn").stdout:
                break
            await asyncio.sleep(0.1)

        def fetch(ns: str) -> str:
            done = ns_run(ns, sys.executable, "-c", code, "192.0.2.50", check=False, timeout=20)
            return done.stdout.strip() or f"failed: {done.stderr.strip()[-200:]}"

        assert fetch(node) == "from 192.0.2.1"  # the LAN, through the floating IP's leg
        assert fetch(g1) == "from 10.0.1.1"  # hairpin: in and back out through the router, seen as the gateway
        # without the floating IP, no DNAT: the address is nobody's
        await plumbing.ensure(path, RouterPlan(vni, leg))
        assert fetch(g1).startswith("failed")
    finally:
        if server is not None:
            server.kill()
            await server.wait()
        for ns in (node, svc, g1, g2):
            sh("ip", "netns", "del", ns, check=False)


async def test_two_routers_of_one_network_each_snat_their_own_subnet_through_their_own_leg():
    """Two subnets of one network, each attached to its own router with an external gateway: two legs in the
    service namespace (``mce0`` and ``mce1``, policy-routed by source), each subnet's guest seen upstream as its own
    router's address; dropping the second router's gateway removes its leg and its policy rules."""
    tag = secrets.token_hex(2)
    vni = 0x5C5C
    node, svc, g1, g2 = f"mcl{tag}n", f"mcl{tag}s-{vni:06x}", f"mcl{tag}g1", f"mcl{tag}g2"
    path = f"/run/netns/{svc}"
    code = "import socket,sys; c=socket.create_connection((sys.argv[1], 8080), timeout=3); print(c.recv(64).decode())"
    serve = (
        "import socket\ns=socket.create_server(('192.0.2.1', 8080))\n"
        "while 1:\n c,a=s.accept(); c.sendall(('from '+a[0]).encode()); c.close()"
    )
    server = None
    try:
        for ns in (node, svc, g1, g2):
            sh("ip", "netns", "add", ns)
        ns_run(node, "ip", "link", "add", "br-in", "type", "bridge")
        ns_run(
            node, "ip", "link", "add", "pub0", "address", "02:00:00:00:00:01", "type", "bridge"
        )  # a fixed MAC, as a real one
        ns_run(node, "ip", "addr", "add", "192.0.2.1/24", "dev", "pub0")
        for dev in ("br-in", "pub0", "lo"):
            ns_run(node, "ip", "link", "set", dev, "up")
        ns_run(node, "ip", "link", "add", "sv0", "type", "veth", "peer", "name", INNER_NAME, "netns", path)
        ns_run(node, "ip", "link", "set", "sv0", "master", "br-in", "up")
        for address in ("10.0.1.1/24", "10.0.2.1/24"):
            ns_run(svc, "ip", "addr", "add", address, "dev", INNER_NAME)
        ns_run(svc, "ip", "link", "set", INNER_NAME, "up")
        for i, g in enumerate((g1, g2), start=1):
            ns_run(
                node, "ip", "link", "add", f"gv{i}", "type", "veth", "peer", "name", "eth0", "netns", f"/run/netns/{g}"
            )
            ns_run(node, "ip", "link", "set", f"gv{i}", "master", "br-in", "up")
            ns_run(g, "ip", "addr", "add", f"10.0.{i}.1{i}/24", "dev", "eth0")
            ns_run(g, "ip", "link", "set", "eth0", "up")
            ns_run(g, "ip", "route", "add", "default", "via", f"10.0.{i}.1")

        def leg(router: str, address: str, source: str, index: int) -> ExternalLeg:
            return ExternalLeg(
                router_id=router,
                interface="pub0",
                address=ipaddress.IPv4Interface(f"{address}/24"),
                gateway=ipaddress.IPv4Address("192.0.2.1"),
                sources=(ipaddress.IPv4Network(source),),
                index=index,
            )

        first, second = leg("rtr-a", "192.0.2.10", "10.0.1.0/24", 0), leg("rtr-b", "192.0.2.20", "10.0.2.0/24", 1)
        plumbing = RouterPlumbing(netns=node)
        await plumbing.ensure(path, RouterPlan(vni, first, more=(second,)))
        server = await asyncio.create_subprocess_exec(
            "nsenter", f"--net=/run/netns/{node}", "--", sys.executable, "-c", serve
        )
        for _ in range(50):
            if ":8080" in ns_run(node, "ss", "-ltn").stdout:
                break
            await asyncio.sleep(0.1)

        def fetch(ns: str) -> str:
            done = ns_run(ns, sys.executable, "-c", code, "192.0.2.1", check=False, timeout=20)
            return done.stdout.strip() or f"failed: {done.stderr.strip()[-200:]}"

        def sent(dev: str) -> int:
            return json.loads(ns_run(svc, "ip", "-s", "-j", "link", "show", dev).stdout)[0]["stats64"]["tx"]["packets"]

        before = (sent("mce0"), sent("mce1"))
        assert fetch(g1) == "from 192.0.2.10"
        assert fetch(g2) == "from 192.0.2.20"
        # each guest's connection left by its own router's leg (the second by policy routing)
        assert sent("mce0") - before[0] >= 3 and sent("mce1") - before[1] >= 3
        rules = ns_run(svc, "ip", "rule", "show").stdout
        assert "from 10.0.2.0/24 lookup 101" in rules and "suppress_prefixlength 0" in rules
        assert "default via 192.0.2.1 dev mce1" in ns_run(svc, "ip", "route", "show", "table", "101").stdout
        await RouterPlumbing(netns=node).ensure(path, RouterPlan(vni, first, more=(second,)))  # a restarted agent
        assert ns_run(svc, "ip", "rule", "show").stdout == rules

        await plumbing.ensure(path, RouterPlan(vni, first))  # the second router lost its gateway
        assert "mce1" not in links(svc) and "mce0" in links(svc)
        rules = ns_run(svc, "ip", "rule", "show").stdout
        assert "lookup 101" not in rules and "suppress_prefixlength" not in rules
        assert fetch(g1) == "from 192.0.2.10"
    finally:
        if server is not None:
            server.kill()
            await server.wait()
        for ns in (node, svc, g1, g2):
            sh("ip", "netns", "del", ns, check=False)
