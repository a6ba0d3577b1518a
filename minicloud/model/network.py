"""Networking request and response types: networks (VPCs), subnets, security groups and routers (shared by server,
SDK and OpenAPI). Addresses and CIDRs are strings here; the services parse and validate them (422 naming the field)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from minicloud.model import Description, Labels, Name, Resource

#: An IPv4 CIDR (``10.0.0.0/16``) or address; checked by the service.
Cidr = Annotated[str, Meta(min_length=1, max_length=43, description="an IPv4 CIDR such as 10.0.0.0/16")]
Address = Annotated[str, Meta(min_length=1, max_length=39, description="an IPv4 address such as 10.0.0.1")]
#: A resource reference: its id or its name.
Ref = Annotated[str, Meta(min_length=1, max_length=255)]
Physnet = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="a provider network name")]
Direction = Literal["ingress", "egress"]
Protocol = Literal["tcp", "udp", "icmp", "any"]
Port = Annotated[int, Meta(ge=0, le=65535)]


class Route(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A static route: packets for ``destination`` go to ``nexthop``."""

    destination: Cidr
    nexthop: Address


# -- networks ------------------------------------------------------------------------------------------------------
class Network(Resource, kw_only=True):
    """A VPC: an isolated IPv4 network spanning the cluster on a VXLAN with a cluster-unique VNI; or, with
    ``external``, a provider (public) network mapped to a host interface of each node."""

    cidr: str
    #: The VXLAN network identifier (null for external networks).
    vni: int | None = None
    #: The guests' MTU: the underlay's less 50 bytes of VXLAN headers (the underlay's for external networks).
    mtu: int
    external: bool = False
    #: The provider (``[network.providers]`` key of each node's config) of an external network.
    provider: str = ""
    description: str = ""
    #: Ids of the subnets in it.
    subnets: list[str] = []
    #: Ids of the routers using it as their external gateway.
    routers: list[str] = []


class NetworkCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A VPC (``cidr``); or, admin only, an external network (``external``, ``provider``, ``gateway``, ``pool``),
    which is created with one subnet of the same name whose allocation range is the pool."""

    name: Name
    cidr: Cidr
    description: Description = ""
    labels: Labels = {}
    external: bool = False
    provider: Physnet | None = None
    #: External networks: the upstream router's address (default: the first host address).
    gateway: Address | None = None
    #: External networks: the range routers and floating IPs take addresses from, ``FIRST-LAST``.
    pool: Annotated[str, Meta(max_length=80)] | None = None


class NetworkUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


# -- subnets -------------------------------------------------------------------------------------------------------
class Subnet(Resource, kw_only=True):
    """A CIDR inside its network. The gateway address is reserved for the network's router; addresses for NICs are
    allocated from ``allocation_start`` to ``allocation_end``."""

    network: str
    cidr: str
    gateway: str
    allocation_start: str
    allocation_end: str
    dns_servers: list[str] = []
    routes: list[Route] = []
    #: The router it is attached to (null: none).
    router: str | None = None
    description: str = ""


class SubnetCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    #: The network, by id or name.
    network: Ref
    cidr: Cidr
    #: Default: the first host address.
    gateway: Address | None = None
    #: Default: from the address after the gateway to the last host address.
    allocation_start: Address | None = None
    allocation_end: Address | None = None
    dns_servers: Annotated[list[Address], Meta(max_length=8)] = []
    routes: Annotated[list[Route], Meta(max_length=64)] = []
    description: Description = ""
    labels: Labels = {}


class SubnetUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


# -- security groups -----------------------------------------------------------------------------------------------
class SecurityGroupRule(msgspec.Struct, kw_only=True):
    """Allows traffic in one direction. ``remote_cidr`` or ``remote_group`` (an id) is the other end."""

    id: str
    direction: Direction
    protocol: Protocol
    port_min: int | None = None
    port_max: int | None = None
    remote_cidr: str | None = None
    remote_group: str | None = None
    description: str = ""


class SecurityGroupRuleCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A rule. Ports only for tcp and udp (``port_max`` defaults to ``port_min``; neither: every port). At most one
    of ``remote_cidr`` and ``remote_group`` (by id or name, in the same project); neither: ``0.0.0.0/0``."""

    direction: Direction
    protocol: Protocol = "any"
    port_min: Port | None = None
    port_max: Port | None = None
    remote_cidr: Cidr | None = None
    remote_group: Ref | None = None
    description: Description = ""


class SecurityGroup(Resource, kw_only=True):
    """Stateful allow rules applied to NICs; whatever no rule allows is dropped (replies to allowed traffic pass)."""

    description: str = ""
    rules: list[SecurityGroupRule] = []


class SecurityGroupCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A new group allows all egress (as AWS's do) unless ``rules`` are given."""

    name: Name
    description: Description = ""
    labels: Labels = {}
    rules: Annotated[list[SecurityGroupRuleCreate], Meta(max_length=100)] | None = None


class SecurityGroupUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


# -- routers -------------------------------------------------------------------------------------------------------
class RouterEgressCounter(msgspec.Struct, kw_only=True):
    since: int
    bytes: int


class Router(Resource, kw_only=True):
    """Routes between its subnets (each answers on its subnet's gateway address), static routes, and SNAT through
    its external network when it has one."""

    subnets: list[str] = []
    external_network: str | None = None
    #: Its address on the external network (the SNAT source of the first node that needed an external leg).
    external_address: str | None = None
    #: Each node's external leg address (node -> address), the SNAT source of that node's guests: a leg per node
    #: where the router's subnets have guests, each with its own address and MAC on the LAN.
    node_addresses: dict[str, str] = {}
    routes: list[Route] = []
    description: str = ""
    #: Per external leg (``"<node>/<vni>"``): the bytes it sent out since ``since`` (epoch seconds), as the node last
    #: reported them (about once a minute); the ``network.egress-gib`` meter bills their increase.
    egress: dict[str, RouterEgressCounter] = {}


class RouterCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    #: An external network (by id or name; one of another project is found by its name too).
    external_network: Ref | None = None
    description: Description = ""
    labels: Labels = {}


class RouterUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


class RouterSubnet(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The subnet, by id or name.
    subnet: Ref
