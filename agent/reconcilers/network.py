"""The network reconciler: converges this node's overlay data plane to the port, network, subnet, security-group
and node records.

Keys: a **network id** per VPC network (its devices, service namespace, dnsmasq and metadata service on this node)
and :data:`NODE_KEY` (the node's security-group ruleset, publishing this node's underlay address, and the sweep of
networks no record wants here any more). A port change queues its network and the node key; a network or subnet
change its network; a security group change the node key; a node change every network built here.

``reconcile(network id)``, level-triggered and idempotent:

- no port of the network on this node (or no network record, or an external network): stop its metadata service
  and dnsmasq, remove the service namespace (veth, nft table) and the bridge + VXLAN device, and tell
  :class:`~agent.net.nodenetworks.NodeNetworks` it is gone;
- otherwise compute the desired state (:func:`desired_network`, pure) and converge: bridge + VXLAN (local address =
  this node's underlay address), one flooding entry per other node with a port of the network, a static FDB entry
  and a neighbour entry per remote port, the service namespace (gateways + 169.254.169.254, the VNI's MAC, an nft
  table keeping that MAC off the VXLAN device), dnsmasq (static hosts of this node's ports, DNS for every port),
  the metadata service; then ``NodeNetworks.built`` so the compute reconciler plugs NICs.

A restarted agent adopts everything: the drivers change nothing that matches (same ifindexes), dnsmasq is adopted by
its pid file and command line; only the metadata listener (in the agent's process) is opened again.

Underlay addresses: a node publishes ``network.underlay_address`` (when set) as the label :data:`UNDERLAY_LABEL` of
its ``node`` record; other nodes use that label, else the record's address, else (single node, no record)
127.0.0.1.

Growth: a network reconcile reads that network's ports and floating IPs only (indexed by ``network`` and
``port_network``); the node key lists every port of the cluster (security groups' members are cluster-wide: ~16 ms
at 2,000 ports on SQLite); the metadata service reads this node's ports only (indexed by ``node``).
Security-group changes are applied as deltas of the ruleset last applied (``secgroup_compile.delta_script``).

The node's **default bridge** has no security groups, but its guests (this node's instances without NICs) are ports
of the same ruleset, anti-spoofing only (``stateful=False``): each one's tap (``agent.net.default.guest_tap``) is
pinned to its MAC and to the fixed address the compute reconciler gave it (``NodeNetworks.default_addresses``), from
its creation until it is stopped or its record goes. An instance change queues the node key only when that changes;
the compute side's ``NodeNetworks.guests_changed`` queues it too, and it reports what the kernel holds
(``NodeNetworks.set_guarded``) so that a guest is started only once its rules are in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from agent.compute.design import mac_for
from agent.net.common import NetworkError
from agent.net.default import guest_tap
from agent.net.dhcp import DhcpHost, DhcpServer, DhcpSpec, DhcpSubnet, DnsRecord
from agent.net.firewall import NftFirewall, NftTable
from agent.net.metadata import InstanceMetadata, MetadataServer
from agent.net.nodenetworks import NodeNetworks, tap_name
from agent.net.overlay import FdbEntry, Neighbour, OverlayDriver, OverlaySpec, bridge_name
from agent.net.router import (
    ExternalLeg,
    FakeRouterPlumbing,
    FloatingLeg,
    PeerLink,
    RouterPlan,
    RouterPlumbing,
    StaticRoute,
    routed_mac,
)
from agent.net.service import INNER_NAME, ProviderServiceSpec, ServiceSpec, provider_key, provider_mac, service_mac
from agent.reconcile import Result, update_record
from minicloud import errors
from minicloud.cluster.kinds import NODE
from minicloud.compute.kinds import INSTANCE
from minicloud.network import networks as networks_service
from minicloud.network import routers as routers_service
from minicloud.network import secgroup_compile as sgc
from minicloud.network.default_vpc import HOST_PROVIDER
from minicloud.network.kinds import (
    FLOATING_IP,
    NETWORK,
    PORT,
    ROUTER,
    SECURITY_GROUP,
    SUBNET,
    FloatingIpSpec,
    NetworkSpec,
    PortSpec,
    RouterSpec,
    SubnetSpec,
)
from minicloud.state import Change, Record, Store, list_all

log = logging.getLogger("minicloud.network.node")

#: The node-wide key: security-group ruleset, underlay label, sweep. No record id looks like it.
NODE_KEY = ":node"
#: The label on a ``node`` record that carries its underlay address (when configured apart from its address).
UNDERLAY_LABEL = "underlay"
#: How soon to look again when a network cannot be converged for a reason no record will announce.
_RETRY = 5.0
_LABEL_BAD = re.compile(r"[^a-z0-9-]+")

Port = Any  # Obj[PortSpec, Any]


# -- pure: names -----------------------------------------------------------------------------------------------------
def dns_label(name: str) -> str | None:
    """``name`` as a DNS label (lowercase, other characters as ``-``), or None if nothing usable is left."""
    label = _LABEL_BAD.sub("-", name.lower()).strip("-")[:63].strip("-")
    return label or None


# -- pure: underlay ----------------------------------------------------------------------------------------------------
def parse_address(value: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address from a node record's address (``IP`` or ``IP:port``); None for anything else."""
    text = value.strip()
    for candidate in (text, text.rsplit(":", 1)[0].strip("[]")):
        try:
            return ipaddress.IPv4Address(candidate)
        except ValueError:
            continue
    return None


def underlay_addresses(
    nodes: Iterable[Record], me: str, configured: str
) -> tuple[ipaddress.IPv4Address, dict[str, ipaddress.IPv4Address]]:
    """(this node's underlay address, every node's by name): a node's ``underlay`` label, else its record's
    address; this node's configured address wins for itself; 127.0.0.1 when nothing says."""
    out: dict[str, ipaddress.IPv4Address] = {}
    for r in nodes:
        addr = parse_address(r.labels.get(UNDERLAY_LABEL, "")) or parse_address(NODE.load(r).spec.address)
        if addr is not None:
            out[r.name] = addr
    local = parse_address(configured) if configured else None
    if local is None:
        local = out.get(me, ipaddress.IPv4Address("127.0.0.1"))
    out[me] = local
    return local, out


# -- pure: the desired state of one network on this node ---------------------------------------------------------------
@dataclass(frozen=True)
class DesiredNetwork:
    network_id: str
    overlay: OverlaySpec
    peers: frozenset[ipaddress.IPv4Address]
    fdb: tuple[FdbEntry, ...]
    neighbours: tuple[Neighbour, ...]
    service: ServiceSpec
    #: None when no subnet has a port here (nothing to serve by DHCP).
    dhcp: DhcpSpec | None
    hosts: tuple[DhcpHost, ...]
    records: tuple[DnsRecord, ...]
    #: Ports that name a node without a known underlay address (not reachable yet).
    unreachable: tuple[str, ...] = ()
    #: What routers need in the service namespace (None: no subnet of the network is attached to a router).
    router: RouterPlan | None = None


def desired_network(
    network_id: str,
    network: NetworkSpec,
    network_name: str,
    subnets: dict[str, SubnetSpec],
    ports: Sequence[tuple[str, PortSpec]],
    names: dict[str, str],
    me: str,
    local: ipaddress.IPv4Address,
    underlay: dict[str, ipaddress.IPv4Address],
    routed_here: bool = False,
) -> DesiredNetwork | None:
    """What network ``network_id`` needs on node ``me``, from its records; None when nothing (no port here, no
    VNI). ``ports`` are (port id, spec) of this network, any node; ``names`` instance id -> instance name.
    ``routed_here``: a network sharing a router with it has a port here, so it is built here too (without a port
    of its own: no DHCP host) for the router to reach its NICs elsewhere. Pure."""
    if network.vni is None or network.external:
        return None
    mine = [(pid, p) for pid, p in ports if here(p, me)]
    if not mine and not routed_here:
        return None
    smac = service_mac(network.vni)
    fdb: dict[str, FdbEntry] = {}
    neighbours: dict[ipaddress.IPv4Address, Neighbour] = {}
    peers: set[ipaddress.IPv4Address] = set()
    unreachable: list[str] = []
    for pid, p in sorted(ports, key=lambda x: x[0]):
        if not p.node or p.node == me:
            continue
        vtep = underlay.get(p.node)
        if vtep is None:
            unreachable.append(pid)
            continue
        if vtep != local:
            peers.add(vtep)
        if p.arriving != me:
            # An arriving guest gets no static entry here: until it comes, frames for it flood to its node (a
            # peer); once it runs here, the bridge learns its tap from its first frame (QEMU announces it).
            fdb[p.mac.lower()] = FdbEntry(p.mac, vtep)
        neighbours[ipaddress.IPv4Address(p.address)] = Neighbour(p.address, p.mac)
    live = sorted(
        ((sid, s) for sid, s in subnets.items() if not s.deleting), key=lambda x: ipaddress.IPv4Network(x[1].cidr)
    )
    gateways = [ipaddress.IPv4Interface(f"{s.gateway}/{ipaddress.IPv4Network(s.cidr).prefixlen}") for _, s in live]
    for gw in gateways:
        # the gateway answers locally on every node: its ARP never needs to cross the rack
        neighbours.setdefault(gw.ip, Neighbour(gw.ip, smac))
    net_label = dns_label(network_name) or "net"
    # DHCP: one dnsmasq per network per node (one DHCP socket per interface) serving every subnet with a port on
    # this node (each gateway address is on the service port): static hosts of this node's ports only.
    # Upstream name servers: those of every served subnet, in order.
    local_subnets = {p.subnet for _, p in mine}
    served = [(gw, sid, s) for gw, (sid, s) in zip(gateways, live, strict=True) if sid in local_subnets]
    dhcp = None
    hosts: list[DhcpHost] = []
    if served:
        first = served[0][0]
        dhcp = DhcpSpec(
            network=net_label,
            interface=INNER_NAME,
            server=first,
            mtu=network.mtu,
            router=first.ip,
            upstream_dns=tuple(dict.fromkeys(d for _, _, s in served for d in s.dns_servers)) or None,
            more=tuple(DhcpSubnet(gw, gw.ip) for gw, _, _ in served[1:]),
        )
        ids = {sid for _, sid, _ in served}
        hosts = [
            DhcpHost(p.mac, p.address, _host_name(pid, p, names))
            for pid, p in sorted(mine, key=lambda x: x[0])
            if p.subnet in ids
        ]
    records = tuple(
        DnsRecord(_host_name(pid, p, names), p.address)
        for pid, p in sorted(ports, key=lambda x: x[0])
        if p.instance and dns_label(names.get(p.instance, "")) is not None
    )
    return DesiredNetwork(
        network_id=network_id,
        overlay=OverlaySpec(vni=network.vni, local=local, mtu=network.mtu),
        peers=frozenset(peers),
        fdb=tuple(fdb[m] for m in sorted(fdb)),
        neighbours=tuple(neighbours[ip] for ip in sorted(neighbours)),
        service=ServiceSpec(vni=network.vni, mtu=network.mtu, addresses=tuple(gateways)),
        dhcp=dhcp,
        hosts=tuple(hosts),
        records=records,
        unreachable=tuple(unreachable),
    )


@dataclass(frozen=True)
class DesiredExternal:
    """What an external network needs on this node while NICs of it plug straight into its provider here: the
    provider bridge, and a DHCP port on it serving those NICs' addresses (the LAN's router is their gateway)."""

    network_id: str
    bridge: str
    mtu: int
    label: str
    gateway: ipaddress.IPv4Address
    dns: tuple[str, ...]
    hosts: tuple[DhcpHost, ...]


def desired_external(
    network_id: str,
    network: NetworkSpec,
    network_name: str,
    subnets: Mapping[str, SubnetSpec],
    ports: Sequence[tuple[str, PortSpec]],
    names: dict[str, str],
    me: str,
    providers: Mapping[str, str],
) -> tuple[DesiredExternal | None, str | None]:
    """(what external network ``network_id`` needs on node ``me``, why this node cannot build it): (None, None)
    when no NIC of it is here. Its provider must name a Linux bridge of the node in ``[network.providers]`` (checked
    by the driver); ``host`` (the nodes' default bridges, with their own DHCP) takes no NIC: an instance without
    ``--nic`` sits there already. The gateway is the subnet's; the guests' name servers the subnet's, else the
    gateway. Pure."""
    mine = [(pid, p) for pid, p in ports if here(p, me)]
    if not network.external or not mine:
        return None, None
    if network.provider == HOST_PROVIDER:
        return None, (
            f"external network {network_name} is the nodes' default bridges: an instance without --nic is there "
            "already; give a NIC on another external network, or a VPC NIC and a floating IP"
        )
    bridge = providers.get(network.provider)
    if not bridge:
        return None, (
            f"node {me} has no provider '{network.provider}' of external network {network_name}: name a Linux bridge "
            f"of its LAN under [network.providers] in the node's config"
        )
    live = sorted((sid, sub) for sid, sub in subnets.items() if not sub.deleting)
    if not live:
        return None, None
    _, subnet = live[0]
    gateway = ipaddress.IPv4Address(subnet.gateway)
    hosts = tuple(DhcpHost(p.mac, p.address, _host_name(pid, p, names)) for pid, p in sorted(mine, key=lambda x: x[0]))
    return DesiredExternal(
        network_id=network_id,
        bridge=bridge,
        mtu=network.mtu,
        label=dns_label(network_name) or "net",
        gateway=gateway,
        dns=tuple(subnet.dns_servers) or (str(gateway),),
        hosts=hosts,
    ), None


def external_zone(network_id: str) -> int:
    """An external network's conntrack zone on the nodes its NICs plug into: 61440-65535 by its id's SHA-256 (VPCs
    take theirs from their VNI, :func:`~minicloud.network.secgroup_compile.conntrack_zone`, from 1 up)."""
    return 65535 - int(provider_key(network_id)[:6], 16) % 4096


def desired_router(
    vni: int,
    subnets: Mapping[str, SubnetSpec],
    routers: Mapping[str, RouterSpec],
    externals: Mapping[str, tuple[NetworkSpec, SubnetSpec]],
    providers: Mapping[str, str],
    floating: Sequence[tuple[str, FloatingIpSpec]] = (),
    *,
    external: bool = True,
    addresses: Mapping[str, str] | None = None,
    arriving: Sequence[tuple[str, FloatingIpSpec]] = (),
) -> tuple[RouterPlan | None, str | None]:
    """(what the routers of a network's subnets need in its service namespace on this node, a reason the external
    leg is missing or None). ``subnets``: the network's subnets by id; ``routers``: the routers they name, by id;
    ``externals``: external network id -> (its spec, the subnet the routers' addresses are in); ``providers``: this
    node's ``[network.providers]``. One external leg per router with an external gateway (by router id:
    ``mce0``, ``mce1``, …), each SNATing its router's subnets of this network (the extra legs by policy routing). Static routes: each router's whose next hop is in one
    of its subnets of this network (one via another network's subnet goes over the link to that network's
    namespace: :func:`desired_peers`).
    ``floating``: (id, spec) of the floating IPs
    associated with this node's NICs of the network; those on the leg's external network whose NIC address is in
    one of the leg's subnets are NATed 1:1 here; ``arriving``: those of NICs arriving here by live migration, SNAT
    only (their NIC leaves as its floating IP from its first packet here). ``external`` False (no NIC of the network
    here or arriving): no external leg. (Each node's leg has its own address and MAC, so a leg built before a
    migrating guest comes takes nobody's traffic.)
    ``addresses``: router id -> this node's leg address (``RouterSpec.node_addresses``); a router without one here
    gets no leg (the reason says so); None: each router's ``external_address``. Pure."""
    attached = {sid: s.router for sid, s in subnets.items() if s.router and not s.deleting and s.router in routers}
    if not attached:
        return None, None
    # static routes: those whose next hop is on one of the router's subnets of this network (one per destination,
    # the first router by id wins)
    by_destination: dict[ipaddress.IPv4Network, StaticRoute] = {}
    for rid in sorted(set(attached.values())):
        nets = [ipaddress.IPv4Network(subnets[sid].cidr) for sid, owner in attached.items() if owner == rid]
        for rt in routers[rid].routes:
            route = StaticRoute(ipaddress.IPv4Network(rt.destination), ipaddress.IPv4Address(rt.nexthop))
            if any(route.nexthop in net for net in nets):
                by_destination.setdefault(route.destination, route)
    routes = tuple(sorted(by_destination.values()))
    legs: list[ExternalLeg] = []
    fips: list[FloatingLeg] = []
    coming: list[FloatingLeg] = []
    missing: str | None = None
    for rid in sorted(set(attached.values())) if external else ():
        r = routers[rid]
        if not (r.external_network and r.external_address):
            continue
        ext = externals.get(r.external_network)
        if ext is None:
            missing = missing or f"external network {r.external_network} of router {rid} is gone"
            continue
        net, sub = ext
        interface = providers.get(net.provider)
        if interface is None:
            missing = missing or f"no [network.providers] {net.provider!r} on this node (router {rid})"
            continue
        mine = r.external_address if addresses is None else addresses.get(rid)
        if not mine:
            missing = missing or f"router {rid} has no external address for this node yet"
            continue
        sources = tuple(
            sorted(ipaddress.IPv4Network(subnets[sid].cidr) for sid, owner in attached.items() if owner == rid)
        )
        leg = ExternalLeg(
            router_id=rid,
            interface=interface,
            address=ipaddress.IPv4Interface(f"{mine}/{ipaddress.IPv4Network(sub.cidr).prefixlen}"),
            gateway=ipaddress.IPv4Address(sub.gateway),
            sources=sources,
            index=len(legs),
            primary=mine == r.external_address,
        )
        legs.append(leg)
        coming += [
            FloatingLeg(fid, ipaddress.IPv4Address(f.address), ipaddress.IPv4Address(f.fixed_address), leg.index)
            for fid, f in sorted(arriving, key=lambda x: x[0])
            if f.network == r.external_network
            and f.fixed_address
            and any(ipaddress.IPv4Address(f.fixed_address) in net for net in sources)
        ]
        fips += [
            FloatingLeg(fid, ipaddress.IPv4Address(f.address), ipaddress.IPv4Address(f.fixed_address), leg.index)
            for fid, f in sorted(floating, key=lambda x: x[0])
            if f.network == r.external_network
            and f.fixed_address
            and any(ipaddress.IPv4Address(f.fixed_address) in net for net in sources)
        ]
    if not legs:
        return RouterPlan(vni, routes=routes), missing
    return RouterPlan(vni, legs[0], tuple(fips), more=tuple(legs[1:]), routes=routes, arriving=tuple(coming)), missing


def desired_peers(
    network_id: str,
    routers: Mapping[str, RouterSpec],
    subnets: Mapping[str, SubnetSpec],
    vnis: Mapping[str, int],
    path_of: Callable[[int], str],
    wanted: Iterable[str],
) -> tuple[PeerLink, ...]:
    """The links from network ``network_id``'s namespace to the other networks of its routers (``routers``: those
    of its subnets) that are ``wanted`` on this node: ``subnets`` are every subnet of those routers by id (any
    network), ``vnis`` network id -> VNI. Each peer: its attached subnets and the destinations of the routers'
    static routes whose next hop is on them, via its first gateway. Routing is not transitive: only networks sharing
    a router are peers. Pure."""
    wanted = set(wanted)
    ids = {rid for rid in routers}
    by_peer: dict[str, list[SubnetSpec]] = {}
    for s in subnets.values():
        if s.network != network_id and s.router in ids and not s.deleting and s.network in wanted and s.network in vnis:
            by_peer.setdefault(s.network, []).append(s)
    out = []
    for nid, subs in by_peer.items():
        nets = sorted(ipaddress.IPv4Network(s.cidr) for s in subs)
        first = min(subs, key=lambda s: ipaddress.IPv4Network(s.cidr))
        destinations = set(nets)
        for rid in sorted({s.router for s in subs}):
            for rt in routers[rid].routes:
                if any(ipaddress.IPv4Address(rt.nexthop) in n for n in nets):
                    destinations.add(ipaddress.IPv4Network(rt.destination))
        out.append(
            PeerLink(
                vni=vnis[nid],
                path=path_of(vnis[nid]),
                nexthop=ipaddress.IPv4Address(first.gateway),
                destinations=tuple(sorted(destinations)),
            )
        )
    return tuple(sorted(out))


def here(p: PortSpec, me: str) -> bool:
    """Whether node ``me`` plugs the NIC: it runs its instance, or the instance is migrating to it (the network, the
    NIC's DHCP host and firewall chain are ready before the guest arrives; both nodes have them meanwhile)."""
    return p.node == me or (p.arriving == me and bool(p.node))


def _host_name(port_id: str, p: PortSpec, names: dict[str, str]) -> str:
    label = dns_label(names.get(p.instance, ""))
    if label is None:
        return dns_label(port_id) or "port"
    return label if p.index == 0 else f"{label}-{p.index}"[:63]


# -- pure: the security-group compiler's inputs ------------------------------------------------------------------------
def compile_inputs(
    groups: Sequence[tuple[str, Any]],
    ports: Sequence[tuple[str, PortSpec]],
    me: str,
    bridges: Mapping[str, str] | None = None,
    zones: Mapping[str, int] | None = None,
    routed: Mapping[str, Iterable[str]] | None = None,
) -> tuple[list[sgc.Group], list[sgc.Port]]:
    """(groups, this node's ports) for :func:`~minicloud.network.secgroup_compile.build`: each group with
    its rules and its members' addresses cluster-wide; each local port with its tap, its network's bridge (from
    ``bridges``: network id -> bridge name), MAC, address and the groups of its that exist (a port naming a deleted
    group just loses that group's rules). A port whose network has no bridge in ``bridges`` gets no address (it
    sends nothing but DHCP discovery until it has). ``zones``: network id -> its conntrack zone. ``groups`` are (id, SecurityGroupSpec). Rules naming a group
    that no longer exists are dropped. A member is a (bridge, address) pair, the bridge of its network and of each
    network ``routed`` (network id -> the networks a router connects it with) names: two networks with the same
    CIDR must not share members. Pure."""
    bridges = bridges or {}
    zones = zones or {}
    routed = routed or {}
    known = {gid for gid, _ in groups}
    members: dict[str, set[tuple[str, str]]] = {gid: set() for gid in known}
    for _, p in ports:
        nets = {p.network, *routed.get(p.network, ())}
        where = sorted(bridges[n] for n in nets if bridges.get(n))
        for gid in p.security_groups:
            if gid in members and p.address:
                members[gid].update((b, p.address) for b in where)
    out_groups = []
    for gid, spec in sorted(groups, key=lambda g: g[0]):
        rules = tuple(
            sgc.Rule(
                direction=r.direction,
                protocol=r.protocol,
                port_min=r.port_min,
                port_max=r.port_max,
                remote_cidr=r.remote_cidr,
                remote_group=r.remote_group,
            )
            for r in spec.rules
            if r.remote_group is None or r.remote_group in known
        )
        out_groups.append(sgc.Group(id=gid, rules=rules, members=tuple(sorted(members[gid]))))
    out_ports = [
        sgc.Port(
            id=pid,
            device=tap_name(pid),
            mac=p.mac.lower(),
            ips=(p.address,) if bridges.get(p.network) else (),
            groups=tuple(g for g in dict.fromkeys(p.security_groups) if g in known),
            bridge=bridges.get(p.network, ""),
            zone=zones.get(p.network, 0),
        )
        for pid, p in sorted(ports, key=lambda x: x[0])
        if here(p, me)
    ]
    return out_groups, out_ports


# -- the reconciler ----------------------------------------------------------------------------------------------------
class NetworkReconciler:
    """See the module docstring. Drivers are injected (fakes in unit tests); ``dhcp_factory(spec, state_dir,
    netns_path)`` makes a DHCP server, ``metadata_factory(netns_path, lookup)`` a metadata server."""

    name = "network"
    kinds = frozenset(
        {
            PORT.name,
            NETWORK.name,
            SUBNET.name,
            SECURITY_GROUP.name,
            NODE.name,
            ROUTER.name,
            FLOATING_IP.name,
            INSTANCE.name,  # the default bridge's guests: anti-spoofing while they run
        }
    )

    def __init__(
        self,
        *,
        store: Store,
        node: str,
        underlay_address: str,
        overlay: OverlayDriver,
        services: Any,
        firewall: NftFirewall | Any,
        node_networks: NodeNetworks,
        state_dir: Path,
        dhcp_factory: Callable[[DhcpSpec, Path, str], Any] | None = None,
        metadata_factory: Callable[[str, Any], Any] | None = None,
        routers: RouterPlumbing | Any | None = None,
        providers: Mapping[str, str] | None = None,
        drift_repair_interval: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.node = node
        self.underlay_address = underlay_address
        self.overlay = overlay
        self.services = services
        self.firewall = firewall
        self.node_networks = node_networks
        self.state_dir = state_dir
        self.dhcp_factory = dhcp_factory or (lambda spec, d, ns: DhcpServer(spec, d, netns=ns))
        self.metadata_factory = metadata_factory or (lambda ns, lookup: MetadataServer(ns, lookup))
        self._enqueue: Callable[[str], None] = lambda key: None
        #: network id -> VNI of what this process built (so a deleted record's devices can go at once).
        self._vnis: dict[str, int] = {}
        #: router id -> its spec and labels as last seen: a change of its status alone (the egress counters each node
        #: reports, agent/reconcilers/egress.py) changes nothing this reconciler builds, so it queues nothing.
        self._router_seen: dict[str, bytes] = {}
        #: instance id -> whether its anti-spoofing rules are wanted, for this node's default-bridge guests as last
        #: seen: an instance change queues the ruleset only when that changes.
        self._guests_seen: dict[str, bool] = {}
        self._dhcp: dict[str, Any] = {}
        self._metadata: dict[str, Any] = {}
        #: Network id -> the other networks of its routers, as last read (a port change queues them too: whether
        #: they are built here depends on its NICs).
        self._routed_with: dict[str, set[str]] = {}
        #: External network id -> its DHCP port as this process last ensured it (NICs of it plug in here).
        self._externals: dict[str, ProviderServiceSpec] = {}
        #: External networks this process made sure have nothing on this node (see ``_teardown_external``).
        self._externals_clean: set[str] = set()
        #: The security-group ruleset in the kernel as this process applied it: None (not known yet: start-up), ""
        #: (our tables are absent) or what was applied last (changes are applied as deltas from it).
        self._ruleset: sgc.Ruleset | str | None = None
        self._ruleset_full_at = 0.0
        #: How often (seconds) the whole ruleset is replaced even without a change, repairing drift.
        self.drift_repair_interval = drift_repair_interval
        self.clock = clock
        #: The routers' side of the service namespaces, and this node's ``[network.providers]``.
        self.routers = routers or FakeRouterPlumbing()  # the agent passes the real one (agent/node.py)
        self.providers = dict(providers or {})

    # -- the framework's side --------------------------------------------------------------------------------------
    def built_vnis(self) -> dict[str, int]:
        """Network id -> VNI of every network this process built on the node (a copy; for the metrics collector)."""
        return dict(self._vnis)

    async def start(self, enqueue: Callable[[str], None]) -> None:
        self._enqueue = enqueue
        self.node_networks.on_landed(lambda nid: self._enqueue(nid))
        if self.node_networks.default_bridge is not None:
            self.node_networks.on_guests_changed(lambda: self._enqueue(NODE_KEY))

    async def close(self) -> None:
        for server in list(self._metadata.values()):
            with contextlib.suppress(Exception):
                await server.stop()
        self._metadata.clear()
        await self.overlay.close()
        await self.services.close()

    def keys_for(self, change: Change) -> Iterable[str]:
        rec = change.record
        if change.kind == PORT.name:
            network = PORT.load(rec).spec.network
            yield network
            yield from sorted(self._routed_with.get(network, ()))
            yield NODE_KEY
        elif change.kind == NETWORK.name:
            yield change.id
        elif change.kind == SUBNET.name:
            yield SUBNET.load(rec).spec.network
        elif change.kind == SECURITY_GROUP.name:
            yield NODE_KEY
        elif change.kind == NODE.name:
            yield from self._vnis
            yield NODE_KEY
        elif change.kind == INSTANCE.name:
            if self._guest_changed(change):
                yield NODE_KEY
        elif change.kind in (ROUTER.name, FLOATING_IP.name):  # (a subnet change queues its own network)
            if change.kind == ROUTER.name and not self._router_changed(change):
                return
            yield from self._vnis
            if change.kind == ROUTER.name:  # the networks it connects share their groups' members' bridges
                yield NODE_KEY

    def _guest_changed(self, change: Change) -> bool:
        if self.node_networks.default_bridge is None:
            return False
        wanted = None if change.type == "deleted" else self._guest_wanted(INSTANCE.load(change.record))
        if wanted is None:
            return self._guests_seen.pop(change.id, None) is not None
        if self._guests_seen.get(change.id) == wanted:
            return False
        self._guests_seen[change.id] = wanted
        return True

    def _guest_wanted(self, inst: Any) -> bool | None:
        """None: not a guest of this node's default bridge; else whether its anti-spoofing rules are wanted: from
        its creation until it is stopped (its record's removal ends it too)."""
        if inst.spec.node != self.node or inst.spec.nics:
            return None
        return not (inst.spec.power == "stopped" and inst.status.state == "stopped")

    async def _default_guests(self) -> list[sgc.Port]:
        """The default bridge's guests on this node as ports of the compiler: anti-spoofing only, pinned to the MAC
        and fixed address the compute side gave them, on the tap it names. A guest without an address here yet is
        left out: one starting is started only once pinned to its address, and one already running (arrived by
        live migration, its record just moved here) must not be cut off (pinned to no address: IPv4 dropped) for the
        moment until the compute side gives it its address — that blackholed a migrated guest for seconds."""
        bridge = self.node_networks.default_bridge
        if bridge is None:
            return []
        addresses = self.node_networks.default_addresses()
        out = []
        for r in await list_all(self.store, INSTANCE.name, where={"node": self.node}):
            inst = INSTANCE.load(r)
            if not self._guest_wanted(inst):
                continue
            mac = mac_for(inst.id, 0)
            ip = addresses.get(mac)
            if ip:
                out.append(
                    sgc.Port(id=inst.id, device=guest_tap(inst.id), mac=mac, ips=(ip,), bridge=bridge, stateful=False)
                )
        return out

    def _router_changed(self, change: Change) -> bool:
        if change.type == "deleted":
            self._router_seen.pop(change.id, None)
            return True
        seen = msgspec.json.encode([change.record.spec, change.record.labels])
        if self._router_seen.get(change.id) == seen:
            return False
        self._router_seen[change.id] = seen
        return True

    async def all_keys(self) -> list[str]:
        ports = await list_all(self.store, PORT.name, where={"node": self.node})
        nets = {PORT.load(r).spec.network for r in ports}
        # and those of guests migrating here (no index on ``arriving``: every port, as the node key reads them)
        nets |= {p.network for _, p in await self._ports() if p.arriving == self.node and here(p, self.node)}
        return [*sorted(nets | set(self._vnis)), NODE_KEY]

    async def reconcile(self, key: str) -> Result:
        if key == NODE_KEY:
            return await self._reconcile_node()
        if not key:
            return Result()
        return await self._reconcile_network(key)

    # -- reading ---------------------------------------------------------------------------------------------------
    async def _underlay(self) -> tuple[ipaddress.IPv4Address, dict[str, ipaddress.IPv4Address]]:
        nodes = await list_all(self.store, NODE.name)
        return underlay_addresses(nodes, self.node, self.underlay_address)

    async def _ports(self) -> list[tuple[str, PortSpec]]:
        return [(r.id, PORT.load(r).spec) for r in await list_all(self.store, PORT.name)]

    async def desired(self, network_id: str) -> tuple[DesiredNetwork | None, int | None]:
        """(what the network needs here, its VNI) from the records."""
        record = await self.store.get(NETWORK.name, network_id)
        if record is None:
            return None, None
        net = NETWORK.load(record)
        ports, subnets, names = await self._network_records(net)
        local, underlay = await self._underlay()
        # the other networks of its routers: it is built here too while one of them has a NIC here
        routers, router_subnets, vnis = await self._routed_networks(network_id, subnets)
        self._routed_with[network_id] = set(vnis) - {network_id}
        with_nics = {
            nid
            for nid in self._routed_with[network_id]
            if any(
                here(PORT.load(r).spec, self.node)
                for r in await list_all(self.store, PORT.name, where={"network": nid})
            )
        }
        want = desired_network(
            network_id,
            net.spec,
            net.name,
            subnets,
            ports,
            names,
            self.node,
            local,
            underlay,
            routed_here=bool(with_nics),
        )
        if want is not None and net.spec.vni is not None:
            # a guest arriving by live migration that runs here already (its domain resumed) is ours for its
            # floating IPs; one still on its way gets their SNAT only
            nn = self.node_networks
            for pid, p in ports:
                if p.arriving != self.node:
                    nn.forget_landed(pid)
            arriving = [(pid, p) for pid, p in ports if p.arriving == self.node and p.node and p.node != self.node]
            mine = {p.address: pid for pid, p in ports if p.node == self.node}
            mine.update({p.address: pid for pid, p in arriving if nn.is_landed(pid)})
            coming = {p.address: pid for pid, p in arriving if not nn.is_landed(pid)}
            plan = await self._router_plan(net.spec.vni, subnets, network_id, mine, coming)
            if plan is not None:
                own = tuple(sorted(str(a.ip) for a in want.service.want_addresses))
                # peers built here: all of them while it has NICs here (each shares a router with it), else those
                # with NICs here or built here anyway
                own_nics = any(here(p, self.node) for _, p in ports)
                wanted = self._routed_with[network_id] if own_nics else with_nics | set(self._vnis)
                peers = desired_peers(network_id, routers, router_subnets, vnis, self.services.path, wanted)
                plan = dataclasses.replace(plan, routed_mac=routed_mac(net.spec.vni, str(local)), own=own, peers=peers)
                want = dataclasses.replace(want, router=plan)
        return want, net.spec.vni

    async def _network_records(
        self, net: Any, *, local_names: bool = False
    ) -> tuple[list[tuple[str, PortSpec]], dict[str, SubnetSpec], dict[str, str]]:
        """(its ports by id (any node; indexed: this network's only), its subnets by id, instance id -> name of
        the instances of its ports, or of this node's only)."""
        ports = [(r.id, PORT.load(r).spec) for r in await list_all(self.store, PORT.name, where={"network": net.id})]
        subnets: dict[str, SubnetSpec] = {}
        for sid in net.spec.subnets:
            if (rec := await self.store.get(SUBNET.name, sid)) is not None:
                subnets[sid] = SUBNET.load(rec).spec
        names: dict[str, str] = {}
        for iid in {p.instance for _, p in ports if p.instance and (not local_names or here(p, self.node))}:
            if (inst := await self.store.get(INSTANCE.name, iid)) is not None:
                names[iid] = inst.name
        return ports, subnets, names

    async def _routed_networks(
        self, network_id: str, subnets: Mapping[str, SubnetSpec]
    ) -> tuple[dict[str, RouterSpec], dict[str, SubnetSpec], dict[str, int]]:
        """(the routers of the network's subnets, every subnet they have by id, network id -> VNI of the networks
        of those subnets, this one included)."""
        routers: dict[str, RouterSpec] = {}
        for rid in {s.router for s in subnets.values() if s.router and not s.deleting}:
            rec = await self.store.get(ROUTER.name, rid)
            if rec is not None:
                routers[rid] = ROUTER.load(rec).spec
        all_subnets: dict[str, SubnetSpec] = dict(subnets)
        for r in routers.values():
            for sid in r.subnets:
                if sid not in all_subnets and (rec := await self.store.get(SUBNET.name, sid)) is not None:
                    all_subnets[sid] = SUBNET.load(rec).spec
        vnis: dict[str, int] = {}
        for nid in {sub.network for sid, sub in all_subnets.items() if sub.router in routers or sid in subnets}:
            rec = await self.store.get(NETWORK.name, nid)
            if rec is not None and (vni := NETWORK.load(rec).spec.vni) is not None:
                vnis[nid] = vni
        return routers, all_subnets, vnis

    async def _router_plan(
        self,
        vni: int,
        subnets: dict[str, SubnetSpec],
        network_id: str,
        mine: Mapping[str, str],
        coming: Mapping[str, str] | None = None,
    ) -> RouterPlan | None:
        """``mine``: address -> port id of this node's ports of the network; ``coming``: of those arriving here."""
        coming = coming or {}
        routers: dict[str, RouterSpec] = {}
        externals: dict[str, tuple[NetworkSpec, SubnetSpec]] = {}
        for rid in {s.router for s in subnets.values() if s.router}:
            rec = await self.store.get(ROUTER.name, rid)
            if rec is None:
                continue
            r = routers[rid] = ROUTER.load(rec).spec
            if r.external_network and r.external_subnet and r.external_network not in externals:
                nrec = await self.store.get(NETWORK.name, r.external_network)
                srec = await self.store.get(SUBNET.name, r.external_subnet)
                if nrec is not None and srec is not None:
                    externals[r.external_network] = (NETWORK.load(nrec).spec, SUBNET.load(srec).spec)
        floating, arriving = [], []
        if any(r.external_network for r in routers.values()):
            for rec in await list_all(self.store, FLOATING_IP.name, where={"port_network": network_id}):  # indexed
                f = FLOATING_IP.load(rec).spec
                if f.port_network == network_id and mine.get(f.fixed_address) == f.port:
                    floating.append((rec.id, f))
                elif f.port_network == network_id and coming.get(f.fixed_address) == f.port:
                    arriving.append((rec.id, f))
        addresses: dict[str, str] = {}
        for rid, r in routers.items() if mine or coming else ():  # this node's address of each router with a gateway
            if r.external_network and r.external_address:
                try:
                    address = r.node_addresses.get(self.node) or await routers_service.node_address(
                        self.store, rid, self.node
                    )
                except errors.MinicloudError as exc:
                    log.warning("no external address for this node's leg", extra={"router": rid, "error": str(exc)})
                    continue
                if address:
                    addresses[rid] = address
        plan, missing = desired_router(
            vni,
            subnets,
            routers,
            externals,
            self.providers,
            floating,
            external=bool(mine or coming),
            addresses=addresses,
            arriving=arriving,
        )
        if missing:
            log.warning("router without its external side on this node", extra={"vni": vni, "reason": missing})
        return plan

    # -- one network -----------------------------------------------------------------------------------------------
    async def _reconcile_network(self, network_id: str) -> Result:
        record = await self.store.get(NETWORK.name, network_id)
        if (record is None and network_id in self._externals) or (
            record is not None and NETWORK.load(record).spec.external
        ):
            return await self._reconcile_external(network_id, record)
        want, vni = await self.desired(network_id)
        if want is None:
            vni = self._vnis.get(network_id, vni)
            if vni is not None:
                await self._teardown(network_id, vni)
            self.node_networks.gone(network_id)
            return Result()
        try:
            await self._converge(want)
        except (NetworkError, ValueError) as exc:
            log.warning("network not converged; retrying", extra={"network": network_id, "error": str(exc)})
            return Result(requeue_after=_RETRY)
        if want.unreachable:
            log.warning("ports on nodes without a known underlay address", extra={"ports": list(want.unreachable)})
            return Result(requeue_after=_RETRY)
        return Result()

    async def _converge(self, want: DesiredNetwork) -> None:
        vni = want.overlay.vni
        previous = self._vnis.get(want.network_id)
        if previous is None:  # newly built here: the other networks of its routers link to it (or are built too)
            for peer in sorted(self._routed_with.get(want.network_id, ())):
                self._enqueue(peer)
        if previous is not None and previous != vni:
            await self._teardown(want.network_id, previous)
        self._vnis[want.network_id] = vni
        await self.overlay.ensure_network(want.overlay)
        await self.overlay.set_peers(vni, want.peers)
        await self.overlay.set_fdb(vni, want.fdb)
        await self.overlay.set_neighbours(vni, want.neighbours)
        state = await self.services.ensure(want.service)
        await self.routers.ensure(state.netns, want.router)
        await self._ensure_dhcp(want, state.netns)
        await self._ensure_metadata(want.network_id, state.netns)
        self.node_networks.built(want.network_id, bridge_name(vni))

    async def _ensure_dhcp(self, want: DesiredNetwork, netns: str) -> None:
        if want.dhcp is None:
            server = self._dhcp.pop(want.network_id, None)
            if server is not None:
                await server.stop()
            return
        await self._ensure_dhcp_server(want.network_id, want.dhcp, netns, want.hosts, want.records)

    async def _ensure_dhcp_server(
        self, nid: str, spec: DhcpSpec, netns: str, hosts: Iterable[DhcpHost], records: Iterable[DnsRecord]
    ) -> None:
        server = self._dhcp.get(nid)
        if server is None or server.spec != spec:
            server = self._dhcp[nid] = self.dhcp_factory(spec, self.state_dir / nid, netns)
        await server.ensure(hosts, records)

    async def _stop_dhcp(self, network_id: str) -> None:
        """Stop the network's dnsmasq here (adopted or not) and remove its files. Idempotent."""
        dhcp = self._dhcp.pop(network_id, None)
        if dhcp is None and network_id:
            dhcp = _Stopper(self.state_dir / network_id)
        if dhcp is not None:
            await dhcp.stop()
        if network_id:  # its log too: a network that leaves a node leaves no file behind
            await asyncio.to_thread(shutil.rmtree, self.state_dir / network_id, True)

    async def _ensure_metadata(self, network_id: str, netns: str) -> None:
        if network_id in self._metadata:
            return
        server = self.metadata_factory(netns, self._lookup_for(network_id))
        await server.start()
        self._metadata[network_id] = server

    async def _teardown(self, network_id: str, vni: int) -> None:
        """Everything of the network on this node, in reverse order of building. Idempotent."""
        self.node_networks.gone(network_id)
        server = self._metadata.pop(network_id, None)
        if server is not None:
            await server.stop()
        await self._stop_dhcp(network_id)
        await self.services.remove(vni)
        await self.routers.remove(self.services.path(vni))  # the router's side went with the namespace
        await self.overlay.remove_network(vni)
        self._vnis.pop(network_id, None)
        for peer in sorted(self._routed_with.pop(network_id, ())):  # their links to it went with its namespace
            self._enqueue(peer)
        log.info("network removed from this node", extra={"network": network_id, "vni": vni})

    # -- external networks: NICs straight on the provider's LAN ----------------------------------------------------
    async def desired_external(
        self, network_id: str, record: Record | None
    ) -> tuple[DesiredExternal | None, str | None]:
        if record is None:
            return None, None
        net = NETWORK.load(record)
        ports, subnets, names = await self._network_records(net, local_names=True)
        return desired_external(network_id, net.spec, net.name, subnets, ports, names, self.node, self.providers)

    async def _reconcile_external(self, network_id: str, record: Record | None) -> Result:
        """A NIC of an external network on this node plugs into the provider bridge itself (no overlay); this node's
        DHCP port on that bridge (an address of the subnet, in namespace ``<prefix>x<key>``) serves its address."""
        want, reason = await self.desired_external(network_id, record)
        if want is None:
            await self._teardown_external(network_id)
            if reason:  # its instances fail their build with this instead of waiting for ever
                log.warning("external network not built on this node", extra={"network": network_id, "reason": reason})
                self.node_networks.failed(network_id, reason)
                return Result(requeue_after=_RETRY * 6)
            return Result()
        try:
            address = await networks_service.node_dhcp_address(self.store, network_id, self.node)
        except errors.MinicloudError as exc:
            self.node_networks.failed(network_id, f"no DHCP address for node {self.node}: {exc}")
            return Result(requeue_after=_RETRY * 6)
        if address is None:  # its subnet is being deleted
            return Result(requeue_after=_RETRY)
        spec = ProviderServiceSpec(
            network_id=network_id,
            bridge=want.bridge,
            mtu=want.mtu,
            address=address,
            mac=provider_mac(network_id, self.node),
        )
        self._externals[network_id] = spec  # what to remove, even if this pass fails half way
        self._externals_clean.discard(network_id)
        try:
            netns = await self.services.ensure_provider(spec)
            dhcp = DhcpSpec(
                network=want.label,
                interface=INNER_NAME,
                server=address,
                mtu=want.mtu,
                router=want.gateway,
                upstream_dns=want.dns,
                dns=False,
            )
            await self._ensure_dhcp_server(network_id, dhcp, netns, want.hosts, ())
        except (NetworkError, ValueError) as exc:
            reason = f"provider '{want.bridge}' of external network {want.label} on node {self.node}: {exc}"
            log.warning("external network not built on this node", extra={"network": network_id, "reason": reason})
            self.node_networks.failed(network_id, reason)
            return Result(requeue_after=_RETRY * 6)
        self.node_networks.built(network_id, want.bridge)
        return Result()

    async def _teardown_external(self, network_id: str) -> None:
        """This node's DHCP port of the external network, its dnsmasq, files and address. Idempotent; once per
        process for a network it never built (a port change elsewhere queues every node)."""
        spec = self._externals.pop(network_id, None)
        self.node_networks.gone(network_id)
        if spec is None and network_id in self._externals_clean:
            return
        self._externals_clean.add(network_id)
        await self._stop_dhcp(network_id)
        await self.services.remove_provider(provider_key(network_id))
        if spec is not None:
            log.info("external network removed from this node", extra={"network": network_id})
        await networks_service.release_node_dhcp_address(self.store, network_id, self.node)

    # -- metadata --------------------------------------------------------------------------------------------------
    def _lookup_for(self, network_id: str) -> Any:
        async def lookup(ip: str) -> InstanceMetadata | None:
            return await self.metadata_for(network_id, ip)

        return lookup

    async def metadata_for(self, network_id: str, ip: str) -> InstanceMetadata | None:
        """What the metadata service tells the guest of the port of ``network_id`` on this node with address
        ``ip`` (None: no such port here)."""
        for r in await list_all(self.store, PORT.name, where={"node": self.node}):  # indexed: this node's only
            p = PORT.load(r).spec
            if p.network == network_id and p.node == self.node and p.address == ip and p.instance:
                record = await self.store.get(INSTANCE.name, p.instance)
                if record is None:
                    return None
                inst = INSTANCE.load(record)
                return InstanceMetadata(
                    instance_id=inst.id,
                    hostname=dns_label(inst.name) or inst.id,
                    local_ipv4=p.address,
                    mac=p.mac.lower(),
                    public_keys=tuple(inst.spec.public_keys),
                    user_data=inst.spec.user_data.encode(),
                )
        return None

    # -- the node key ----------------------------------------------------------------------------------------------
    async def _reconcile_node(self) -> Result:
        try:
            await self._publish_underlay()
            await self._sweep()
        finally:  # last: a kernel that refuses the ruleset must not stop the sweep, nor a failed sweep the ruleset
            await self._apply_ruleset()  # (the default bridge's guests wait for it to start)
        return Result()

    async def _publish_underlay(self) -> None:
        want = self.underlay_address

        def mutate(record: Record) -> Record | None:
            labels = dict(record.labels)
            if want:
                labels[UNDERLAY_LABEL] = want
            else:
                labels.pop(UNDERLAY_LABEL, None)
            return None if labels == record.labels else msgspec.structs.replace(record, labels=labels)

        record = await self.store.get_by_name(NODE.name, "", self.node)
        if record is not None:
            await update_record(self.store, NODE.name, record.id, mutate)

    async def _apply_ruleset(self) -> None:
        ports = [(pid, p) for pid, p in await self._ports()]
        groups = [(r.id, SECURITY_GROUP.load(r).spec) for r in await list_all(self.store, SECURITY_GROUP.name)]
        bridges, zones = {}, {}
        for r in await list_all(self.store, NETWORK.name):
            spec = NETWORK.load(r).spec
            if spec.vni is not None:
                bridges[r.id] = bridge_name(spec.vni)
                zones[r.id] = sgc.conntrack_zone(spec.vni)
            elif spec.external and spec.provider != HOST_PROVIDER and self.providers.get(spec.provider):
                bridges[r.id] = self.providers[spec.provider]  # its NICs plug straight into the provider bridge
                zones[r.id] = external_zone(r.id)
        subnet_net = {r.id: SUBNET.load(r).spec.network for r in await list_all(self.store, SUBNET.name)}
        routed: dict[str, set[str]] = {}
        for r in await list_all(self.store, ROUTER.name):  # a member's routed traffic arrives on the other bridges
            nets = {subnet_net[s] for s in ROUTER.load(r).spec.subnets if s in subnet_net}
            for n in nets:
                routed.setdefault(n, set()).update(nets - {n})
        g, p = compile_inputs(groups, ports, self.node, bridges, zones, routed)
        guests = await self._default_guests()
        await self._converge_ruleset(g, [*p, *guests])
        # what the kernel now has (an exception above leaves the guests waiting): the compute side starts them
        self.node_networks.set_guarded({x.device: x.ips for x in guests})

    async def _converge_ruleset(self, g: list[sgc.Group], p: list[sgc.Port]) -> None:
        tables = [NftTable("bridge", sgc.TABLE), NftTable("inet", sgc.TABLE)]
        if not p:
            if self._ruleset == "":
                return
            if self._ruleset is None:  # first look since start: touch nftables only if our tables are there
                try:
                    present = set(tables) & set(await self.firewall.list_tables(sgc.TABLE))
                except NetworkError as exc:
                    log.warning("cannot list nftables tables", extra={"error": str(exc)})
                    return
                if not present:
                    self._ruleset = ""
                    return
            await self.firewall.delete_tables(tables)
            self._ruleset = ""
            return
        model = sgc.build(g, p)
        now = self.clock()
        if isinstance(self._ruleset, sgc.Ruleset) and now - self._ruleset_full_at < self.drift_repair_interval:
            # Incremental: one transaction touching only the changed ports' chains, groups' chains and elements.
            script = sgc.delta_script(self._ruleset, model)
            if not script:
                return
            try:
                await self.firewall.apply(script)
            except NetworkError as exc:  # the kernel's tables are not what we applied last (drift): rebuild them
                log.warning("security-group change refused; replacing the whole ruleset", extra={"error": str(exc)})
            else:
                self._ruleset = model
                return
        # The whole ruleset: at start-up (adopting whatever is there), after a refused change, and every
        # drift_repair_interval (someone's `nft flush ruleset`, a sysctl turned off). The stateful rules are in the
        # inet family and see bridged IPv4 only through br_netfilter: make sure it is on in this namespace (the
        # kernel's default, but a host may have turned it off). The default bridge's guests alone need no stateful
        # rule, so not br_netfilter either.
        if any(x.stateful for x in p):
            await self.firewall.enable_bridge_netfilter()
        await self.firewall.apply(sgc.full_script(model))
        self._ruleset, self._ruleset_full_at = model, now

    async def _sweep(self) -> None:
        """Remove networks built here that no record wants here any more (e.g. deleted while the agent was down)."""
        wanted: set[int] = set()
        vni_of: dict[int, str] = {}
        externals: dict[str, str] = {}  # provider key -> external network id with a NIC here
        for r in await list_all(self.store, PORT.name, where={"node": self.node}):
            nid = PORT.load(r).spec.network
            rec = await self.store.get(NETWORK.name, nid)
            vni = NETWORK.load(rec).spec.vni if rec is not None else None
            if vni is not None:
                wanted.add(vni)
                vni_of[vni] = nid
            elif rec is not None and NETWORK.load(rec).spec.external:
                externals[provider_key(nid)] = nid
        wanted_ids = set(vni_of.values()) | set(externals.values()) | set(self._externals)
        for key in await self.services.list_providers():  # external networks' DHCP ports no NIC here needs
            if key not in externals and key not in {provider_key(n) for n in self._externals}:
                log.warning("removing an external network's DHCP port no NIC here needs", extra={"key": key})
                await self.services.remove_provider(key)
        for nid in set(externals.values()) - set(self._externals):
            self._enqueue(nid)
        if await asyncio.to_thread(self.state_dir.is_dir):
            for entry in await asyncio.to_thread(lambda: sorted(self.state_dir.iterdir())):
                if entry.is_dir() and entry.name not in wanted_ids and entry.name not in self._dhcp:
                    await _Stopper(entry).stop()  # a dnsmasq of a network gone while we were down
        # What this node's namespace holds (bridges, VXLAN devices): a service namespace is only ever removed with
        # its network's devices, never on its own (namespaces of another node could share the directory).
        present = {s.vni for s in await self.overlay.list_networks()}
        known = {v: k for k, v in self._vnis.items()}
        if present - wanted:
            # a network built for a guest migrating here has no port of this node yet; one built for a router has
            # none at all, but a network sharing the router has
            for r in await list_all(self.store, NETWORK.name):
                vni = NETWORK.load(r).spec.vni
                if vni not in present - wanted:
                    continue
                subnets = {sid: SUBNET.load(x).spec for sid in NETWORK.load(r).spec.subnets
                           if (x := await self.store.get(SUBNET.name, sid)) is not None}  # fmt: skip
                _, _, vnis = await self._routed_networks(r.id, subnets)
                for nid in sorted(set(vnis) | {r.id}):
                    if any(here(PORT.load(p).spec, self.node)
                           for p in await list_all(self.store, PORT.name, where={"network": nid})):  # fmt: skip
                        wanted.add(vni)
                        break
        for vni in sorted(present - wanted):
            nid = known.get(vni, "")
            log.warning("removing a network no port here needs", extra={"vni": vni, "network": nid})
            await self._teardown(nid, vni)
        for vni in wanted - present:
            self._enqueue(vni_of[vni])


class _Stopper:
    """Stops a dnsmasq this process did not start (adopted after a restart) by its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    async def stop(self) -> None:
        if not await asyncio.to_thread(self.state_dir.is_dir):
            return
        spec = DhcpSpec(network="x", interface="x", server=ipaddress.IPv4Interface("10.0.0.1/24"), mtu=1450)
        await DhcpServer(spec, self.state_dir).stop()
