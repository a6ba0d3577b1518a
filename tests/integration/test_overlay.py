"""The overlay data plane for real, in network namespaces: two "nodes" joined by a veth underlay, the driver running
in each node's namespace, and "guests" (endpoint namespaces on a veth into a node's bridge).

Nothing is created in the host's namespace and no address is set outside the test's own namespaces; every namespace
is named ``mco`` + a random tag and deleted afterwards (which takes its devices along). Needs root, ``ip netns``,
``nsenter`` and, for the DHCP and firewall tests, dnsmasq, busybox (``udhcpc``, ``nc``) and nft.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.net.dhcp import DhcpHost, DhcpServer, DhcpSpec, DhcpSubnet, DnsRecord
from agent.net.firewall import NftFirewall, NftTable
from agent.net.overlay import FdbEntry, LinuxOverlay, Neighbour, OverlaySpec, bridge_name, vxlan_name

BUSYBOX = "/bin/busybox"
UNDERLAY = ("10.254.0.1", "10.254.0.2")
MTU = 1450


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, netlink)"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2 / util-linux)"
    probe = f"mcoprobe{secrets.token_hex(2)}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"needs network namespaces: ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def ns_run(ns: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net=/run/netns/{ns}", "--", *args, check=check, timeout=timeout)


def ping(ns: str, ip: str, count: int = 1) -> bool:
    return ns_run(ns, BUSYBOX, "ping", "-c", str(count), "-W", "1", ip, check=False).returncode == 0


class Lab:
    """Namespaces for one test: nodes on a shared underlay, endpoints plugged into the nodes' bridges."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.namespaces: list[str] = []

    def netns(self, suffix: str) -> str:
        name = f"mco{self.tag}{suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        ns_run(name, "ip", "link", "set", "lo", "up")
        return name

    def two_nodes(self) -> tuple[str, str]:
        """Two node namespaces joined by a veth underlay (MTU 1500) holding :data:`UNDERLAY`."""
        a, b = self.netns("na"), self.netns("nb")
        sh("ip", "-n", a, "link", "add", "under", "type", "veth", "peer", "name", "under", "netns", b)
        for ns, addr in zip((a, b), UNDERLAY, strict=True):
            ns_run(ns, "ip", "addr", "add", f"{addr}/24", "dev", "under")
            ns_run(ns, "ip", "link", "set", "under", "up")
        return a, b

    def endpoint(self, node: str, bridge: str, ip: str, suffix: str, mac: str | None = None) -> str:
        """A guest stand-in: a namespace whose ``eth0`` is a veth into ``bridge`` on ``node``; returns its name."""
        ep = self.netns(suffix)
        port = f"p{self.tag}{suffix}"
        sh("ip", "-n", node, "link", "add", port, "mtu", str(MTU), "type", "veth", "peer", "name", "eth0", "netns", ep)
        ns_run(node, "ip", "link", "set", port, "master", bridge, "up")
        if mac:
            ns_run(ep, "ip", "link", "set", "eth0", "address", mac)
        ns_run(ep, "ip", "link", "set", "eth0", "mtu", str(MTU), "up")
        if ip:
            ns_run(ep, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        return ep

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
async def nodes(lab: Lab) -> AsyncIterator[tuple[str, str, LinuxOverlay, LinuxOverlay]]:
    a, b = lab.two_nodes()
    da, db = LinuxOverlay(netns=a), LinuxOverlay(netns=b)
    try:
        yield a, b, da, db
    finally:
        await da.close()
        await db.close()


async def connect(da: LinuxOverlay, db: LinuxOverlay, vni: int) -> None:
    """The network on both nodes, each flooding to the other (head-end replication)."""
    await da.ensure_network(OverlaySpec(vni=vni, local=UNDERLAY[0], mtu=MTU))
    await db.ensure_network(OverlaySpec(vni=vni, local=UNDERLAY[1], mtu=MTU))
    await da.set_peers(vni, [UNDERLAY[1]])
    await db.set_peers(vni, [UNDERLAY[0]])


def links(ns: str) -> list[str]:
    return [line.split()[1].split("@")[0].rstrip(":") for line in ns_run(ns, "ip", "-o", "link").stdout.splitlines()]


def ifindex(ns: str, name: str) -> int:
    return int(ns_run(ns, "ip", "-o", "link", "show", name).stdout.split(":")[0])


# --- overlay ----------------------------------------------------------------------------------------------------------


async def test_guests_on_two_nodes_ping_across_the_overlay(lab: Lab, nodes: tuple) -> None:
    a, b, da, db = nodes
    await connect(da, db, 0x10)
    ea = lab.endpoint(a, bridge_name(0x10), "10.0.0.1", "ea")
    eb = lab.endpoint(b, bridge_name(0x10), "10.0.0.2", "eb")

    assert ping(ea, "10.0.0.2", count=3)
    detail = ns_run(a, "ip", "-d", "link", "show", vxlan_name(0x10)).stdout
    assert "vxlan id 16 local 10.254.0.1" in detail and "dstport 4789" in detail and "nolearning" in detail
    assert "neigh_suppress on" in detail and f"master {bridge_name(0x10)}" in detail and f"mtu {MTU}" in detail
    assert "addrgenmode none" in ns_run(a, "ip", "-d", "link", "show", bridge_name(0x10)).stdout
    assert ns_run(a, "bridge", "fdb", "show", "dev", vxlan_name(0x10)).stdout.count("00:00:00:00:00:00") == 1
    assert eb  # plugged in


async def test_two_networks_with_the_same_cidr_are_isolated(lab: Lab, nodes: tuple) -> None:
    a, b, da, db = nodes
    await connect(da, db, 1)
    await connect(da, db, 2)
    a1 = lab.endpoint(a, bridge_name(1), "10.0.0.1", "a1")
    lab.endpoint(b, bridge_name(1), "10.0.0.2", "b1")
    a2 = lab.endpoint(a, bridge_name(2), "10.0.0.1", "a2")
    lab.endpoint(b, bridge_name(2), "10.0.0.3", "b2")

    assert ping(a1, "10.0.0.2") and ping(a2, "10.0.0.3")
    assert not ping(a1, "10.0.0.3")  # exists, but in VNI 2
    assert not ping(a2, "10.0.0.2")  # exists, but in VNI 1


async def test_re_ensure_and_a_restarted_driver_change_nothing(lab: Lab, nodes: tuple) -> None:
    a, b, da, db = nodes
    await connect(da, db, 7)
    ea = lab.endpoint(a, bridge_name(7), "10.0.0.1", "ea")
    lab.endpoint(b, bridge_name(7), "10.0.0.2", "eb")
    before = (ifindex(a, bridge_name(7)), ifindex(a, vxlan_name(7)))
    fdb_before = _programmed(ns_run(a, "bridge", "fdb", "show", "dev", vxlan_name(7)).stdout)

    state = await da.ensure_network(OverlaySpec(vni=7, local=UNDERLAY[0], mtu=MTU))
    assert (state.bridge_index, state.vxlan_index) == before
    # A new driver (an agent restarted) adopts the devices: same indexes, the same entries, traffic flows.
    again = LinuxOverlay(netns=a)
    try:
        listed = await again.list_networks()
        assert [(n.vni, n.bridge_index, n.vxlan_index, str(n.local), n.mtu) for n in listed] == [
            (7, *before, UNDERLAY[0], MTU)
        ]
        await again.ensure_network(OverlaySpec(vni=7, local=UNDERLAY[0], mtu=MTU))
        assert (await again.set_peers(7, [UNDERLAY[1]])).empty
    finally:
        await again.close()
    assert (ifindex(a, bridge_name(7)), ifindex(a, vxlan_name(7))) == before
    assert _programmed(ns_run(a, "bridge", "fdb", "show", "dev", vxlan_name(7)).stdout) == fdb_before
    assert ping(ea, "10.0.0.2")

    # An MTU change is made in place; another local address recreates only the VXLAN device.
    await da.ensure_network(OverlaySpec(vni=7, local=UNDERLAY[0], mtu=1400))
    assert (ifindex(a, bridge_name(7)), ifindex(a, vxlan_name(7))) == before
    assert "mtu 1400" in ns_run(a, "ip", "link", "show", vxlan_name(7)).stdout


async def test_remove_network_leaves_no_device_and_is_idempotent(lab: Lab, nodes: tuple) -> None:
    a, _b, da, db = nodes
    await connect(da, db, 0xABCDEF)
    assert {bridge_name(0xABCDEF), vxlan_name(0xABCDEF)} <= set(links(a))
    await da.remove_network(0xABCDEF)
    await da.remove_network(0xABCDEF)
    assert not [n for n in links(a) if n.startswith(("mcb-", "mcv-"))]
    assert await da.list_networks() == []


def _programmed(fdb: str) -> list[str]:
    """The FDB entries the driver programs (permanent/static); the bridge's own learned entries come and go with
    whatever traffic the kernel sends meanwhile."""
    return sorted(line for line in fdb.splitlines() if "permanent" in line or "static" in line)


async def test_fdb_and_neighbours_converge_and_unicast_needs_no_flooding(lab: Lab, nodes: tuple) -> None:
    a, b, da, db = nodes
    vni = 9
    await da.ensure_network(OverlaySpec(vni=vni, local=UNDERLAY[0], mtu=MTU))
    await db.ensure_network(OverlaySpec(vni=vni, local=UNDERLAY[1], mtu=MTU))
    mac_a, mac_b = "52:54:00:0a:00:01", "52:54:00:0b:00:01"
    ea = lab.endpoint(a, bridge_name(vni), "10.0.0.1", "ea", mac=mac_a)
    lab.endpoint(b, bridge_name(vni), "10.0.0.2", "eb", mac=mac_b)

    # Stale entries first: a MAC and an address that no longer exist, and mac_b on the wrong node.
    stale = [FdbEntry("52:54:00:99:99:99", "10.254.0.99"), FdbEntry(mac_b, "10.254.0.98")]
    await da.set_fdb(vni, stale)
    await da.set_neighbours(vni, [Neighbour("10.0.0.99", "52:54:00:99:99:99"), Neighbour("10.0.0.2", mac_a)])
    await da.set_peers(vni, ["10.254.0.97", "10.254.0.96"])

    # Converge to the truth, with NO flooding peers at all: ARP is answered by the local bridge (suppression) and
    # unicast goes to the one VTEP of the destination MAC.
    delta = await da.set_fdb(vni, [FdbEntry(mac_b, UNDERLAY[1])])
    assert set(delta.remove) == {"52:54:00:99:99:99"} and set(delta.upsert) == {mac_b}
    await da.set_neighbours(vni, [Neighbour("10.0.0.2", mac_b)])
    await da.set_peers(vni, [])
    await db.set_fdb(vni, [FdbEntry(mac_a, UNDERLAY[0])])
    await db.set_neighbours(vni, [Neighbour("10.0.0.1", mac_a)])

    fdb = ns_run(a, "bridge", "fdb", "show", "dev", vxlan_name(vni)).stdout
    assert f"{mac_b} dst {UNDERLAY[1]} self permanent" in fdb
    assert f"{mac_b} master {bridge_name(vni)} static" in fdb
    assert "52:54:00:99:99:99" not in fdb and "10.254.0.98" not in fdb and "00:00:00:00:00:00" not in fdb
    neigh = ns_run(a, "ip", "neigh", "show", "dev", bridge_name(vni)).stdout
    assert neigh.split() == ["10.0.0.2", "lladdr", mac_b, "PERMANENT"]
    assert ping(ea, "10.0.0.2", count=2)
    # A second identical call changes nothing.
    assert (await da.set_fdb(vni, [FdbEntry(mac_b, UNDERLAY[1])])).empty
    assert (await da.set_neighbours(vni, [Neighbour("10.0.0.2", mac_b)])).empty
    # Without the neighbour entry and the peers, ARP for 10.0.0.2 has no way across: the ping fails.
    await da.set_neighbours(vni, [])
    ns_run(ea, "ip", "neigh", "flush", "dev", "eth0")
    assert not ping(ea, "10.0.0.2")


# --- DHCP -------------------------------------------------------------------------------------------------------------

needs_dhcp_tools = pytest.mark.skipif(
    not shutil.which("dnsmasq") or not os.access(BUSYBOX, os.X_OK),
    reason="needs dnsmasq (dnsmasq-base) and /bin/busybox (busybox-static) for udhcpc",
)


def udhcpc(ns: str, tmp_path: Path, tries: int = 3) -> dict[str, str] | None:
    """Ask for a lease in ``ns`` with busybox udhcpc; the variables its script saw, or None when nobody answered."""
    env_file, script = tmp_path / f"{ns}.env", tmp_path / f"{ns}.sh"
    script.write_text(f'#!{BUSYBOX} sh\n[ "$1" = bound ] && env > "{env_file}"\nexit 0\n')
    script.chmod(0o755)
    # -O mtu: ask for option 26 as guests' DHCP clients do (dnsmasq sends only the options a client asks for).
    args = (
        BUSYBOX,
        "udhcpc",
        "-f",
        "-q",
        "-n",
        "-t",
        str(tries),
        "-T",
        "1",
        "-O",
        "mtu",
        "-i",
        "eth0",
        "-s",
        str(script),
    )
    done = ns_run(ns, *args, check=False, timeout=30)
    if done.returncode != 0 or not env_file.exists():
        return None
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)


@needs_dhcp_tools
async def test_dnsmasq_serves_only_its_static_hosts_with_mtu_and_dns(lab: Lab, tmp_path: Path) -> None:
    node = lab.netns("n")
    overlay = LinuxOverlay(netns=node)
    try:
        await overlay.ensure_network(OverlaySpec(vni=5, local="10.254.0.1", mtu=MTU))
    finally:
        await overlay.close()
    # The DHCP port: here simply the server address on the bridge of this (single-network) node namespace.
    ns_run(node, "ip", "addr", "add", "10.5.0.2/24", "dev", bridge_name(5))
    known = lab.endpoint(node, bridge_name(5), "", "k", mac="52:54:00:05:00:0a")
    stranger = lab.endpoint(node, bridge_name(5), "", "s", mac="52:54:00:05:00:0b")
    spec = DhcpSpec(
        network="blue",
        interface=bridge_name(5),
        server=ipaddress.IPv4Interface("10.5.0.2/24"),
        router=ipaddress.IPv4Address("10.5.0.1"),
        mtu=MTU,
        upstream_dns=(),
    )
    # user=root: pytest's tmp_path lies under a 0700 directory that dnsmasq's own account could not traverse.
    server = DhcpServer(spec, tmp_path / "dhcp", netns=node, user="root")
    hosts = [DhcpHost("52:54:00:05:00:0a", "10.5.0.10", "web1")]
    records = [DnsRecord("web1", "10.5.0.10"), DnsRecord("db1", "10.5.0.77")]  # db1 lives on another node
    try:
        assert await server.ensure(hosts, records)
        pid = server.pid()
        assert not await server.ensure(hosts, records)  # idempotent: same process, nothing rewritten
        assert server.pid() == pid

        lease = udhcpc(known, tmp_path)
        assert lease is not None, (server.state_dir / "dnsmasq.log").read_text()
        assert (lease["ip"], lease["mtu"], lease["router"], lease["dns"].strip()) == (
            "10.5.0.10",
            str(MTU),
            "10.5.0.1",
            "10.5.0.2",
        )
        assert lease["hostname"] == "web1" and lease["domain"] == "blue.internal"
        assert udhcpc(stranger, tmp_path, tries=2) is None

        ns_run(known, "ip", "addr", "add", "10.5.0.10/24", "dev", "eth0")
        answer = ns_run(known, BUSYBOX, "nslookup", "db1.blue.internal", "10.5.0.2").stdout
        assert "10.5.0.77" in answer
        ptr = ns_run(known, BUSYBOX, "nslookup", "10.5.0.77", "10.5.0.2").stdout
        assert "db1.blue.internal" in ptr

        # A host added later is served after a SIGHUP, without restarting dnsmasq.
        assert await server.ensure([*hosts, DhcpHost("52:54:00:05:00:0b", "10.5.0.11", "web2")], records)
        assert server.pid() == pid
        lease2 = udhcpc(stranger, tmp_path)
        assert lease2 is not None and lease2["ip"] == "10.5.0.11"
    finally:
        await server.stop()
    assert server.pid() is None


@needs_dhcp_tools
async def test_one_dnsmasq_serves_two_subnets_of_a_network_each_client_its_own_router(lab: Lab, tmp_path: Path) -> None:
    node = lab.netns("m")
    overlay = LinuxOverlay(netns=node)
    try:
        await overlay.ensure_network(OverlaySpec(vni=6, local="10.254.0.1", mtu=MTU))
    finally:
        await overlay.close()
    # Both gateways on the one interface, as on a service namespace's port (agent.net.service).
    for address in ("10.5.0.1/24", "10.6.0.254/24"):
        ns_run(node, "ip", "addr", "add", address, "dev", bridge_name(6))
    a = lab.endpoint(node, bridge_name(6), "", "a", mac="52:54:00:06:00:0a")
    b = lab.endpoint(node, bridge_name(6), "", "b", mac="52:54:00:06:00:0b")
    spec = DhcpSpec(
        network="green",
        interface=bridge_name(6),
        server=ipaddress.IPv4Interface("10.5.0.1/24"),
        router=ipaddress.IPv4Address("10.5.0.1"),
        mtu=MTU,
        upstream_dns=(),
        more=(DhcpSubnet(ipaddress.IPv4Interface("10.6.0.254/24"), ipaddress.IPv4Address("10.6.0.254")),),
    )
    server = DhcpServer(spec, tmp_path / "dhcp", netns=node, user="root")
    hosts = [DhcpHost("52:54:00:06:00:0a", "10.5.0.10", "a1"), DhcpHost("52:54:00:06:00:0b", "10.6.0.20", "b1")]
    try:
        await server.ensure(hosts, [DnsRecord("a1", "10.5.0.10"), DnsRecord("b1", "10.6.0.20")])
        got = {}
        for ns in (a, b):
            lease = udhcpc(ns, tmp_path)
            assert lease is not None, (server.state_dir / "dnsmasq.log").read_text()
            got[ns] = (lease["ip"], lease["subnet"], lease["router"], lease["dns"].strip(), lease["mtu"])
        assert got == {
            a: ("10.5.0.10", "255.255.255.0", "10.5.0.1", "10.5.0.1", str(MTU)),
            b: ("10.6.0.20", "255.255.255.0", "10.6.0.254", "10.6.0.254", str(MTU)),
        }
        assert server.leases() == {"52:54:00:06:00:0a": "10.5.0.10", "52:54:00:06:00:0b": "10.6.0.20"}
        ns_run(b, "ip", "addr", "add", "10.6.0.20/24", "dev", "eth0")
        assert "10.5.0.10" in ns_run(b, BUSYBOX, "nslookup", "a1.green.internal", "10.6.0.254").stdout
    finally:
        await server.stop()


# --- firewall ---------------------------------------------------------------------------------------------------------

needs_nft = pytest.mark.skipif(not shutil.which("nft"), reason="needs nft (nftables)")


def tcp_connects(ns: str, ip: str, port: int) -> bool:
    code = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()"
    return ns_run(ns, sys.executable, "-c", code, ip, str(port), check=False, timeout=10).returncode == 0


def listen(ns: str, ip: str, port: int) -> subprocess.Popen[bytes]:
    """A TCP server in ``ns`` that accepts and closes every connection."""
    serve = "import socket,sys\ns=socket.create_server((sys.argv[1],int(sys.argv[2])))\nwhile 1: s.accept()[0].close()"
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-c", serve, ip, str(port)])


@needs_nft
async def test_firewall_applies_and_replaces_a_ruleset_atomically(lab: Lab) -> None:
    server, client = lab.netns("srv"), lab.netns("cli")
    sh("ip", "-n", server, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client)
    for ns, addr in ((server, "10.77.0.1"), (client, "10.77.0.2")):
        ns_run(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        ns_run(ns, "ip", "link", "set", "eth0", "up")
    listeners = [listen(server, "10.77.0.1", port) for port in (8080, 9090)]
    try:
        for port in (8080, 9090):  # each listener is a fresh Python process: ready when it accepts (no fixed sleep)
            deadline = time.monotonic() + 30
            while not tcp_connects(client, "10.77.0.1", port):
                assert time.monotonic() < deadline, f"the test listener on port {port} never accepted"
                await asyncio.sleep(0.2)
        fw = NftFirewall(netns=server)
        table = NftTable("inet", "minicloud-sg-test")
        drop = "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\ttcp dport {} drop\n\t}"
        await fw.replace_table(table, drop.replace("{}", "8080"))
        assert not tcp_connects(client, "10.77.0.1", 8080) and tcp_connects(client, "10.77.0.1", 9090)
        await fw.replace_table(table, drop.replace("{}", "9090"))  # one transaction: never both, never neither
        assert tcp_connects(client, "10.77.0.1", 8080) and not tcp_connects(client, "10.77.0.1", 9090)
        assert await fw.list_tables() == [table]
        # A broken ruleset is refused as a whole and leaves the current one in force.
        with pytest.raises(Exception, match="nftables"):
            await fw.apply(f"delete table {table}\ntable inet minicloud-broken {{ chain x {{ nonsense }} }}\n")
        assert await fw.list_tables() == [table]
        await fw.delete_tables([table])
        await fw.delete_tables([table])
        assert await fw.list_tables() == []
        assert tcp_connects(client, "10.77.0.1", 9090)
    finally:
        for p in listeners:
            p.kill()
            p.wait()
