"""The kinds of volume backups (see :mod:`minicloud.core.kinds` and :mod:`minicloud.storage.backups`).

- ``volumebackup`` (project-scoped, prefix ``vbk``): one backup of a volume into a bucket. The services write the
  spec (status ``creating``); the node that manages the volume (``spec.node``) takes a backup snapshot ``bk-<id>`` of
  it, streams ``rbd export-diff`` (from the parent backup's snapshot when incremental, from nothing when full) — or,
  for a ``local`` volume, a qcow2 copy — into the bucket in parts, writes the manifest last, and sets ``available``.
  Deletes are ``spec.deleted``: the node removes the objects, then the record.
- ``backuptarget`` (project-scoped, prefix ``btg``): an S3 endpoint outside this cluster (endpoint, region, access
  key, the secret sealed with the node key store, a CA bundle). The endpoint must pass the operator's allow-list
  (``compute.image_url_allow``: the rule of image URLs).
- ``backupschedule`` (project-scoped, prefix ``bks``): every ``every_seconds`` the services leader makes a backup of
  ``volume`` (incremental on the last one, a full one every ``full_every``) and prunes beyond ``keep``. With
  ``state = True`` (admins only) it backs up the cluster state database into the bucket instead.

Growth: a volume's backups are bounded by :data:`~minicloud.storage.backups.MAX_BACKUPS_PER_VOLUME`; schedules prune.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from minicloud.core.kinds import Column, Kind, Obj, declare
from minicloud.model import Description, Labels, Name, Resource

_EVERY = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_every(text: str) -> int:
    """``90``, ``30m``, ``6h``, ``1d``, ``1w`` in seconds; ValueError saying the form (the CLI's ``--every``)."""
    m = _EVERY.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not an interval: give a number with s, m, h, d or w (e.g. 1d, 6h, 30m)")
    return int(m.group(1)) * _UNITS[m.group(2)]


BackupState = Literal["creating", "uploading", "available", "deleting", "error"]


# -- volume backups --------------------------------------------------------------------------------------------------
class VolumeBackupSpec(msgspec.Struct, kw_only=True):
    volume: str
    volume_name: str = ""
    pool: str = ""
    driver: Literal["ceph", "local"] = "ceph"
    #: The node that makes it (the volume's node when it was asked) and later deletes it.
    node: str = ""
    bucket: str
    #: A ``backuptarget`` id, or "" for this cluster's S3 (a bucket of the project).
    target: str = ""
    target_name: str = ""
    #: Key prefix of its objects in the bucket: ``minicloud-backups/volumes/<volume id>/<backup id>/``.
    prefix: str = ""
    incremental: bool = False
    #: The backup this one is a diff from ("" for a full backup), and the whole chain (ids, full first, this last).
    parent: str = ""
    chain: list[str] = []
    #: The schedule that made it ("" when asked by hand).
    schedule: str = ""
    size_gib: int = 0
    deleted: bool = False
    description: str = ""


class VolumeBackupObserved(msgspec.Struct, kw_only=True):
    state: BackupState = "creating"
    reason: str = ""
    #: The volume's size at backup time.
    size_bytes: int = 0
    #: Bytes stored in the bucket (the diff or the copy) and how many S3 parts.
    stored_bytes: int = 0
    parts: int = 0
    #: Progress while uploading.
    done_bytes: int = 0
    #: sha256 of the manifest object.
    manifest_sha256: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float = 0.0
    #: An S3 multipart upload in progress (aborted when the backup is started again after a crash).
    upload_id: str = ""


class VolumeBackupStatus(msgspec.Struct, kw_only=True):
    state: BackupState
    reason: str = ""
    size_bytes: int = 0
    stored_bytes: int = 0
    parts: int = 0
    done_bytes: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float = 0.0


class VolumeBackup(Resource, kw_only=True):
    """A backup of a volume in a bucket (full, or incremental on ``parent``)."""

    volume: str
    volume_id: str
    pool: str
    bucket: str
    target: str = ""
    prefix: str = ""
    incremental: bool = False
    parent: str = ""
    chain: list[str] = []
    schedule: str = ""
    size_gib: int = 0
    description: str = ""
    status: VolumeBackupStatus


class VolumeBackupCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    volume: str
    bucket: str
    name: Name | None = None
    #: A ``backuptarget`` (id or name) for another S3 endpoint; none: this cluster's S3.
    target: str | None = None
    incremental: bool = False
    description: Description = ""
    labels: Labels = {}


class VolumeBackupRestore(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: The new volume's name.
    name: Name
    #: Its pool (the backup's volume's pool when left out); at least the backup's size.
    pool: str | None = None
    size_gib: int | None = None
    description: Description = ""
    labels: Labels = {}


class VolumeBackupUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    description: Description | msgspec.UnsetType = msgspec.UNSET
    labels: Labels | msgspec.UnsetType = msgspec.UNSET


def _render_backup(obj: Obj[VolumeBackupSpec, VolumeBackupObserved]) -> VolumeBackup:
    s, st = obj.spec, obj.status
    return VolumeBackup(
        **obj.common_fields(),
        volume=s.volume_name or s.volume,
        volume_id=s.volume,
        pool=s.pool,
        bucket=s.bucket,
        target=s.target_name or s.target,
        prefix=s.prefix,
        incremental=s.incremental,
        parent=s.parent,
        chain=s.chain,
        schedule=s.schedule,
        size_gib=s.size_gib,
        description=s.description,
        status=VolumeBackupStatus(
            state="deleting" if s.deleted and st.state != "error" else st.state,
            reason=st.reason,
            size_bytes=st.size_bytes,
            stored_bytes=st.stored_bytes,
            parts=st.parts,
            done_bytes=st.done_bytes,
            started_at=st.started_at,
            finished_at=st.finished_at,
            seconds=st.seconds,
        ),
    )


VOLUME_BACKUP = declare(
    Kind(
        name="volumebackup",
        plural="volume-backups",
        prefix="vbk",
        spec=VolumeBackupSpec,
        status=VolumeBackupObserved,
        action="storage:backups",
        view=VolumeBackup,
        render=_render_backup,
        noun="volume backup",
        columns=(
            Column("name", "name"),
            Column("volume", "volume"),
            Column("bucket", "bucket"),
            Column("incremental", "incremental"),
            Column("state", "status.state"),
            Column("stored", "status.stored_bytes"),
            Column("created", "created_at"),
            Column("id", "id"),
        ),
        patch=VolumeBackupUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- targets ---------------------------------------------------------------------------------------------------------
class BackupTargetSpec(msgspec.Struct, kw_only=True):
    endpoint: str
    region: str = "us-east-1"
    access_key: str
    #: The secret key, sealed with the node key store (associated data: ``backuptarget:<id>``).
    secret: str
    #: PEM of the CA(s) the endpoint's certificate chains to ("" : the system's).
    ca_bundle: str = ""
    description: str = ""
    #: A delete is looking for backups and schedules that use the target (creates that use it are refused).
    deleting: bool = False


class BackupTarget(Resource, kw_only=True):
    """Another S3 endpoint that backups can go to (its secret is never shown)."""

    endpoint: str
    region: str
    access_key: str
    ca_bundle: bool = False
    description: str = ""


class BackupTargetCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    ca_bundle: str = ""
    description: Description = ""
    labels: Labels = {}


class BackupTargetUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    description: Description | msgspec.UnsetType = msgspec.UNSET
    labels: Labels | msgspec.UnsetType = msgspec.UNSET


def _render_target(obj: Obj[BackupTargetSpec, None]) -> BackupTarget:
    s = obj.spec
    return BackupTarget(
        **obj.common_fields(), endpoint=s.endpoint, region=s.region, access_key=s.access_key,
        ca_bundle=bool(s.ca_bundle), description=s.description,
    )  # fmt: skip


BACKUP_TARGET = declare(
    Kind(
        name="backuptarget",
        plural="backup-targets",
        prefix="btg",
        spec=BackupTargetSpec,
        action="storage:backuptargets",
        view=BackupTarget,
        render=_render_target,
        noun="backup target",
        columns=(Column("name", "name"), Column("endpoint", "endpoint"), Column("id", "id")),
        patch=BackupTargetUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- schedules -------------------------------------------------------------------------------------------------------
class BackupScheduleSpec(msgspec.Struct, kw_only=True):
    #: The volume (id) backed up; "" with ``state``.
    volume: str = ""
    volume_name: str = ""
    #: Back up the cluster state database instead of a volume (admins only).
    state: bool = False
    bucket: str
    target: str = ""
    target_name: str = ""
    every_seconds: int
    keep: int
    #: A full backup every this many backups (the others are incremental on the last); 0: ``keep``.
    full_every: int = 0
    paused: bool = False
    description: str = ""


class BackupScheduleObserved(msgspec.Struct, kw_only=True):
    last_run: str | None = None
    last_backup: str = ""
    reason: str = ""


class BackupScheduleStatus(msgspec.Struct, kw_only=True):
    last_run: str | None = None
    last_backup: str = ""
    reason: str = ""


class BackupSchedule(Resource, kw_only=True):
    """Backups of a volume (or of the cluster state) every ``every_seconds``, the newest ``keep`` kept."""

    volume: str = ""
    volume_id: str = ""
    state: bool = False
    bucket: str
    target: str = ""
    every_seconds: int
    keep: int
    full_every: int = 0
    paused: bool = False
    description: str = ""
    status: BackupScheduleStatus


#: The project's bucket where schedules without ``--bucket`` put their backups (made on first use).
DEFAULT_BUCKET = "backups"


class BackupScheduleCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name | None = None
    volume: str | None = None
    state: bool = False
    #: None: the project's bucket ``backups`` (made on first use); needed with ``target``.
    bucket: str | None = None
    target: str | None = None
    every_seconds: int
    keep: int
    full_every: int = 0
    description: Description = ""
    labels: Labels = {}


class BackupScheduleUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    description: Description | msgspec.UnsetType = msgspec.UNSET
    labels: Labels | msgspec.UnsetType = msgspec.UNSET


def _render_schedule(obj: Obj[BackupScheduleSpec, BackupScheduleObserved]) -> BackupSchedule:
    s, st = obj.spec, obj.status
    return BackupSchedule(
        **obj.common_fields(), volume=s.volume_name or s.volume, volume_id=s.volume, state=s.state, bucket=s.bucket,
        target=s.target_name or s.target, every_seconds=s.every_seconds, keep=s.keep, full_every=s.full_every,
        paused=s.paused, description=s.description,
        status=BackupScheduleStatus(last_run=st.last_run, last_backup=st.last_backup, reason=st.reason),
    )  # fmt: skip


BACKUP_SCHEDULE = declare(
    Kind(
        name="backupschedule",
        plural="backup-schedules",
        prefix="bks",
        spec=BackupScheduleSpec,
        status=BackupScheduleObserved,
        action="storage:backupschedules",
        view=BackupSchedule,
        render=_render_schedule,
        noun="backup schedule",
        columns=(
            Column("name", "name"),
            Column("volume", "volume"),
            Column("bucket", "bucket"),
            Column("every_s", "every_seconds"),
            Column("keep", "keep"),
            Column("last_run", "status.last_run"),
            Column("id", "id"),
        ),
        patch=BackupScheduleUpdate,
        generic=frozenset({"list", "show", "patch", "delete"}),
    )
)

__all__ = [
    "BACKUP_SCHEDULE",
    "BACKUP_TARGET",
    "VOLUME_BACKUP",
    "BackupScheduleSpec",
    "BackupTargetSpec",
    "VolumeBackupObserved",
    "VolumeBackupSpec",
]
