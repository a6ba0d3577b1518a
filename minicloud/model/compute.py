"""Compute request and response types: images, instance types and instances (shared by server, SDK and OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from minicloud.model import Description, Labels, Name, Resource

#: An absolute path on the node (image import); checked against ``compute.image_dirs``.
NodePath = Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]
ImageFormat = Literal["qcow2", "raw"]
Firmware = Literal["bios", "uefi"]
InstanceState = Literal["pending", "scheduling", "building", "running", "stopping", "stopped", "error", "deleting"]
#: A failure domain (a node's ``zone`` label, set by ``cluster enable|add --zone``).
ZoneName = Annotated[str, Meta(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
NodeRef = Annotated[str, Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
Ref = Annotated[str, Meta(min_length=1, max_length=255)]


# -- images --------------------------------------------------------------------------------------------------------
class ImageFile(msgspec.Struct, kw_only=True):
    size_bytes: int
    sha256: str


class Image(Resource, kw_only=True):
    """A bootable image in a node's image store: a disk (qcow2/raw) or a kernel + initrd for direct-kernel boot."""

    boot: Literal["disk", "kernel"]
    #: The disk's format as ``qemu-img info`` found it (null for kernel images).
    format: ImageFormat | None = None
    #: The disk's size as the guest sees it (null for kernel images).
    virtual_size_bytes: int | None = None
    #: Bytes stored, all files together.
    size_bytes: int
    #: sha256 of the disk, or of the kernel for kernel images.
    sha256: str
    files: dict[str, ImageFile] = {}
    cmdline: str = ""
    firmware: Firmware = "bios"
    os: dict[str, str] = {}
    #: The node whose image store holds the files; instances of this image are placed there.
    node: str
    source: str = ""
    description: str = ""
    #: The storage pool id the disk is copied into (null: only the node's image store), and how that copy stands:
    #: ``importing``, ``ready`` (usable from every node of a ``ceph`` pool) or ``error`` (``pool_reason`` says why).
    pool: str | None = None
    pool_state: str | None = None
    pool_reason: str = ""


class ImageImport(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Import an image from files on the node (under ``compute.image_dirs``) or from an http(s) URL.

    Give ``path`` (a disk) or ``url`` (a disk: answered with an operation), or ``kernel`` (+ optional ``initrd``,
    ``cmdline``)."""

    name: Name
    path: NodePath | None = None
    url: Annotated[str, Meta(max_length=4096, pattern=r"^https?://")] | None = None
    #: The format you expect; the import fails if ``qemu-img info`` finds another. Default: whatever it finds.
    format: ImageFormat | None = None
    #: The disk's SHA-256 (hex) you expect; the import fails, keeping nothing, if the file has another.
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    kernel: NodePath | None = None
    initrd: NodePath | None = None
    cmdline: Annotated[str, Meta(max_length=1024, pattern=r"^[\x20-\x7e]*$")] = ""
    firmware: Firmware = "bios"
    os_distro: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = ""
    os_version: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = ""
    #: The storage pool (name or id) the disk is copied into; default: the default pool. Kernel images stay files.
    pool: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    description: Description = ""
    labels: Labels = {}


class ImageUploadQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The query string of ``PUT /v1/images/{name}/file``: what ``ImageImport`` says about a disk, the disk itself
    being the request body (``Content-Length`` and ``X-Checksum-Sha256`` required)."""

    #: The format you expect; the upload fails, keeping nothing, if ``qemu-img info`` finds another.
    format: ImageFormat | None = None
    firmware: Firmware = "bios"
    os_distro: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = ""
    os_version: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = ""
    #: The storage pool (name or id) the disk is copied into; default: the default pool.
    pool: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    description: Description = ""
    #: Labels as ``k=v[,k2=v2]`` (values without commas; set others with ``PATCH /v1/images/{ref}``).
    labels: Annotated[str, Meta(max_length=8192)] = ""


class ImageUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


# -- instance types ------------------------------------------------------------------------------------------------
class InstanceType(msgspec.Struct, kw_only=True):
    """A machine shape. Built-in types have no id; admin-defined ones are resources of the cluster."""

    name: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    builtin: bool
    description: str = ""
    #: GPUs passed through to each instance of the type, and the model pattern they must match ("" any model).
    gpus: int = 0
    gpu_model: str = ""
    id: str | None = None
    revision: int | None = None


class InstanceTypeCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    vcpus: Annotated[int, Meta(ge=1, le=256)]
    memory_mib: Annotated[int, Meta(ge=64, le=4 * 1024 * 1024)]
    disk_gib: Annotated[int, Meta(ge=1, le=65536)]
    description: Description = ""
    #: Whole GPUs passed through with VFIO (``--gpus``); ``gpu_model`` a shell-style pattern on the model,
    #: case-insensitive (``H100*``; docs/gpus.md).
    gpus: Annotated[int, Meta(ge=0, le=16)] = 0
    gpu_model: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9 _.*?\[\]-]*$")] = ""


# -- instances -----------------------------------------------------------------------------------------------------
class Address(msgspec.Struct, kw_only=True):
    network: str
    mac: str
    ip: str | None = None


class Nic(msgspec.Struct, kw_only=True):
    """One of an instance's NICs on a network (VPC or external): its port, where it is, its MAC and address."""

    port: str
    #: The network's and subnet's names (ids in ``network_id``/``subnet_id``).
    network: str
    network_id: str
    subnet: str
    subnet_id: str
    mac: str
    ip: str
    #: Security group names.
    security_groups: list[str] = []


class NicCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A NIC to give an instance: on a ``subnet``, or on a ``network`` (its first subnet with a free address; an
    external network only for cluster administrators, for now). ``ip``: a fixed address (default: IPAM picks the
    lowest free one). ``security_groups``: names or ids (default: the project's ``default`` group)."""

    subnet: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    network: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    ip: Annotated[str, Meta(min_length=1, max_length=15)] | None = None
    security_groups: Annotated[list[Annotated[str, Meta(min_length=1, max_length=255)]], Meta(max_length=16)] | None = (
        None
    )


class InstanceStatus(msgspec.Struct, kw_only=True):
    state: InstanceState
    #: Why the instance is in ``error`` (or what it is waiting for).
    reason: str = ""
    node: str | None = None
    addresses: list[Address] = []
    virt_type: str | None = None
    launched_at: str | None = None
    stopped_at: str | None = None
    #: Why the scheduler chose ``node`` (the weigher, the figures, the nodes it refused and why).
    placement: str = ""


class Instance(Resource, kw_only=True):
    """A virtual machine. ``power`` is what you asked for; ``status.state`` is what the node observes."""

    image: str
    image_id: str
    type: str
    vcpus: int
    #: vCPUs it may get while running (`resize` to a type with the same memory and more vCPUs, up to this).
    max_vcpus: int
    memory_mib: int
    disk_gib: int
    keypair: str | None = None
    power: Literal["running", "stopped"]
    user_data_bytes: int = 0
    #: NICs on VPC or external networks (empty: the node's ``default`` bridge network, see ``status.addresses``).
    nics: list[Nic] = []
    description: str = ""
    #: The storage pool id of the root disk (null: the node's instance directory, as before pools existed), and the
    #: volume that is the root disk when it was created with ``--boot-volume``.
    pool: str | None = None
    root_volume: str | None = None
    #: The server group (id) it is a member of, and the zone asked for at create.
    server_group: str | None = None
    zone: str | None = None
    #: GPUs passed through (its type's); which ones: ``minicloud gpu list`` (administrators).
    gpus: int = 0
    status: InstanceStatus


class InstanceCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    #: The image the root disk is made from; give it or ``boot_volume``.
    image: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    type: Annotated[str, Meta(min_length=1, max_length=255)]
    keypair: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    #: cloud-init user-data (a ``#!`` script or ``#cloud-config``), at most 64 KiB.
    user_data: Annotated[str, Meta(max_length=65536)] = ""
    #: Root disk size; default: the type's. Never smaller than the image.
    disk_gib: Annotated[int, Meta(ge=1, le=65536)] | None = None
    #: Start the instance once built (default) or leave it stopped.
    start: bool = True
    #: NICs, in order (the first is the guest's first interface). None: the node's ``default`` bridge network.
    nics: Annotated[list[NicCreate], Meta(max_length=8)] | None = None
    #: The storage pool (name or id) of the root disk; default: the default pool (``local`` when there is none).
    pool: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    #: A volume (name or id) of the project, available and unattached, to boot from: it is the root disk (no disk
    #: is made from an image) and outlives the instance.
    boot_volume: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    #: Only nodes of this zone (400 for a zone no node has).
    zone: ZoneName | None = None
    #: Only this node (cluster administrators: ``admin:instances:place``).
    node: NodeRef | None = None
    #: A server group (name or id) of the project: the instance joins it and the scheduler honours its policy.
    server_group: Ref | None = None
    description: Description = ""
    labels: Labels = {}


class InstanceUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


class InstanceStop(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Power off at once instead of asking the guest to shut down (ACPI) first.
    force: bool = False


class InstanceReboot(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Reset at once instead of asking the guest to reboot (ACPI) first.
    force: bool = False


class InstanceResize(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Annotated[str, Meta(min_length=1, max_length=255)]


class ConsoleQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Only the last this many bytes of the log (0: all of it).
    tail: Annotated[int, Meta(ge=0, le=64 * 1024 * 1024)] = 0
    #: Keep the response open and stream what the guest prints next.
    follow: bool = False


# -- server groups and node states ---------------------------------------------------------------------------------
ServerGroupPolicy = Literal["anti-affinity", "affinity", "soft-anti-affinity"]


class ServerGroup(Resource, kw_only=True):
    """Instances placed together or apart: ``anti-affinity`` (never two members on one node, or in one zone with
    ``scope=zone``: a create that cannot honour it is refused), ``affinity`` (all on the first member's node or
    zone), ``soft-anti-affinity`` (apart when possible)."""

    policy: ServerGroupPolicy
    scope: Literal["node", "zone"] = "node"
    description: str = ""
    #: The instances (ids) in it, and the nodes they are on.
    members: list[str] = []
    member_nodes: list[str] = []


class ServerGroupCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    policy: ServerGroupPolicy
    scope: Literal["node", "zone"] = "node"
    description: Description = ""
    labels: Labels = {}


class ServerGroupUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


class ComputeNode(msgspec.Struct, kw_only=True):
    """A node as the scheduler sees it (``node list``)."""

    name: str
    zone: str = ""
    #: ``online``, ``offline``, or "" (a single node, or not seen by the leader yet).
    state: str = ""
    #: ``schedulable`` or ``cordoned`` (no new placements).
    scheduling: Literal["schedulable", "cordoned"] = "schedulable"
    cordon_reason: str = ""
    instances: int = 0
    vcpus_used: int = 0
    vcpus: int = 0
    memory_used_mib: int = 0
    memory_mib: int = 0
    disk_used_gib: int = 0
    disk_gib: int = 0


class NodeCordon(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Why (shown in ``node list``).
    reason: Description = ""
