"""Security groups enforced for real on one "node" (a network namespace) built by the network reconciler and its real
drivers, with two "guest" namespaces plugged into the network's bridge as the compute side plugs a tap:

- ``client`` is in the project's ``default`` group (egress all, ingress only from ``default``); ``server`` is only
  in ``srv``, a group with egress all and no ingress rule: its TCP port 8080 is closed to the client by default;
- adding the rule ``ingress tcp 8080 from group default`` opens it; a packet whose source address is not the
  client's own (the bridge's anti-spoofing) still does not get through;
- removing the rule makes a NEW connect fail, while the connection established before keeps working (the
  stateful rules accept ``ct state established,related`` first, and the ruleset replacement keeps conntrack);
- group membership is per network: a member of ``default`` in another network of the same CIDR, whose address is
  the client's, does not let the client (not a member) through a "from group default" rule.

This runs on kernels without bridge conntrack (``CONFIG_NF_CONNTRACK_BRIDGE`` unset): the stateful rules are in the
``inet`` family and see bridged IPv4 through ``br_netfilter`` (``net.bridge.bridge-nf-call-iptables``, per network
namespace, which the reconciler sets to 1 in the node's namespace).

Namespaces are named ``mcq`` + a random tag; all are deleted afterwards with every process the test started. Needs
root, iproute2, nsenter, nft, sysctl, dnsmasq, busybox and br_netfilter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.net.dhcp import DhcpServer, DhcpSpec
from agent.net.firewall import NftFirewall
from agent.net.nodenetworks import NodeNetworks
from agent.net.overlay import LinuxOverlay, bridge_name
from agent.net.service import ServiceNamespaces
from agent.reconcile import update_record
from agent.reconcilers.network import NODE_KEY, NetworkReconciler, tap_name
from minicloud.network import secgroup_compile as sgc
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
from minicloud.state import Create, Record, Txn
from minicloud.state.sqlite import SQLiteStore

BUSYBOX = "/bin/busybox"
VNI = 0x5151
VNI2 = 0x5152  # a second network of the same CIDR
CLIENT = ("port-c", "52:54:00:5a:00:01", "10.78.1.10")
SERVER = ("port-s", "52:54:00:5a:00:02", "10.78.1.20")
PORT_NO = 8080
OPEN = RuleSpec(id="r-open", direction="ingress", protocol="tcp", port_min=PORT_NO, remote_group="sg-default")


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def ns_argv(ns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def ns_run(ns: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh(*ns_argv(ns), *args, check=check, timeout=timeout)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, netlink, nftables)"
    for tool in ("ip", "nsenter", "nft", "sysctl", "dnsmasq"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, util-linux, nftables, procps, dnsmasq-base)"
    if not os.access(BUSYBOX, os.X_OK):
        return "needs /bin/busybox (busybox-static) for ping"
    probe = f"mcqprobe{secrets.token_hex(2)}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"needs network namespaces: ip netns add failed: {done.stderr.strip()}"
    try:
        if ns_run(probe, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables", check=False).returncode != 0:
            return "needs br_netfilter (no net.bridge.bridge-nf-call-iptables in a network namespace)"
        rules = (
            "table inet t {\n chain f {\n  type filter hook forward priority 0\n  ct state established accept\n }\n}\n"
        )
        done = subprocess.run([*ns_argv(probe), "nft", "-f", "-"], input=rules, capture_output=True, text=True)
        if done.returncode != 0:
            return f"needs conntrack in nftables' inet family: {done.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

SERVER_CODE = f"""
import socketserver
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(100)
            if not data:
                return
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
srv = socketserver.ThreadingTCPServer(("0.0.0.0", {PORT_NO}), Echo)
srv.daemon_threads = True
print("ready", flush=True)
srv.serve_forever()
"""

CONNECT_CODE = """
import socket, sys
src = sys.argv[3] if len(sys.argv) > 3 else ""
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5, source_address=(src, 0))
    s.sendall(b"ping")
    sys.exit(0 if s.recv(10) == b"ping" else 2)
except OSError as exc:
    print(exc)
    sys.exit(1)
"""

# One connection kept open: each line on stdin is sent and its echo printed.
SESSION_CODE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print("up", flush=True)
for line in sys.stdin:
    s.sendall(line.strip().encode())
    print(s.recv(100).decode(), flush=True)
"""


@dataclass
class World:
    tag: str
    node: str
    client: str
    server: str
    store: SQLiteStore
    tmp: Path
    reconciler: NetworkReconciler | None = None
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def service_ns(self) -> str:
        return f"mcq{self.tag}s-{VNI:06x}"

    async def converge(self) -> None:
        assert self.reconciler is not None
        for key in await self.reconciler.all_keys():
            await self.reconciler.reconcile(key)
        await self.reconciler.reconcile(NODE_KEY)

    def spawn(self, ns: str, code: str, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [*ns_argv(ns), sys.executable, "-u", "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(p)
        return p

    async def connect(self, src: str = "") -> bool:
        """Whether a NEW TCP connection from the client to the server's port gets an echo."""
        argv = [*ns_argv(self.client), sys.executable, "-c", CONNECT_CODE, SERVER[2], str(PORT_NO)]
        done = await asyncio.to_thread(sh, *argv, *([src] if src else []), check=False)
        return done.returncode == 0

    async def set_rules(self, group: str, rules: list[RuleSpec]) -> None:
        def mutate(record: Record) -> Record:
            group = SECURITY_GROUP.load(record)
            return SECURITY_GROUP.dump(group.replace(spec=msgspec.structs.replace(group.spec, rules=rules)))

        await update_record(self.store, SECURITY_GROUP.name, group, mutate)
        await self.converge()

    async def set_groups(self, port: str, groups: list[str]) -> None:
        def mutate(record: Record) -> Record:
            p = PORT.load(record)
            return PORT.dump(p.replace(spec=msgspec.structs.replace(p.spec, security_groups=groups)))

        await update_record(self.store, PORT.name, port, mutate)
        await self.converge()


async def _readline(p: subprocess.Popen[str], timeout: float = 10) -> str:
    assert p.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), timeout)).strip()


def _ip_in_receives(ns: str) -> int:
    """IPv4 packets the namespace has received (``Ip: InReceives`` of its ``/proc/net/snmp``)."""
    head, values = [line.split() for line in ns_run(ns, "cat", "/proc/net/snmp").stdout.splitlines()[:2]]
    return int(values[head.index("InReceives")])


def _any_spec() -> DhcpSpec:
    return DhcpSpec(network="x", interface="x", server=ipaddress.IPv4Interface("10.0.0.1/24"), mtu=1450)


async def _records(store: SQLiteStore) -> None:
    objs = [
        (
            NETWORK,
            NETWORK.new(
                project="p",
                name="vpc",
                id="net-1",
                spec=NetworkSpec(cidr="10.78.0.0/16", vni=VNI, mtu=1450, subnets={"sub-1": "10.78.1.0/24"}),
            ),
        ),
        (
            SUBNET,
            SUBNET.new(
                project="p",
                name="lan",
                id="sub-1",
                spec=SubnetSpec(
                    network="net-1",
                    cidr="10.78.1.0/24",
                    gateway="10.78.1.1",
                    allocation_start="10.78.1.2",
                    allocation_end="10.78.1.254",
                ),
            ),
        ),
        (
            SECURITY_GROUP,
            SECURITY_GROUP.new(
                project="p",
                name="default",
                id="sg-default",
                spec=SecurityGroupSpec(
                    rules=[
                        RuleSpec(id="r1", direction="egress"),
                        RuleSpec(id="r2", direction="ingress", remote_group="sg-default"),
                    ]
                ),
            ),
        ),
        (
            SECURITY_GROUP,
            SECURITY_GROUP.new(
                project="p",
                name="srv",
                id="sg-srv",
                spec=SecurityGroupSpec(rules=[RuleSpec(id="r3", direction="egress")]),
            ),
        ),
    ]
    for (pid, mac, ip), group in ((CLIENT, "sg-default"), (SERVER, "sg-srv")):
        spec = PortSpec(network="net-1", subnet="sub-1", address=ip, mac=mac, node="n1", security_groups=[group])
        objs.append((PORT, PORT.new(project="p", name=pid, id=pid, spec=spec)))
    await store.commit(Txn([Create(kind.dump(obj)) for kind, obj in objs]))


def _plug(node: str, guest: str, port: tuple[str, str, str]) -> None:
    """A guest stand-in: eth0 with the port's MAC and address, a veth into the bridge named as the compute side
    names the port's tap."""
    pid, mac, ip = port
    tap = tap_name(pid)
    sh("ip", "-n", node, "link", "add", tap, "mtu", "1450", "type", "veth", "peer", "name", "eth0", "netns", guest)
    ns_run(node, "ip", "link", "set", tap, "master", bridge_name(VNI), "up")
    ns_run(guest, "ip", "link", "set", "lo", "up")
    ns_run(guest, "ip", "link", "set", "eth0", "address", mac, "mtu", "1450", "up")
    ns_run(guest, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    tag = secrets.token_hex(2)
    w = World(tag, f"mcq{tag}n", f"mcq{tag}c", f"mcq{tag}v", SQLiteStore(tmp_path / "state.db"), tmp_path)
    created: list[str] = []
    await w.store.open()
    try:
        for ns in (w.node, w.client, w.server):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        ns_run(w.node, "ip", "link", "set", "lo", "up")
        ns_run(w.node, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0")  # the reconciler turns it on
        await _records(w.store)
        w.reconciler = NetworkReconciler(
            store=w.store,
            node="n1",
            underlay_address="10.254.9.1",
            overlay=LinuxOverlay(netns=w.node),
            services=ServiceNamespaces(w.node, prefix=f"mcq{tag}s-"),
            firewall=NftFirewall(w.node),
            node_networks=NodeNetworks(),
            state_dir=tmp_path / "networks",
            dhcp_factory=lambda spec, d, netns: DhcpServer(spec, d, netns=netns, user="root"),
        )
        await w.reconciler.start(lambda key: None)
        await w.converge()
        _plug(w.node, w.client, CLIENT)
        _plug(w.node, w.server, SERVER)
        yield w
    finally:
        for p in w.procs:
            p.kill()
            p.wait(timeout=10)
        if w.reconciler is not None:
            await w.reconciler.close()
        await w.store.close()
        for d in (tmp_path / "networks").glob("*"):
            await DhcpServer(_any_spec(), d).stop()
        for ns in [*created, w.service_ns]:
            sh("ip", "netns", "del", ns, check=False)


async def test_a_rule_opens_and_closes_a_port_spoofing_is_dropped_and_established_connections_survive(world: World):
    w = world
    assert ns_run(w.node, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables").stdout.strip() == "1"
    tables = ns_run(w.node, "nft", "list", "tables").stdout
    assert "bridge minicloud_sg" in tables and "inet minicloud_sg" in tables

    server = w.spawn(w.server, SERVER_CODE)
    assert await _readline(server) == "ready"
    # the network works (the client and the server reach their gateway), yet the server's port is closed:
    # its only group, srv, has no ingress rule
    for g in (w.client, w.server):
        ping = await asyncio.to_thread(ns_run, g, BUSYBOX, "ping", "-c", "1", "-W", "2", "10.78.1.1", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    assert not await w.connect()

    # a rule opens it for members of default (the client)
    await w.set_rules("sg-srv", [RuleSpec(id="r3", direction="egress"), OPEN])
    assert await w.connect()

    # anti-spoofing: the same connect from an address that is not the client's own is dropped on the bridge
    ns_run(w.client, "ip", "addr", "add", "10.78.1.99/24", "dev", "eth0")
    received = _ip_in_receives(w.server)
    assert not await w.connect(src="10.78.1.99")
    assert _ip_in_receives(w.server) == received  # not one of its SYNs reached the server
    ns_run(w.client, "ip", "addr", "del", "10.78.1.99/24", "dev", "eth0")
    assert await w.connect()

    # an established connection survives the rule's removal; a new one is refused
    session = w.spawn(w.client, SESSION_CODE, SERVER[2], str(PORT_NO))
    assert await _readline(session) == "up"
    assert session.stdin is not None
    session.stdin.write("one\n")
    session.stdin.flush()
    assert await _readline(session) == "one"
    # the network's connections live in its own conntrack zone on the node (networks may share a CIDR)
    tracked = [
        line
        for line in ns_run(w.node, "cat", "/proc/net/nf_conntrack").stdout.splitlines()
        if f"dport={PORT_NO} " in line
    ]
    assert tracked and all(f"zone={sgc.conntrack_zone(VNI)} " in line for line in tracked), tracked
    await w.set_rules("sg-srv", [RuleSpec(id="r3", direction="egress")])
    assert "8080" not in ns_run(w.node, "nft", "list", "table", "inet", "minicloud_sg").stdout
    assert not await w.connect()
    session.stdin.write("two\n")
    session.stdin.flush()
    assert await _readline(session) == "two"

    # the other way round: the server is not in default, so the client's default group does not let it in
    back = await asyncio.to_thread(ns_run, w.server, BUSYBOX, "ping", "-c", "1", "-W", "1", CLIENT[2], check=False)
    assert back.returncode != 0


async def test_a_from_group_rule_does_not_admit_a_non_member_whose_address_is_a_members_in_another_network(
    world: World,
):
    """Two networks of one project with the same CIDR: the client (only in ``srv``) has 10.78.1.10 in net-1; a port
    in net-2 (same CIDR, on another node) has 10.78.1.10 too and is in ``default``. The server's rule "tcp 8080 from
    group default" must refuse the client: group sets hold bridge . address, not a bare address."""
    w = world
    net2 = NETWORK.new(
        project="p",
        name="vpc-2",
        id="net-2",
        spec=NetworkSpec(cidr="10.78.0.0/16", vni=VNI2, mtu=1450, subnets={"sub-2": "10.78.1.0/24"}),
    )
    sub2 = SUBNET.new(
        project="p",
        name="lan-2",
        id="sub-2",
        spec=SubnetSpec(
            network="net-2",
            cidr="10.78.1.0/24",
            gateway="10.78.1.1",
            allocation_start="10.78.1.2",
            allocation_end="10.78.1.254",
        ),
    )
    twin = PortSpec(
        network="net-2",
        subnet="sub-2",
        address=CLIENT[2],
        mac="52:54:00:5a:00:09",
        node="n2",
        security_groups=["sg-default"],
    )
    port = PORT.new(project="p", name="port-twin", id="port-twin", spec=twin)
    await w.store.commit(Txn([Create(kind.dump(obj)) for kind, obj in ((NETWORK, net2), (SUBNET, sub2), (PORT, port))]))
    await w.set_groups(CLIENT[0], ["sg-srv"])
    server = w.spawn(w.server, SERVER_CODE)
    assert await _readline(server) == "ready"
    await w.set_rules("sg-srv", [RuleSpec(id="r3", direction="egress"), OPEN])
    assert not await w.connect()  # a bare-address set would let the client in as the twin
    listed = ns_run(w.node, "nft", "list", "set", "inet", sgc.TABLE, "g_sg_default").stdout
    assert f'"{bridge_name(VNI2)}" . {CLIENT[2]}' in listed, listed  # the twin is a member on its own bridge only
    assert f'"{bridge_name(VNI)}" . {CLIENT[2]}' not in listed, listed
    # the rule itself works: once the client is in default, it connects
    await w.set_groups(CLIENT[0], ["sg-default"])
    assert await w.connect()


# -- incremental changes ------------------------------------------------------------------------------------------
def _kernel_tables(ns: str) -> dict[tuple[str, str, str], Any]:
    """Both tables as the kernel holds them, without handles or declaration order: each set's and map's elements
    (sorted), each chain's rules (in order)."""
    out: dict[tuple[str, str, str], Any] = {}
    for family in ("bridge", "inet"):
        doc = json.loads(ns_run(ns, "nft", "-j", "list", "table", family, sgc.TABLE).stdout)
        for item in doc["nftables"]:
            ((what, body),) = item.items()
            if what in ("set", "map"):
                elems = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
                out[(family, what, body["name"])] = (body["type"], elems)
            elif what == "chain":
                out.setdefault((family, "chain", body["name"]), [])
            elif what == "rule":
                out.setdefault((family, "chain", body["chain"]), []).append(json.dumps(body["expr"], sort_keys=True))
    return out


def _random_world(rnd: random.Random) -> tuple[list[sgc.Group], list[sgc.Port]]:
    gids = [f"sg-{i}" for i in range(rnd.randint(1, 5))]
    ports = []
    for i in range(rnd.randint(0, 6)):
        ips = () if rnd.random() < 0.15 else (f"10.0.{rnd.randint(0, 1)}.{i + 1}",)
        groups = tuple(rnd.sample(gids, rnd.randint(0, len(gids))))
        tap = f"tap{rnd.randint(0, 3)}x{i}"  # a port's tap and bridge change now and then too
        bridge = rnd.randint(1, 2)  # each bridge its network's conntrack zone
        ports.append(sgc.Port(f"p-{i}", tap, f"52:54:00:00:00:{i:02x}", ips, groups, f"mcb-{bridge}", bridge))
    groups = []
    for gid in gids:
        rules = []
        for _ in range(rnd.randint(0, 4)):
            direction = rnd.choice(["ingress", "egress"])
            kind = rnd.random()
            if kind < 0.3:
                rules.append(sgc.Rule(direction, "tcp", rnd.randint(1, 100)))
            elif kind < 0.6:
                rules.append(sgc.Rule(direction, remote_group=rnd.choice(gids)))
            elif kind < 0.8:
                rules.append(sgc.Rule(direction, "udp", remote_cidr=f"10.{rnd.randint(0, 3)}.0.0/16"))
            else:
                rules.append(sgc.Rule(direction))
        members = [(p.bridge, ip) for p in ports if gid in p.groups for ip in p.ips]
        others = [("mcb-1", "10.9.0.1"), ("mcb-2", "10.9.0.1"), ("mcb-2", "10.9.0.2")]  # members on other nodes
        members += rnd.sample(others, rnd.randint(0, 3))
        groups.append(sgc.Group(gid, tuple(rules), tuple(members)))
    return groups, ports


async def test_incremental_changes_leave_the_kernel_exactly_where_the_whole_ruleset_would():
    """Random successions of ports, groups, rules and members (added, changed, removed): each change applied as
    ``delta_script`` on one namespace holds, chain by chain and element by element, what ``full_script`` of the
    same state loads on another."""
    tag = secrets.token_hex(2)
    inc, whole = f"mcq{tag}i", f"mcq{tag}w"
    rnd = random.Random(10)
    try:
        for ns in (inc, whole):
            sh("ip", "netns", "add", ns)
        applied = sgc.build(*_random_world(rnd))
        await NftFirewall(inc).apply(sgc.full_script(applied))
        for step in range(60):
            new = sgc.build(*_random_world(rnd))
            delta = sgc.delta_script(applied, new)
            if delta:
                await NftFirewall(inc).apply(delta)
            await NftFirewall(whole).apply(sgc.full_script(new))
            assert _kernel_tables(inc) == _kernel_tables(whole), (step, delta)
            applied = new
    finally:
        for ns in (inc, whole):
            sh("ip", "netns", "del", ns, check=False)
