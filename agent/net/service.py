"""A network's service namespace on one node: where its gateway address, DHCP/DNS and metadata live.

Per overlay network (VNI ``0x00002a``) on each node that carries it::

    mcb-00002a (bridge) ── mcn-00002a (veth, node side) ══ mcs0 (veth, in netns mcs-00002a)
                                                             MAC 02:4d:43:00:00:2a (the same on every node)
                                                             <gateway>/<prefix> per subnet, 169.254.169.254/32
    bridge minicloud_svc_00002a (nft): frames from or to that MAC never enter or leave through mcv-00002a

Every node answers locally on the same addresses with the same MAC, so the gateway and the metadata service are
distributed (what Neutron DVR and OVN do): the nft table keeps the service MAC off the VXLAN device, so no node ever
sees another node's service port. dnsmasq (:mod:`agent.net.dhcp`) and the metadata service (:mod:`agent.net.metadata`)
run inside the namespace; routers will extend it.

:class:`ServiceNamespaces` converges this idempotently: ``ensure`` adopts what exists (same ifindexes, nothing
recreated), ``remove`` deletes the veth (both ends), the nft table and the namespace and is idempotent. Processes
inside the namespace must be stopped first (a namespace with processes outlives its file).
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
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import AsyncIPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns

from agent.net.common import NetworkError, collect, get_link, netlink_error, ns_socket
from agent.net.firewall import NftFirewall, NftTable
from agent.net.overlay import bridge_name, vxlan_name

log = logging.getLogger(__name__)

#: The metadata service's address inside every network (EC2's link-local address).
METADATA_ADDRESS = ipaddress.IPv4Interface("169.254.169.254/32")
#: The service port's name inside the namespace.
INNER_NAME = "mcs0"
VETH_PREFIX = "mcn-"
NAMESPACE_PREFIX = "mcs-"
NETNS_DIR = "/run/netns"
_IFF_UP = 0x1
_AF_INET = 2
_ADDR_GEN_MODE_NONE = 1
_NO_IPV6_LL = {"attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", _ADDR_GEN_MODE_NONE)]})]}


def service_mac(vni: int) -> str:
    """The service port's MAC in network ``vni``: locally administered, unicast, the same on every node."""
    return "02:4d:43:" + ":".join(f"{(vni >> s) & 0xFF:02x}" for s in (16, 8, 0))


def veth_name(vni: int) -> str:
    return f"{VETH_PREFIX}{vni:06x}"


def nft_table(vni: int) -> NftTable:
    return NftTable("bridge", f"minicloud_svc_{vni:06x}")


def nft_body(vni: int) -> str:
    """The table body that keeps the service MAC on this node: nothing from or to it crosses the VXLAN device."""
    mac, vx = service_mac(vni), vxlan_name(vni)
    return "\n".join(
        [
            "\tchain forward {",
            "\t\ttype filter hook forward priority -10; policy accept;",
            f'\t\tiifname "{vx}" ether saddr {mac} drop',
            f'\t\tiifname "{vx}" ether daddr {mac} drop',
            f'\t\toifname "{vx}" ether saddr {mac} drop',
            f'\t\toifname "{vx}" ether daddr {mac} drop',
            "\t}",
        ]
    )


@dataclass(frozen=True)
class ServiceSpec:
    """One network's service port on this node: ``addresses`` are the subnets' gateways with their prefixes
    (169.254.169.254/32 is always added)."""

    vni: int
    mtu: int
    addresses: tuple[ipaddress.IPv4Interface, ...] = ()

    @property
    def mac(self) -> str:
        return service_mac(self.vni)

    @property
    def want_addresses(self) -> frozenset[ipaddress.IPv4Interface]:
        return frozenset({*self.addresses, METADATA_ADDRESS})

    @property
    def bridge(self) -> str:
        return bridge_name(self.vni)

    @property
    def veth(self) -> str:
        return veth_name(self.vni)


def provider_key(network_id: str) -> str:
    """An external network's key in device and namespace names: 10 hex digits of its id's SHA-256."""
    return hashlib.sha256(network_id.encode()).hexdigest()[:10]


def provider_mac(network_id: str, node: str) -> str:
    """The MAC of node ``node``'s DHCP port on external network ``network_id``: locally administered, unicast, and
    different on every node (all of them sit on the one LAN)."""
    digest = hashlib.sha256(f"{network_id}/{node}".encode()).digest()
    return "02:4d:50:" + ":".join(f"{b:02x}" for b in digest[:3])


@dataclass(frozen=True)
class ProviderServiceSpec:
    """A node's DHCP port on an external network whose NICs plug straight into ``bridge`` (the provider, a Linux
    bridge of the node): a veth ``mcp-<key>`` on it, ``mcs0`` with ``address`` and ``mac`` in namespace
    ``<prefix>x<key>``. Nothing else: the LAN's own router is the gateway, no metadata, no nft table."""

    network_id: str
    bridge: str
    mtu: int
    address: ipaddress.IPv4Interface
    mac: str

    @property
    def key(self) -> str:
        return provider_key(self.network_id)

    @property
    def veth(self) -> str:
        return f"mcp-{self.key}"

    @property
    def want_addresses(self) -> frozenset[ipaddress.IPv4Interface]:
        return frozenset({self.address})


@dataclass(frozen=True)
class ServiceState:
    vni: int
    netns: str
    veth_index: int
    inner_index: int


class ServiceNamespaces:
    """The service namespaces of the node whose network namespace is ``netns`` (None: the agent's own). Namespaces
    are files ``<netns_dir>/<prefix><vni hex>``; tests (and several agents on one host) give another ``prefix`` or
    ``netns_dir``. Calls are serialised."""

    def __init__(
        self,
        netns: str | None = None,
        *,
        prefix: str = NAMESPACE_PREFIX,
        netns_dir: str = NETNS_DIR,
        firewall: NftFirewall | None = None,
    ) -> None:
        self.netns = netns
        self.prefix = prefix
        self.netns_dir = netns_dir
        self.firewall = firewall or NftFirewall(netns)
        self._ipr: AsyncIPRoute | None = None
        self._lock = asyncio.Lock()
        self._name_re = re.compile(rf"^{re.escape(prefix)}([0-9a-f]{{6}})$")

    def path(self, vni: int) -> str:
        return os.path.join(self.netns_dir, f"{self.prefix}{vni:06x}")

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def _node(self) -> AsyncIPRoute:
        if self._ipr is None:
            try:
                ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
                await ipr.setup_endpoint()
            except (OSError, NetlinkError) as e:
                raise NetworkError(f"cannot open a netlink socket in the node's namespace: {e}") from e
            self._ipr = ipr
        return self._ipr

    async def list(self) -> list[int]:
        """VNIs whose service namespace exists on this node."""

        def scan() -> list[int]:
            try:
                names = os.listdir(self.netns_dir)
            except FileNotFoundError:
                return []
            return sorted(int(m.group(1), 16) for n in names if (m := self._name_re.match(n)))

        return await asyncio.to_thread(scan)

    async def ensure(self, spec: ServiceSpec) -> ServiceState:
        """Namespace, veth into the network's bridge (which must exist), MAC, MTU, exactly the wanted addresses, and
        the nft table. Idempotent; adopts what exists without recreating it."""
        async with self._lock:
            path = self.path(spec.vni)
            await _ensure_netns(path)
            ipr = await self._node()
            try:
                veth, inner = await self._ensure_veth(ipr, spec, path)
            except NetlinkError as e:
                raise netlink_error(f"plugging the service port of network VNI {spec.vni}", e) from e
            await self.firewall.replace_table(nft_table(spec.vni), nft_body(spec.vni))
            return ServiceState(spec.vni, path, veth, inner)

    async def _ensure_veth(
        self, ipr: AsyncIPRoute, spec: ServiceSpec | ProviderServiceSpec, path: str
    ) -> tuple[int, int]:
        bridge, name = spec.bridge, spec.veth
        br = await get_link(ipr, bridge)
        provider = isinstance(spec, ProviderServiceSpec)
        if br is None:
            raise NetworkError(
                f"no device {bridge} on this node"
                if provider
                else f"bridge {bridge} does not exist; ensure the network first"
            )
        if provider and br.get(("linkinfo", "kind")) != "bridge":
            raise NetworkError(f"{bridge} is not a Linux bridge")
        link = await get_link(ipr, name)
        async with ns_socket(path) as inside:
            peer = await get_link(inside, INNER_NAME)
            if link is not None and (link.get(("linkinfo", "kind")) != "veth" or peer is None):
                log.warning("service: %s is not the veth into %s; recreating it", name, path)
                with contextlib.suppress(NetlinkError):
                    await ipr.link("del", index=link["index"])
                link = None
            if link is None:
                if peer is not None:  # a half left behind
                    with contextlib.suppress(NetlinkError):
                        await inside.link("del", index=peer["index"])
                await ipr.link("add", ifname=name, kind="veth", peer={"ifname": INNER_NAME, "net_ns_fd": path})
                with contextlib.suppress(NetlinkError):
                    await ipr.link("set", ifname=name, af_spec=_NO_IPV6_LL)
                link = await get_link(ipr, name)
                peer = await get_link(inside, INNER_NAME)
                if link is None or peer is None:
                    raise NetworkError(f"the service port {name} vanished right after it was created")
            idx = link["index"]
            if link.get("master") != br["index"]:
                await ipr.link("set", index=idx, master=br["index"])
            if link.get("mtu") != spec.mtu:
                await ipr.link("set", index=idx, mtu=spec.mtu)
            if not link["flags"] & _IFF_UP:
                await ipr.link("set", index=idx, state="up")
            # inside: loopback up, the port's MAC, MTU, addresses, up
            lo = await get_link(inside, "lo")
            if lo is not None and not lo["flags"] & _IFF_UP:
                await inside.link("set", index=lo["index"], state="up")
            pidx = peer["index"]
            if (peer.get("address") or "").lower() != spec.mac:
                await inside.link("set", index=pidx, address=spec.mac)
            if peer.get("mtu") != spec.mtu:
                await inside.link("set", index=pidx, mtu=spec.mtu)
            have: set[ipaddress.IPv4Interface] = set()
            for m in await collect(inside.addr("dump", family=_AF_INET, index=pidx)):
                if m.get("index") == pidx:
                    have.add(ipaddress.IPv4Interface(f"{m.get('address')}/{m['prefixlen']}"))
            want = spec.want_addresses
            for a in have - want:
                with contextlib.suppress(NetlinkError):
                    await inside.addr("del", index=pidx, address=str(a.ip), prefixlen=a.network.prefixlen)
            for a in want - have:
                try:
                    await inside.addr("add", index=pidx, address=str(a.ip), prefixlen=a.network.prefixlen)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
            if not peer["flags"] & _IFF_UP:
                await inside.link("set", index=pidx, state="up")
            return idx, pidx

    async def remove(self, vni: int) -> None:
        """Delete the veth (both ends), the nft table and the namespace. Idempotent. Stop what runs inside first."""
        async with self._lock:
            ipr = await self._node()
            try:
                link = await get_link(ipr, veth_name(vni))
                if link is not None and link.get(("linkinfo", "kind")) == "veth":
                    with contextlib.suppress(NetlinkError):
                        await ipr.link("del", index=link["index"])
            except NetlinkError as e:
                raise netlink_error(f"removing the service port of network VNI {vni}", e) from e
            await self.firewall.delete_tables([nft_table(vni)])
            path = self.path(vni)
            if await asyncio.to_thread(os.path.exists, path):
                try:
                    await asyncio.to_thread(pyroute2_netns.remove, path)
                except OSError as e:
                    raise NetworkError(f"cannot remove network namespace {path}: {e}") from e

    # -- external networks: a DHCP port on the provider bridge -------------------------------------------------------
    def provider_path(self, network_id: str) -> str:
        return os.path.join(self.netns_dir, f"{self.prefix}x{provider_key(network_id)}")

    async def list_providers(self) -> list[str]:
        """Keys (:func:`provider_key`) of the external networks' namespaces on this node."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}x([0-9a-f]{{10}})$")

        def scan() -> list[str]:
            try:
                names = os.listdir(self.netns_dir)
            except FileNotFoundError:
                return []
            return sorted(m.group(1) for n in names if (m := pattern.match(n)))

        return await asyncio.to_thread(scan)

    async def ensure_provider(self, spec: ProviderServiceSpec) -> str:
        """Namespace, veth into the provider bridge (which must exist and be a Linux bridge), MAC, MTU and exactly
        the DHCP address. Idempotent; adopts what exists. Returns the namespace's path."""
        async with self._lock:
            path = self.provider_path(spec.network_id)
            await _ensure_netns(path)
            ipr = await self._node()
            try:
                await self._ensure_veth(ipr, spec, path)
            except NetlinkError as e:
                raise netlink_error(f"plugging the DHCP port of external network {spec.network_id}", e) from e
            return path

    async def remove_provider(self, key: str) -> None:
        """Delete the DHCP port (both ends) and the namespace of the external network with key ``key``
        (:func:`provider_key`). Idempotent. Stop its dnsmasq first."""
        async with self._lock:
            ipr = await self._node()
            try:
                link = await get_link(ipr, f"mcp-{key}")
                if link is not None and link.get(("linkinfo", "kind")) == "veth":
                    with contextlib.suppress(NetlinkError):
                        await ipr.link("del", index=link["index"])
            except NetlinkError as e:
                raise netlink_error(f"removing the DHCP port mcp-{key}", e) from e
            path = os.path.join(self.netns_dir, f"{self.prefix}x{key}")
            if await asyncio.to_thread(os.path.exists, path):
                try:
                    await asyncio.to_thread(pyroute2_netns.remove, path)
                except OSError as e:
                    raise NetworkError(f"cannot remove network namespace {path}: {e}") from e


async def _ensure_netns(path: str) -> None:
    """The named network namespace at ``path``, created if it is not there."""
    if not await asyncio.to_thread(_is_netns, path):
        try:
            await asyncio.to_thread(pyroute2_netns.create, path)
        except OSError as e:
            raise NetworkError(f"cannot create network namespace {path}: {e}") from e


def _is_netns(path: str) -> bool:
    """Whether ``path`` is a mounted network namespace (not merely a file left behind)."""
    if not os.path.exists(path):
        return False
    try:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == path for line in f if len(line.split()) > 4):
                return True
    except OSError:
        pass
    # a stale file (its namespace is gone): remove it so that create() can mount a new one
    with contextlib.suppress(OSError):
        Path(path).unlink()
    return False


class FakeServiceNamespaces:
    """In-memory :class:`ServiceNamespaces` for unit tests: ``spaces`` maps VNI -> the last spec ensured; indexes
    stay while the namespace exists. ``changes`` counts ensures that changed something."""

    def __init__(self) -> None:
        self.spaces: dict[int, ServiceSpec] = {}
        self.indexes: dict[int, tuple[int, int]] = {}
        self.changes = 0
        self._next = 500
        self.prefix = NAMESPACE_PREFIX
        #: External networks' DHCP ports: key -> the last spec ensured; and the Linux bridges the node has (None:
        #: any provider is one).
        self.providers: dict[str, ProviderServiceSpec] = {}
        self.bridges: set[str] | None = None

    def path(self, vni: int) -> str:
        return os.path.join(NETNS_DIR, f"{self.prefix}{vni:06x}")

    async def list(self) -> list[int]:
        return sorted(self.spaces)

    async def ensure(self, spec: ServiceSpec) -> ServiceState:
        if self.spaces.get(spec.vni) != spec:
            self.changes += 1
            self.spaces[spec.vni] = spec
        if spec.vni not in self.indexes:
            self._next += 2
            self.indexes[spec.vni] = (self._next, self._next + 1)
        veth, inner = self.indexes[spec.vni]
        return ServiceState(spec.vni, self.path(spec.vni), veth, inner)

    def provider_path(self, network_id: str) -> str:
        return os.path.join(NETNS_DIR, f"{self.prefix}x{provider_key(network_id)}")

    async def list_providers(self) -> list[str]:
        return sorted(self.providers)

    async def ensure_provider(self, spec: ProviderServiceSpec) -> str:
        if self.bridges is not None and spec.bridge not in self.bridges:
            raise NetworkError(f"{spec.bridge} is not a Linux bridge")
        if self.providers.get(spec.key) != spec:
            self.changes += 1
            self.providers[spec.key] = spec
        return self.provider_path(spec.network_id)

    async def remove_provider(self, key: str) -> None:
        if self.providers.pop(key, None) is not None:
            self.changes += 1

    async def remove(self, vni: int) -> None:
        if self.spaces.pop(vni, None) is not None:
            self.changes += 1
        self.indexes.pop(vni, None)

    async def close(self) -> None:
        return None
