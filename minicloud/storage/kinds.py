"""Storage's resource kinds, declared once (see :mod:`minicloud.core.kinds`): the Ceph cluster minicloud runs
(``cephcluster``, one record named ``ceph``), its disks (``storagedisk``, an OSD each), pools, volumes and snapshots;
and two internal bookkeeping kinds that make the services race-free:

- ``storageusage`` (one per project that holds storage, named after the project): the project's volume count, GiB
  and snapshot count. Every create, extend and delete of a volume or snapshot updates it with a compare-and-swap in
  the same transaction, so the quota check ("50 volumes") cannot be passed by two concurrent creates: the second
  fails its CAS, reads again and is refused. It is deleted (CAS) when it drops to zero, so it never outlives the
  project's storage.
- ``diskslots`` (one per instance with attached volumes, named after the instance): guest disk → volume id. An attach
  picks the next free ``vdb…vdz`` from it and commits with a CAS on it (a Create when it is the first volume), so two
  concurrent attaches to one instance never get the same device; a detach removes the entry (the record when it is
  the last). It lives apart from the instance record so attaching a volume never races the compute reconciler's
  writes of the instance.

Back-references, kept by the services in the same transaction with a CAS on the record that holds them: a volume's
``snapshots``, a snapshot's ``clones``. So "delete this volume's snapshots unless one has clones" and "refuse to delete
a snapshot with clones" are one read each, and cannot race a concurrent snapshot or clone create.

Lifecycle: services write spec (with status ``creating``); the node named in ``spec.node`` converges the data and
writes status. Deletes set ``spec.deleted``; the node removes the data, then the record. Status structs are written
by nodes: every field has a default.

Growth: one ``cephcluster`` record; a ``storagedisk`` per OSD, removed after draining; a ``pool`` per pool; volumes
and snapshots are bounded by the project quotas and removed by their nodes after ``deleted``; ``storageusage`` and
``diskslots`` as above. Volumes are listed by node through the indexed spec field ``node``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from minicloud.core.kinds import Column, Kind, Obj, declare
from minicloud.model.storage import (
    AttachmentView,
    OsdInfo,
    Pool,
    PoolUpdate,
    QosLimits,
    Snapshot,
    SnapshotStatus,
    SnapshotUpdate,
    StorageDisk,
    Volume,
    VolumeSourceView,
    VolumeStatus,
    VolumeUpdate,
)

#: The one ``cephcluster`` record's name (look it up by name: its id is random).
CEPH_NAME = "ceph"
#: The RADOS pool ``storage enable`` creates, and the minicloud pool record over it.
DEFAULT_CEPH_POOL = "minicloud"
CEPH_POOL_NAME = "ceph"
LOCAL_POOL_NAME = "local"
#: Guest disks of attached volumes (``vda`` is the root disk, ``sda`` the NoCloud seed).
DEVICES = tuple(f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz")
GIB = 1 << 30


# -- the Ceph cluster ----------------------------------------------------------------------------------------------
class Fence(msgspec.Struct, kw_only=True):
    """A lost node's Ceph clients are blocklisted (by its address) so that, half-dead, it can never write a volume
    that moved away from it again. Kept until the node is back and its stale guests are gone: then that node lifts
    it (``blocklist rm``) and removes the entry."""

    #: What was blocklisted: the node's IP (every client on it).
    address: str
    #: When, and by which node.
    since: str = ""
    by: str = ""


class CephSpec(msgspec.Struct, kw_only=True):
    fsid: str
    #: The node that bootstraps the first MON and MGR.
    bootstrap_node: str
    #: Node → cluster address of each MON (the leader keeps at most 3 voting nodes).
    mons: dict[str, str] = {}
    #: Entity (``mon.``, ``client.admin``, ``client.bootstrap-osd``) → key sealed with the node key store (associated
    #: data: the entity name). Written by the bootstrap node.
    keys: dict[str, str] = {}
    replicas: int = 1
    #: RADOS pools every node ensures exist.
    pools: list[str] = []
    #: Node → its fence, for each lost node whose clients are blocklisted (written by the node reconcilers).
    fenced: dict[str, Fence] = {}


class CephStatus(msgspec.Struct, kw_only=True):
    """Written by the nodes running the engine."""

    state: Literal["bootstrapping", "ready", "error"] = "bootstrapping"
    #: ``HEALTH_OK|HEALTH_WARN|HEALTH_ERR`` ("" before the first report).
    health: str = ""
    #: Plain words: what is wrong and what to do.
    summary: str = ""
    capacity_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    #: PG state → count.
    pgs: dict[str, int] = {}
    osds: list[OsdInfo] = []
    reason: str = ""
    observed_at: str | None = None


#: ``storage enable`` creates it, ``storage show`` reads it; internal (no generic verbs, no events).
CEPH = declare(
    Kind(
        name="cephcluster",
        plural="cephclusters",
        prefix="ceph",
        spec=CephSpec,
        status=CephStatus,
        scope="cluster",
        action="storage:cluster",
        title="storage cluster",
        generic=frozenset(),
    )
)


# -- disks ---------------------------------------------------------------------------------------------------------
class StorageDiskSpec(msgspec.Struct, kw_only=True):
    node: str
    source: Literal["file", "device"]
    #: The device path, "" for a file OSD.
    path: str = ""
    #: A file OSD's size (0 for a device).
    size_bytes: int = 0
    #: Removal asked: the node drains the OSD, then deletes the record.
    remove: bool = False


class StorageDiskStatus(msgspec.Struct, kw_only=True):
    osd_id: int | None = None
    state: Literal["pending", "creating", "up", "down", "draining", "removed", "error"] = "pending"
    reason: str = ""


def _render_disk(obj: Obj[StorageDiskSpec, StorageDiskStatus]) -> StorageDisk:
    s, st = obj.spec, obj.status
    return StorageDisk(
        **obj.common_fields(),
        node=s.node,
        source=s.source,
        path=s.path,
        size_bytes=s.size_bytes,
        remove=s.remove,
        osd_id=st.osd_id,
        state="draining" if s.remove and st.state not in ("removed", "error") else st.state,
        reason=st.reason,
    )


#: ``storage disk add|list|remove`` (cluster administrators; hand-written routes under ``/v1/storage/disks``).
STORAGE_DISK = declare(
    Kind(
        name="storagedisk",
        plural="storage-disks",
        prefix="sd",
        spec=StorageDiskSpec,
        status=StorageDiskStatus,
        scope="cluster",
        action="admin:storage:disks",
        view=StorageDisk,
        render=_render_disk,
        noun="storage disk",
        title="storage disk",
        columns=(
            Column("name", "name"),
            Column("node", "node"),
            Column("source", "source"),
            Column("path", "path"),
            Column("size", "size_bytes"),
            Column("osd", "osd_id"),
            Column("state", "state"),
            Column("id", "id"),
        ),
        generic=frozenset(),
    )
)


# -- pools ---------------------------------------------------------------------------------------------------------
class PoolSpec(msgspec.Struct, kw_only=True):
    driver: Literal["ceph", "local"]
    #: The RADOS pool ("" for local).
    ceph_pool: str = ""
    default: bool = False
    description: str = ""
    #: A delete is checking that nothing uses the pool (set before its last look, so a volume create that commits
    #: after the mark fails its condition on the pool and one before it is seen); cleared when the delete is
    #: refused. Creates refuse a pool so marked.
    deleting: bool = False
    #: Its volumes' I/O limits unless their create says otherwise, field by field (0 = none).
    qos: Qos = msgspec.field(default_factory=lambda: Qos())


#: Cluster-scoped: every authenticated caller may list and show them (``storage:pools:list|get``); create and
#: delete are cluster administrators' (``admin:storage:pools:*``), written by hand.
POOL = declare(
    Kind(
        name="pool",
        plural="pools",
        prefix="pool",
        spec=PoolSpec,
        scope="cluster",
        action="storage:pools",
        view=Pool,
        noun="pool",
        columns=(
            Column("name", "name"),
            Column("driver", "driver"),
            Column("ceph_pool", "ceph_pool"),
            Column("default", "default"),
            Column("id", "id"),
        ),
        patch=PoolUpdate,
        generic=frozenset({"list", "show"}),
    )
)


# -- volumes -------------------------------------------------------------------------------------------------------
class VolumeSource(msgspec.Struct, kw_only=True):
    type: Literal["blank", "image", "snapshot", "backup"] = "blank"
    #: The image's, snapshot's or volume backup's id ("" for blank).
    id: str = ""
    name: str = ""


class Attachment(msgspec.Struct, kw_only=True):
    instance: str
    instance_name: str = ""
    #: The instance's node (the volume's ``spec.node`` follows it).
    node: str = ""
    #: The guest disk, ``vdb`` … ``vdz`` (unique per instance: ``diskslots``).
    device: str
    #: Detach asked with ``--force``: the node unplugs without waiting for the guest.
    force: bool = False


class Qos(msgspec.Struct, kw_only=True):
    """I/O limits (0 = none); libvirt ``<iotune>``."""

    read_iops_sec: int = 0
    write_iops_sec: int = 0
    read_bytes_sec: int = 0
    write_bytes_sec: int = 0


class RevertRequest(msgspec.Struct, kw_only=True):
    #: The snapshot's id ("" none); the node rolls back once per increase of ``seq`` (``status.revert_seq``).
    snapshot: str = ""
    seq: int = 0


class VolumeSpec(msgspec.Struct, kw_only=True):
    size_gib: int
    #: The pool's id and name, and its driver (``ceph|local``).
    pool: str
    pool_name: str = ""
    driver: Literal["ceph", "local"] = "ceph"
    source: VolumeSource = msgspec.field(default_factory=VolumeSource)
    #: The image it was made from ("" otherwise): ``source.id`` at the top level, where the store indexes it, so an
    #: image's delete finds its volumes in every project.
    image_id: str = ""
    #: The node that manages it (indexed: ``where={"node": …}``): local → where its file is; ceph → the attached
    #: instance's node, else the node chosen at create.
    node: str = ""
    #: The node that managed it before the last attach moved it (a ceph volume): the new node fences it.
    previous_node: str = ""
    attachment: Attachment | None = None
    #: The attachment a ``volume detach`` removed (its ``force`` says how): the instance's node unplugs the volume
    #: from that domain. Replaced by the next detach; informational once the volume is ``available``.
    detached_from: Attachment | None = None
    qos: Qos = msgspec.field(default_factory=Qos)
    revert: RevertRequest = msgspec.field(default_factory=RevertRequest)
    #: Flatten asked (``volume flatten``, a volume made from a snapshot): its node copies the snapshot's data into
    #: it (:meth:`VolumeDriver.flatten`), then :func:`minicloud.storage.volumes.flattened` drops it from the
    #: snapshot's ``clones`` and sets ``status.flattened`` in one transaction. Never cleared.
    flatten: bool = False
    #: Delete asked: the node removes the data (and its snapshots'), then the record.
    deleted: bool = False
    #: The instance whose root disk it is (``--boot-volume``); "".
    root_of: str = ""
    #: Its snapshots' ids (kept by the snapshot services, CAS on the volume).
    snapshots: list[str] = []
    description: str = ""


class VolumeObserved(msgspec.Struct, kw_only=True):
    """A volume's ``status``, written by its node."""

    state: Literal[
        "creating", "available", "attaching", "in-use", "detaching", "extending", "reverting", "deleting", "error"
    ] = "creating"
    reason: str = ""
    #: What the pool holds.
    size_gib: int = 0
    #: The guest disk it is plugged as ("" when not plugged).
    device: str = ""
    #: The last revert done (``RevertRequest.seq``).
    revert_seq: int = 0
    #: ``spec.flatten`` is done: the volume no longer depends on the snapshot it was made from.
    flattened: bool = False


def _render_volume(obj: Obj[VolumeSpec, VolumeObserved]) -> Volume:
    s, st = obj.spec, obj.status
    att = s.attachment
    return Volume(
        **obj.common_fields(),
        size_gib=s.size_gib,
        pool=s.pool_name or s.pool,
        pool_id=s.pool,
        driver=s.driver,
        source=VolumeSourceView(type=s.source.type, id=s.source.id, name=s.source.name),
        node=s.node,
        attachment=(
            AttachmentView(instance=att.instance, instance_name=att.instance_name, node=att.node, device=att.device)
            if att is not None
            else None
        ),
        qos=QosLimits(
            read_iops_sec=s.qos.read_iops_sec,
            write_iops_sec=s.qos.write_iops_sec,
            read_bytes_sec=s.qos.read_bytes_sec,
            write_bytes_sec=s.qos.write_bytes_sec,
        ),
        root_of=s.root_of,
        description=s.description,
        status=VolumeStatus(
            state="deleting" if s.deleted and st.state != "error" else st.state,
            reason=st.reason,
            size_gib=st.size_gib,
            flattening=s.flatten and not st.flattened,
            flattened=st.flattened,
        ),
    )


#: Create, delete, attach, detach and extend are written by hand in :mod:`minicloud.storage.volumes`; list, show
#: and patch are derived.
VOLUME = declare(
    Kind(
        name="volume",
        plural="volumes",
        prefix="vol",
        spec=VolumeSpec,
        status=VolumeObserved,
        action="storage:volumes",
        view=Volume,
        render=_render_volume,
        noun="volume",
        columns=(
            Column("name", "name"),
            Column("size_gib", "size_gib"),
            Column("pool", "pool"),
            Column("state", "status.state"),
            Column("instance", "attachment.instance_name"),
            Column("device", "attachment.device"),
            Column("id", "id"),
        ),
        patch=VolumeUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- snapshots -----------------------------------------------------------------------------------------------------
class SnapshotSpec(msgspec.Struct, kw_only=True):
    #: The volume's id and name ("" for a root-disk snapshot).
    volume: str
    volume_name: str = ""
    #: A root-disk snapshot: the instance's id and name (its root disk is an RBD clone in ``pool``, not a volume).
    instance: str = ""
    instance_name: str = ""
    #: A root-disk snapshot's revert: the node rolls the root disk back once per increase (``status.revert_seq``).
    revert_seq: int = 0
    #: The pool's id (the volume's).
    pool: str = ""
    #: The node that makes and removes it (the volume's node when it was taken).
    node: str = ""
    size_gib: int = 0
    deleted: bool = False
    #: Volumes cloned from it (kept by the volume services, CAS on the snapshot).
    clones: list[str] = []
    description: str = ""


class SnapshotObserved(msgspec.Struct, kw_only=True):
    state: Literal["creating", "available", "deleting", "error"] = "creating"
    reason: str = ""
    #: The last root-disk revert done (``SnapshotSpec.revert_seq``).
    revert_seq: int = 0


def rbd_image(spec: SnapshotSpec) -> str:
    """The pool image a snapshot is of: its volume's (named by the volume id), or its instance's root disk."""
    return spec.volume or f"{spec.instance}-root"


def _render_snapshot(obj: Obj[SnapshotSpec, SnapshotObserved]) -> Snapshot:
    s, st = obj.spec, obj.status
    return Snapshot(
        **obj.common_fields(),
        volume=s.volume_name or s.volume,
        volume_id=s.volume,
        instance=s.instance_name or s.instance,
        instance_id=s.instance,
        pool=s.pool,
        size_gib=s.size_gib,
        description=s.description,
        status=SnapshotStatus(state="deleting" if s.deleted and st.state != "error" else st.state, reason=st.reason),
    )


SNAPSHOT = declare(
    Kind(
        name="snapshot",
        plural="snapshots",
        prefix="snap",
        spec=SnapshotSpec,
        status=SnapshotObserved,
        action="storage:snapshots",
        view=Snapshot,
        render=_render_snapshot,
        noun="snapshot",
        columns=(
            Column("name", "name"),
            Column("volume", "volume"),
            Column("size_gib", "size_gib"),
            Column("state", "status.state"),
            Column("id", "id"),
        ),
        patch=SnapshotUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- bookkeeping (internal) ----------------------------------------------------------------------------------------
class StorageUsageSpec(msgspec.Struct, kw_only=True):
    """A project's storage held against its quotas (volumes asked to be deleted no longer count)."""

    project: str
    volumes: int = 0
    volume_gib: int = 0
    snapshots: int = 0


#: One per project holding storage, id ``stu-<project>``, name the project (cluster-scoped so project deletion is
#: not blocked by it); deleted when it drops to zero.
STORAGE_USAGE = declare(
    Kind(name="storageusage", plural="storageusages", prefix="stu", spec=StorageUsageSpec, scope="cluster",
         generic=frozenset())
)  # fmt: skip


class DiskSlotsSpec(msgspec.Struct, kw_only=True):
    instance: str
    #: Guest disk (``vdb`` …) → volume id.
    devices: dict[str, str] = {}


#: One per instance with attached volumes, id ``dsl-<instance id>``, name the instance id; deleted with its last
#: volume's detach (or by :func:`minicloud.storage.volumes.release_instance`).
DISK_SLOTS = declare(
    Kind(name="diskslots", plural="diskslots", prefix="dsl", spec=DiskSlotsSpec, scope="cluster", generic=frozenset())
)


def usage_id(project: str) -> str:
    return f"{STORAGE_USAGE.prefix}-{project}"


def slots_id(instance: str) -> str:
    return f"{DISK_SLOTS.prefix}-{instance}"


__all__ = [
    "CEPH",
    "DISK_SLOTS",
    "POOL",
    "SNAPSHOT",
    "STORAGE_DISK",
    "STORAGE_USAGE",
    "VOLUME",
    "Attachment",
    "CephSpec",
    "CephStatus",
    "DiskSlotsSpec",
    "Fence",
    "OsdInfo",
    "PoolSpec",
    "Qos",
    "RevertRequest",
    "SnapshotObserved",
    "SnapshotSpec",
    "StorageDiskSpec",
    "StorageDiskStatus",
    "StorageUsageSpec",
    "VolumeObserved",
    "VolumeSource",
    "VolumeSpec",
]
