"""SDK for networking: ``client.networks``, ``client.subnets``, ``client.security_groups``, ``client.routers``.
List, get, update and delete come from each kind's declaration (:class:`Collection`); creates and verbs are here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minicloud.client.collection import Collection, quote
from minicloud.model.network import Network, Router, SecurityGroup, Subnet
from minicloud.network.kinds import NETWORK, ROUTER, SECURITY_GROUP, SUBNET

if TYPE_CHECKING:
    from minicloud.client import Client


def _body(**fields: Any) -> dict[str, Any]:
    """The JSON body: fields left as None are the server's defaults."""
    return {k: v for k, v in fields.items() if v is not None}


class Networks(Collection[Network]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, NETWORK)

    def create(self, *, name: str, cidr: str, idempotency_key: str | None = None, **fields: Any) -> Network:
        """A VPC; with ``external=True, provider=, gateway=, pool="FIRST-LAST"`` an external network (admin)."""
        return self._create(_body(name=name, cidr=cidr, **fields), idempotency_key)


class Subnets(Collection[Subnet]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, SUBNET)

    def create(
        self, *, name: str, network: str, cidr: str, idempotency_key: str | None = None, **fields: Any
    ) -> Subnet:
        """``gateway=``, ``allocation_start=``, ``allocation_end=``, ``dns_servers=[…]``,
        ``routes=[{"destination": …, "nexthop": …}]`` are optional."""
        return self._create(_body(name=name, network=network, cidr=cidr, **fields), idempotency_key)


class SecurityGroups(Collection[SecurityGroup]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, SECURITY_GROUP)

    def create(self, *, name: str, idempotency_key: str | None = None, **fields: Any) -> SecurityGroup:
        """``rules=[…]`` (default: all egress), ``description=``, ``labels=``."""
        return self._create(_body(name=name, **fields), idempotency_key)

    def add_rule(self, ref: str, *, direction: str, **fields: Any) -> SecurityGroup:
        """``protocol=`` tcp/udp/icmp/any, ``port_min=``, ``port_max=``, ``remote_cidr=`` or ``remote_group=``."""
        body = _body(direction=direction, **fields)
        return self._c.call("POST", f"{self.path}/{quote(ref)}/rules", SecurityGroup, json=body)

    def remove_rule(self, ref: str, rule_id: str) -> SecurityGroup:
        return self._c.call("DELETE", f"{self.path}/{quote(ref)}/rules/{quote(rule_id)}", SecurityGroup)


class Routers(Collection[Router]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, ROUTER)

    def create(
        self, *, name: str, external_network: str | None = None, idempotency_key: str | None = None, **fields: Any
    ) -> Router:
        return self._create(_body(name=name, external_network=external_network, **fields), idempotency_key)

    def _verb(self, ref: str, verb: str, body: dict[str, Any]) -> Router:
        return self._c.call("POST", f"{self.path}/{quote(ref)}/{verb}", Router, json=body)

    def add_subnet(self, ref: str, subnet: str) -> Router:
        return self._verb(ref, "add-subnet", {"subnet": subnet})

    def remove_subnet(self, ref: str, subnet: str) -> Router:
        return self._verb(ref, "remove-subnet", {"subnet": subnet})

    def add_route(self, ref: str, destination: str, nexthop: str) -> Router:
        return self._verb(ref, "add-route", {"destination": destination, "nexthop": nexthop})

    def remove_route(self, ref: str, destination: str, nexthop: str) -> Router:
        return self._verb(ref, "remove-route", {"destination": destination, "nexthop": nexthop})
