"""The security-group compiler: a pure function from groups and a node's ports to the nftables ruleset text.

``compile_rules(groups, ports)`` returns one ``nft -f`` script that replaces the table ``bridge minicloud_sg``
atomically (``nft -f`` applies a file as one transaction: the table is declared, deleted and declared again with its
whole content, so no packet ever sees a half-applied ruleset and re-applying the same text is a no-op in effect).

What it enforces, in the ``bridge`` family on the node's bridges (the filter runs where a tap meets its bridge):

- **a set per group** (``g_<group id>``): the IPv4 addresses of the group's members cluster-wide, which rules
  naming the group as remote match against;
- for each port, two chains: ``o_<port>`` for what the guest sends (anti-spoofing first: only the port's MAC as
  Ethernet source, ARP only for its own MAC and addresses, IPv4 only from its addresses — DHCP discovery from
  ``0.0.0.0`` excepted — and no other EtherType) and ``i_<port>`` for what it receives;
- conntrack-stateful: ``ct state established,related accept`` and ``ct state invalid drop`` first in both chains,
  then one ``accept`` per rule of the port's groups in that direction, then **drop** (default deny). ARP to a port
  is accepted (address resolution is not filtered by groups; its spoofing is, on the sending side), and so are DHCP
  replies (server port 67 to client port 68: the node's DHCP server answers from its own address).

Traffic that enters and leaves through no port (the VXLAN device, a router's namespace) passes the base chain.
Output is deterministic: groups and ports sorted by id, rules in the group's order, addresses sorted numerically —
the golden tests depend on it.

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
    """A NIC on this node: ``device`` is its tap, ``mac`` and ``ips`` what it may send from, ``groups`` the ids of
    its security groups (none: everything to and from it is dropped but ARP and DHCP discovery)."""

    id: str
    device: str
    mac: str
    ips: tuple[str, ...]
    groups: tuple[str, ...] = field(default=())


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


def _rule(rule: Rule, known: set[str]) -> str:
    """One nft statement for ``rule``; ingress matches the source address, egress the destination."""
    side = "saddr" if rule.direction == "ingress" else "daddr"
    parts = []
    if rule.remote_group is not None:
        if rule.remote_group not in known:
            raise ValueError(f"rule names group {rule.remote_group}, which is not among the groups given")
        parts.append(f"ip {side} @g_{_ident(rule.remote_group)}")
    elif rule.remote_cidr is not None and ipaddress.IPv4Network(rule.remote_cidr).prefixlen > 0:
        parts.append(f"ip {side} {ipaddress.IPv4Network(rule.remote_cidr)}")
    else:
        parts.append("ether type ip")
    if rule.protocol == "icmp":
        parts.append("ip protocol icmp")
    ports = _ports(rule)
    if rule.protocol in ("tcp", "udp") and not ports:
        parts.append(f"ip protocol {rule.protocol}")
    return " ".join(parts) + ports + " accept"


def _stateful(rules: Iterable[Rule], direction: str, known: set[str]) -> list[str]:
    """Conntrack first, one accept per distinct rule of ``direction``, then the default drop."""
    statements = list(dict.fromkeys(_rule(r, known) for r in rules if r.direction == direction))
    return [
        "\t\tct state established,related accept",
        "\t\tct state invalid drop",
        *(f"\t\t{s}" for s in statements),
        "\t\tdrop",
    ]


def compile_rules(groups: Sequence[Group], ports: Sequence[Port]) -> str:
    """The nft script for ``ports`` under ``groups`` (see the module docstring). Pure and deterministic; raises
    ``ValueError`` for a port naming an unknown group, a bad MAC, device or address, or an impossible rule."""
    by_id = {g.id: g for g in groups}
    if len(by_id) != len(groups):
        raise ValueError("a group is given twice")
    known = set(by_id)
    lines = [
        f"table bridge {TABLE} {{}}",
        f"delete table bridge {TABLE}",
        f"table bridge {TABLE} {{",
    ]
    for g in sorted(groups, key=lambda g: g.id):
        lines.append(f"\tset g_{_ident(g.id)} {{")
        lines.append("\t\ttype ipv4_addr")
        members = _sorted_ips(g.members)
        if members:
            lines.append(f"\t\telements = {{ {', '.join(members)} }}")
        lines.append("\t}")
    ordered = sorted(ports, key=lambda p: p.id)
    for p in ordered:
        if not _MAC.match(p.mac):
            raise ValueError(f"port {p.id}: '{p.mac}' is not a lowercase MAC address")
        if not _DEVICE.match(p.device):
            raise ValueError(f"port {p.id}: '{p.device}' is not an interface name")
        for gid in p.groups:
            if gid not in known:
                raise ValueError(f"port {p.id} is in group {gid}, which is not among the groups given")
    lines.append("\tchain forward {")
    lines.append("\t\ttype filter hook forward priority 0; policy accept;")
    for p in ordered:
        lines.append(f'\t\tiifname "{p.device}" jump o_{_ident(p.id)}')
        lines.append(f'\t\toifname "{p.device}" jump i_{_ident(p.id)}')
    lines.append("\t}")
    for p in ordered:
        name = _ident(p.id)
        ips = _sorted_ips(p.ips)
        own = f"{{ {', '.join(ips)} }}" if ips else ""
        rules = [r for gid in p.groups for r in by_id[gid].rules]
        lines.append(f"\tchain o_{name} {{")
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
            lines.extend(_stateful(rules, "egress", known))
        else:  # no address yet: nothing but DHCP discovery leaves it
            lines.append("\t\tdrop")
        lines.append("\t}")
        lines.append(f"\tchain i_{name} {{")
        lines.append("\t\tether type arp accept")
        lines.append("\t\tudp sport 67 udp dport 68 accept")
        lines.extend(_stateful(rules, "ingress", known))
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"
