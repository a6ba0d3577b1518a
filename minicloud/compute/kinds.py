"""Compute's resource kinds, declared once (see :mod:`minicloud.core.kinds`): the API, the SDK, the CLI, the
scheduler and the node's compute reconciler all read them from here."""

from __future__ import annotations

import msgspec

from minicloud.core.kinds import Column, Kind, declare
from minicloud.model import KeyPair, KeyPairUpdate
from minicloud.model.compute import InstanceType


# -- key pairs -----------------------------------------------------------------------------------------------------
class KeyPairSpec(msgspec.Struct, kw_only=True):
    type: str
    fingerprint: str
    public_key: str
    comment: str = ""
    description: str = ""


KEYPAIR = declare(
    Kind(
        name="keypair",
        plural="keypairs",
        prefix="kp",
        spec=KeyPairSpec,
        action="compute:keypairs",
        view=KeyPair,
        noun="keypair",
        title="key pair",
        columns=(
            Column("name", "name"),
            Column("type", "type"),
            Column("fingerprint", "fingerprint"),
            Column("id", "id"),
        ),
        patch=KeyPairUpdate,
    )
)


# -- instance types ------------------------------------------------------------------------------------------------
class InstanceTypeSpec(msgspec.Struct, kw_only=True):
    vcpus: int
    memory_mib: int
    disk_gib: int
    description: str = ""


def _render_type(obj) -> InstanceType:  # type: ignore[no-untyped-def]
    s = obj.spec
    return InstanceType(
        name=obj.name,
        vcpus=s.vcpus,
        memory_mib=s.memory_mib,
        disk_gib=s.disk_gib,
        builtin=False,
        description=s.description,
        id=obj.id,
        revision=obj.revision,
    )


#: Admin-defined instance types (the built-in catalogue is :data:`minicloud.compute.types.BUILTIN`, not records).
#: Its list and show merge the catalogue in, and create/delete are cluster administrators' (``admin:`` actions), so
#: no generic verb is derived.
INSTANCE_TYPE = declare(
    Kind(
        name="instancetype",
        plural="instance-types",
        prefix="ity",
        spec=InstanceTypeSpec,
        scope="cluster",
        action="compute:instancetypes",
        view=InstanceType,
        render=_render_type,
        noun="type",
        title="instance type",
        columns=(
            Column("name", "name"),
            Column("vcpus", "vcpus"),
            Column("memory_mib", "memory_mib"),
            Column("disk_gib", "disk_gib"),
            Column("builtin", "builtin"),
        ),
        generic=frozenset(),
    )
)

INSTANCE_KIND = "instance"
IMAGE_KIND = "image"
#: One per node: the capacity its agent publishes for the scheduler.
HYPERVISOR_KIND = "hypervisor"
#: One per node: what the scheduler has handed out there (the create handler's compare-and-swap target).
PLACEMENT_KIND = "placement"
