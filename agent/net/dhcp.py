"""DHCP and DNS for one overlay network on one node: a dnsmasq serving only this node's NICs, from IPAM.

DHCP never crosses nodes: each node's dnsmasq knows only the static host entries (MAC -> address, name) of the NICs
placed on it and ignores every other MAC (``--dhcp-range=…,static``), so no two nodes ever answer the same client.
DNS answers every instance of the network, wherever it runs, as ``NAME.NETWORK.internal`` (A and PTR, from an
``--addn-hosts`` file) and forwards other names upstream; names under the network's domain that are not known are
answered NXDOMAIN locally, never forwarded. The MTU reaches guests as DHCP option 26.

Files under the server's ``state_dir`` (one directory per network per node): ``hosts`` (``--dhcp-hostsfile``),
``dns`` (``--addn-hosts``), ``leases``, ``dnsmasq.pid``, ``dnsmasq.log``. Host and record changes rewrite those files
atomically and send SIGHUP (dnsmasq re-reads both); only a change of the command line (interface, addresses, MTU,
upstream servers) restarts dnsmasq. dnsmasq is detached and outlives the agent, so guests keep renewing while the agent
restarts; a new :class:`DhcpServer` on the same directory adopts it.

dnsmasq binds to ``spec.interface`` and ``spec.server`` only. Networks may share address ranges, so each network's
dnsmasq is meant to run in its own network namespace (``netns``) with a port on the network's bridge carrying the
server address; this module does not create that namespace or port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.net.common import (
    NetworkError,
    NetworkPermissionError,
    netns_argv,
    processes_with_arg,
    read_int,
    run_daemonizing,
    same_command,
    stop_process,
    write_if_changed,
)
from agent.net.default import DNSMASQ_BINARY, parse_leases

log = logging.getLogger(__name__)

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IFNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _label(value: str, what: str) -> str:
    if not _LABEL_RE.match(value):
        raise ValueError(f"{what} {value!r}: use 1-63 lowercase letters, digits and inner dashes (a DNS label)")
    return value


@dataclass(frozen=True)
class DhcpHost:
    """A NIC on this node: DHCP gives ``mac`` the address ``ip`` and the host name ``name``."""

    mac: str
    ip: ipaddress.IPv4Address
    name: str

    def __post_init__(self) -> None:
        mac = self.mac.lower()
        if not _MAC_RE.match(mac):
            raise ValueError(f"MAC address {self.mac!r}: use six hex octets separated by ':'")
        object.__setattr__(self, "mac", mac)
        object.__setattr__(self, "ip", ipaddress.IPv4Address(self.ip))
        _label(self.name, "host name")


@dataclass(frozen=True)
class DnsRecord:
    """An instance of the network anywhere in the cluster: ``name.NETWORK.internal`` is ``ip`` (and back)."""

    name: str
    ip: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        _label(self.name, "DNS name")
        object.__setattr__(self, "ip", ipaddress.IPv4Address(self.ip))


def _subnet(server: ipaddress.IPv4Interface, router: ipaddress.IPv4Address | None) -> tuple:
    server = ipaddress.IPv4Interface(server)
    if server.network.prefixlen > 30:
        raise ValueError(f"subnet {server.network}: too small; use /30 or larger")
    if router is not None:
        router = ipaddress.IPv4Address(router)
        if router not in server.network:
            raise ValueError(f"router {router} is outside the subnet {server.network}")
    return server, router


@dataclass(frozen=True)
class DhcpSubnet:
    """One more subnet served by the same dnsmasq (a network with several subnets with ports on this node): its
    ``server`` address (with the prefix; also on the interface) and the ``router`` handed out there (None: none)."""

    server: ipaddress.IPv4Interface
    router: ipaddress.IPv4Address | None = None

    def __post_init__(self) -> None:
        server, router = _subnet(self.server, self.router)
        object.__setattr__(self, "server", server)
        object.__setattr__(self, "router", router)


@dataclass(frozen=True)
class DhcpSpec:
    """What a network's dnsmasq is on this node; changing any field restarts it. Validated on construction.

    ``server`` is the address (with the subnet's prefix) dnsmasq answers from, already on ``interface``; the subnet
    it serves is ``server.network``. ``router`` is handed out as the default gateway (None: no router option).
    ``more``: further subnets of the network served by the same dnsmasq on the same interface (their server
    addresses are on the interface too; subnets may not overlap). ``upstream_dns``: None reads the host's
    /etc/resolv.conf, () forwards nothing.
    """

    network: str
    interface: str
    server: ipaddress.IPv4Interface
    mtu: int
    router: ipaddress.IPv4Address | None = None
    upstream_dns: tuple[str, ...] | None = None
    lease_seconds: int = 3600
    more: tuple[DhcpSubnet, ...] = ()
    #: False: DHCP only (``--port=0``): no DNS server, names or forwarding; the guests are handed ``upstream_dns``
    #: as their name servers (an external network: the LAN has its own DNS, and no resolver of ours faces it).
    dns: bool = True

    def __post_init__(self) -> None:
        _label(self.network, "network name")
        if not _IFNAME_RE.match(self.interface):
            raise ValueError(f"interface name {self.interface!r}: use 1-15 letters, digits, '_', '.', '-'")
        server, router = _subnet(self.server, self.router)
        object.__setattr__(self, "server", server)
        object.__setattr__(self, "router", router)
        more = tuple(m if isinstance(m, DhcpSubnet) else DhcpSubnet(*m) for m in self.more)
        object.__setattr__(self, "more", more)
        nets = [s.server.network for s in self.subnets]
        for i, a in enumerate(nets):
            for b in nets[i + 1 :]:
                if a.overlaps(b):
                    raise ValueError(f"subnets {a} and {b} overlap")
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"MTU {self.mtu}: use 576 to 9000")
        if self.upstream_dns is not None:
            object.__setattr__(self, "upstream_dns", tuple(str(ipaddress.IPv4Address(s)) for s in self.upstream_dns))
        if not 120 <= self.lease_seconds <= 365 * 86400:
            raise ValueError(f"lease time {self.lease_seconds} s: use 120 s to one year")

    @property
    def domain(self) -> str:
        return f"{self.network}.internal"

    @property
    def subnets(self) -> tuple[DhcpSubnet, ...]:
        """Every subnet served: the first (``server``, ``router``), then ``more``."""
        return (DhcpSubnet(self.server, self.router), *self.more)


# --- pure renderers ----------------------------------------------------------------------------------------------------


def dhcp_argv(spec: DhcpSpec, state_dir: Path, binary: str = DNSMASQ_BINARY, user: str | None = None) -> list[str]:
    """dnsmasq's command line (without a namespace prefix). Deterministic: it is how a running dnsmasq is recognised
    as current. Hosts and DNS records are not in it (they live in files re-read on SIGHUP). ``user``: the account
    dnsmasq drops to (None: its built-in default)."""
    d = Path(os.path.abspath(state_dir))
    subnets = spec.subnets
    # One subnet: plain options. Several (a network with ports of several subnets on this node): each range sets a
    # tag and the per-subnet options (router, DNS server) are given for that tag only. dnsmasq serves a static host
    # from the range its address is in (every server address is on the interface).
    tags = [f"s{i}" for i in range(len(subnets))] if len(subnets) > 1 else [""] * len(subnets)
    argv = [
        binary,
        "--conf-file=/dev/null",
        *([f"--user={user}"] if user else []),
        f"--pid-file={d / 'dnsmasq.pid'}",
        f"--log-facility={d / 'dnsmasq.log'}",
        "--bind-interfaces",
        f"--interface={spec.interface}",
        "--except-interface=lo",
        *(f"--listen-address={s.server.ip}" for s in subnets),
    ]
    for tag, s in zip(tags, subnets, strict=True):
        net = s.server.network
        # "static": addresses only for MACs in the hosts file; every other client gets no answer at all.
        argv.append(
            f"--dhcp-range={f'set:{tag},' if tag else ''}{net.network_address},static,{net.netmask},{spec.lease_seconds}"
        )
    argv += [
        f"--dhcp-hostsfile={d / 'hosts'}",
        f"--dhcp-leasefile={d / 'leases'}",
        "--dhcp-authoritative",
        "--no-ping",
        f"--dhcp-option=option:mtu,{spec.mtu}",
    ]
    if not spec.dns:
        if spec.upstream_dns:
            argv.append(f"--dhcp-option=option:dns-server,{','.join(spec.upstream_dns)}")
        else:
            argv.append("--dhcp-option=option:dns-server")  # an empty option: not this server (it answers no DNS)
    for tag, s in zip(tags, subnets, strict=True) if spec.dns else ():
        on = f"tag:{tag}," if tag else ""
        argv.append(f"--dhcp-option={on}option:dns-server,{s.server.ip}")
        if not tag:
            argv.append(f"--dhcp-option=option:domain-name,{spec.domain}")
    if tags[0] and spec.dns:
        argv.append(f"--dhcp-option=option:domain-name,{spec.domain}")
    for tag, s in zip(tags, subnets, strict=True):
        on = f"tag:{tag}," if tag else ""
        if s.router is not None:
            argv.append(f"--dhcp-option={on}option:router,{s.router}")
        else:
            argv.append(f"--dhcp-option={on}option:router")  # an empty option: no default route
    if not spec.dns:
        return [*argv, "--no-hosts", "--no-resolv", "--port=0"]
    argv += ["--no-hosts", f"--addn-hosts={d / 'dns'}"]
    # Names and reverse lookups of the subnets are ours: answered from the files, never forwarded.
    argv += [f"--domain={spec.domain},{s.server.network},local" for s in subnets]
    argv += [
        "--port=53",
        "--domain-needed",
        "--bogus-priv",
    ]
    if spec.upstream_dns is None:
        argv.append("--resolv-file=/etc/resolv.conf")
    else:
        argv += ["--no-resolv", "--strict-order", *(f"--server={s}" for s in spec.upstream_dns)]
    return argv


def hosts_file(spec: DhcpSpec, hosts: Iterable[DhcpHost]) -> str:
    """The ``--dhcp-hostsfile`` text: one ``MAC,IP,NAME`` line per NIC, sorted. ``ValueError`` for an address
    outside the subnet, the server's own address, or a MAC or address given twice."""
    lines: list[str] = []
    macs: set[str] = set()
    ips: set[ipaddress.IPv4Address] = set()
    nets = [s.server for s in spec.subnets]
    for h in sorted(hosts, key=lambda h: h.mac):
        net = next((s.network for s in nets if h.ip in s.network), nets[0].network)
        if h.ip not in net or h.ip in (net.network_address, net.broadcast_address, *(s.ip for s in nets)):
            raise ValueError(f"address {h.ip} of {h.mac} is not a usable host address of {net}")
        if h.mac in macs or h.ip in ips:
            raise ValueError(f"MAC {h.mac} or address {h.ip} given twice")
        macs.add(h.mac)
        ips.add(h.ip)
        lines.append(f"{h.mac},{h.ip},{h.name}")
    return "".join(f"{line}\n" for line in lines)


def dns_file(spec: DhcpSpec, records: Iterable[DnsRecord]) -> str:
    """The ``--addn-hosts`` text: ``IP NAME.DOMAIN NAME`` per record, sorted (dnsmasq derives PTR from it)."""
    return "".join(
        f"{r.ip} {r.name}.{spec.domain} {r.name}\n" for r in sorted(records, key=lambda r: (r.name, int(r.ip)))
    )


# --- the server --------------------------------------------------------------------------------------------------------


class DhcpServer:
    """One network's dnsmasq on this node, in the agent's namespace or in ``netns`` (see the module docstring).

    dnsmasq drops its privileges after start (to ``user``, default its built-in account) and re-reads the hosts and
    DNS files as that user on SIGHUP: the state directory is made 0755 and its files 0644 (MACs, addresses and names
    are no secret), and every directory above it must be traversable by that user.
    """

    def __init__(
        self,
        spec: DhcpSpec,
        state_dir: Path,
        *,
        netns: str | None = None,
        dnsmasq: str | None = None,
        user: str | None = None,
    ):
        self.spec = spec
        self.state_dir = Path(os.path.abspath(state_dir))
        self.netns = netns
        self.user = user
        self._dnsmasq = dnsmasq or shutil.which(DNSMASQ_BINARY) or DNSMASQ_BINARY
        self._lock = asyncio.Lock()

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    def pid(self) -> int | None:
        """The running dnsmasq of this network (per its pid file and command line), or None."""
        pid = read_int(self.pid_file)
        return pid if pid is not None and pid in processes_with_arg(f"--pid-file={self.pid_file}") else None

    def leases(self) -> dict[str, str]:
        """MAC -> IPv4 of the current leases; empty when there are none."""
        try:
            return parse_leases((self.state_dir / "leases").read_text(errors="replace"))
        except FileNotFoundError:
            return {}

    async def ensure(self, hosts: Iterable[DhcpHost], records: Iterable[DnsRecord]) -> bool:
        """Converge: files hold exactly ``hosts`` and ``records``, dnsmasq runs with the spec's command line and has
        read them. Idempotent (no file write, no signal when nothing changed). Returns whether anything changed.
        Raises ``ValueError`` for inconsistent input (nothing is changed then) and :class:`NetworkError`."""
        hosts_text = hosts_file(self.spec, hosts)
        dns_text = dns_file(self.spec, records)
        async with self._lock:
            await asyncio.to_thread(self.state_dir.mkdir, mode=0o755, parents=True, exist_ok=True)
            changed = write_if_changed(self.state_dir / "hosts", hosts_text)
            changed |= write_if_changed(self.state_dir / "dns", dns_text)
            want = dhcp_argv(self.spec, self.state_dir, self._dnsmasq, self.user)
            ours = await asyncio.to_thread(processes_with_arg, f"--pid-file={self.pid_file}")
            recorded = read_int(self.pid_file)
            keep = recorded if recorded in ours and same_command(ours[recorded], want) else None
            for pid in ours:
                if pid != keep:
                    log.info("dhcp %s: stopping dnsmasq %d (outdated or stray)", self.spec.network, pid)
                    await stop_process(pid)
            if keep is None:
                self.pid_file.unlink(missing_ok=True)
                await run_daemonizing(
                    [*netns_argv(self.netns), *want],
                    f"dnsmasq for network {self.spec.network}",
                    "install dnsmasq (Debian: dnsmasq-base)",
                )
                if self.pid() is None:
                    raise NetworkError(f"dnsmasq for network {self.spec.network} exited right after start")
                return True
            if changed:
                try:
                    os.kill(keep, signal.SIGHUP)
                except ProcessLookupError:
                    pass
                except PermissionError as e:
                    raise NetworkPermissionError(f"cannot signal dnsmasq {keep}: permission denied") from e
            return changed

    async def stop(self) -> None:
        """Stop this network's dnsmasq and delete its files (the log stays). Idempotent."""
        async with self._lock:
            for pid in await asyncio.to_thread(processes_with_arg, f"--pid-file={self.pid_file}"):
                await stop_process(pid)
            for name in ("dnsmasq.pid", "leases", "hosts", "dns"):
                (self.state_dir / name).unlink(missing_ok=True)


class FakeDhcpServer:
    """A :class:`DhcpServer` that runs nothing (the fake hypervisor's nodes): ``hosts`` and ``records`` hold what the
    last ``ensure`` was given."""

    def __init__(self, spec: DhcpSpec, state_dir: Path, *, netns: str | None = None, **_: object) -> None:
        self.spec = spec
        self.state_dir = Path(state_dir)
        self.netns = netns
        self.hosts: tuple[DhcpHost, ...] = ()
        self.records: tuple[DnsRecord, ...] = ()
        self.running = False

    def pid(self) -> int | None:
        return None

    def leases(self) -> dict[str, str]:
        return {}

    async def ensure(self, hosts: Iterable[DhcpHost], records: Iterable[DnsRecord]) -> bool:
        new = (tuple(hosts), tuple(records))
        hosts_file(self.spec, new[0])  # the same validation
        changed = not self.running or new != (self.hosts, self.records)
        self.hosts, self.records = new
        self.running = True
        return changed

    async def stop(self) -> None:
        self.running = False
