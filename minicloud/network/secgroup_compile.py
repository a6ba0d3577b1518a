"""The security-group compiler: pure functions from groups and a node's ports to the nftables ruleset.

``build(groups, ports)`` returns the ruleset as named pieces (:class:`Ruleset`: chains, sets, map elements);
``full_script(ruleset)`` the ``nft -f`` script that replaces the two tables ``bridge minicloud_sg`` and ``inet
minicloud_sg`` atomically (``nft -f`` applies a file as one transaction: each table is declared, deleted and declared
again with its whole content, so no packet ever sees a half-applied ruleset and re-applying the same text is a no-op
in effect); ``delta_script(old, new)`` the one transaction that changes only what differs (what the node applies on
a change; the full script at start-up, after a refused delta and periodically). ``compile_rules`` is
``full_script(build(...))``.

Two tables, because conntrack is not available in the ``bridge`` family on every kernel (``nf_conntrack_bridge``,
``CONFIG_NF_CONNTRACK_BRIDGE``, is unset on this project's CI and dev VMs), while ``br_netfilter`` is: with
``net.bridge.bridge-nf-call-iptables = 1`` (per network namespace; the node sets it) bridged IPv4 also passes the
``inet`` hooks, where conntrack works.

- ``bridge minicloud_sg`` — **stateless anti-spoofing** where a tap meets its bridge, on the bridge's prerouting
  hook at priority -300 (before ``br_netfilter`` hands the packet to conntrack and the ``inet`` hooks, so a spoofed
  packet never creates a conntrack entry), dispatched by the verdict map ``spoof`` (tap -> chain). For each port a
  chain ``o_<port>`` for what the guest sends: only the port's MAC as Ethernet source, ARP only for its own MAC and
  addresses, IPv4 only from its addresses (DHCP discovery from ``0.0.0.0`` excepted), no other EtherType. Towards a
  port only ARP and IPv4 pass (the forward hook). After this, a source address seen on the bridge is trustworthy.
  The guests of the node's default bridge are ports too, with ``stateful=False``: this table pins them the same way,
  and they have nothing in the ``inet`` table (no security groups there).
- ``inet minicloud_sg`` — **the stateful group rules** on the forward hook, reached through ``br_netfilter`` (there
  ``iifname``/``oifname`` are the bridge, not the tap: a port is matched by its bridge and its address):
  a set per group some rule names as remote (``g_<group id>``: its members cluster-wide as *bridge . address*
  pairs, ``type ifname . ipv4_addr``, matched by those rules as ``iifname . ip saddr @g_<group>`` (ingress) or
  ``oifname . ip daddr @g_<group>`` (egress); the bridge is the one of the member's network, and of each network a
  router connects it with, so routed traffic of a member still counts as the member's. Keyed by bridge because two
  networks of one project may use the same CIDR: a bare address would let a non-member through whose address equals
  a member's in the other network); the verdict map ``out`` sends traffic *from* a port to ``o_<port>`` (egress) and ``into``
  traffic *to* a port to ``i_<port>`` (ingress). Both start with DHCP (client to server port 67 out, server to
  client port 68 in: the node's DHCP server answers from its own address), then ``ct state established,related``,
  ``ct state invalid drop``, a jump to each of the port's groups' chains in that direction (``ge_<group>`` /
  ``gi_<group>``: one statement per distinct rule), then **drop** (default deny). An allowed egress packet goes to
  ``egress_ok`` (the receiver's ingress chain when it is a port of this node, so a packet between two ports of the
  node passes both; else accept), an allowed ingress packet is accepted.

- **Conntrack zones**: two networks on one node may use the same CIDR, and the node's one conntrack table would
  otherwise mix their connections (an entry of one matching a packet of the other with the same 5-tuple). In the
  ``inet`` table, the prerouting hook at priority -300 (before conntrack) puts every packet entering a network's
  bridge into that network's zone (``ct zone set iifname map @zones``: bridge -> :func:`conntrack_zone` of its
  VNI), so each network has its own connections.

Traffic that enters and leaves through no port (the VXLAN device, a service namespace) passes both base chains;
a port without an address sends nothing but DHCP discovery. Output is deterministic: groups and ports sorted by id,
rules in the group's order, addresses sorted numerically — the golden tests depend on it.

Inputs are the frozen dataclasses below, built by the node from records; the function validates what would make an
invalid ruleset (``ValueError``) and otherwise trusts them (the API validated the rules).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

TABLE = "minicloud_sg"
#: The type of a group set ``g_<group>``: a member is a bridge and an address, as in the ``out``/``into`` maps.
MEMBER_TYPE = "ifname . ipv4_addr"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DEVICE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class Rule:
    """An allow rule. ``remote_group`` (a group id) or ``remote_cidr`` (None for both: any address)."""

    direction: Literal["ingress", "egress"]
    protocol: Literal["tcp", "udp", "icmp", "any"] = "any"
    port_min: int | None = None
    port_max: int | None = None
    remote_cidr: str | None = None
    remote_group: str | None = None


@dataclass(frozen=True)
class Group:
    """A security group: its id, its rules and its members (on every node) as ``(bridge, IPv4 address)`` pairs: the
    bridge of the network the address is in (and of each network routed with it), where a packet from or to that
    member passes."""

    id: str
    rules: tuple[Rule, ...] = ()
    members: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Port:
    """A NIC on this node: ``device`` is its tap, ``bridge`` the bridge the tap is plugged into, ``mac`` and ``ips``
    what it may send from, ``groups`` the ids of its security groups (none: everything to and from it is dropped
    but ARP and DHCP)."""

    id: str
    device: str
    mac: str
    ips: tuple[str, ...]
    groups: tuple[str, ...] = field(default=())
    bridge: str = ""
    #: The conntrack zone of the port's network on this node (0: none, the node's default zone).
    zone: int = 0
    #: False: anti-spoofing only (a guest of the node's default bridge, which has no security groups): its chain in
    #: ``bridge minicloud_sg`` and nothing in ``inet minicloud_sg`` (``groups`` and ``zone`` are then ignored).
    stateful: bool = True


def conntrack_zone(vni: int) -> int:
    """A network's conntrack zone: its VNI folded into 1..65535 (zones are 16 bits; 0 is the node's own). Two
    networks share a zone only when their VNIs differ by a multiple of 65535."""
    return (vni - 1) % 65535 + 1


@functools.lru_cache(maxsize=1 << 16)
def _ident(text: str) -> str:
    """An nft identifier from an id (``sg-ab12`` → ``sg_ab12``)."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", text)
    if not out or not out[0].isalpha():
        out = "x" + out
    return out


def _sorted_ips(ips: Iterable[str]) -> tuple[str, ...]:
    return _sorted_tuple(tuple(ips))


@functools.lru_cache(maxsize=1 << 14)
def _sorted_tuple(ips: tuple[str, ...]) -> tuple[str, ...]:
    # cached: the node rebuilds the whole ruleset on every change, and parsing addresses was most of its cost
    return tuple(str(a) for a in sorted({ipaddress.IPv4Address(a) for a in ips}))


@functools.lru_cache(maxsize=1 << 14)
def _sorted_members(members: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """``g_<group>`` elements: ``"<bridge>" . <address>``, by bridge then address (numerically), deduplicated."""
    for bridge, _ in members:
        if not _DEVICE.match(bridge):
            raise ValueError(f"member bridge '{bridge}' is not an interface name")
    pairs = sorted({(b, ipaddress.IPv4Address(a)) for b, a in members})
    return tuple(f'"{b}" . {a}' for b, a in pairs)


def _ports(rule: Rule) -> str:
    if rule.protocol not in ("tcp", "udp"):
        if rule.port_min is not None or rule.port_max is not None:
            raise ValueError(f"a {rule.protocol} rule has no ports")
        return ""
    if rule.port_min is None:
        return ""
    hi = rule.port_max if rule.port_max is not None else rule.port_min
    if not 1 <= rule.port_min <= hi <= 65535:
        raise ValueError(f"bad port range {rule.port_min}-{hi}")
    return (
        f" {rule.protocol} dport {rule.port_min}"
        if rule.port_min == hi
        else f" {rule.protocol} dport {rule.port_min}-{hi}"
    )


def _rule(rule: Rule, known: set[str], verdict: str) -> str:
    """One nft statement for ``rule``; ingress matches the source address, egress the destination."""
    if rule.remote_group is not None and rule.remote_group not in known:
        raise ValueError(f"rule names group {rule.remote_group}, which is not among the groups given")
    return _statement(rule, verdict)


@functools.lru_cache(maxsize=1 << 16)
def _statement(rule: Rule, verdict: str) -> str:
    side = "saddr" if rule.direction == "ingress" else "daddr"
    parts = []
    if rule.remote_group is not None:  # the bridge the packet came in by (ingress) or leaves by (egress), and the peer
        dev = "iifname" if rule.direction == "ingress" else "oifname"
        parts.append(f"{dev} . ip {side} @g_{_ident(rule.remote_group)}")
    elif rule.remote_cidr is not None and ipaddress.IPv4Network(rule.remote_cidr).prefixlen > 0:
        parts.append(f"ip {side} {ipaddress.IPv4Network(rule.remote_cidr)}")
    if rule.protocol == "icmp":
        parts.append("ip protocol icmp")
    ports = _ports(rule).strip()
    if rule.protocol in ("tcp", "udp"):
        parts.append(ports or f"ip protocol {rule.protocol}")
    return " ".join([*parts, verdict])


#: The inet chain an allowed egress packet continues in: the receiver's ingress chain when it is a port of this node
#: (the ``into`` map), else accept.
EGRESS_OK = "egress_ok"


def _port_chain(groups: Sequence[str], direction: str) -> tuple[str, ...]:
    """A port's stateful chain: DHCP, conntrack, a jump to each of its groups' chains of ``direction``, then the
    default drop. Only IPv4 reaches these chains (the verdict maps key on IPv4 addresses)."""
    if direction == "ingress":
        verdict, dhcp, prefix = "accept", "udp sport 67 udp dport 68", "gi_"
    else:
        verdict, dhcp, prefix = f"goto {EGRESS_OK}", "udp sport 68 udp dport 67", "ge_"
    return (
        f"{dhcp} {verdict}",
        f"ct state established,related {verdict}",
        "ct state invalid drop",
        *(f"jump {prefix}{_ident(g)}" for g in groups),
        "drop",
    )


def _group_chain(group: Group, direction: str, known: set[str]) -> tuple[str, ...]:
    """One statement per distinct rule of ``direction``; what matches none returns to the port's chain."""
    verdict = "accept" if direction == "ingress" else f"goto {EGRESS_OK}"
    return tuple(dict.fromkeys(_rule(r, known, verdict) for r in group.rules if r.direction == direction))


def _spoof_chain(p: Port) -> tuple[str, ...]:
    ips = _sorted_ips(p.ips)
    own = f"{{ {', '.join(ips)} }}" if ips else ""
    lines = [f"ether saddr != {p.mac} drop", f"ether type arp arp saddr ether != {p.mac} drop"]
    if own:
        lines += [f"ether type arp arp saddr ip != {own} drop", "ether type arp accept"]
    else:
        lines.append("ether type arp drop")
    lines += ["ether type != ip drop", "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept"]
    lines.append(f"ip saddr != {own} drop" if own else "drop")  # no address yet: nothing but DHCP discovery leaves
    return tuple(lines)


@dataclass(frozen=True)
class Ruleset:
    """The compiled ruleset as named pieces, what :func:`delta_script` diffs: chains (name -> rule lines) of both
    tables, the group sets (name -> elements), and the elements of the maps and sets that dispatch to the chains
    (key -> verdict). Dicts keep the deterministic order :func:`build` gave them."""

    #: ``bridge``: the anti-spoofing chain of each port (``o_<port>``).
    bridge_chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: ``bridge`` map ``spoof``: ``"<tap>"`` -> ``jump o_<port>`` (set ``taps`` holds the same keys).
    spoof: dict[str, str] = field(default_factory=dict)
    #: ``inet``: ``g_<group>`` -> its members as ``"<bridge>" . <ip>``, for the groups a rule here names as remote.
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: ``inet`` maps ``out``/``into``: ``"<bridge>" . <ip>`` -> ``jump o_<port>`` / ``jump i_<port>``.
    out: dict[str, str] = field(default_factory=dict)
    into: dict[str, str] = field(default_factory=dict)
    #: ``inet`` map ``zones``: ``"<bridge>"`` -> its network's conntrack zone.
    zones: dict[str, str] = field(default_factory=dict)
    #: ``inet``: ``egress_ok``, then ``ge_``/``gi_<group>`` of the groups of this node's ports, then ``o_``/``i_<port>``.
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)


def build(groups: Sequence[Group], ports: Sequence[Port]) -> Ruleset:
    """The ruleset for ``ports`` under ``groups`` (see the module docstring). Pure and deterministic; raises
    ``ValueError`` for a port naming an unknown group, a bad MAC, device, bridge or address, or an impossible
    rule."""
    by_id = {g.id: g for g in groups}
    if len(by_id) != len(groups):
        raise ValueError("a group is given twice")
    known = set(by_id)
    for g in groups:  # every rule, used by a port here or not: a bad one is an error wherever it is
        for r in g.rules:
            _rule(r, known, "accept")
    ordered = sorted(ports, key=lambda p: p.id)
    for p in ordered:
        if not _MAC.match(p.mac):
            raise ValueError(f"port {p.id}: '{p.mac}' is not a lowercase MAC address")
        if not _DEVICE.match(p.device):
            raise ValueError(f"port {p.id}: '{p.device}' is not an interface name")
        if p.ips and not _DEVICE.match(p.bridge):
            raise ValueError(f"port {p.id}: bridge '{p.bridge}' is not an interface name")
        for gid in p.groups if p.stateful else ():
            if gid not in known:
                raise ValueError(f"port {p.id} is in group {gid}, which is not among the groups given")
    seen: dict[tuple[str, str], str] = {}
    zones: dict[str, int] = {}
    taps: dict[str, str] = {}
    for p in ordered:
        if taps.setdefault(p.device, p.id) != p.id:
            raise ValueError(f"ports {taps[p.device]} and {p.id} both have the tap {p.device}")
        if p.zone and p.ips and p.stateful:
            if not 0 < p.zone <= 65535:
                raise ValueError(f"port {p.id}: conntrack zone {p.zone} is not in 1..65535")
            if zones.setdefault(p.bridge, p.zone) != p.zone:
                raise ValueError(f"bridge {p.bridge} has ports in zones {zones[p.bridge]} and {p.zone}")
        for ip in _sorted_ips(p.ips):
            other = seen.setdefault((p.bridge, ip), p.id)
            if other != p.id:
                raise ValueError(f"ports {other} and {p.id} both have {ip} on {p.bridge}")

    out = Ruleset()
    for p in ordered:
        out.bridge_chains[f"o_{_ident(p.id)}"] = _spoof_chain(p)
        out.spoof[f'"{p.device}"'] = f"jump o_{_ident(p.id)}"
    addressed = [p for p in ordered if p.ips and p.stateful]
    used = sorted({g for p in addressed for g in p.groups})
    remote = {r.remote_group for g in used for r in by_id[g].rules if r.remote_group is not None}
    for gid in sorted(remote):
        out.sets[f"g_{_ident(gid)}"] = _sorted_members(by_id[gid].members)
    for bridge in sorted(zones):
        out.zones[f'"{bridge}"'] = str(zones[bridge])
    out.chains[EGRESS_OK] = ("oifname . ip daddr vmap @into", "accept")
    for gid in used:
        out.chains[f"ge_{_ident(gid)}"] = _group_chain(by_id[gid], "egress", known)
        out.chains[f"gi_{_ident(gid)}"] = _group_chain(by_id[gid], "ingress", known)
    for p in addressed:
        mine = tuple(dict.fromkeys(p.groups))
        out.chains[f"o_{_ident(p.id)}"] = _port_chain(mine, "egress")
        out.chains[f"i_{_ident(p.id)}"] = _port_chain(mine, "ingress")
        for ip in _sorted_ips(p.ips):
            out.out[f'"{p.bridge}" . {ip}'] = f"jump o_{_ident(p.id)}"
            out.into[f'"{p.bridge}" . {ip}'] = f"jump i_{_ident(p.id)}"
    return out


def _elements(items: Iterable[str]) -> str:
    return f"{{ {', '.join(items)} }}"


def _body(kind: str, name: str, head: Sequence[str], elements: Sequence[str]) -> list[str]:
    lines = [f"\t{kind} {name} {{", *(f"\t\t{h}" for h in head)]
    if elements:
        lines.append(f"\t\telements = {_elements(elements)}")
    return [*lines, "\t}"]


def full_script(rs: Ruleset) -> str:
    """The ``nft -f`` script replacing both tables with ``rs`` in one transaction (start-up, drift repair)."""
    lines = [
        f"table bridge {TABLE} {{}}",
        f"delete table bridge {TABLE}",
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        # -- stateless anti-spoofing on the taps
        f"table bridge {TABLE} {{",
        *_body("map", "spoof", ["type ifname : verdict"], [f"{k} : {v}" for k, v in rs.spoof.items()]),
        *_body("set", "taps", ["type ifname"], list(rs.spoof)),
        *_body("chain", "prerouting", ["type filter hook prerouting priority -300; policy accept;",
                                       "iifname vmap @spoof"], []),
        *_body("chain", "forward", ["type filter hook forward priority 0; policy accept;",
                                    "oifname @taps ether type != { ip, arp } drop"], []),
    ]  # fmt: skip
    for name, body in rs.bridge_chains.items():
        lines += _body("chain", name, body, [])
    lines.append("}")
    # -- the stateful group rules, reached through br_netfilter
    lines.append(f"table inet {TABLE} {{")
    for name, members in rs.sets.items():
        lines += _body("set", name, [f"type {MEMBER_TYPE}"], members)
    for name, entries in (("out", rs.out), ("into", rs.into)):
        lines += _body("map", name, ["type ifname . ipv4_addr : verdict"], [f"{k} : {v}" for k, v in entries.items()])
    lines += _body("map", "zones", ["typeof iifname : ct zone"], [f"{k} : {v}" for k, v in rs.zones.items()])
    lines += _body("chain", "prerouting", ["type filter hook prerouting priority -300; policy accept;",
                                           "ct zone set iifname map @zones"], [])  # fmt: skip
    lines += _body("chain", "forward", ["type filter hook forward priority 0; policy accept;",
                                        "iifname . ip saddr vmap @out", "oifname . ip daddr vmap @into"], [])  # fmt: skip
    for name, body in rs.chains.items():
        lines += _body("chain", name, body, [])
    lines.append("}")
    return "\n".join(lines) + "\n"


def _element_delta(table: str, name: str, old: dict[str, str], new: dict[str, str]) -> tuple[list[str], list[str]]:
    """(delete, add) commands turning map (or set: values "") ``old`` into ``new``; a changed value is both."""
    gone = [k for k, v in old.items() if new.get(k) != v]
    came = [f"{k} : {v}" if v else k for k, v in new.items() if old.get(k) != v]
    delete = [f"delete element {table} {name} {_elements(gone)}"] if gone else []
    add = [f"add element {table} {name} {_elements(came)}"] if came else []
    return delete, add


def delta_script(old: Ruleset, new: Ruleset) -> str:
    """The ``nft -f`` script that turns the kernel's ``old`` ruleset into ``new`` in one transaction, touching only
    what differs: set elements added/deleted, new chains declared, changed chains flushed and refilled, map elements
    added/deleted, then chains and sets no longer referenced deleted. "" when nothing differs. Applying it to tables
    that do not hold exactly ``old`` fails (nft refuses an unknown chain/element) or leaves drift: the caller then
    applies :func:`full_script`."""
    br, inet = f"bridge {TABLE}", f"inet {TABLE}"
    cmds: list[str] = []
    for name, members in new.sets.items():
        have = old.sets.get(name)
        if have is None:
            cmds.append(f"add set {inet} {name} {{ type {MEMBER_TYPE}; }}")
        dele, add = _element_delta(inet, name, dict.fromkeys(have or (), ""), dict.fromkeys(members, ""))
        cmds += dele + add
    pairs = ((br, old.bridge_chains, new.bridge_chains), (inet, old.chains, new.chains))
    for table, have, want in pairs:
        cmds += [f"add chain {table} {name}" for name in want if name not in have]
    for table, have, want in pairs:
        for name, body in want.items():
            if have.get(name) == body:
                continue
            if name in have:
                cmds.append(f"flush chain {table} {name}")
            cmds += [f"add rule {table} {name} {line}" for line in body]
    deletes: list[str] = []
    adds: list[str] = []
    for table, name, have_map, want_map in (
        (br, "spoof", old.spoof, new.spoof),
        (br, "taps", dict.fromkeys(old.spoof, ""), dict.fromkeys(new.spoof, "")),
        (inet, "out", old.out, new.out),
        (inet, "into", old.into, new.into),
        (inet, "zones", old.zones, new.zones),
    ):
        dele, add = _element_delta(table, name, have_map, want_map)
        deletes += dele
        adds += add
    cmds += deletes + adds
    for table, have, want in pairs:  # port chains before the group chains they jump to (reverse of building)
        cmds += [f"delete chain {table} {name}" for name in reversed(have) if name not in want]
    cmds += [f"delete set {inet} {name}" for name in old.sets if name not in new.sets]
    return "".join(f"{c}\n" for c in cmds)


def compile_rules(groups: Sequence[Group], ports: Sequence[Port]) -> str:
    """The full ``nft -f`` script for ``ports`` under ``groups``: ``full_script(build(groups, ports))``."""
    return full_script(build(groups, ports))
