"""A distributed router's side of one network on one node, inside that network's service namespace.

The service namespace ``mcs-<vni>`` (:mod:`agent.net.service`) already holds every subnet's gateway on ``mcs0`` with
the VNI's MAC, the same on every node. A network with a subnet attached to a router gets, in that namespace:

- **forwarding** on (``net.ipv4.ip_forward = 1``, ICMP redirects off): traffic between the router's subnets of the
  network is routed on the node it comes from;
- the routers' **static routes** (``router route add``) whose next hop is on one of their subnets of this network,
  in the main table with protocol :data:`ROUTE_PROTO` (netlink, pyroute2), removed with the route;
- with an **external gateway** (the router's address on an external network): ``mce0``, a macvlan (bridge mode) on
  the node's **provider interface** for that network (``[network.providers] PHYSNET = "ifname"``), with the router's
  external address and a MAC derived from the router (the same on every node), a default route via the external
  subnet's gateway, and the nft table ``ip minicloud_rtr``: SNAT of the router's subnets out of ``mce0`` to the
  external address, and nothing new from ``mce0`` forwarded inwards (replies only).

Nothing of this crosses the VXLAN device: the external side leaves through the node's own provider interface.

A router whose subnets are in **several networks** joins their service namespaces on each node that carries them:
one veth pair per pair of networks (``mcr-<peer VNI>`` in each namespace, deterministic MACs, no addresses), routes
in each namespace to the peer's subnets (and to the destinations of static routes whose next hop is on them) via the
peer's first gateway, on-link over that veth, with a permanent neighbour entry for it (no ARP on the link: the
namespaces answer ARP for their own legs only). Traffic between networks is routed on the node it comes from, as
within one network.

:class:`RouterPlumbing` converges it idempotently (``ensure(netns path, plan)``; a plan of None undoes it); the
namespace going (the network leaving the node) takes all of it along.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import NetlinkError

from agent.net.common import NetworkError, collect, get_link, netns_argv, ns_socket
from agent.net.firewall import NftFirewall, NftTable
from agent.net.overlay import vxlan_name
from agent.net.service import INNER_NAME, service_mac

log = logging.getLogger(__name__)

#: The external leg's name inside the service namespace.
EXTERNAL_NAME = "mce0"
TABLE = NftTable("ip", "minicloud_rtr")
_SYSCTLS = (
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.send_redirects=0",
    "net.ipv4.conf.default.send_redirects=0",
    # each leg answers ARP only for its own addresses (a floating IP's leg for it, the router's leg for its own)
    "net.ipv4.conf.all.arp_ignore=1",
)
FLOATING_PREFIX = "mcf-"
#: The routing protocol number marking the routers' static routes in a service namespace (``ip route show proto
#: 77``): what is ours to converge, apart from the kernel's and the external leg's routes.
ROUTE_PROTO = 77
_RTNH_F_ONLINK = 4

#: Sends one gratuitous ARP request (argv: interface, address, MAC) on an AF_PACKET socket.
_GARP = """
import socket, sys
ifname, ip, mac = sys.argv[1:4]
m, a = bytes.fromhex(mac.replace(":", "")), socket.inet_aton(ip)
frame = b"\\xff" * 6 + m + b"\\x08\\x06" + b"\\x00\\x01\\x08\\x00\\x06\\x04\\x00\\x01" + m + a + b"\\x00" * 6 + a
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
s.send(frame)
"""


def external_mac(router_id: str) -> str:
    """The external leg's MAC of router ``router_id``: locally administered, unicast, the same on every node."""
    digest = hashlib.sha256(router_id.encode()).digest()
    return "02:4d:52:" + ":".join(f"{b:02x}" for b in digest[:3])


def floating_name(fip_id: str) -> str:
    """A floating IP's leg (in the node's namespace while created, then in the service namespace)."""
    return FLOATING_PREFIX + hashlib.sha256(fip_id.encode()).hexdigest()[:8]


def veth_peer_name(path: str, name: str) -> str:
    """The node-side end of a leg on a bridge provider (``mcp`` + 10 hex digits of the namespace path and leg)."""
    return "mcp" + hashlib.sha256(f"{path}/{name}".encode()).hexdigest()[:10]


def temp_name(vni: int, index: int = 0) -> str:
    """The macvlan's name in the node's namespace while it is created (then it moves into the service namespace)."""
    return f"mce-{vni:06x}" if index == 0 else f"mce{index}-{vni:06x}"


#: Policy-routing rules of the extra external legs (a network whose subnets have routers with different external
#: gateways): at :data:`RULE_PRIORITY` ``from <a leg's subnet> to <its external subnet> lookup <its table>``, then
#: the main table without its default route, then ``from <a leg's subnet> lookup <its table>``; tables are
#: :data:`LEG_TABLE` + the leg's index.
RULE_PRIORITY = 1000
LEG_TABLE = 100


@dataclass(frozen=True)
class ExternalLeg:
    router_id: str
    #: The node's provider interface (from its config) the external network maps to.
    interface: str
    #: The router's external address with the external subnet's prefix, and that subnet's gateway.
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    #: The CIDRs of the router's subnets in this network (what is SNATed).
    sources: tuple[ipaddress.IPv4Network, ...]
    #: The leg's index among the network's legs on this node: 0 is ``mce0`` with the main table's default route;
    #: ``i`` > 0 is ``mce<i>``, routing its sources by policy through table :data:`LEG_TABLE` + ``i``.
    index: int = 0
    #: Whether ``address`` is the router's own ``external_address`` (the first node's leg) rather than another
    #: node's address of it: each address on the LAN has its own MAC.
    primary: bool = True

    @property
    def mac(self) -> str:
        return external_mac(self.router_id if self.primary else f"{self.router_id}/{self.address.ip}")

    @property
    def name(self) -> str:
        return f"mce{self.index}"

    @property
    def table(self) -> int:
        return LEG_TABLE + self.index if self.index else 0


@dataclass(frozen=True)
class FloatingLeg:
    """A floating IP NATed 1:1 to ``fixed`` (a NIC on this node): its own macvlan on the provider interface with
    the floating address and a MAC derived from its id, present on this node only."""

    fip_id: str
    address: ipaddress.IPv4Address
    fixed: ipaddress.IPv4Address
    #: The index of the external leg (router) it belongs to (:attr:`ExternalLeg.index`).
    leg: int = 0

    @property
    def mac(self) -> str:
        return external_mac(f"floatingip/{self.fip_id}")

    @property
    def name(self) -> str:
        return floating_name(self.fip_id)


@dataclass(frozen=True, order=True)
class StaticRoute:
    """A router's static route: ``destination`` via ``nexthop``, an address on one of its subnets of this network;
    or (``device``: a peer link ``mcr-…``) via the peer network's namespace, on-link over that link."""

    destination: ipaddress.IPv4Network
    nexthop: ipaddress.IPv4Address
    device: str = ""


LINK_PREFIX = "mcr-"


def link_name(peer_vni: int) -> str:
    """The link, inside a network's service namespace, to the service namespace of network ``peer_vni``."""
    return f"{LINK_PREFIX}{peer_vni:06x}"


def link_mac(vni: int, peer_vni: int) -> str:
    """The MAC of network ``vni``'s end of its link to network ``peer_vni``: locally administered, unicast."""
    digest = hashlib.sha256(f"link/{vni}/{peer_vni}".encode()).digest()
    return "02:4d:4c:" + ":".join(f"{b:02x}" for b in digest[:3])


@dataclass(frozen=True, order=True)
class PeerLink:
    """Another network of the same router(s), built on this node: its VNI, its service namespace, and an address
    there (its first gateway) as the next hop of the routes to its side."""

    vni: int
    path: str
    nexthop: ipaddress.IPv4Address
    destinations: tuple[ipaddress.IPv4Network, ...] = ()

    def routes(self) -> tuple[StaticRoute, ...]:
        return tuple(StaticRoute(d, self.nexthop, link_name(self.vni)) for d in self.destinations)


@dataclass(frozen=True)
class RouterPlan:
    """What the routers need in one network's service namespace: forwarding, at most one external leg, and the
    floating IPs of this node's NICs (only with the external leg)."""

    vni: int
    external: ExternalLeg | None = None
    floating: tuple[FloatingLeg, ...] = ()
    #: Further external legs (other routers of the network's subnets with an external gateway), indexes 1, 2, …
    more: tuple[ExternalLeg, ...] = ()
    #: This node's source MAC for frames the router sends across the VXLAN device (see :func:`routed_body`).
    routed_mac: str = ""
    #: The service namespace's own addresses (gateways, metadata): what it sends itself never crosses VXLAN.
    own: tuple[str, ...] = ()
    #: The routers' static routes whose next hop is on one of their subnets of this network, sorted.
    routes: tuple[StaticRoute, ...] = ()
    #: The other networks of its routers built on this node, by VNI (the links between the namespaces).
    peers: tuple[PeerLink, ...] = ()
    #: Floating IPs of NICs arriving here by live migration: their SNAT only (no leg: the source answers for them
    #: until the NIC's record moves here).
    arriving: tuple[FloatingLeg, ...] = ()

    @property
    def legs(self) -> tuple[ExternalLeg, ...]:
        return (self.external, *self.more) if self.external is not None else ()


def routed_mac(vni: int, local: str) -> str:
    """The source MAC of what network ``vni``'s router on the node with underlay address ``local`` routes to other
    nodes: locally administered, unicast, one per node and network."""
    digest = hashlib.sha256(f"{vni}/{local}".encode()).digest()
    return "02:4d:44:" + ":".join(f"{b:02x}" for b in digest[:3])


def routed_table(vni: int) -> NftTable:
    return NftTable("bridge", f"minicloud_rtr_{vni:06x}")


def routed_body(vni: int, mac: str, own: tuple[str, ...] = ()) -> str:
    """East-west to another node: a routed IPv4 frame leaves the service port with the gateway MAC, which must never
    cross the VXLAN device (the service table drops it there, at priority -10). Before that, this table gives such
    frames the node's own MAC instead (DVR's per-node MAC). Only routed ones: what the namespace sends from its own
    addresses (``own``: DHCP answers, DNS, metadata) and ARP still stay on the node."""
    ours = ", ".join(sorted(set(own), key=lambda a: ipaddress.IPv4Address(a)))
    match = f"ip saddr != {{ {ours} }} " if ours else "ether type ip "
    return "\n".join(
        [
            "\tchain forward {",
            "\t\ttype filter hook forward priority -20; policy accept;",
            f'\t\toifname "{vxlan_name(vni)}" ether saddr {service_mac(vni)} {match}ether saddr set {mac}',
            "\t}",
        ]
    )


def nft_body(
    leg: ExternalLeg,
    floating: tuple[FloatingLeg, ...] = (),
    more: tuple[ExternalLeg, ...] = (),
    arriving: tuple[FloatingLeg, ...] = (),
) -> str:
    """SNAT of the router's subnets (a floating IP's NIC leaves as its floating IP), DNAT of each floating IP (from
    the LAN and, hairpinned, from the network's own NICs on this node), and nothing new forwarded from the LAN side
    but DNATed traffic. ``more``: further legs, each SNATing its own router's subnets out of its own interface."""
    legs = (leg, *more)
    # Whatever leg a packet leaves by (routing picks the leg of its router for the default route, but a connected
    # external subnet of another leg by that leg), it leaves as its router's address: never a private one.
    out = f'"{leg.name}"' if not more else "{ " + ", ".join(f'"{g.name}"' for g in legs) + " }"
    fips = sorted(floating, key=lambda f: int(f.address))
    return "\n".join(
        [
            # Egress metering: one named counter per leg of the bytes leaving by it (``nft list counters``), in a
            # filter chain (a nat chain sees only a connection's first packet); read by :func:`read_egress`.
            *(f"\tcounter {egress_counter_name(g.name)} {{\n\t}}" for g in legs),
            "\tchain egress {",
            "\t\ttype filter hook postrouting priority 300; policy accept;",
            *(f'\t\toifname "{g.name}" counter name "{egress_counter_name(g.name)}"' for g in legs),
            "\t}",
            "\tchain prerouting {",
            "\t\ttype nat hook prerouting priority -100; policy accept;",
            *(f"\t\tip daddr {f.address} dnat to {f.fixed}" for f in fips),
            "\t}",
            "\tchain forward {",
            "\t\ttype filter hook forward priority 0; policy accept;",
            "\t\tct state established,related accept",
            "\t\tct status dnat accept",
            f'\t\tiifname "{LINK_PREFIX}*" oifname "{INNER_NAME}" accept',  # from another network of its routers
            f'\t\tiifname != "{INNER_NAME}" drop',
            "\t}",
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority 100; policy accept;",
            *(f"\t\toifname {out} ip saddr {f.fixed} snat to {f.address}" for f in fips),
            # a NIC arriving by live migration: from its first packet here it leaves as its floating IP (the LAN
            # still sends to the source's leg, which reaches it over the VXLAN, until its record moves here)
            *(
                f"\t\toifname {out} ip saddr {f.fixed} snat to {f.address}"
                for f in sorted(arriving, key=lambda f: int(f.address))
            ),
            *(
                f"\t\toifname {out} ip saddr {{ {', '.join(str(s) for s in g.sources)} }} snat to {g.address.ip}"
                for g in legs
            ),
            # Hairpin: a NIC of the network reaching a floating IP NATed here is DNATed back inside; it leaves as the
            # gateway, so the answer comes back through this namespace (and is un-NATed) instead of going straight
            # to the NIC, which expects it from the floating IP.
            *([f'\t\tiifname "{INNER_NAME}" oifname "{INNER_NAME}" ct status dnat masquerade'] if fips else []),
            "\t}",
        ]
    )


EGRESS_PREFIX = "egress_"


def egress_counter_name(leg: str) -> str:
    """The named nft counter of the bytes leaving by external leg ``leg`` (``egress_mce0``)."""
    return f"{EGRESS_PREFIX}{leg}"


def parse_egress_counters(text: str) -> dict[str, int]:
    """Pure: ``nft -j list counters table ip minicloud_rtr``'s answer as bytes by leg (``{"mce0": n}``)."""
    doc = json.loads(text or "{}")
    out: dict[str, int] = {}
    for item in doc.get("nftables", []):
        c = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(c, dict) or c.get("table") != TABLE.name:
            continue
        name = str(c.get("name", ""))
        if name.startswith(EGRESS_PREFIX) and _is_leg(name[len(EGRESS_PREFIX) :]):
            out[name[len(EGRESS_PREFIX) :]] = int(c.get("bytes", 0) or 0)
    return out


async def read_egress(path: str) -> dict[str, int]:
    """Bytes out by external leg in the service namespace at ``path`` (one ``nft`` process; empty without the
    table)."""
    fw = NftFirewall(path)
    try:
        return parse_egress_counters(
            await fw._run(["-j", "list", "counters", "table", TABLE.family, TABLE.name], None, "list counters")
        )
    except NetworkError:
        return {}


class RouterPlumbing:
    """Routers' parts of the service namespaces of the node whose namespace is ``netns`` (None: the agent's own).
    Uses ``ip``/``sysctl``/``nft`` (one short process each, only when something differs). Calls are serialised."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lock = asyncio.Lock()
        self._ip = shutil.which("ip") or "ip"
        self._sysctl = shutil.which("sysctl") or "sysctl"
        self._tables: dict[str, str] = {}
        self._applied: dict[str, RouterPlan | None] = {}
        self._egress_since: dict[str, int] = {}

    def egress_since(self, path: str) -> int:
        """When this process last wrote the nft table of ``path`` (its egress counters count from then; 0: never)."""
        return self._egress_since.get(path, 0)

    def applied(self) -> dict[str, RouterPlan]:
        """Namespace path -> the plan this process converged there (a copy; for the metrics collector)."""
        return {path: plan for path, plan in self._applied.items() if plan is not None}

    async def _run(self, argv: list[str], what: str, *, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
        )
        out, err = await proc.communicate()
        if check and proc.returncode != 0:
            raise NetworkError(f"router: could not {what}: {err.decode(errors='replace').strip()}")
        return out.decode(errors="replace")

    async def _inside(self, path: str, *cmd: str, what: str, check: bool = True) -> str:
        return await self._run([*netns_argv(path), *cmd], what, check=check)

    async def ensure(self, path: str, plan: RouterPlan | None) -> None:
        """Converge the service namespace at ``path`` to ``plan`` (None: no router there). Idempotent."""
        async with self._lock:
            if path in self._applied and self._applied[path] == plan:
                return  # converged by this process already (a restarted agent looks once)
            if plan is None and not await asyncio.to_thread(os.path.exists, path):
                return
            if await self._converge(path, plan):
                self._applied[path] = plan
            else:  # a peer's namespace is not there yet: look again next time
                self._applied.pop(path, None)

    async def remove(self, path: str) -> None:
        """The namespace at ``path`` is gone (and all of this inside with it): remove the node's routed-MAC table."""
        async with self._lock:
            self._applied.pop(path, None)
            self._tables.pop(path, None)
            for other, plan in list(self._applied.items()):  # their links to it went with it: look again
                if plan is not None and any(p.path == path for p in plan.peers):
                    del self._applied[other]
            await self._routed(path, None)

    async def _routed(self, path: str, plan: RouterPlan | None) -> None:
        vni = int(path[-6:], 16)  # the service namespace's name ends in the VNI (agent.net.service)
        table, node = routed_table(vni), NftFirewall(self.netns)
        if plan is not None and plan.routed_mac:
            body = routed_body(vni, plan.routed_mac, plan.own)
            if self._tables.get(table.name) != body:
                await node.replace_table(table, body)
                self._tables[table.name] = body
        elif self._tables.get(table.name) != "":
            await node.delete_tables([table])
            self._tables[table.name] = ""

    async def _converge(self, path: str, plan: RouterPlan | None) -> bool:
        """Converge; False when a peer network's namespace is missing (its link and routes come later)."""
        await self._routed(path, plan)
        fw = NftFirewall(path)
        forwarding = (await self._inside(path, self._sysctl, "-n", "net.ipv4.ip_forward", what="read")).strip()
        if plan is None:
            await self._remove_external(path, fw)
            await ensure_routes(path, ())
            await self._ensure_links(path, 0, ())
            if forwarding == "1":
                await self._inside(path, self._sysctl, "-qw", "net.ipv4.ip_forward=0", what="stop forwarding")
            return True
        await self._inside(path, self._sysctl, "-qw", *_SYSCTLS, what="turn forwarding on")
        linked = await self._ensure_links(path, plan.vni, plan.peers)
        await ensure_routes(path, (*plan.routes, *(r for p in linked for r in p.routes())))
        complete = len(linked) == len(plan.peers)
        if plan.external is None:
            await self._remove_external(path, fw)
            return complete
        for leg in plan.legs:
            await self._ensure_external(path, plan.vni, leg)
        for name in await self._links(path):  # legs no router needs any more (fewer routers than before)
            if _is_leg(name) and name not in {g.name for g in plan.legs}:
                await self._inside(path, self._ip, "link", "del", name, what="delete an external leg")
        await self._ensure_rules(path, plan.more)
        await self._ensure_floating(path, plan.legs, plan.floating)
        body = nft_body(plan.external, plan.floating, plan.more, plan.arriving)
        if self._tables.get(path) != body:  # once after a restart too: an atomic replace keeps conntrack
            await fw.replace_table(TABLE, body)
            self._tables[path] = body
            self._egress_since[path] = int(time.time())  # the egress counters start again from 0
        return complete

    async def _ensure_links(self, path: str, vni: int, peers: tuple[PeerLink, ...]) -> list[PeerLink]:
        """Exactly one veth to each peer's namespace (created from here when both namespaces exist; the peer's own
        pass adopts it), up, with its MAC and a permanent neighbour entry for the peer's next hop; links to
        namespaces no longer peers are deleted (both ends go). Returns the peers linked."""
        have = {name for name in await self._links(path) if name.startswith(LINK_PREFIX)}
        linked = []
        for peer in peers:
            name, back = link_name(peer.vni), link_name(vni)
            if name not in have:
                if not await asyncio.to_thread(os.path.exists, peer.path):
                    continue  # not built here yet: its own pass will link us (and queue us)
                tmp = f"mcq-{peer.vni:06x}"  # the peer's end until it is in the peer's namespace
                await self._inside(path, self._ip, "link", "del", tmp, what="clear a half-made link", check=False)
                await self._inside(peer.path, self._ip, "link", "del", back, what="clear a stale end", check=False)
                await self._inside(path, self._ip, "link", "add", name, "address", link_mac(vni, peer.vni),
                                   "type", "veth", "peer", "name", tmp, "address", link_mac(peer.vni, vni),
                                   what=f"link to network {peer.vni}")  # fmt: skip
                await self._inside(path, self._ip, "link", "set", name, "addrgenmode", "none", what="no IPv6")
                await self._inside(path, self._ip, "link", "set", tmp, "netns", peer.path, what="move a link")
                await self._inside(peer.path, self._ip, "link", "set", tmp, "name", back, what="name a link")
                await self._inside(peer.path, self._ip, "link", "set", back, "addrgenmode", "none", what="no IPv6")
                await self._inside(peer.path, self._ip, "link", "set", back, "up", what="bring a link up")
            await self._inside(path, self._ip, "link", "set", name, "up", what="bring a link up")
            await self._inside(path, self._ip, "neigh", "replace", str(peer.nexthop), "lladdr",
                               link_mac(peer.vni, vni), "dev", name, "nud", "permanent",
                               what=f"the next hop of network {peer.vni}")  # fmt: skip
            linked.append(peer)
        for name in have - {link_name(p.vni) for p in peers}:
            await self._inside(path, self._ip, "link", "del", name, what="delete a link", check=False)
        return linked

    async def announce(self, path: str, leg: ExternalLeg) -> None:
        """A gratuitous ARP for the leg's address from the namespace at ``path`` (best effort)."""
        await self._inside(
            path, sys.executable, "-c", _GARP, leg.name, str(leg.address.ip), leg.mac, what="announce", check=False
        )

    async def _ensure_rules(self, path: str, more: tuple[ExternalLeg, ...]) -> None:
        """The policy rules of the extra legs (none without): a leg's sources to its own external subnet by its
        table, then the main table without its default route (internal subnets, static routes), then the leg's
        sources to its table (its default route). Only rules at our three priorities are touched."""
        want: set[tuple[int, str, str, int]] = set()
        if more:
            want.add((RULE_PRIORITY + 1, "", "", 254))
            for leg in more:
                for src in leg.sources:
                    want.add((RULE_PRIORITY, str(src), str(leg.address.network), leg.table))
                    want.add((RULE_PRIORITY + 2, str(src), "", leg.table))
        out = await self._inside(path, self._ip, "-j", "-4", "rule", "show", what="read the rules")
        have: set[tuple[int, str, str, int]] = set()
        for r in json.loads(out or "[]"):
            if RULE_PRIORITY <= r.get("priority", -1) <= RULE_PRIORITY + 2:
                src, dst = r.get("src", "all"), r.get("dst", "all")
                src = "" if src == "all" else str(ipaddress.IPv4Network(f"{src}/{r.get('srclen', 32)}"))
                dst = "" if dst == "all" else str(ipaddress.IPv4Network(f"{dst}/{r.get('dstlen', 32)}"))
                table = {"main": 254, "default": 253, "local": 255}.get(str(r.get("table")), r.get("table"))
                have.add((r["priority"], src, dst, int(table)))
        for prio, src, dst, table in sorted(have - want):
            await self._inside(
                path, self._ip, "rule", "del", "priority", str(prio), *(("from", src) if src else ()),
                *(("to", dst) if dst else ()), "lookup", str(table), what="delete a policy rule",
            )  # fmt: skip
        for prio, src, dst, table in sorted(want - have):
            match = ("suppress_prefixlength", "0") if table == 254 else ("from", src, *(("to", dst) if dst else ()))
            await self._inside(
                path, self._ip, "rule", "add", "priority", str(prio), *match, "lookup", str(table),
                what="add a policy rule",
            )  # fmt: skip

    async def _links(self, path: str) -> dict[str, dict]:
        out = await self._inside(path, self._ip, "-j", "-d", "addr", "show", what="list links")
        return {link["ifname"]: link for link in json.loads(out or "[]")}

    async def _ensure_external(self, path: str, vni: int, leg: ExternalLeg) -> None:
        links = await self._links(path)
        link = links.get(leg.name)
        if link is not None and (link.get("address", "").lower() != leg.mac):
            await self._inside(path, self._ip, "link", "del", leg.name, what="delete the external leg")
            link = None
        if link is None:
            await self._macvlan(path, temp_name(vni, leg.index), leg.name, leg.interface, leg.mac)
            links = await self._links(path)
            link = links[leg.name]
        have = {
            ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
            for a in link.get("addr_info", [])
            if a.get("family") == "inet"
        }
        for a in have - {leg.address}:
            await self._inside(path, self._ip, "addr", "del", str(a), "dev", leg.name, what="drop an address")
        if leg.address not in have:
            await self._inside(
                path, self._ip, "addr", "add", str(leg.address), "dev", leg.name, what="add the external address"
            )
        if "UP" not in link.get("flags", []):
            await self._inside(path, self._ip, "link", "set", leg.name, "up", what="bring the leg up")
            # tell the LAN where the address is now (the switch and the upstream gateway's ARP cache)
            await self.announce(path, leg)
        table = ("table", str(leg.table)) if leg.table else ()
        if table:  # the leg's own external subnet in its table too (its sources reach that LAN by this leg)
            await self._inside(
                path, self._ip, "route", "replace", str(leg.address.network), "dev", leg.name, *table,
                what="route the leg's subnet",
            )  # fmt: skip
        routes = await self._inside(
            path, self._ip, "-j", "route", "show", "default", *table, what="read the routes", check=not table
        )
        want = {"dst": "default", "gateway": str(leg.gateway), "dev": leg.name}
        try:
            have = json.loads(routes or "[]")
        except json.JSONDecodeError:  # a leg's table that does not exist yet ("[" then an error)
            have = []
        if not any(all(r.get(k) == v for k, v in want.items()) for r in have):
            await self._inside(
                path, self._ip, "route", "replace", "default", "via", str(leg.gateway), "dev", leg.name, *table,
                what="set the default route",
            )  # fmt: skip

    async def _is_bridge(self, interface: str) -> bool:
        out = await self._run(
            [*netns_argv(self.netns), self._ip, "-j", "-d", "link", "show", "dev", interface],
            f"read provider interface {interface}",
            check=False,
        )
        links = json.loads(out or "[]")
        return bool(links) and links[0].get("linkinfo", {}).get("info_kind") == "bridge"

    async def _macvlan(self, path: str, tmp: str, name: str, interface: str, mac: str) -> None:
        """A macvlan (bridge mode) on the node's ``interface`` with ``mac``, moved into ``path`` as ``name``. On a
        Linux bridge (the ``host`` provider: the node's default bridge, which holds the external gateway address
        itself), a veth pair instead, its peer a port of the bridge: a macvlan on a bridge cannot reach the
        bridge's own address (the bridge drops unicast to its own MAC sent down from an upper device)."""
        node = netns_argv(self.netns)
        await self._run([*node, self._ip, "link", "del", tmp], "clean up", check=False)
        if await self._is_bridge(interface):
            peer = veth_peer_name(path, name)
            await self._run([*node, self._ip, "link", "del", peer], "clean up", check=False)
            await self._run(
                [*node, self._ip, "link", "add", tmp, "address", mac, "type", "veth", "peer", "name", peer],
                f"create a veth pair for bridge {interface}",
            )
            await self._run([*node, self._ip, "link", "set", peer, "addrgenmode", "none"], "no IPv6", check=False)
            await self._run(
                [*node, self._ip, "link", "set", peer, "master", interface, "up"], f"plug the leg into {interface}"
            )
        else:
            await self._run(
                [*node, self._ip, "link", "add", tmp, "link", interface, "address", mac, "type", "macvlan", "mode",
                 "bridge"],
                f"create a macvlan on provider interface {interface}",
            )  # fmt: skip
        try:
            await self._run([*node, self._ip, "link", "set", tmp, "netns", path], "move the macvlan")
        except NetworkError:
            await self._run([*node, self._ip, "link", "del", tmp], "clean up", check=False)
            raise
        if name != tmp:
            await self._inside(path, self._ip, "link", "set", tmp, "name", name, what="rename")
        await self._inside(path, self._ip, "link", "set", name, "addrgenmode", "none", what="no IPv6")

    async def _ensure_floating(
        self, path: str, legs: tuple[ExternalLeg, ...], floating: tuple[FloatingLeg, ...]
    ) -> None:
        interfaces = {g.index: g.interface for g in legs}
        links = await self._links(path)
        want = {f.name: f for f in floating}
        for name, link in links.items():
            name = name.split("@")[0]
            f = want.get(name)
            if name.startswith(FLOATING_PREFIX) and (f is None or link.get("address", "").lower() != f.mac):
                await self._inside(path, self._ip, "link", "del", name, what="delete a floating IP's leg")
        links = await self._links(path)
        for name, f in want.items():
            link = links.get(name)
            if link is None:
                await self._macvlan(path, name, name, interfaces.get(f.leg, legs[0].interface), f.mac)
                link = (await self._links(path))[name]
            have = {a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"}
            if have != {str(f.address)}:
                await self._inside(path, self._ip, "addr", "flush", "dev", name, what="flush")
                await self._inside(path, self._ip, "addr", "add", f"{f.address}/32", "dev", name, what="address")
            if "UP" not in link.get("flags", []):
                await self._inside(path, self._ip, "link", "set", name, "up", what="bring a floating leg up")
                # the floating IP is here now: tell the LAN (the switch learns its MAC on this node's port)
                await self._inside(
                    path, sys.executable, "-c", _GARP, name, str(f.address), f.mac, what="announce", check=False
                )

    async def _remove_external(self, path: str, fw: NftFirewall) -> None:
        for name in await self._links(path):
            if _is_leg(name) or name.startswith(FLOATING_PREFIX):
                await self._inside(path, self._ip, "link", "del", name, what="delete an external leg")
        await self._ensure_rules(path, ())
        if TABLE in await fw.list_tables():
            await fw.delete_tables([TABLE])
        self._tables.pop(path, None)


def _is_leg(name: str) -> bool:
    """Whether a link of a service namespace is an external leg (``mce0``, ``mce1``, …)."""
    return name.startswith("mce") and name[3:].isdigit()


def route_changes(
    have: Iterable[StaticRoute], want: Iterable[StaticRoute]
) -> tuple[list[StaticRoute], list[StaticRoute]]:
    """(to delete, to add) turning the static routes ``have`` into ``want``; a destination whose next hop changed is
    replaced in place (listed in add only). Pure."""
    have_by = {r.destination: r for r in have}
    want_by = {r.destination: r for r in want}
    delete = sorted(r for d, r in have_by.items() if d not in want_by)
    add = sorted(r for d, r in want_by.items() if have_by.get(d) != r)
    return delete, add


async def read_routes(path: str) -> list[StaticRoute]:
    """The static routes a router programmed in the namespace at ``path`` (protocol :data:`ROUTE_PROTO`)."""
    async with ns_socket(path) as inside:
        names = {link["index"]: link.get("ifname") for link in await collect(inside.link("dump"))}
        found = []
        for m in await collect(inside.route("dump", family=socket.AF_INET)):
            if m["proto"] != ROUTE_PROTO or m["table"] != 254 or not m.get("gateway"):
                continue
            dst = ipaddress.IPv4Network(f"{m.get('dst') or '0.0.0.0'}/{m['dst_len']}")
            dev = names.get(m.get("oif"), "") or ""
            found.append(
                StaticRoute(dst, ipaddress.IPv4Address(m.get("gateway")), dev if dev.startswith(LINK_PREFIX) else "")
            )
        return sorted(found)


async def ensure_routes(path: str, want: Iterable[StaticRoute]) -> tuple[list[StaticRoute], list[StaticRoute]]:
    """Converge the static routes in the service namespace at ``path`` (main table, marked with protocol
    :data:`ROUTE_PROTO`, so the leg's default route and the kernel's connected routes are never touched) to exactly
    ``want``, by netlink. Idempotent; returns (deleted, added). A next hop that is not on-link raises
    :class:`NetworkError`."""
    delete, add = route_changes(await read_routes(path), want)
    if not (delete or add):
        return delete, add
    async with ns_socket(path) as inside:
        for r in delete:
            try:
                await inside.route("del", dst=str(r.destination), gateway=str(r.nexthop), proto=ROUTE_PROTO)
            except NetlinkError as e:
                if e.code != errno.ESRCH:
                    raise NetworkError(f"router: could not delete route {r.destination}: {e}") from e
        for r in add:
            try:
                if r.device:  # over a link to another network's namespace: on-link, the next hop is there
                    oif = (await get_link(inside, r.device) or {}).get("index")
                    if oif is None:
                        raise NetworkError(f"router: no link {r.device} for the route to {r.destination}")
                    await inside.route("replace", dst=str(r.destination), gateway=str(r.nexthop), oif=oif,
                                       flags=_RTNH_F_ONLINK, proto=ROUTE_PROTO)  # fmt: skip
                else:
                    await inside.route("replace", dst=str(r.destination), gateway=str(r.nexthop), proto=ROUTE_PROTO)
            except NetlinkError as e:
                raise NetworkError(f"router: could not route {r.destination} via {r.nexthop}: {e}") from e
    return delete, add


class FakeRouterPlumbing:
    """In-memory :class:`RouterPlumbing` for unit tests: ``plans`` maps a namespace path to its last plan."""

    def __init__(self) -> None:
        self.plans: dict[str, RouterPlan] = {}

    def applied(self) -> dict[str, RouterPlan]:
        return dict(self.plans)

    async def ensure(self, path: str, plan: RouterPlan | None) -> None:
        if plan is None:
            self.plans.pop(path, None)
        else:
            self.plans[path] = plan

    async def remove(self, path: str) -> None:
        self.plans.pop(path, None)
