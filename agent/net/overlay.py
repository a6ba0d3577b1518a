"""The node's overlay data plane: per network (by VNI) a Linux bridge and a VXLAN device, built with pyroute2.

What one network puts on a node (``vni=0x00002a``; names fit IFNAMSIZ for every 24-bit VNI)::

    guest tap / veth ──┐
    guest tap / veth ──┤  mcb-00002a  (bridge, no IP address, IPv6 address generation off, MTU = spec.mtu)
                       └─ mcv-00002a  (vxlan id 42, local = this node's underlay address, dstport 4789, nolearning,
                                       bridge port with neigh_suppress on)
                            │ UDP 4789 over the underlay
                            ▼ remote VTEPs

* **Head-end replication**: one all-zero FDB entry on the VXLAN device per other node carrying the network
  (:meth:`LinuxOverlay.set_peers`): broadcast and unknown unicast are copied to each of them.
* **Known unicast**: a static FDB entry per remote MAC on the VXLAN device (``MAC dst VTEP self permanent``) and on
  the bridge (``MAC dev mcv-… master static``) (:meth:`LinuxOverlay.set_fdb`), so a frame to a known MAC goes to its
  node only.
* **ARP suppression**: ``neigh_suppress`` on the VXLAN port plus permanent neighbour entries on the bridge
  (:meth:`LinuxOverlay.set_neighbours`): the bridge answers ARP requests for remote addresses locally (it needs the
  MAC's bridge FDB entry too), so ARP for known addresses never crosses the rack.

Every method converges to exactly what it is given and is idempotent: a second call with the same input sends no
change to the kernel. A restarted agent adopts what exists (:meth:`LinuxOverlay.list_networks`, then
``ensure_network`` changes nothing that already matches; ifindexes stay). Driver errors are :class:`NetworkError`
subclasses; a ``NetlinkError`` never leaves this module.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pyroute2 import AsyncIPRoute, NetlinkError

from agent.net.common import NetworkConflict, NetworkError, collect, get_link, netlink_error

log = logging.getLogger(__name__)

VXLAN_PORT = 4789
BRIDGE_PREFIX = "mcb-"
VXLAN_PREFIX = "mcv-"
ZERO_MAC = "00:00:00:00:00:00"
MAX_VNI = (1 << 24) - 1

_IFF_UP = 0x1
_NUD_NOARP = 0x40
_NUD_PERMANENT = 0x80
_NTF_SELF = 0x02
_NTF_MASTER = 0x04
_AF_INET = 2
_ADDR_GEN_MODE_NONE = 1
_NO_IPV6_LL = {"attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", _ADDR_GEN_MODE_NONE)]})]}
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME_RE = re.compile(rf"^(?:{BRIDGE_PREFIX}|{VXLAN_PREFIX})([0-9a-f]{{6}})$")


def bridge_name(vni: int) -> str:
    """The bridge of network ``vni`` on every node: ``mcb-`` and six hex digits (10 characters)."""
    return f"{BRIDGE_PREFIX}{vni:06x}"


def bridge_mac(vni: int) -> str:
    """The bridge's own MAC, fixed (locally administered, from the VNI): a bridge whose MAC follows its ports changes
    it when a port with a lower MAC is plugged, and the kernel then flushes the bridge's neighbour entries (ARP
    suppression) until the next reconcile."""
    return "02:4d:42:" + ":".join(f"{(vni >> s) & 0xFF:02x}" for s in (16, 8, 0))


def vxlan_name(vni: int) -> str:
    """The VXLAN device of network ``vni`` on every node: ``mcv-`` and six hex digits (10 characters)."""
    return f"{VXLAN_PREFIX}{vni:06x}"


def _mac(value: str) -> str:
    mac = value.lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        raise ValueError(f"MAC address {value!r}: use six hex octets separated by ':'")
    return mac


def _vni(value: int) -> int:
    if not 1 <= value <= MAX_VNI:
        raise ValueError(f"VNI {value}: use 1 to {MAX_VNI}")
    return value


# --- typed inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverlaySpec:
    """One network's devices on one node. Immutable, validated on construction (``ValueError`` says what is wrong).

    ``local`` is this node's underlay address (from its config); ``underlay`` optionally names the underlay
    interface the VXLAN device is bound to; ``mtu`` is the guests' MTU (underlay MTU - 50).
    """

    vni: int
    local: ipaddress.IPv4Address
    mtu: int = 1450
    underlay: str | None = None

    def __post_init__(self) -> None:
        _vni(self.vni)
        object.__setattr__(self, "local", ipaddress.IPv4Address(self.local))
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"MTU {self.mtu}: use 576 to 9000")

    @property
    def bridge(self) -> str:
        return bridge_name(self.vni)

    @property
    def vxlan(self) -> str:
        return vxlan_name(self.vni)


@dataclass(frozen=True)
class FdbEntry:
    """A remote NIC: frames to ``mac`` go to the node whose underlay address is ``vtep``."""

    mac: str
    vtep: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", _mac(self.mac))
        object.__setattr__(self, "vtep", ipaddress.IPv4Address(self.vtep))
        if self.mac == ZERO_MAC:
            raise ValueError("the all-zero MAC is a flooding entry; pass remote nodes to set_peers instead")


@dataclass(frozen=True)
class Neighbour:
    """An address of the network and the MAC that owns it (answered locally by ARP suppression)."""

    ip: ipaddress.IPv4Address
    mac: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", ipaddress.IPv4Address(self.ip))
        object.__setattr__(self, "mac", _mac(self.mac))


@dataclass(frozen=True)
class OverlayState:
    """What :meth:`OverlayDriver.list_networks` finds of one network on the node (None: that part is missing)."""

    vni: int
    bridge_index: int | None
    vxlan_index: int | None
    local: ipaddress.IPv4Address | None = None
    mtu: int | None = None

    @property
    def complete(self) -> bool:
        return self.bridge_index is not None and self.vxlan_index is not None


# --- the pure diff -----------------------------------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Delta(Generic[K, V]):
    """How to turn ``have`` into ``want``: write ``upsert`` (new or changed keys), delete ``remove``."""

    upsert: dict[K, V] = field(default_factory=dict)
    remove: frozenset[K] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.upsert and not self.remove


def diff(have: Mapping[K, V], want: Mapping[K, V]) -> Delta[K, V]:
    """The change that makes ``have`` equal to ``want`` (keys are MACs, IPs or VTEPs). Pure."""
    upsert = {k: v for k, v in want.items() if k not in have or have[k] != v}
    return Delta(upsert=upsert, remove=frozenset(k for k in have if k not in want))


def fdb_map(entries: Iterable[FdbEntry]) -> dict[str, ipaddress.IPv4Address]:
    """MAC -> VTEP; ``ValueError`` when one MAC is given two different VTEPs."""
    out: dict[str, ipaddress.IPv4Address] = {}
    for e in entries:
        if out.setdefault(e.mac, e.vtep) != e.vtep:
            raise ValueError(f"MAC {e.mac} given on two nodes: {out[e.mac]} and {e.vtep}")
    return out


def neighbour_map(entries: Iterable[Neighbour]) -> dict[ipaddress.IPv4Address, str]:
    """IP -> MAC; ``ValueError`` when one address is given two different MACs."""
    out: dict[ipaddress.IPv4Address, str] = {}
    for n in entries:
        if out.setdefault(n.ip, n.mac) != n.mac:
            raise ValueError(f"address {n.ip} given two MACs: {out[n.ip]} and {n.mac}")
    return out


def peer_map(vteps: Iterable[ipaddress.IPv4Address | str]) -> dict[ipaddress.IPv4Address, None]:
    return {ipaddress.IPv4Address(v): None for v in vteps}


# --- the protocol ------------------------------------------------------------------------------------------------------


class OverlayDriver(Protocol):
    """What the node's network reconciler needs from the overlay data plane, real or fake.

    Every method is idempotent and converges: ``set_*`` make the node hold exactly the given set (missing entries
    added, extra ones removed, changed ones replaced) and return the delta they applied. ``set_*`` on a network that
    is not on the node raise :class:`NetworkError`; ``remove_network`` of an absent network is success.
    """

    async def ensure_network(self, spec: OverlaySpec) -> OverlayState: ...

    async def set_peers(
        self, vni: int, vteps: Iterable[ipaddress.IPv4Address | str]
    ) -> Delta[ipaddress.IPv4Address, None]: ...

    async def set_fdb(self, vni: int, entries: Iterable[FdbEntry]) -> Delta[str, ipaddress.IPv4Address]: ...

    async def set_neighbours(self, vni: int, entries: Iterable[Neighbour]) -> Delta[ipaddress.IPv4Address, str]: ...

    async def remove_network(self, vni: int) -> None: ...

    async def list_networks(self) -> list[OverlayState]: ...

    async def close(self) -> None: ...


# --- the real driver ---------------------------------------------------------------------------------------------------


def _attrs(msg: Any, *path: str) -> dict[str, Any]:
    """The NLA list at ``path`` inside a link message as a dict (``("linkinfo", "data")`` etc.)."""
    node = msg.get(path)
    if node is None:
        return {}
    return {k: v for k, v in node.get("attrs", []) if k != "UNKNOWN"}


class LinuxOverlay:
    """:class:`OverlayDriver` on the kernel's bridge and VXLAN devices, in the agent's namespace or in ``netns``.

    ``netns`` (a name under ``/run/netns`` or a path) must exist (opened with ``flags=0``: a typo fails instead of
    creating a namespace). One netlink socket is opened on first use and kept until :meth:`close`; calls on one
    object are serialised. The object holds no other state: a new one on the same namespace adopts what is there.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: AsyncIPRoute | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def _sock(self) -> AsyncIPRoute:
        if self._ipr is None:
            try:
                ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
                await ipr.setup_endpoint()
            except (OSError, NetlinkError) as e:
                where = f"network namespace {self.netns}" if self.netns else "this namespace"
                raise NetworkError(f"cannot open a netlink socket in {where}: {e}") from e
            self._ipr = ipr
        return self._ipr

    # -- networks --

    async def ensure_network(self, spec: OverlaySpec) -> OverlayState:
        """Bridge and VXLAN device present, configured as ``spec`` says, enslaved and up; returns their indexes.

        Adopts matching devices without changing them. A VXLAN device whose VNI, local address, port, learning or
        underlay differ is recreated (those cannot change in place); the MTU, master, ``neigh_suppress`` and up state
        are corrected in place. Raises :class:`NetworkConflict` when a device of our name is not a bridge/vxlan, or
        another VXLAN device already holds the VNI.
        """
        async with self._lock:
            ipr = await self._sock()
            try:
                return await self._ensure(ipr, spec)
            except NetlinkError as e:
                raise netlink_error(f"ensuring network VNI {spec.vni}", e) from e

    async def _ensure(self, ipr: AsyncIPRoute, spec: OverlaySpec) -> OverlayState:
        underlay_index = None
        if spec.underlay is not None:
            under = await get_link(ipr, spec.underlay)
            if under is None:
                raise NetworkError(f"underlay interface {spec.underlay} does not exist")
            underlay_index = under["index"]

        br = await self._ensure_link(ipr, spec.bridge, "bridge", {"mtu": spec.mtu}, lambda _m: True)
        bri = br["index"]
        if (br.get("address") or "").lower() != bridge_mac(spec.vni):
            await ipr.link("set", index=bri, address=bridge_mac(spec.vni))

        def vxlan_matches(msg: Any) -> bool:
            data = _attrs(msg, "linkinfo", "data")
            return (
                data.get("IFLA_VXLAN_ID") == spec.vni
                and data.get("IFLA_VXLAN_LOCAL") == str(spec.local)
                and data.get("IFLA_VXLAN_PORT") == VXLAN_PORT
                and data.get("IFLA_VXLAN_LEARNING") == 0
                and data.get("IFLA_VXLAN_LINK") == underlay_index
            )

        vx_args: dict[str, Any] = {
            "vxlan_id": spec.vni,
            "vxlan_local": str(spec.local),
            "vxlan_port": VXLAN_PORT,
            "vxlan_learning": 0,
            "mtu": spec.mtu,
            "master": bri,
        }
        if underlay_index is not None:
            vx_args["vxlan_link"] = underlay_index
        vx = await self._ensure_link(ipr, spec.vxlan, "vxlan", vx_args, vxlan_matches)
        vxi = vx["index"]

        if vx.get("master") != bri:
            await ipr.link("set", index=vxi, master=bri)
        if _attrs(vx, "linkinfo", "slave_data").get("IFLA_BRPORT_NEIGH_SUPPRESS") != 1:
            await ipr.brport("set", index=vxi, neigh_suppress=1)
        for msg in (br, vx):
            if msg.get("mtu") != spec.mtu:
                await ipr.link("set", index=msg["index"], mtu=spec.mtu)
            inet6 = _attrs(msg, "af_spec").get("AF_INET6")
            if (
                inet6 is not None
                and dict(inet6.get("attrs", [])).get("IFLA_INET6_ADDR_GEN_MODE") != _ADDR_GEN_MODE_NONE
            ):
                await ipr.link("set", index=msg["index"], af_spec=_NO_IPV6_LL)
        for msg in (vx, br):
            if not msg["flags"] & _IFF_UP:
                await ipr.link("set", index=msg["index"], state="up")
        return OverlayState(spec.vni, bri, vxi, spec.local, spec.mtu)

    async def _ensure_link(self, ipr: AsyncIPRoute, name: str, kind: str, args: dict[str, Any], matches: Any) -> Any:
        link = await get_link(ipr, name)
        if link is not None:
            have = link.get(("linkinfo", "kind"))
            if have != kind:
                raise NetworkConflict(
                    f"interface {name} exists but is a {have or 'plain'} device, not a {kind}; remove it by hand"
                )
            if matches(link):
                return link
            log.warning("overlay: %s does not match its spec; recreating it", name)
            await self._delete_index(ipr, link["index"])
        try:
            await ipr.link("add", ifname=name, kind=kind, **args)
        except NetlinkError as e:
            if e.code == errno.EEXIST and kind == "vxlan":
                raise NetworkConflict(
                    f"cannot create {name}: another VXLAN device already uses VNI {args['vxlan_id']} "
                    f"on port {VXLAN_PORT}; remove it"
                ) from e
            if e.code != errno.EEXIST:
                raise
        try:
            await ipr.link("set", ifname=name, af_spec=_NO_IPV6_LL)
        except NetlinkError as e:  # IPv6 disabled in this namespace: nothing to turn off
            log.debug("overlay: %s: cannot turn off IPv6 address generation: %s", name, e)
        link = await get_link(ipr, name)
        if link is None:
            raise NetworkError(f"interface {name} vanished right after it was created")
        return link

    @staticmethod
    async def _delete_index(ipr: AsyncIPRoute, index: int) -> None:
        try:
            await ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise

    async def remove_network(self, vni: int) -> None:
        """Delete the network's VXLAN device and bridge (with every FDB and neighbour entry on them). Idempotent;
        a device of our name but another kind is left alone (logged)."""
        _vni(vni)
        async with self._lock:
            ipr = await self._sock()
            try:
                for name, kind in ((vxlan_name(vni), "vxlan"), (bridge_name(vni), "bridge")):
                    link = await get_link(ipr, name)
                    if link is None:
                        continue
                    if link.get(("linkinfo", "kind")) != kind:
                        log.warning("overlay: %s is not a %s; leaving it alone", name, kind)
                        continue
                    await self._delete_index(ipr, link["index"])
            except NetlinkError as e:
                raise netlink_error(f"removing network VNI {vni}", e) from e

    async def list_networks(self) -> list[OverlayState]:
        """Every network whose bridge or VXLAN device exists here (by our device names), sorted by VNI. Reads only."""
        async with self._lock:
            ipr = await self._sock()
            try:
                links = await collect(ipr.link("dump"))
            except NetlinkError as e:
                raise netlink_error("listing overlay networks", e) from e
        found: dict[int, dict[str, Any]] = {}
        for link in links:
            name = link.get("ifname") or ""
            m = _NAME_RE.match(name)
            if not m:
                continue
            entry = found.setdefault(int(m.group(1), 16), {})
            kind = link.get(("linkinfo", "kind"))
            if name.startswith(BRIDGE_PREFIX) and kind == "bridge":
                entry["bridge"] = link
            elif name.startswith(VXLAN_PREFIX) and kind == "vxlan":
                entry["vxlan"] = link
        out = []
        for vni, parts in sorted(found.items()):
            vx, br = parts.get("vxlan"), parts.get("bridge")
            local = _attrs(vx, "linkinfo", "data").get("IFLA_VXLAN_LOCAL") if vx is not None else None
            mtu = (vx or br or {}).get("mtu") if (vx or br) is not None else None
            out.append(
                OverlayState(
                    vni=vni,
                    bridge_index=br["index"] if br is not None else None,
                    vxlan_index=vx["index"] if vx is not None else None,
                    local=ipaddress.IPv4Address(local) if local else None,
                    mtu=mtu,
                )
            )
        return out

    # -- forwarding entries --

    async def _indexes(self, ipr: AsyncIPRoute, vni: int) -> tuple[int, int]:
        br = await get_link(ipr, bridge_name(vni))
        vx = await get_link(ipr, vxlan_name(vni))
        if br is None or vx is None:
            raise NetworkError(f"network VNI {vni} is not on this node; ensure it first")
        return br["index"], vx["index"]

    async def _vxlan_fdb(
        self, ipr: AsyncIPRoute, vxi: int, bri: int
    ) -> tuple[dict[Any, Any], dict[str, Any], set[str]]:
        """(peers, remote MAC -> VTEP, static bridge MACs on the VXLAN port) as the kernel has them."""
        peers: dict[ipaddress.IPv4Address, None] = {}
        remotes: dict[str, ipaddress.IPv4Address] = {}
        bridge_static: set[str] = set()
        for m in await collect(ipr.fdb("dump", ifindex=vxi)):
            if m["ifindex"] != vxi:
                continue
            mac = (m.get("lladdr") or "").lower()
            if m.get("master") == bri:
                # static (NOARP, not PERMANENT): what set_fdb added; the port's own MAC is PERMANENT, learned ones
                # are REACHABLE/STALE
                if m["state"] & _NUD_NOARP and not m["state"] & _NUD_PERMANENT:
                    bridge_static.add(mac)
                continue
            dst = m.get("dst")
            if dst is None or not m["flags"] & _NTF_SELF:
                continue
            if mac == ZERO_MAC:
                peers[ipaddress.IPv4Address(dst)] = None
            else:
                remotes[mac] = ipaddress.IPv4Address(dst)
        return peers, remotes, bridge_static

    async def set_peers(
        self, vni: int, vteps: Iterable[ipaddress.IPv4Address | str]
    ) -> Delta[ipaddress.IPv4Address, None]:
        """Exactly one all-zero FDB entry (head-end replication) per VTEP in ``vteps`` (this node's own is skipped
        by the caller: flooding to ourselves would loop back)."""
        want = peer_map(vteps)
        async with self._lock:
            ipr = await self._sock()
            try:
                bri, vxi = await self._indexes(ipr, vni)
                have, _, _ = await self._vxlan_fdb(ipr, vxi, bri)
                delta = diff(have, want)
                for vtep in delta.remove:
                    await self._fdb_del(ipr, vxi, ZERO_MAC, dst=str(vtep))
                for vtep in delta.upsert:
                    await ipr.fdb(
                        "append",
                        ifindex=vxi,
                        lladdr=ZERO_MAC,
                        dst=str(vtep),
                        state=_NUD_PERMANENT | _NUD_NOARP,
                        flags=_NTF_SELF,
                    )
            except NetlinkError as e:
                raise netlink_error(f"setting the peers of network VNI {vni}", e) from e
        return delta

    async def set_fdb(self, vni: int, entries: Iterable[FdbEntry]) -> Delta[str, ipaddress.IPv4Address]:
        """Exactly these remote MACs: on the VXLAN device (``MAC dst VTEP``) and as static bridge entries on the
        VXLAN port. A MAC that moved to another node is replaced in place (no window without an entry)."""
        want = fdb_map(entries)
        async with self._lock:
            ipr = await self._sock()
            try:
                bri, vxi = await self._indexes(ipr, vni)
                _, have, bridge_static = await self._vxlan_fdb(ipr, vxi, bri)
                delta = diff(have, want)
                for mac in delta.remove:
                    await self._fdb_del(ipr, vxi, mac, dst=str(have[mac]))
                for mac in bridge_static - want.keys():
                    await self._fdb_del(ipr, vxi, mac, master=bri)
                for mac, vtep in delta.upsert.items():
                    await ipr.fdb(
                        "replace",
                        ifindex=vxi,
                        lladdr=mac,
                        dst=str(vtep),
                        state=_NUD_PERMANENT | _NUD_NOARP,
                        flags=_NTF_SELF,
                    )
                for mac in want.keys() - bridge_static:
                    await ipr.fdb("replace", ifindex=vxi, lladdr=mac, master=bri, state=_NUD_NOARP, flags=_NTF_MASTER)
            except NetlinkError as e:
                raise netlink_error(f"setting the FDB of network VNI {vni}", e) from e
        return delta

    @staticmethod
    async def _fdb_del(ipr: AsyncIPRoute, ifindex: int, mac: str, **kw: Any) -> None:
        flags = _NTF_MASTER if "master" in kw else _NTF_SELF
        try:
            await ipr.fdb("del", ifindex=ifindex, lladdr=mac, flags=flags, **kw)
        except NetlinkError as e:
            if e.code != errno.ENOENT:  # already gone
                raise

    async def set_neighbours(self, vni: int, entries: Iterable[Neighbour]) -> Delta[ipaddress.IPv4Address, str]:
        """Exactly these permanent IPv4 neighbour entries on the bridge (what ARP suppression answers from)."""
        want = neighbour_map(entries)
        async with self._lock:
            ipr = await self._sock()
            try:
                bri, _ = await self._indexes(ipr, vni)
                have: dict[ipaddress.IPv4Address, str] = {}
                for m in await collect(ipr.neigh("dump", family=_AF_INET, ifindex=bri)):
                    if m["ifindex"] == bri and m["state"] & _NUD_PERMANENT and m.get("dst") and m.get("lladdr"):
                        have[ipaddress.IPv4Address(m.get("dst"))] = m.get("lladdr").lower()
                delta = diff(have, want)
                for ip in delta.remove:
                    try:
                        await ipr.neigh("del", ifindex=bri, dst=str(ip), family=_AF_INET)
                    except NetlinkError as e:
                        if e.code != errno.ENOENT:
                            raise
                for ip, mac in delta.upsert.items():
                    await ipr.neigh(
                        "replace", ifindex=bri, dst=str(ip), lladdr=mac, state=_NUD_PERMANENT, family=_AF_INET
                    )
            except NetlinkError as e:
                raise netlink_error(f"setting the neighbours of network VNI {vni}", e) from e
        return delta


# --- the fake ----------------------------------------------------------------------------------------------------------


@dataclass
class _FakeNet:
    spec: OverlaySpec
    bridge_index: int
    vxlan_index: int
    peers: dict[ipaddress.IPv4Address, None] = field(default_factory=dict)
    fdb: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)
    neighbours: dict[ipaddress.IPv4Address, str] = field(default_factory=dict)


class FakeOverlay:
    """An in-memory :class:`OverlayDriver` for unit tests; it touches nothing on the host.

    Semantics, mirroring :class:`LinuxOverlay`: ``ensure_network`` allocates two ifindexes the first time and keeps
    them while the VNI, local address and underlay stay the same (an MTU change keeps them; another local address
    or underlay replaces the VXLAN device and drops its FDB, as the kernel does); ``set_*`` converge to exactly the
    given set and return the delta, raising :class:`NetworkError` for a network that is not present;
    ``remove_network`` forgets everything of the network (idempotent). ``changes`` counts every write a real driver
    would send to the kernel, so tests can assert that a second identical call sends none. Set ``fail_with`` to make
    every call raise that exception.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.networks: dict[int, _FakeNet] = {}
        self.changes = 0
        self.fail_with: Exception | None = None
        self._next_index = 100

    def _alloc(self) -> int:
        self._next_index += 1
        return self._next_index

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def _net(self, vni: int) -> _FakeNet:
        self._check()
        net = self.networks.get(vni)
        if net is None:
            raise NetworkError(f"network VNI {vni} is not on this node; ensure it first")
        return net

    async def ensure_network(self, spec: OverlaySpec) -> OverlayState:
        self._check()
        net = self.networks.get(spec.vni)
        if net is None:
            net = self.networks[spec.vni] = _FakeNet(spec, self._alloc(), self._alloc())
            self.changes += 2
        elif net.spec != spec:
            if (net.spec.local, net.spec.underlay) != (spec.local, spec.underlay):
                net.vxlan_index = self._alloc()
                net.peers.clear()
                net.fdb.clear()
            net.spec = spec
            self.changes += 1
        return OverlayState(spec.vni, net.bridge_index, net.vxlan_index, spec.local, spec.mtu)

    def _apply(self, current: dict[Any, Any], delta: Delta[Any, Any]) -> None:
        for k in delta.remove:
            del current[k]
        current.update(delta.upsert)
        self.changes += len(delta.remove) + len(delta.upsert)

    async def set_peers(
        self, vni: int, vteps: Iterable[ipaddress.IPv4Address | str]
    ) -> Delta[ipaddress.IPv4Address, None]:
        net = self._net(vni)
        delta = diff(net.peers, peer_map(vteps))
        self._apply(net.peers, delta)
        return delta

    async def set_fdb(self, vni: int, entries: Iterable[FdbEntry]) -> Delta[str, ipaddress.IPv4Address]:
        want = fdb_map(entries)
        net = self._net(vni)
        delta = diff(net.fdb, want)
        self._apply(net.fdb, delta)
        return delta

    async def set_neighbours(self, vni: int, entries: Iterable[Neighbour]) -> Delta[ipaddress.IPv4Address, str]:
        want = neighbour_map(entries)
        net = self._net(vni)
        delta = diff(net.neighbours, want)
        self._apply(net.neighbours, delta)
        return delta

    async def remove_network(self, vni: int) -> None:
        self._check()
        if self.networks.pop(_vni(vni), None) is not None:
            self.changes += 2

    async def list_networks(self) -> list[OverlayState]:
        self._check()
        return [
            OverlayState(vni, n.bridge_index, n.vxlan_index, n.spec.local, n.spec.mtu)
            for vni, n in sorted(self.networks.items())
        ]

    async def close(self) -> None:
        return None


#: Overlay drivers by name; the agent's configuration picks one. Each is built as ``DRIVERS[name](netns)``.
DRIVERS: dict[str, type[LinuxOverlay] | type[FakeOverlay]] = {"linux": LinuxOverlay, "fake": FakeOverlay}
