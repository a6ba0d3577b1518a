"""Networking's resource kinds, declared once (see :mod:`minicloud.core.kinds`): networks (VPCs), subnets, security
groups and routers (project-scoped, public), and the allocation kinds ``vni`` and ``ipalloc`` (cluster-scoped,
internal), whose uniqueness of (kind, project, name) in the store is what makes an allocation a compare-and-swap
across nodes (:mod:`minicloud.network.ipam`).

Back-references (a network's subnets and routers, a subnet's router) are kept by the services in the same
transaction as the change that makes them, with a compare-and-swap on the record that holds them: "is this network
still in use?" is one read, and it cannot race a concurrent subnet create.
"""

from __future__ import annotations

from typing import Any

import msgspec

from minicloud.core.kinds import Column, Kind, Obj, declare
from minicloud.model.network import (
    Network,
    NetworkUpdate,
    Route,
    Router,
    RouterEgressCounter,
    RouterUpdate,
    SecurityGroup,
    SecurityGroupRule,
    SecurityGroupUpdate,
    Subnet,
    SubnetUpdate,
)

#: VXLAN network identifiers handed out (0..4095 are left for provider VLAN-like uses and tests).
VNI_MIN = 4096
VNI_MAX = 16_777_215
#: Bytes of VXLAN encapsulation (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
VXLAN_OVERHEAD = 50


class RouteSpec(msgspec.Struct, kw_only=True):
    destination: str
    nexthop: str


def _routes(routes: list[RouteSpec]) -> list[Route]:
    return [Route(destination=r.destination, nexthop=r.nexthop) for r in routes]


# -- networks ------------------------------------------------------------------------------------------------------
class NetworkSpec(msgspec.Struct, kw_only=True):
    cidr: str
    #: None for external networks (no overlay).
    vni: int | None = None
    mtu: int = 1450
    external: bool = False
    provider: str = ""
    description: str = ""
    #: Subnet id → CIDR, kept by the subnet services (each subnet create/delete is a CAS on the network).
    subnets: dict[str, str] = {}
    #: Routers whose external gateway is on this network (kept by the router services, CAS on the network).
    routers: list[str] = []


def _render_network(obj: Obj[NetworkSpec, Any]) -> Network:
    s = obj.spec
    return Network(
        **obj.common_fields(),
        cidr=s.cidr,
        vni=s.vni,
        mtu=s.mtu,
        external=s.external,
        provider=s.provider,
        description=s.description,
        subnets=sorted(s.subnets),
        routers=list(s.routers),
    )


#: Create (VNI allocation) and delete (refused while in use; frees the VNI) by hand; list, show and patch derived.
#: Growth: one per VPC, user-deleted.
NETWORK = declare(
    Kind(
        name="network",
        plural="networks",
        prefix="net",
        spec=NetworkSpec,
        action="network:networks",
        view=Network,
        render=_render_network,
        noun="network",
        columns=(
            Column("name", "name"),
            Column("cidr", "cidr"),
            Column("vni", "vni"),
            Column("mtu", "mtu"),
            Column("external", "external"),
            Column("id", "id"),
        ),
        patch=NetworkUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- subnets -------------------------------------------------------------------------------------------------------
class SubnetSpec(msgspec.Struct, kw_only=True):
    #: The network's id.
    network: str
    cidr: str
    gateway: str
    allocation_start: str
    allocation_end: str
    dns_servers: list[str] = []
    routes: list[RouteSpec] = []
    #: The router it is attached to ("" none; kept by the router services, CAS on the subnet).
    router: str = ""
    #: Set (CAS) while a delete checks that no address is allocated; allocations carry a Check on the subnet's
    #: revision, so none can slip in between the check and the delete.
    deleting: bool = False
    description: str = ""


def _render_subnet(obj: Obj[SubnetSpec, Any]) -> Subnet:
    s = obj.spec
    return Subnet(
        **obj.common_fields(),
        network=s.network,
        cidr=s.cidr,
        gateway=s.gateway,
        allocation_start=s.allocation_start,
        allocation_end=s.allocation_end,
        dns_servers=list(s.dns_servers),
        routes=_routes(s.routes),
        router=s.router or None,
        description=s.description,
    )


SUBNET = declare(
    Kind(
        name="subnet",
        plural="subnets",
        prefix="sub",
        spec=SubnetSpec,
        action="network:subnets",
        view=Subnet,
        render=_render_subnet,
        noun="subnet",
        columns=(
            Column("name", "name"),
            Column("cidr", "cidr"),
            Column("gateway", "gateway"),
            Column("network", "network"),
            Column("router", "router"),
            Column("id", "id"),
        ),
        patch=SubnetUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- security groups -----------------------------------------------------------------------------------------------
class RuleSpec(msgspec.Struct, kw_only=True):
    id: str
    direction: str
    protocol: str = "any"
    port_min: int | None = None
    port_max: int | None = None
    remote_cidr: str | None = None
    #: A security group id of the same project.
    remote_group: str | None = None
    description: str = ""


class SecurityGroupSpec(msgspec.Struct, kw_only=True):
    description: str = ""
    rules: list[RuleSpec] = []


def _render_group(obj: Obj[SecurityGroupSpec, Any]) -> SecurityGroup:
    return SecurityGroup(
        **obj.common_fields(),
        description=obj.spec.description,
        rules=[msgspec.convert(msgspec.to_builtins(r), SecurityGroupRule) for r in obj.spec.rules],
    )


SECURITY_GROUP = declare(
    Kind(
        name="securitygroup",
        plural="security-groups",
        prefix="sg",
        spec=SecurityGroupSpec,
        action="network:securitygroups",
        view=SecurityGroup,
        render=_render_group,
        noun="security-group",
        title="security group",
        columns=(Column("name", "name"), Column("description", "description"), Column("id", "id")),
        patch=SecurityGroupUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- routers -------------------------------------------------------------------------------------------------------
class RouterSpec(msgspec.Struct, kw_only=True):
    #: Attached subnet ids (each subnet names the router back).
    subnets: list[str] = []
    external_network: str = ""
    #: The external network's subnet its address was allocated in, and the address.
    external_subnet: str = ""
    external_address: str = ""
    #: Node -> the external address of its leg (its SNAT source there; :func:`minicloud.network.routers.node_address`):
    #: the first node to need a leg takes ``external_address``, each other one an address of the same subnet (holder
    #: ``router/<id>/<node>``), so no two nodes put the same address and MAC on the LAN. Released with the router.
    node_addresses: dict[str, str] = {}
    routes: list[RouteSpec] = []
    description: str = ""


class RouterEgress(msgspec.Struct, kw_only=True):
    """One node's egress counter of one of the router's legs (agent/reconcilers/egress.py ``report_egress``)."""

    since: int = 0
    bytes: int = 0


class RouterStatus(msgspec.Struct, kw_only=True):
    #: ``"<node>/<vni>"`` -> the leg's running egress byte counter, read by the ``network.egress-gib`` meter. Declared
    #: so that an edit of the router (load, change, dump) keeps what the nodes reported.
    egress: dict[str, RouterEgress] = {}


def _render_router(obj: Obj[RouterSpec, Any]) -> Router:
    s = obj.spec
    return Router(
        **obj.common_fields(),
        subnets=list(s.subnets),
        external_network=s.external_network or None,
        external_address=s.external_address or None,
        node_addresses=dict(sorted(s.node_addresses.items())),
        routes=_routes(s.routes),
        description=s.description,
        egress={leg: RouterEgressCounter(since=e.since, bytes=e.bytes) for leg, e in sorted(obj.status.egress.items())},
    )


ROUTER = declare(
    Kind(
        name="router",
        plural="routers",
        prefix="rtr",
        spec=RouterSpec,
        status=RouterStatus,
        action="network:routers",
        view=Router,
        render=_render_router,
        noun="router",
        columns=(
            Column("name", "name"),
            Column("subnets", "subnets"),
            Column("external_address", "external_address"),
            Column("id", "id"),
        ),
        patch=RouterUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- allocations (internal) ----------------------------------------------------------------------------------------
class VniSpec(msgspec.Struct, kw_only=True):
    network: str
    project: str


#: One per allocated VNI, named by the number (cluster-scoped): two creates that pick the same VNI collide on the
#: name, on one node or across an etcd cluster. Growth: one per network, deleted with it.
VNI = declare(Kind(name="vni", plural="vnis", prefix="vni", spec=VniSpec, scope="cluster", generic=frozenset()))


class IpAllocSpec(msgspec.Struct, kw_only=True):
    subnet: str
    address: str
    #: What holds the address, ``<kind>/<id>`` (``subnet/sub-…`` for a gateway, ``router/rtr-…``, later NICs).
    holder: str


#: One per allocated address, named ``<subnet id>/<address>`` (cluster-scoped), created in the same transaction as
#: its holder. Growth: one per NIC/gateway, deleted with its holder; listed by the subnet's name prefix.
IPALLOC = declare(
    Kind(name="ipalloc", plural="ipallocs", prefix="ipa", spec=IpAllocSpec, scope="cluster", generic=frozenset())
)


class PortSpec(msgspec.Struct, kw_only=True):
    """An instance's NIC on a VPC network: the address IPAM gave it (its ``ipalloc`` names this port as holder,
    committed in the same transaction), its MAC, and where it is plugged. The node's network reconciler builds the
    network on every node that has a port of it, and FDB/neighbour entries on the others from these records."""

    network: str
    subnet: str
    #: The IPv4 address (from the subnet's allocation range, or the one asked for).
    address: str
    #: ``52:54:00:xx:xx:xx``, fixed for the port's life (DHCP and the static FDB entries key on it).
    mac: str
    #: The instance it belongs to ("" while detached) and its position among the instance's NICs (0 = first).
    instance: str = ""
    index: int = 0
    #: The node running the instance (copied from its placement; "" until placed). Indexed for the reconcilers.
    node: str = ""
    #: While its instance migrates: the target node (set with the migration, cleared when it ends, and ``node`` set
    #: to it when it succeeds). That node builds the network, the NIC's DHCP host and firewall chain before the
    #: guest arrives (:mod:`minicloud.compute.migration`); every other node keeps sending to ``node`` until then.
    arriving: str = ""
    security_groups: list[str] = []
    description: str = ""


#: NICs (``instance create --nic …``, ``instance nic add|remove``). Internal for now (shown inside the instance):
#: no routes of their own. Growth: one per NIC, deleted with its instance.
PORT = declare(Kind(name="port", plural="ports", prefix="port", spec=PortSpec, generic=frozenset()))


# -- floating IPs --------------------------------------------------------------------------------------------------
from minicloud.model.floating_ip import FloatingIp, FloatingIpUpdate  # noqa: E402  (appended with the kind)


class FloatingIpSpec(msgspec.Struct, kw_only=True):
    """A public address of an external network (its ``ipalloc`` names this record as holder) and, while
    associated, the NIC it is NATed to. The network reconciler of the node running that NIC programs the NAT."""

    network: str
    subnet: str
    address: str
    instance: str = ""
    port: str = ""
    fixed_address: str = ""
    #: The NIC's (VPC) network, so a node knows which service namespace holds the NAT.
    port_network: str = ""
    description: str = ""


def _render_floating_ip(obj: Obj[FloatingIpSpec, Any]) -> FloatingIp:
    s = obj.spec
    return FloatingIp(
        **obj.common_fields(),
        network=s.network,
        address=s.address,
        instance=s.instance or None,
        port=s.port or None,
        fixed_address=s.fixed_address or None,
        description=s.description,
    )


#: ``floating-ip allocate|associate|disassociate|release``; named by its address. Growth: one per allocated public
#: address, user-released.
FLOATING_IP = declare(
    Kind(
        name="floatingip",
        plural="floating-ips",
        prefix="fip",
        spec=FloatingIpSpec,
        action="network:floatingips",
        view=FloatingIp,
        render=_render_floating_ip,
        noun="floating-ip",
        title="floating IP",
        columns=(
            Column("address", "address"),
            Column("instance", "instance"),
            Column("fixed_address", "fixed_address"),
            Column("id", "id"),
        ),
        patch=FloatingIpUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)
