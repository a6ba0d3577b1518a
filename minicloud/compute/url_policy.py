"""Which addresses a URL import may connect to (``compute.image_url_allow``): pure policy, no I/O but reading the
node's interface addresses once. The mechanism that enforces it at connect time is ``image_download``."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from minicloud import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(errors.Forbidden):
    """The URL (or a redirect) leads to an address the node does not fetch from."""


def node_addresses() -> set[IPAddress]:
    """Every address on this node's interfaces (its API, agents and other services listen on them)."""
    import psutil

    found: set[IPAddress] = set()
    for snics in psutil.net_if_addrs().values():
        for snic in snics:
            if snic.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(snic.address.split("%", 1)[0]))
                except ValueError:
                    continue
    return found


def parse_allow(entries: Iterable[str]) -> tuple[list[IPNetwork], set[str]]:
    """``compute.image_url_allow`` as (networks, host names). Raises ValueError naming a bad entry."""
    nets: list[IPNetwork] = []
    hosts: set[str] = set()
    for entry in entries:
        text = entry.strip()
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        labels = text.lower().rstrip(".").split(".")
        if not text or not all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() and label[0] != "-"
            for label in labels
        ):
            raise ValueError(f"{entry!r} is neither a CIDR (10.0.0.0/8, 127.0.0.1/32) nor a host name (mirror.lan)")
        hosts.add(".".join(labels))
    return nets, hosts


def normal_host(host: str) -> str:
    return host.lower().rstrip(".").strip("[]")


@dataclass
class UrlPolicy:
    """Which addresses an image download may connect to. ``own`` lists the node's addresses (computed once)."""

    nets: list[IPNetwork] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)
    own: Callable[[], Iterable[IPAddress]] = node_addresses
    _own_cache: set[IPAddress] | None = None

    @classmethod
    def from_config(cls, allow: Sequence[str], own: Callable[[], Iterable[IPAddress]] = node_addresses) -> UrlPolicy:
        nets, hosts = parse_allow(allow)
        return cls(nets=nets, hosts=hosts, own=own)

    def host_allowed(self, host: str) -> bool:
        return normal_host(host) in self.hosts

    def _own(self) -> set[IPAddress]:
        if self._own_cache is None:
            self._own_cache = set(self.own())
        return self._own_cache

    def refusal(self, host: str, address: str) -> str | None:
        """Why connecting to ``address`` (for the URL host ``host``) is refused, or None when it is allowed."""
        if self.host_allowed(host):
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:a.b.c.d connects to a.b.c.d
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):  # 6to4 and Teredo addresses are judged by the IPv4 inside too
            candidates += [a for a in (ip.sixtofour,) if a is not None]
            if ip.teredo is not None:
                candidates += list(ip.teredo)
        for a in candidates:
            if any(a.version == n.version and a in n for n in self.nets):
                continue
            if reason := self._category(a):
                return reason
        return None

    def _category(self, ip: IPAddress) -> str | None:
        if ip.is_unspecified:
            return "the unspecified address"
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_link_local:
            return "a link-local address"
        if ip.is_multicast:
            return "a multicast address"
        if ip in self._own():
            return "one of this node's own addresses"
        if ip.is_private or ip.is_reserved or not ip.is_global:
            return "a private or reserved address"
        return None

    def check(self, host: str, address: str) -> None:
        if (reason := self.refusal(host, address)) is not None:
            raise AddressRefused(
                f"the image URL leads to {reason} ({address}), which the node does not download from; use a public "
                "URL, or ask the operator to allow the address or host in compute.image_url_allow"
            )
