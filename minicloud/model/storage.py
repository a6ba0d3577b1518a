"""Storage request and response types (shared by server, SDK and CLI): the Ceph cluster minicloud runs (``storage``),
its disks (OSDs), pools, volumes and snapshots. Sizes in requests are bounded here (400 before any service runs);
references (pools, images, volumes, instances) are ids or names, resolved by the services."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from minicloud.model import Description, Labels, Name, Resource

#: A resource reference: its id or its name.
Ref = Annotated[str, Meta(min_length=1, max_length=255)]
#: A volume's size: 1 GiB to 64 TiB.
SizeGib = Annotated[int, Meta(ge=1, le=65536, description="GiB, 1..65536")]
#: A file OSD's size: 1 GiB to 16 TiB, in bytes.
DiskBytes = Annotated[int, Meta(ge=1 << 30, le=16 << 40, description="bytes, 1 GiB..16 TiB")]
DevicePath = Annotated[str, Meta(pattern=r"^/dev/[A-Za-z0-9/_.:-]{1,200}$", description="a block device, /dev/…")]
NodeName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
#: A guest disk name, ``vdb`` … ``vdz`` (``vda`` is the root disk).
GuestDevice = Annotated[str, Meta(pattern=r"^vd[b-z]$", description="vdb … vdz")]
#: RADOS pool names: what Ceph accepts, kept simple.
CephPoolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
#: I/O limits (0 = none).
Iops = Annotated[int, Meta(ge=0, le=10_000_000)]
BytesPerSec = Annotated[int, Meta(ge=0, le=1 << 40)]

PoolDriver = Literal["ceph", "local"]
VolumeState = Literal[
    "creating", "available", "attaching", "in-use", "detaching", "extending", "reverting", "deleting", "error"
]
SnapshotState = Literal["creating", "available", "deleting", "error"]
DiskState = Literal["pending", "creating", "up", "down", "draining", "removed", "error"]


# -- pools ---------------------------------------------------------------------------------------------------------
class Pool(Resource, kw_only=True):
    """Where volumes (and images) live: ``ceph`` (an RBD pool of the cluster's Ceph, reachable from every node) or
    ``local`` (qcow2 files on one node's disk; a local volume attaches only to instances on its node)."""

    driver: PoolDriver
    #: The RADOS pool of a ceph pool ("" for local).
    ceph_pool: str = ""
    #: Volumes created without ``--pool`` go here.
    default: bool = False
    description: str = ""
    #: The I/O limits of its volumes unless a volume's create says otherwise (a pool is the volume type: several
    #: pools may share one RADOS pool with different limits).
    qos: QosLimits = msgspec.field(default_factory=lambda: QosLimits())


class PoolCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    driver: PoolDriver
    #: The RADOS pool (default: the pool's name); ceph pools only.
    ceph_pool: CephPoolName | None = None
    default: bool = False
    description: Description = ""
    labels: Labels = {}
    qos: QosLimits = msgspec.field(default_factory=lambda: QosLimits())


class PoolUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


# -- disks (OSDs) --------------------------------------------------------------------------------------------------
class StorageDisk(Resource, kw_only=True):
    """A disk given to Ceph on one node: a block device or a file (an OSD each)."""

    node: str
    source: Literal["file", "device"]
    #: The device path ("" for a file OSD).
    path: str = ""
    #: A file OSD's size.
    size_bytes: int = 0
    #: Asked to be removed: the node drains it, then deletes the record.
    remove: bool = False
    osd_id: int | None = None
    state: DiskState = "pending"
    reason: str = ""


class StorageDiskCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A block device (``device``) or a file OSD of ``file_size_bytes``, on ``node`` (default: the node answering)."""

    node: NodeName | None = None
    device: DevicePath | None = None
    file_size_bytes: DiskBytes | None = None


# -- the storage cluster -------------------------------------------------------------------------------------------
class OsdInfo(msgspec.Struct, kw_only=True):
    """One OSD as its node last reported it."""

    id: int = -1
    node: str = ""
    up: bool = False
    in_cluster: bool = False
    device: str = ""
    size_bytes: int = 0
    used_bytes: int = 0


class StorageEnable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Bootstrap Ceph on ``node`` (default: the node answering) with a file OSD of ``file_size_bytes`` there
    (default 10 GiB) unless ``no_disk``."""

    node: NodeName | None = None
    file_size_bytes: DiskBytes | None = None
    no_disk: bool = False


class Storage(msgspec.Struct, kw_only=True):
    """The cluster's storage: whether Ceph is enabled, its health in plain words, capacity, placement groups, OSDs
    by node, its disks and the pools."""

    enabled: bool
    #: ``disabled``, ``bootstrapping``, ``ready`` or ``error``.
    state: str
    #: Ceph's ``HEALTH_OK|HEALTH_WARN|HEALTH_ERR`` ("" before the first report).
    health: str = ""
    #: What is wrong, and what to do, in plain words.
    summary: str = ""
    reason: str = ""
    fsid: str = ""
    bootstrap_node: str = ""
    #: Node → address of each monitor.
    mons: dict[str, str] = {}
    replicas: int = 0
    capacity_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    #: Placement groups by state (``active+clean`` …).
    pgs: dict[str, int] = {}
    osds: list[OsdInfo] = []
    observed_at: str | None = None
    disks: list[StorageDisk] = []
    pools: list[Pool] = []


# -- volumes -------------------------------------------------------------------------------------------------------
class VolumeSourceView(msgspec.Struct, kw_only=True):
    #: ``blank``, ``image``, ``snapshot`` or ``backup`` (restored from a volume backup).
    type: Literal["blank", "image", "snapshot", "backup"] = "blank"
    id: str = ""
    name: str = ""


class AttachmentView(msgspec.Struct, kw_only=True):
    instance: str
    instance_name: str
    node: str
    #: The guest disk (``vdb`` …).
    device: str


class QosLimits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Per-volume I/O limits (0 = none)."""

    read_iops_sec: Iops = 0
    write_iops_sec: Iops = 0
    read_bytes_sec: BytesPerSec = 0
    write_bytes_sec: BytesPerSec = 0


class VolumeStatus(msgspec.Struct, kw_only=True):
    state: VolumeState = "creating"
    reason: str = ""
    #: What the pool holds (it lags the asked size while extending).
    size_gib: int = 0
    #: ``volume flatten`` asked and not done yet: its node is copying the snapshot's data into it.
    flattening: bool = False
    #: Flattened: it no longer depends on the snapshot it was made from (``source``), which can be deleted.
    flattened: bool = False


class Volume(Resource, kw_only=True):
    """A block device in a pool, attachable to one instance at a time."""

    size_gib: int
    #: The pool's name and id.
    pool: str
    pool_id: str
    driver: PoolDriver
    source: VolumeSourceView = msgspec.field(default_factory=VolumeSourceView)
    #: The node that manages it (local: where its file is; ceph: its instance's node, else the node it was made on).
    node: str = ""
    attachment: AttachmentView | None = None
    qos: QosLimits = msgspec.field(default_factory=QosLimits)
    #: The instance whose root disk it is ("" none).
    root_of: str = ""
    description: str = ""
    status: VolumeStatus = msgspec.field(default_factory=VolumeStatus)


class VolumeCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A blank volume, or one from an image (``image``) or a snapshot (``snapshot``, same pool)."""

    name: Name
    size_gib: SizeGib
    pool: Ref | None = None
    image: Ref | None = None
    snapshot: Ref | None = None
    qos: QosLimits = msgspec.field(default_factory=QosLimits)
    description: Description = ""
    labels: Labels = {}


class VolumeUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


class VolumeAttach(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    instance: Ref
    #: Default: the instance's next free guest disk.
    device: GuestDevice | None = None


class VolumeDetach(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Detach even if the guest does not release the disk (it may lose unflushed writes).
    force: bool = False


class VolumeExtend(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    size_gib: SizeGib


class VolumeDelete(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Administrators: delete the record even though no node will remove the data (its node is gone).
    force: bool = False


# -- snapshots -----------------------------------------------------------------------------------------------------
class SnapshotStatus(msgspec.Struct, kw_only=True):
    state: SnapshotState = "creating"
    reason: str = ""


class Snapshot(Resource, kw_only=True):
    """A point-in-time copy of a volume, in the volume's pool: new volumes can be made from it, and the volume can
    be reverted to it."""

    #: The volume's name and id ("" for a root-disk snapshot).
    volume: str
    volume_id: str
    pool: str
    size_gib: int
    description: str = ""
    status: SnapshotStatus = msgspec.field(default_factory=SnapshotStatus)
    #: A root-disk snapshot: the instance's name and id.
    instance: str = ""
    instance_id: str = ""


class SnapshotCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Of a volume, or of an instance's root disk (one of the two)."""

    name: Name
    volume: Ref | None = None
    instance: Ref | None = None
    description: Description = ""
    labels: Labels = {}


class SnapshotUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET
