"""Floating IP request and response types (shared by server, SDK and CLI): a public address of an external network's
pool, 1:1 NATed to an instance's NIC while associated."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType

from minicloud.model import Description, Labels, Resource

Ref = Annotated[str, Meta(min_length=1, max_length=255)]


class FloatingIp(Resource, kw_only=True):
    """An address of an external network (its name is the address). While associated, traffic to it reaches the
    instance's NIC (``fixed_address``) and the NIC's traffic leaves as it, on the node that runs the instance."""

    network: str
    address: str
    #: The instance, its NIC (port id) and the NIC's address; null when not associated.
    instance: str | None = None
    port: str | None = None
    fixed_address: str | None = None
    description: str = ""


class FloatingIpAllocate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The external network (id or name; external networks are shared by every project).
    network: Ref
    description: Description = ""
    labels: Labels = {}


class FloatingIpAssociate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The instance (id or name) of the caller's project.
    instance: Ref
    #: Which NIC: its port id, MAC or address (default: the first NIC whose subnet reaches the floating IP's network
    #: through a router).
    nic: Ref | None = None


class FloatingIpUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET
