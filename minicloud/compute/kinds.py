"""Compute's resource kinds, declared once (see :mod:`minicloud.core.kinds`): the API, the SDK, the CLI, the
scheduler and the node's compute reconciler all read them from here."""

from __future__ import annotations

from typing import Literal

import msgspec

from minicloud.core.kinds import Column, Kind, declare
from minicloud.model import KeyPair, KeyPairUpdate
from minicloud.model.compute import (
    Address,
    Image,
    ImageFile,
    ImageUpdate,
    Instance,
    InstanceState,
    InstanceStatus,
    InstanceType,
    InstanceUpdate,
    Nic,
    ServerGroup,
    ServerGroupUpdate,
)


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
    gpus: int = 0
    gpu_model: str = ""


def _render_type(obj) -> InstanceType:  # type: ignore[no-untyped-def]
    s = obj.spec
    return InstanceType(
        name=obj.name,
        vcpus=s.vcpus,
        memory_mib=s.memory_mib,
        disk_gib=s.disk_gib,
        builtin=False,
        description=s.description,
        gpus=s.gpus,
        gpu_model=s.gpu_model,
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
            Column("gpus", "gpus"),
            Column("builtin", "builtin"),
        ),
        generic=frozenset(),
    )
)


# -- images --------------------------------------------------------------------------------------------------------
class ImageFileSpec(msgspec.Struct, kw_only=True):
    size_bytes: int
    sha256: str


class ImageSpec(msgspec.Struct, kw_only=True):
    """An image in one node's image store (``<data_dir>/images/<id>/``). The field names are the stored keys: older
    records lack the defaulted ones."""

    #: ``disk`` (qcow2/raw) or ``kernel`` (+ initrd, direct-kernel boot).
    boot: str
    #: What ``qemu-img info`` found (None for kernel images).
    format: str | None = None
    virtual_size_bytes: int | None = None
    size_bytes: int
    #: Of the disk, or of the kernel for kernel images.
    sha256: str
    #: Stored files by role (``disk``, ``kernel``, ``initrd``).
    files: dict[str, ImageFileSpec] = {}
    cmdline: str = ""
    firmware: str = "bios"
    #: ``distro`` and ``version`` when given.
    os: dict[str, str] = {}
    #: The node whose image store holds the files; instances of the image are placed there.
    node: str
    #: The path, URL or kernel it was imported from.
    source: str = ""
    description: str = ""
    #: The storage pool (:data:`minicloud.storage.kinds.POOL` id) the disk is copied into, and its driver; "" for
    #: images made before pools existed and kernel images (files in ``node``'s image store only). An image in a
    #: ``ceph`` pool is usable from every node once its status says ``ready``; a ``local`` one only on ``node``.
    pool: str = ""
    pool_driver: str = ""
    #: A delete is looking for volumes made from it (set before its last look, so a volume create that commits
    #: after the mark fails its condition on the image and one before it is seen); cleared when the delete is
    #: refused. Volume creates refuse an image so marked.
    deleting: bool = False


class ImageStatus(msgspec.Struct, kw_only=True):
    """What the node holding the files reports of the copy into the pool (the node's storage reconciler)."""

    #: ``""`` (no pool), ``importing``, ``ready`` or ``error``.
    pool_state: str = ""
    reason: str = ""


def _render_image(obj) -> Image:  # type: ignore[no-untyped-def]
    s = obj.spec
    return Image(
        **obj.common_fields(),
        boot=s.boot,
        format=s.format,
        virtual_size_bytes=s.virtual_size_bytes,
        size_bytes=s.size_bytes,
        sha256=s.sha256,
        files={k: ImageFile(size_bytes=f.size_bytes, sha256=f.sha256) for k, f in s.files.items()},
        cmdline=s.cmdline,
        firmware=s.firmware,
        os=s.os,
        node=s.node,
        source=s.source,
        description=s.description,
        pool=s.pool or None,
        pool_state=obj.status.pool_state or None,
        pool_reason=obj.status.reason,
    )


#: Create (files on the node, or a URL as an operation) and delete (refused while instances use the image; the
#: node removes the files) are written by hand; list, show and patch are derived.
IMAGE = declare(
    Kind(
        name="image",
        plural="images",
        prefix="img",
        spec=ImageSpec,
        status=ImageStatus,
        action="compute:images",
        view=Image,
        render=_render_image,
        noun="image",
        columns=(
            Column("name", "name"),
            Column("boot", "boot"),
            Column("format", "format"),
            Column("size", "size_bytes"),
            Column("node", "node"),
            Column("id", "id"),
        ),
        patch=ImageUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- instances -----------------------------------------------------------------------------------------------------
class RebootRequest(msgspec.Struct, kw_only=True):
    #: Raised by each ``instance reboot``; the node reboots once per increase (``InstanceObserved.reboot_seq``).
    seq: int = 0
    force: bool = False


class InstanceNicSpec(msgspec.Struct, kw_only=True):
    """The instance's copy of one of its ports (:data:`minicloud.network.kinds.PORT`), written in the same
    transaction as the port: what the instance shows and what its node plugs (a bridge per network, this MAC)."""

    port: str
    network: str
    network_name: str
    subnet: str
    subnet_name: str
    mac: str
    ip: str
    security_groups: list[str] = []
    security_group_names: list[str] = []


class InstanceSpec(msgspec.Struct, kw_only=True):
    """What the user wants of an instance; the node's compute reconciler converges libvirt to it. The field names
    are the stored keys; older records lack the defaulted ones."""

    #: The libvirt domain's uuid.
    uuid: str
    image_id: str
    image_name: str
    #: The instance type's name and the shape copied from it (a type may be deleted later).
    type: str
    vcpus: int
    #: vCPUs it may get while running (CPU hot-plug); None in records made before it existed: ``vcpus``.
    max_vcpus: int | None = None
    memory_mib: int
    disk_gib: int
    keypair: str | None = None
    public_keys: list[str] = []
    user_data: str = ""
    power: Literal["running", "stopped"] = "running"
    reboot: RebootRequest = msgspec.field(default_factory=RebootRequest)
    stop_force: bool = False
    #: Delete requested: the node tears the instance down, then removes the record.
    deleted: bool = False
    #: The node it is placed on (indexed: ``where={"node": …}``).
    node: str = ""
    #: Raised by ``instance start`` of an instance in ``error``: a new spec, so the node tries again.
    retry: int = 0
    #: NICs on VPC/external networks (ports), in guest order; empty: one NIC on the node's ``default`` bridge.
    nics: list[InstanceNicSpec] = []
    description: str = ""
    #: The storage pool of the root disk (:data:`minicloud.storage.kinds.POOL` id) and its driver; "" in records made
    #: before pools: a qcow2 overlay in the node's ``instances`` directory (the ``local`` driver's layout).
    pool: str = ""
    pool_driver: str = ""
    #: ``--boot-volume``: the volume that is the root disk (then no disk is made from the image).
    root_volume: str = ""
    #: The server group (id) it joined at create, and the zone it was asked for (``--zone``).
    server_group: str = ""
    zone: str = ""
    #: Why the scheduler chose ``node`` (:class:`minicloud.compute.scheduler.Decision`).
    placement: str = ""
    #: GPUs it holds (its type's, copied): the ``gpu`` records whose ``instance`` is its id, on its node.
    gpus: int = 0
    gpu_model: str = ""

    @property
    def vcpu_limit(self) -> int:
        return self.max_vcpus or self.vcpus


class InstanceObserved(msgspec.Struct, kw_only=True):
    """An instance's ``status``: what its node observes (written by the node's compute reconciler)."""

    state: InstanceState = "pending"
    reason: str = ""
    addresses: list[Address] = []
    virt_type: str | None = None
    launched_at: str | None = None
    stopped_at: str | None = None
    #: The last reboot request done (``RebootRequest.seq``).
    reboot_seq: int = 0
    #: The fingerprint of the spec that failed (``error``): not retried until the spec changes.
    error_spec: str = ""
    #: A guest without NICs: its fixed address on its node's default bridge, kept while it is stopped too (DHCP
    #: hands out exactly this one); "" for others. Other nodes' agents and the migration check read it.
    bridge_ip: str = ""


def _render_instance(obj) -> Instance:  # type: ignore[no-untyped-def]
    s, st = obj.spec, obj.status
    return Instance(
        **obj.common_fields(),
        image=s.image_name,
        image_id=s.image_id,
        type=s.type,
        vcpus=s.vcpus,
        max_vcpus=s.vcpu_limit,
        memory_mib=s.memory_mib,
        disk_gib=s.disk_gib,
        keypair=s.keypair,
        power=s.power,
        user_data_bytes=len(s.user_data.encode()),
        nics=[
            Nic(
                port=n.port,
                network=n.network_name,
                network_id=n.network,
                subnet=n.subnet_name,
                subnet_id=n.subnet,
                mac=n.mac,
                ip=n.ip,
                security_groups=list(n.security_group_names),
            )
            for n in s.nics
        ],
        description=s.description,
        pool=s.pool or None,
        root_volume=s.root_volume or None,
        server_group=s.server_group or None,
        zone=s.zone or None,
        gpus=s.gpus,
        status=InstanceStatus(
            state=st.state,
            reason=st.reason,
            node=s.node or None,
            addresses=st.addresses,
            virt_type=st.virt_type,
            launched_at=st.launched_at,
            stopped_at=st.stopped_at,
            placement=s.placement,
        ),
    )


#: Create (placement), the power verbs, resize, console and delete (202: the node tears it down) are written by
#: hand in :mod:`minicloud.compute.instances`; list, show and patch are derived.
INSTANCE = declare(
    Kind(
        name="instance",
        plural="instances",
        prefix="i",
        spec=InstanceSpec,
        status=InstanceObserved,
        action="compute:instances",
        view=Instance,
        render=_render_instance,
        noun="instance",
        columns=(
            Column("name", "name"),
            Column("state", "status.state"),
            Column("type", "type"),
            Column("image", "image"),
            Column("node", "status.node"),
            Column("addresses", "status.addresses"),
            Column("id", "id"),
        ),
        patch=InstanceUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- node records: capacity and placement --------------------------------------------------------------------------
class HypervisorSpec(msgspec.Struct, kw_only=True):
    """What a node's hypervisor offers (host figures and the node's allocation ratios and reservations)."""

    cpus: int = 1
    memory_mib: int = 0
    disk_gib: int = 0
    cpu_allocation_ratio: float = 1.0
    ram_allocation_ratio: float = 1.0
    reserved_memory_mib: int = 0
    reserved_disk_gib: int = 0
    #: ``kvm`` or ``qemu`` (TCG), and why.
    virt_type: str = ""
    virt_reason: str = ""


#: One per node, named after it: the capacity its agent publishes for the scheduler (internal: no view).
HYPERVISOR = declare(
    Kind(
        name="hypervisor", plural="hypervisors", prefix="hv", spec=HypervisorSpec, scope="cluster", generic=frozenset()
    )
)


class PlacementSpec(msgspec.Struct, kw_only=True):
    #: Raised by every placement on the node: the compare-and-swap token of concurrent creates.
    seq: int = 0


#: One per node, id ``plc-<node>``: what the scheduler has handed out there; an instance create commits with a
#: compare-and-swap on it, so two creates cannot both take the last free slot (internal: no view).
PLACEMENT = declare(
    Kind(name="placement", plural="placements", prefix="plc", spec=PlacementSpec, scope="cluster", generic=frozenset())
)


# -- server groups -------------------------------------------------------------------------------------------------
class ServerGroupSpec(msgspec.Struct, kw_only=True):
    policy: str
    #: ``node`` or ``zone``: what "together"/"apart" means.
    scope: str = "node"
    description: str = ""
    #: Raised by every instance create that joins the group: the compare-and-swap token that keeps two concurrent
    #: creates from both taking the last node (or zone) an anti-affinity group allows.
    seq: int = 0


#: Server groups (:mod:`minicloud.compute.server_groups`): members are the instances whose ``spec.server_group``
#: names the group (none is stored here, so an instance's removal needs no change of its group).
SERVERGROUP = declare(
    Kind(
        name="servergroup",
        plural="server-groups",
        prefix="sgrp",
        spec=ServerGroupSpec,
        action="compute:server-groups",
        view=ServerGroup,
        noun="server-group",
        title="server group",
        columns=(
            Column("name", "name"),
            Column("policy", "policy"),
            Column("scope", "scope"),
            Column("members", "members"),
            Column("id", "id"),
        ),
        patch=ServerGroupUpdate,
        # list and show add the members (from the placement cache), delete refuses a group with members
        generic=frozenset({"patch"}),
    )
)

INSTANCE_KIND = INSTANCE.name
HYPERVISOR_KIND = HYPERVISOR.name
PLACEMENT_KIND = PLACEMENT.name
IMAGE_KIND = IMAGE.name
