"""The security-group compiler: a pure function from groups and a node's ports to the nftables ruleset text.

``compile_rules(groups, ports)`` returns one ``nft -f`` script that replaces the two tables ``bridge minicloud_sg``
and ``inet minicloud_sg`` atomically (``nft -f`` applies a file as one transaction: each table is declared, deleted
and declared again with its whole content, so no packet ever sees a half-applied ruleset and re-applying the same
text is a no-op in effect).

Two tables, because conntrack is not available in the ``bridge`` family on every kernel (``nf_conntrack_bridge``,
``CONFIG_NF_CONNTRACK_BRIDGE``, is unset on this project's CI and dev VMs), while ``br_netfilter`` is: with
``net.bridge.bridge-nf-call-iptables = 1`` (per network namespace; the node sets it) bridged IPv4 also passes the
``inet`` hooks, where conntrack works.

- ``bridge minicloud_sg`` — **stateless anti-spoofing** where a tap meets its bridge, on the bridge's prerouting
  hook at priority -300 (before ``br_netfilter`` hands the packet to conntrack and the ``inet`` hooks, so a spoofed
  packet never creates a conntrack entry). For each port a chain ``o_<port>`` for what the guest sends: only the port's MAC as Ethernet source, ARP only for its own MAC and
  addresses, IPv4 only from its addresses (DHCP discovery from ``0.0.0.0`` excepted), no other EtherType. Towards a
  port only ARP and IPv4 pass (the forward hook). After this, a source address seen on the bridge is trustworthy.
- ``inet minicloud_sg`` — **the stateful group rules** on the forward hook, reached through ``br_netfilter`` (there
  ``iifname``/``oifname`` are the bridge, not the tap: a port is matched by its bridge and its address):
  a set per group (``g_<group id>``: the IPv4 addresses of its members cluster-wide, which rules naming the group
  as remote match against); a verdict map sends traffic *from* a port to ``o_<port>`` (egress) and then traffic
  *to* a port to ``i_<port>`` (ingress). Both start with DHCP (client to server port 67 out, server to client port
  68 in: the node's DHCP server answers from its own address), then ``ct state established,related``, ``ct state
  invalid drop``, one statement per rule of the port's groups in that direction, then **drop** (default deny).
  An egress chain ends an allowed packet with ``return`` (so a packet between two ports of the node also passes the
  receiver's ingress chain), an ingress chain with ``accept``.

Traffic that enters and leaves through no port (the VXLAN device, a service namespace) passes both base chains;
a port without an address sends nothing but DHCP discovery. Output is deterministic: groups and ports sorted by id,
rules in the group's order, addresses sorted numerically — the golden tests depend on it.

Inputs are the frozen dataclasses below, built by the node from records; the function validates what would make an
invalid ruleset (``ValueError``) and otherwise trusts them (the API validated the rules).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

TABLE = "minicloud_sg"
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
    """A security group: its id, its rules and the IPv4 addresses of all its members (on every node)."""

    id: str
    rules: tuple[Rule, ...] = ()
    members: tuple[str, ...] = ()


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


def _ident(text: str) -> str:
    """An nft identifier from an id (``sg-ab12`` → ``sg_ab12``)."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", text)
    if not out or not out[0].isalpha():
        out = "x" + out
    return out


def _sorted_ips(ips: Iterable[str]) -> list[str]:
    return [str(a) for a in sorted({ipaddress.IPv4Address(a) for a in ips})]


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
    side = "saddr" if rule.direction == "ingress" else "daddr"
    parts = []
    if rule.remote_group is not None:
        if rule.remote_group not in known:
            raise ValueError(f"rule names group {rule.remote_group}, which is not among the groups given")
        parts.append(f"ip {side} @g_{_ident(rule.remote_group)}")
    elif rule.remote_cidr is not None and ipaddress.IPv4Network(rule.remote_cidr).prefixlen > 0:
        parts.append(f"ip {side} {ipaddress.IPv4Network(rule.remote_cidr)}")
    if rule.protocol == "icmp":
        parts.append("ip protocol icmp")
    ports = _ports(rule).strip()
    if rule.protocol in ("tcp", "udp"):
        parts.append(ports or f"ip protocol {rule.protocol}")
    return " ".join([*parts, verdict])


def _stateful(rules: Iterable[Rule], direction: str, known: set[str]) -> list[str]:
    """DHCP, conntrack, one statement per distinct rule of ``direction``, then the default drop. Only IPv4 reaches
    these chains (the verdict maps key on IPv4 addresses)."""
    verdict = "accept" if direction == "ingress" else "return"
    dhcp = "udp sport 67 udp dport 68" if direction == "ingress" else "udp sport 68 udp dport 67"
    statements = list(dict.fromkeys(_rule(r, known, verdict) for r in rules if r.direction == direction))
    return [
        f"\t\t{dhcp} {verdict}",
        f"\t\tct state established,related {verdict}",
        "\t\tct state invalid drop",
        *(f"\t\t{s}" for s in statements),
        "\t\tdrop",
    ]


def _vmap(key: str, entries: list[str]) -> list[str]:
    if not entries:
        return []
    if len(entries) == 1:
        return [f"\t\t{key} vmap {{ {entries[0]} }}"]
    return [f"\t\t{key} vmap {{", *(f"\t\t\t{e}," for e in entries[:-1]), f"\t\t\t{entries[-1]}", "\t\t}"]


def compile_rules(groups: Sequence[Group], ports: Sequence[Port]) -> str:
    """The nft script for ``ports`` under ``groups`` (see the module docstring). Pure and deterministic; raises
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
        for gid in p.groups:
            if gid not in known:
                raise ValueError(f"port {p.id} is in group {gid}, which is not among the groups given")
    seen: dict[tuple[str, str], str] = {}
    for p in ordered:
        for ip in _sorted_ips(p.ips):
            other = seen.setdefault((p.bridge, ip), p.id)
            if other != p.id:
                raise ValueError(f"ports {other} and {p.id} both have {ip} on {p.bridge}")

    lines = [
        f"table bridge {TABLE} {{}}",
        f"delete table bridge {TABLE}",
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        # -- stateless anti-spoofing on the taps
        f"table bridge {TABLE} {{",
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority -300; policy accept;",
        *(f'\t\tiifname "{p.device}" jump o_{_ident(p.id)}' for p in ordered),
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority 0; policy accept;",
        *(f'\t\toifname "{p.device}" ether type != {{ ip, arp }} drop' for p in ordered),
        "\t}",
    ]
    for p in ordered:
        ips = _sorted_ips(p.ips)
        own = f"{{ {', '.join(ips)} }}" if ips else ""
        lines.append(f"\tchain o_{_ident(p.id)} {{")
        lines.append(f"\t\tether saddr != {p.mac} drop")
        lines.append(f"\t\tether type arp arp saddr ether != {p.mac} drop")
        if own:
            lines.append(f"\t\tether type arp arp saddr ip != {own} drop")
            lines.append("\t\tether type arp accept")
        else:
            lines.append("\t\tether type arp drop")
        lines.append("\t\tether type != ip drop")
        lines.append("\t\tip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept")
        if own:
            lines.append(f"\t\tip saddr != {own} drop")
        else:  # no address yet: nothing but DHCP discovery leaves it
            lines.append("\t\tdrop")
        lines.append("\t}")
    lines.append("}")
    # -- the stateful group rules, reached through br_netfilter
    lines.append(f"table inet {TABLE} {{")
    for g in sorted(groups, key=lambda g: g.id):
        lines.append(f"\tset g_{_ident(g.id)} {{")
        lines.append("\t\ttype ipv4_addr")
        members = _sorted_ips(g.members)
        if members:
            lines.append(f"\t\telements = {{ {', '.join(members)} }}")
        lines.append("\t}")
    addressed = [p for p in ordered if p.ips]
    lines.append("\tchain forward {")
    lines.append("\t\ttype filter hook forward priority 0; policy accept;")
    out = [f'"{p.bridge}" . {ip} : jump o_{_ident(p.id)}' for p in addressed for ip in _sorted_ips(p.ips)]
    into = [f'"{p.bridge}" . {ip} : jump i_{_ident(p.id)}' for p in addressed for ip in _sorted_ips(p.ips)]
    lines.extend(_vmap("iifname . ip saddr", out))
    lines.extend(_vmap("oifname . ip daddr", into))
    lines.append("\t}")
    for p in addressed:
        rules = [r for gid in p.groups for r in by_id[gid].rules]
        lines.append(f"\tchain o_{_ident(p.id)} {{")
        lines.extend(_stateful(rules, "egress", known))
        lines.append("\t}")
        lines.append(f"\tchain i_{_ident(p.id)} {{")
        lines.extend(_stateful(rules, "ingress", known))
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"
