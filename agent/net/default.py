"""The node's default network for VM guests: one Linux bridge, dnsmasq for DHCP and DNS, nftables for NAT.

Until VPCs arrive this is the only guest network, built the way a VPC's per-node piece will be: a :class:`NetworkSpec`
says what the network is, a driver behind the :class:`NetworkDriver` protocol converges the host to it, and every host
object the driver owns is named after the spec's bridge, so several networks (or several test agents under
pytest-xdist) never touch each other's bridge, dnsmasq, lease file or nftables table.

What :class:`BridgeNetwork` puts on the host for ``NetworkSpec(name="default", bridge="mcbr0", cidr=10.213.0.0/24)``:

* **Bridge** ``mcbr0``, up, holding the gateway ``10.213.0.1/24`` (the first host address) and no other IPv4 address,
  with a fixed MAC derived from its name so guests' ARP caches stay valid as ports come and go (a bridge without a set
  address takes the lowest MAC among its ports).
* **dnsmasq**, detached (it daemonizes and outlives the agent, so guests keep renewing their leases while the agent
  restarts), bound to the bridge only: DHCP on ``--interface=mcbr0`` and DNS on ``10.213.0.1:53``. Its files live in the
  network's state directory: ``dnsmasq.pid``, ``leases`` (read back by :meth:`BridgeNetwork.leases`) and
  ``dnsmasq.log``. Leases last :data:`DEFAULT_LEASE_SECONDS` (12 h); dnsmasq reloads the lease file when restarted.
  DNS answers the guests' DHCP host names and forwards other *qualified* names upstream (``--domain-needed``,
  ``--bogus-priv`` keep local names and private reverse lookups on the node). Upstream is the host's
  ``/etc/resolv.conf`` (re-read when it changes) unless the spec names servers; ``dns=False`` turns DNS off
  (``--port=0``) and guests get no DNS server from DHCP.
* **nftables** table ``ip minicloud-mcbr0`` (see :func:`nft_script`): with ``masquerade`` (NAT mode) guests reach other
  networks through the node's own address and only replies come back in; without it the network is isolated (guests
  reach each other and the gateway, nothing else). NAT mode also sets ``net.ipv4.ip_forward=1`` (never reset: other
  users of the host may depend on it). When the DHCP range ends below the last address (the default VPCs' ``host``
  pool lies above it), ``bridge minicloud-mcbr0`` drops IPv4 from and ARP for those addresses coming from a guest's
  tap (pinned guests excepted), so no guest can take a router's or floating IP's address by hand.

* **Fixed addresses**: each guest of the bridge gets one address, chosen once (:meth:`BridgeNetwork.assign`: its pin,
  its current lease, else the lowest free one of the range) and kept in dnsmasq's ``--dhcp-hostsfile`` (``hosts`` in
  the state directory, re-read on SIGHUP) until :meth:`BridgeNetwork.release`, so DHCP hands out exactly the address
  its anti-spoofing rules allow (``bridge minicloud_sg``, built by the network reconciler on the tap
  :func:`guest_tap` names; see ``docs/networking.md``). Other MACs still get leases from the range.

Host services on the gateway address are reachable from guests (input is not filtered here).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import AsyncIPRoute, NetlinkError

from agent.net.common import NetworkConflict, NetworkError, NetworkPermissionError, write_if_changed  # re-exported
from agent.net.common import cmdline as _cmdline
from agent.net.common import get_link as _get_link
from agent.net.common import netlink_error as _netlink_error
from agent.net.common import read_int as _read_int
from agent.net.common import run_daemonizing as _run_daemonizing
from agent.net.common import same_command as _same_command
from agent.net.common import stop_process as _stop_process

log = logging.getLogger(__name__)

DNSMASQ_BINARY = "dnsmasq"
NFT_BINARY = "nft"
DEFAULT_LEASE_SECONDS = 12 * 3600
#: The host taps of the default bridge's guests (libvirt names them; VPC ports' taps are ``mct-…``).
GUEST_TAPS = "vnet*"
#: The host taps the compute side names for the default bridge's guests (:func:`guest_tap`).
GUEST_TAP_PREFIX = "mcg-"
#: dnsmasq's hosts file in the network's state directory: the guests' fixed addresses.
HOSTS_FILE = "hosts"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Linux allows almost anything in an interface name; we allow what is also a plain nft identifier and file name.
_BRIDGE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFF_UP = 0x1


# --- the spec ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkSpec:
    """What one guest network is. Immutable and validated on construction (``ValueError`` says what is wrong).

    ``cidr`` may be given as a string and is normalised to :class:`ipaddress.IPv4Network`; it must be /30 or larger
    and must not have host bits set. The gateway is its first host address. The DHCP range defaults to ``.10`` up to
    the last host address (``.2`` onwards for networks smaller than /27); explicit bounds must lie inside the network,
    after the gateway, and in order.
    """

    name: str
    bridge: str
    cidr: ipaddress.IPv4Network
    dhcp_start: ipaddress.IPv4Address | None = None
    dhcp_end: ipaddress.IPv4Address | None = None
    masquerade: bool = True
    dns: bool = True
    #: Upstream DNS servers for names dnsmasq cannot answer; None: the host's /etc/resolv.conf; (): none at all.
    upstream_dns: tuple[str, ...] | None = None
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    #: (MAC, address) pairs dnsmasq keeps giving those MACs even outside the DHCP range (``--dhcp-host``): guests
    #: whose lease the default VPC's migration found above a range it shrank (docs/networking.md, "Default VPC").
    static_hosts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"network name {self.name!r}: use 1-63 lowercase letters, digits and dashes")
        if not _BRIDGE_RE.match(self.bridge):
            raise ValueError(
                f"bridge name {self.bridge!r}: use 1-15 letters, digits, '_' or '-', starting with a letter"
            )
        cidr = ipaddress.IPv4Network(self.cidr)  # strict: host bits set is an error
        if cidr.prefixlen > 30:
            raise ValueError(f"network {cidr}: too small for a gateway and guests; use /30 or larger")
        object.__setattr__(self, "cidr", cidr)
        hosts_first = cidr.network_address + 1
        hosts_last = cidr.broadcast_address - 1
        start = ipaddress.IPv4Address(self.dhcp_start) if self.dhcp_start is not None else None
        end = ipaddress.IPv4Address(self.dhcp_end) if self.dhcp_end is not None else None
        if start is None:
            start = cidr.network_address + (10 if cidr.num_addresses >= 32 else 2)
        if end is None:
            end = hosts_last
        if not (hosts_first < start <= end <= hosts_last):
            raise ValueError(
                f"DHCP range {start}-{end}: must lie within {hosts_first + 1}-{hosts_last} (after the gateway), in order"
            )
        object.__setattr__(self, "dhcp_start", start)
        object.__setattr__(self, "dhcp_end", end)
        upstream = (
            tuple(str(ipaddress.ip_address(s)) for s in self.upstream_dns) if self.upstream_dns is not None else None
        )
        object.__setattr__(self, "upstream_dns", upstream)
        hosts = []
        for mac, ip in self.static_hosts:
            if not _MAC_RE.match(mac.lower()) or ipaddress.IPv4Address(ip) not in cidr:
                raise ValueError(f"static host {mac} {ip}: a MAC and an address of {cidr}")
            hosts.append((mac.lower(), str(ipaddress.IPv4Address(ip))))
        object.__setattr__(self, "static_hosts", tuple(sorted(hosts)))
        if not 120 <= self.lease_seconds <= 365 * 86400:
            raise ValueError(f"lease time {self.lease_seconds} s: use 120 s (dnsmasq's minimum) to one year")

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The node's address on the bridge: the network's first host address."""
        return self.cidr.network_address + 1

    @property
    def table(self) -> str:
        """The nftables table (family ``ip``) holding this network's rules; unique per bridge."""
        return f"minicloud-{self.bridge}"

    @property
    def reserved(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None:
        """(first, last) of the addresses above the DHCP range, which are not the guests' (the ``host`` network's
        pool of routers' and floating addresses, when the default VPCs are on); None when DHCP runs to the end."""
        last = self.cidr.broadcast_address - 1
        assert self.dhcp_end is not None
        return (self.dhcp_end + 1, last) if self.dhcp_end < last else None

    @property
    def bridge_mac(self) -> str:
        """A stable, locally administered unicast MAC for the bridge, derived from its name."""
        digest = hashlib.sha256(self.bridge.encode()).digest()
        return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def guest_tap(instance_id: str) -> str:
    """The host tap of a default-bridge guest: ``mcg-`` + 10 hex digits of the instance id's SHA-256 (fits
    IFNAMSIZ). The compute side names the guest's tap so; its anti-spoofing rules match on it."""
    return GUEST_TAP_PREFIX + hashlib.sha256(instance_id.encode()).hexdigest()[:10]


# --- pure renderers ----------------------------------------------------------------------------------------------------


def dnsmasq_argv(spec: NetworkSpec, state_dir: Path, binary: str = DNSMASQ_BINARY) -> list[str]:
    """The dnsmasq command line for ``spec``, its files under ``state_dir`` (made absolute).

    Deterministic: the same spec and directory give the same list, which is how a running dnsmasq is recognised as
    current. Nothing is read from /etc/dnsmasq.conf or /etc/hosts; sockets are bound to the bridge and the gateway
    address only, so dnsmasq instances for different bridges coexist.
    """
    state_dir = Path(os.path.abspath(state_dir))
    gw = str(spec.gateway)
    argv = [
        binary,
        "--conf-file=/dev/null",
        f"--pid-file={state_dir / 'dnsmasq.pid'}",
        f"--log-facility={state_dir / 'dnsmasq.log'}",
        "--bind-interfaces",
        f"--interface={spec.bridge}",
        "--except-interface=lo",
        f"--listen-address={gw}",
        f"--dhcp-range={spec.dhcp_start},{spec.dhcp_end},{spec.cidr.netmask},{spec.lease_seconds}",
        f"--dhcp-leasefile={state_dir / 'leases'}",
        # each guest's fixed address (what its anti-spoofing rules allow), re-read on SIGHUP: as root, because the
        # data directory is 0700 and dnsmasq's own account could not read it again
        f"--dhcp-hostsfile={state_dir / HOSTS_FILE}",
        "--user=root",
        "--dhcp-authoritative",
        # No ICMP probe before each offer: it delays every first lease by ~3 s (a guest's boot by as much), and on
        # this network only our guests take addresses from the range.
        "--no-ping",
        f"--dhcp-option=option:router,{gw}",
        "--no-hosts",
        *(f"--dhcp-host={mac},{ip}" for mac, ip in spec.static_hosts),
    ]
    if not spec.dns:
        return [*argv, "--port=0"]
    argv += ["--port=53", "--domain-needed", "--bogus-priv"]
    if spec.upstream_dns is None:
        argv.append("--resolv-file=/etc/resolv.conf")
    else:
        argv += ["--no-resolv", "--strict-order", *(f"--server={s}" for s in spec.upstream_dns)]
    return argv


def nft_script(spec: NetworkSpec) -> str:
    """An ``nft -f`` script that replaces this network's table in one transaction.

    Creating the table empty and deleting it first makes the script apply whether or not the table exists, so
    re-applying converges (counters reset; no packet ever sees a half-built table). The forward chain's ``accept``
    only ends evaluation in *this* table: a drop elsewhere (another firewall's table) still applies.
    """
    br, cidr = f'"{spec.bridge}"', str(spec.cidr)
    if spec.masquerade:
        nat = [
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f"\t\tip saddr {cidr} ip daddr != {cidr} oifname != {br} masquerade",
            "\t}",
        ]
        forward = [
            f"\t\tiifname {br} oifname {br} accept",
            f"\t\tiifname {br} ip saddr {cidr} accept",
            f"\t\tiifname {br} drop",
            f"\t\toifname {br} ct state established,related accept",
            f"\t\toifname {br} drop",
        ]
        mode = "NAT"
    else:
        nat = []
        forward = [f"\t\tiifname {br} oifname {br} accept", f"\t\tiifname {br} drop", f"\t\toifname {br} drop"]
        mode = "isolated"
    lines = [
        *_nft_delete_lines(spec.table),
        f"table ip {spec.table} {{",
        f'\tcomment "minicloud network {spec.name} ({mode}); managed by the agent, edits are overwritten"',
        *nat,
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        *forward,
        "\t}",
        "}",
    ]
    if spec.reserved is not None:
        # No guest of the bridge may claim an address above its DHCP range (a router's or floating IP's leg there is
        # a veth "mcp…", not a libvirt tap): IPv4 from it and ARP for it are dropped where a guest's tap
        # (libvirt's "vnetN") enters the bridge, before anything else sees them; pinned guests keep their own.
        first, last = spec.reserved
        pinned = [(mac, ip) for mac, ip in spec.static_hosts if first <= ipaddress.IPv4Address(ip) <= last]
        lines += [
            f"table bridge {spec.table} {{",
            "\tchain prerouting {",
            "\t\ttype filter hook prerouting priority -300; policy accept;",
            f'\t\tiifname != "{GUEST_TAPS}" iifname != "{GUEST_TAP_PREFIX}*" accept',
            *(f"\t\tether saddr {mac} ip saddr {ip} accept" for mac, ip in pinned),
            *(f"\t\tether saddr {mac} arp saddr ip {ip} accept" for mac, ip in pinned),
            f"\t\tip saddr {first}-{last} drop",
            f"\t\tarp saddr ip {first}-{last} drop",
            "\t}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def nft_delete_script(table: str) -> str:
    """An ``nft -f`` script deleting ``ip table`` and ``bridge table``; succeeds whether or not they exist."""
    return "\n".join(_nft_delete_lines(table)) + "\n"


def _nft_delete_lines(table: str) -> list[str]:
    return [
        f"table ip {table} {{}}",
        f"delete table ip {table}",
        f"table bridge {table} {{}}",
        f"delete table bridge {table}",
    ]


def pick_address(
    spec: NetworkSpec,
    mac: str,
    assigned: Mapping[str, str],
    leases: Mapping[str, str],
    prefer: Sequence[str] = (),
    avoid: Collection[str] = (),
) -> str | None:
    """The address a default-bridge guest with ``mac`` gets: its pin (``spec.static_hosts``), else the first of its
    current lease and ``prefer`` that is in the DHCP range and nobody else's (assigned, pinned or leased to another
    MAC), else the lowest free address of the range that is not in ``avoid`` (the addresses of default-bridge guests
    on other nodes: one that is unique in the cluster can move there live), else the lowest free one; None when the
    range is exhausted. Pure."""
    mac = mac.lower()
    pins = dict(spec.static_hosts)
    if mac in pins:
        return pins[mac]
    taken = {str(spec.gateway)}
    for table in (assigned, pins, leases):
        taken.update(ip for m, ip in table.items() if m != mac)
    start, end = spec.dhcp_start, spec.dhcp_end
    assert start is not None and end is not None  # filled in by NetworkSpec.__post_init__

    def free(ip: str) -> bool:
        try:
            return start <= ipaddress.IPv4Address(ip) <= end and ip not in taken
        except ValueError:
            return False

    for ip in (leases.get(mac), *prefer):
        if ip and free(ip):
            return str(ipaddress.IPv4Address(ip))
    range_ = [str(a) for a in map(ipaddress.IPv4Address, range(int(start), int(end) + 1))]
    return next((a for a in range_ if free(a) and a not in avoid), None) or next((a for a in range_ if free(a)), None)


def hosts_text(assigned: Mapping[str, str]) -> str:
    """dnsmasq's ``--dhcp-hostsfile``: one ``MAC,address`` line per guest, sorted."""
    return "".join(f"{mac},{ip}\n" for mac, ip in sorted(assigned.items()))


def parse_hosts(text: str) -> dict[str, str]:
    """MAC -> address from :func:`hosts_text`'s format; malformed lines are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        mac, _, ip = line.strip().partition(",")
        try:
            out[mac.lower()] = str(ipaddress.IPv4Address(ip)) if _MAC_RE.match(mac.lower()) else ""
        except ValueError:
            continue
    return {m: ip for m, ip in out.items() if ip}


def parse_leases(text: str, now: float | None = None) -> dict[str, str]:
    """MAC (lowercase) -> IPv4 address from the text of a dnsmasq lease file.

    Each IPv4 line reads ``EXPIRY MAC IP HOSTNAME CLIENT-ID``; the DHCPv6 part (from the ``duid`` line on), non-Ethernet
    hardware addresses, malformed lines and leases that expired before ``now`` (default: the current time; expiry 0
    means never) are skipped. Never raises on bad input.
    """
    now = time.time() if now is None else now
    leases: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "duid":
            break
        if len(fields) < 3:
            continue
        try:
            expiry = int(fields[0])
            ip = ipaddress.IPv4Address(fields[2])
        except ValueError:
            continue
        mac = fields[1].lower()
        if not _MAC_RE.match(mac) or (expiry != 0 and expiry < now):
            continue
        leases[mac] = str(ip)
    return leases


# --- the driver protocol -----------------------------------------------------------------------------------------------


class NetworkDriver(Protocol):
    """What the agent's network reconciler needs from a guest network, real or fake.

    ``ensure`` converges the host to the spec and is idempotent; ``teardown`` removes everything the network put on
    the host and is idempotent too (what is already gone counts as removed). Both raise :class:`NetworkError`.
    """

    @property
    def spec(self) -> NetworkSpec: ...

    @property
    def gateway(self) -> str: ...

    async def ensure(self) -> None: ...

    async def teardown(self) -> None: ...

    def leases(self) -> dict[str, str]: ...

    def assignments(self) -> dict[str, str]: ...

    async def assign(self, mac: str, prefer: Sequence[str] = (), avoid: Collection[str] = ()) -> str: ...

    async def release(self, mac: str) -> bool: ...


# --- the real driver ---------------------------------------------------------------------------------------------------


class BridgeNetwork:
    """A guest network made of a Linux bridge, a detached dnsmasq and an nftables table (see the module docstring).

    ``state_dir`` belongs to this network alone (two networks must not share one); it is created when needed. The
    object holds no host resources between calls, so a new object on the same spec and directory (an agent that was
    restarted, even after SIGKILL) picks up where the old one left off. Calls on one object are serialised; two
    objects, or two agents, must not manage the same network at the same time.
    """

    def __init__(
        self,
        spec: NetworkSpec,
        state_dir: Path,
        *,
        dnsmasq: str | None = None,
        nft: str | None = None,
    ) -> None:
        self._spec = spec
        self.state_dir = Path(os.path.abspath(state_dir))
        self._dnsmasq = dnsmasq or shutil.which(DNSMASQ_BINARY) or DNSMASQ_BINARY
        self._nft = nft or shutil.which(NFT_BINARY) or NFT_BINARY
        self._lock = asyncio.Lock()
        try:  # the guests' fixed addresses outlive the agent: a restarted one pins the same guests to the same addresses
            self._assigned = parse_hosts((self.state_dir / HOSTS_FILE).read_text(errors="replace"))
        except FileNotFoundError:
            self._assigned = {}

    @property
    def spec(self) -> NetworkSpec:
        return self._spec

    @property
    def gateway(self) -> str:
        """The node's address on the bridge, as guests see it (router, DNS server, DHCP server)."""
        return str(self._spec.gateway)

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    @property
    def lease_file(self) -> Path:
        return self.state_dir / "leases"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "dnsmasq.log"

    @property
    def _ifindex_file(self) -> Path:
        return self.state_dir / "dnsmasq.ifindex"

    # -- public contract --

    async def ensure(self) -> None:
        """Converge: bridge up with the gateway address, this network's nftables table, dnsmasq running.

        Idempotent and cheap when nothing changed, so the agent calls it at start and periodically. A running dnsmasq
        whose command line matches is adopted (found through its pid file); a dead one is restarted, one with an
        outdated command line is replaced, and dnsmasq is restarted whenever this call had to recreate the bridge or
        change its address, or when the bridge is not the one dnsmasq was started on (its DHCP socket is bound to
        the interface index, recorded in ``dnsmasq.ifindex``). Not atomic: on failure the steps already done
        stay, the exception names the failed step, and the next ``ensure`` (or ``teardown``) carries on from there.
        """
        async with self._lock:
            await asyncio.to_thread(self.state_dir.mkdir, parents=True, exist_ok=True)
            ifindex, changed = await self._ensure_bridge()
            await self._apply_nft(nft_script(self._spec), "install")
            if self._spec.masquerade:
                await asyncio.to_thread(_enable_ip_forward)
            await asyncio.to_thread(self._write_hosts)
            await self._ensure_dnsmasq(ifindex, restart=changed)

    # -- the guests' fixed addresses --

    def assignments(self) -> dict[str, str]:
        """MAC -> the fixed address of each guest :meth:`assign` gave one (and each pinned guest's pin)."""
        return {**self._assigned, **dict(self._spec.static_hosts)}

    async def assign(self, mac: str, prefer: Sequence[str] = (), avoid: Collection[str] = ()) -> str:
        """The guest's fixed address, chosen once (:func:`pick_address`: its pin, its current lease, ``prefer``, else
        the lowest free one, not one in ``avoid`` if it can) and kept until :meth:`release`: in dnsmasq's hosts file
        (so DHCP hands out exactly it, SIGHUP) and in memory. Idempotent. Raises :class:`NetworkError` when the DHCP range is exhausted."""
        mac = mac.lower()
        have = self.assignments().get(mac)
        if have is not None:
            return have
        async with self._lock:
            ip = pick_address(self._spec, mac, self._assigned, self.leases(), prefer, avoid)
            if ip is None:
                spec = self._spec
                raise NetworkError(
                    f"network {spec.name}: no free address left in {spec.dhcp_start}-{spec.dhcp_end} for guest {mac}"
                )
            self._assigned[mac] = ip
            await self._hosts_changed()
        return ip

    async def release(self, mac: str) -> bool:
        """Forget the guest's fixed address (its instance left this node). Idempotent; True if there was one."""
        async with self._lock:
            if self._assigned.pop(mac.lower(), None) is None:
                return False
            await self._hosts_changed()
        return True

    def _write_hosts(self) -> bool:
        pins = dict(self._spec.static_hosts)  # already on dnsmasq's command line: a second entry would clash
        text = hosts_text({m: ip for m, ip in self._assigned.items() if m not in pins})
        return write_if_changed(self.state_dir / HOSTS_FILE, text)

    async def _hosts_changed(self) -> None:
        await asyncio.to_thread(self.state_dir.mkdir, parents=True, exist_ok=True)
        if await asyncio.to_thread(self._write_hosts) and (pid := self.dnsmasq_pid()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)  # dnsmasq re-reads its hosts file

    async def teardown(self) -> None:
        """Remove the network from the host: stop its dnsmasq, delete its nftables table and its bridge.

        Idempotent: what is already gone counts as removed. Every step is attempted even when an earlier one fails;
        the first failure is raised afterwards. The pid and lease files are deleted (the leases end with the
        network); the state directory and the dnsmasq log are left to the caller. ``ip_forward`` is left as it is.
        """
        async with self._lock:
            errors: list[NetworkError] = []
            steps: list[Callable[[], Any]] = [
                self._stop_all_dnsmasq,
                lambda: self._apply_nft(nft_delete_script(self._spec.table), "delete"),
                self._delete_bridge,
            ]
            for step in steps:
                try:
                    await step()
                except NetworkError as e:
                    errors.append(e)
            for path in (self.pid_file, self.lease_file, self._ifindex_file, self.state_dir / HOSTS_FILE):
                path.unlink(missing_ok=True)
            self._assigned.clear()
            if errors:
                raise errors[0]

    def leases(self) -> dict[str, str]:
        """MAC (lowercase) -> IPv4 of the current leases in dnsmasq's lease file; empty when there is none."""
        try:
            text = self.lease_file.read_text(errors="replace")
        except FileNotFoundError:
            return {}
        return parse_leases(text)

    def dnsmasq_pid(self) -> int | None:
        """The pid of this network's running dnsmasq per its pid file, or None when that process is not ours or gone."""
        pid = _read_int(self.pid_file)
        if pid is None:
            return None
        cmd = _cmdline(pid)
        return pid if cmd is not None and self._is_ours(cmd) else None

    # -- bridge (netlink) --

    async def _ensure_bridge(self) -> tuple[int, bool]:
        """Bridge present, a bridge, with our MAC, only our IPv4 address, and up. Returns its interface index and
        whether the link or its addresses had to be created or changed."""
        spec = self._spec
        changed = False
        try:
            async with AsyncIPRoute() as ipr:
                link = await _get_link(ipr, spec.bridge)
                if link is None:
                    try:
                        await ipr.link("add", ifname=spec.bridge, kind="bridge", address=spec.bridge_mac)
                    except NetlinkError as e:
                        if e.code != errno.EEXIST:  # EEXIST: created concurrently; checked below
                            raise _netlink_error(f"creating bridge {spec.bridge}", e) from e
                    link = await _get_link(ipr, spec.bridge)
                    if link is None:
                        raise NetworkError(f"bridge {spec.bridge} vanished right after it was created")
                    changed = True
                kind = link.get(("linkinfo", "kind"))
                if kind != "bridge":
                    raise NetworkConflict(
                        f"interface {spec.bridge} exists but is a {kind or 'plain'} device, not a bridge; "
                        "remove it or choose another bridge name"
                    )
                index = link["index"]
                if (link.get("address") or "").lower() != spec.bridge_mac:
                    await ipr.link("set", index=index, address=spec.bridge_mac)
                changed |= await self._ensure_address(ipr, index)
                if not link["flags"] & _IFF_UP:
                    await ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise _netlink_error(f"configuring bridge {spec.bridge}", e) from e
        return index, changed

    async def _ensure_address(self, ipr: AsyncIPRoute, index: int) -> bool:
        spec = self._spec
        want = (str(spec.gateway), spec.cidr.prefixlen)
        have: set[tuple[str, int]] = set()
        async for msg in await ipr.addr("dump", family=2):
            addr = (msg.get("address"), msg["prefixlen"])
            if msg["index"] == index:
                have.add(addr)
            elif ipaddress.IPv4Network(f"{addr[0]}/{addr[1]}", strict=False).overlaps(spec.cidr):
                raise NetworkConflict(
                    f"network {spec.cidr} overlaps {addr[0]}/{addr[1]} on interface index {msg['index']}; "
                    "choose another address range for the network"
                )
        changed = False
        for address, prefixlen in have - {want}:
            log.info("network %s: removing stray address %s/%s from %s", spec.name, address, prefixlen, spec.bridge)
            try:
                await ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
            except NetlinkError as e:
                if e.code != errno.EADDRNOTAVAIL:
                    raise
            changed = True
        if want not in have:
            try:
                await ipr.addr("add", index=index, address=want[0], prefixlen=want[1])
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            changed = True
        return changed

    async def _delete_bridge(self) -> None:
        name = self._spec.bridge
        try:
            async with AsyncIPRoute() as ipr:
                link = await _get_link(ipr, name)
                if link is None:
                    return
                if link.get(("linkinfo", "kind")) != "bridge":
                    log.warning("network %s: %s is not a bridge; leaving it alone", self._spec.name, name)
                    return
                try:
                    await ipr.link("del", index=link["index"])
                except NetlinkError as e:
                    if e.code != errno.ENODEV:
                        raise
        except NetlinkError as e:
            raise _netlink_error(f"deleting bridge {name}", e) from e

    # -- nftables --

    async def _apply_nft(self, script: str, what: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._nft,
                "-f",
                "-",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as e:
            raise NetworkError(f"{self._nft} not found; install nftables") from e
        _, err = await proc.communicate(script.encode())
        if proc.returncode != 0:
            msg = err.decode(errors="replace").strip()
            exc = NetworkPermissionError if "Operation not permitted" in msg else NetworkError
            raise exc(f"nftables: could not {what} table ip {self._spec.table}: {msg}")

    # -- dnsmasq --

    def _is_ours(self, cmd: list[str]) -> bool:
        return f"--pid-file={self.pid_file}" in cmd[1:]

    def _our_processes(self) -> dict[int, list[str]]:
        """Every live process whose command line names our pid file: pid -> argv."""
        found: dict[int, list[str]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                cmd = _cmdline(int(entry))
                if cmd is not None and self._is_ours(cmd):
                    found[int(entry)] = cmd
        return found

    async def _ensure_dnsmasq(self, ifindex: int, *, restart: bool) -> None:
        want = dnsmasq_argv(self._spec, self.state_dir, self._dnsmasq)
        ours = await asyncio.to_thread(self._our_processes)
        recorded = _read_int(self.pid_file)
        same_bridge = _read_int(self._ifindex_file) == ifindex
        keep = None
        if not restart and same_bridge and recorded in ours and _same_command(ours[recorded], want):
            keep = recorded
        for pid in ours:
            if pid != keep:
                log.info("network %s: stopping dnsmasq %d (outdated or stray)", self._spec.name, pid)
                await _stop_process(pid)
        if keep is None:
            await self._start_dnsmasq(want)
            self._ifindex_file.write_text(f"{ifindex}\n")

    async def _start_dnsmasq(self, argv: list[str]) -> None:
        self.pid_file.unlink(missing_ok=True)
        self._ifindex_file.unlink(missing_ok=True)
        # dnsmasq's first process exits once the daemon has bound its sockets and written the pid file (or failed).
        await _run_daemonizing(argv, f"dnsmasq for network {self._spec.name}", "install dnsmasq (Debian: dnsmasq-base)")
        pid = self.dnsmasq_pid()
        if pid is None:
            raise NetworkError(f"dnsmasq for network {self._spec.name} exited right after start; see {self.log_file}")
        log.info("network %s: started dnsmasq %d on %s", self._spec.name, pid, self._spec.bridge)

    async def _stop_all_dnsmasq(self) -> None:
        for pid in await asyncio.to_thread(self._our_processes):
            await _stop_process(pid)


# --- process helpers ---------------------------------------------------------------------------------------------------


def _enable_ip_forward() -> None:
    try:
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1\n")
    except PermissionError as e:
        raise NetworkPermissionError("cannot enable net.ipv4.ip_forward: permission denied") from e
    except OSError as e:
        raise NetworkError(f"cannot enable net.ipv4.ip_forward: {e}") from e


# --- the fake ----------------------------------------------------------------------------------------------------------


@dataclass
class FakeNetwork:
    """An in-memory :class:`NetworkDriver` for unit tests; it touches nothing on the host.

    Semantics, mirroring :class:`BridgeNetwork`:

    * ``ensure()`` makes the network ``present`` and counts the call in ``ensure_calls``; idempotent. If
      ``fail_with`` is set, it raises that exception instead and changes nothing (the failure stays until reset).
    * ``teardown()`` makes it absent and forgets all leases; idempotent; counts calls in ``teardown_calls``.
    * ``leases()`` returns a copy of the leases while present, else ``{}``. Tests hand out leases with
      :meth:`add_lease` (as if a guest had asked dnsmasq) and take them back with :meth:`drop_lease`.

    ``state_dir`` is accepted so the constructor matches :class:`BridgeNetwork`'s and is otherwise unused.
    """

    spec: NetworkSpec
    state_dir: Path | None = None
    present: bool = False
    ensure_calls: int = 0
    teardown_calls: int = 0
    fail_with: Exception | None = None
    _leases: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _assigned: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def gateway(self) -> str:
        return str(self.spec.gateway)

    async def ensure(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.ensure_calls += 1
        self.present = True

    async def teardown(self) -> None:
        self.teardown_calls += 1
        self.present = False
        self._leases.clear()

    def leases(self) -> dict[str, str]:
        return dict(self._leases) if self.present else {}

    def assignments(self) -> dict[str, str]:
        return {**self._assigned, **dict(self.spec.static_hosts)}

    async def assign(self, mac: str, prefer: Sequence[str] = (), avoid: Collection[str] = ()) -> str:
        mac = mac.lower()
        if (have := self.assignments().get(mac)) is not None:
            return have
        ip = pick_address(self.spec, mac, self._assigned, self._leases, prefer, avoid)
        if ip is None:
            raise NetworkError(f"network {self.spec.name}: no free address left for guest {mac}")
        self._assigned[mac] = ip
        return ip

    async def release(self, mac: str) -> bool:
        return self._assigned.pop(mac.lower(), None) is not None

    def add_lease(self, mac: str, ip: str | None = None) -> str:
        """Lease ``ip`` (default: the lowest free address of the DHCP range) to ``mac``; returns the address.

        Raises ``ValueError`` for an address outside the DHCP range or one leased to another MAC, and
        ``RuntimeError`` when the network is not present or the range is exhausted.
        """
        if not self.present:
            raise RuntimeError(f"network {self.spec.name} is not present; call ensure() first")
        mac = mac.lower()
        fixed = self.assignments().get(mac) if ip is None else None
        if fixed is not None:  # dnsmasq hands a guest with a fixed address exactly that one
            self._leases[mac] = fixed
            return fixed
        taken = {v for k, v in self._leases.items() if k != mac}
        start, end = self.spec.dhcp_start, self.spec.dhcp_end
        assert start is not None and end is not None  # filled in by NetworkSpec.__post_init__
        if ip is None:
            taken |= {v for k, v in self.assignments().items() if k != mac}
            free = (ipaddress.IPv4Address(n) for n in range(int(start), int(end) + 1))
            chosen = next((str(a) for a in free if str(a) not in taken), None)
            if chosen is None:
                raise RuntimeError(f"DHCP range of network {self.spec.name} is exhausted")
            ip = chosen
        addr = ipaddress.IPv4Address(ip)
        if not start <= addr <= end:
            raise ValueError(f"{ip} is outside the DHCP range {start}-{end}")
        if str(addr) in taken:
            raise ValueError(f"{ip} is already leased to another MAC")
        self._leases[mac] = str(addr)
        return str(addr)

    def drop_lease(self, mac: str) -> None:
        """Forget ``mac``'s lease, if any (as if it had expired)."""
        self._leases.pop(mac.lower(), None)


#: Network drivers by name; the agent's configuration picks one. Each is built as ``DRIVERS[name](spec, state_dir)``.
DRIVERS: dict[str, Callable[[NetworkSpec, Path], NetworkDriver]] = {
    "bridge": BridgeNetwork,
    "fake": FakeNetwork,
}
