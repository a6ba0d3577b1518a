"""Compute's resource kinds, declared once (see :mod:`minicloud.core.kinds`): the API, the SDK, the CLI, the
scheduler and the node's compute reconciler all read them from here."""

from __future__ import annotations

import msgspec

from minicloud.core.kinds import Column, Kind, declare
from minicloud.model import KeyPair, KeyPairUpdate
from minicloud.model.compute import Image, ImageFile, ImageUpdate, InstanceType


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
    )


#: Create (files on the node, or a URL as an operation) and delete (refused while instances use the image; the
#: node removes the files) are written by hand; list, show and patch are derived.
IMAGE = declare(
    Kind(
        name="image",
        plural="images",
        prefix="img",
        spec=ImageSpec,
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

INSTANCE_KIND = "instance"
IMAGE_KIND = IMAGE.name
#: One per node: the capacity its agent publishes for the scheduler.
HYPERVISOR_KIND = "hypervisor"
#: One per node: what the scheduler has handed out there (the create handler's compare-and-swap target).
PLACEMENT_KIND = "placement"
