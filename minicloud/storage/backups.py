"""Volume backups into buckets: the manifest, the chain and retention rules (pure), and the services behind
``/v1/volume-backups``, ``/v1/backup-targets`` and ``/v1/backup-schedules``.

**In the bucket**, a backup ``B`` of volume ``V`` is two objects under ``minicloud-backups/volumes/V/B/``:

- ``data``: an ``rbd export-diff`` stream (``format: rbd-diff``; a full backup is the diff from nothing, an
  incremental one the diff from its parent's snapshot) — or, for a ``local`` volume, a qcow2 copy (``format:
  qcow2``; full only). Uploaded as an S3 multipart upload in parts of :data:`PART_BYTES`, each spooled to a file on
  the node (never held in memory) with its sha256;
- ``manifest.json`` (:class:`Manifest`), written **last**: the volume, its size, the chain (ids, full first), the
  parts with their sizes and sha256. A backup without a manifest is not a backup (an interrupted upload).

**Chains.** An incremental backup's parent is the newest available backup of the same volume into the same bucket
and target (:func:`pick_parent`). The volume keeps one backup snapshot per chain head (``bk-<id>``: the node takes
the new one, and removes the parent's once the child is stored), so an incremental diff is exactly what changed.
A restore applies the chain full → … → this with ``rbd import-diff`` onto a fresh image, verifying each part's
sha256 as it streams; import-diff itself refuses a diff whose start snapshot the image has not (a broken chain).

**Deleting inside a chain** keeps it valid: a backup another backup depends on (its ``chain`` names it) is not
deleted — by hand that is a 409 naming the dependents; a schedule's pruning (:func:`to_prune`) only deletes backups
beyond ``keep`` that no kept backup depends on, and starts a new full backup every ``full_every`` backups so that old
chains become wholly prunable. (Merging diffs was rejected: it would download and re-upload the chain.)
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from minicloud import errors, ids
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.write import Written, commit
from minicloud.iam.directory import Directory, authorize
from minicloud.state import Check, Store, list_all
from minicloud.storage import common
from minicloud.storage.backup_kinds import (
    BACKUP_SCHEDULE,
    BACKUP_TARGET,
    DEFAULT_BUCKET,
    VOLUME_BACKUP,
    BackupScheduleCreate,
    BackupScheduleSpec,
    BackupTargetCreate,
    BackupTargetSpec,
    VolumeBackupCreate,
    VolumeBackupRestore,
    VolumeBackupSpec,
    parse_every,
)

PREFIX = "minicloud-backups"
#: S3 multipart part size: each part is spooled to a file on the node, so memory stays small.
PART_BYTES = 64 << 20
#: S3's smallest part (all but the last).
MIN_PART_BYTES = 5 << 20
#: The most backups one volume has (records listing them stay small; schedules prune).
MAX_BACKUPS_PER_VOLUME = 512
#: The shortest schedule interval.
MIN_EVERY_SECONDS = 60
MAX_KEEP = 365
FORMATS = ("rbd-diff", "qcow2")


# -- objects and manifest ------------------------------------------------------------------------------------------
class PartInfo(msgspec.Struct, kw_only=True):
    number: int
    size: int
    sha256: str


class Manifest(msgspec.Struct, kw_only=True):
    version: int = 1
    kind: Literal["volume", "state"] = "volume"
    format: Literal["rbd-diff", "qcow2", "sqlite"] = "rbd-diff"
    backup: str
    name: str = ""
    project: str = ""
    volume: str = ""
    volume_name: str = ""
    #: The volume's size when backed up (what a restore needs at least).
    size_bytes: int = 0
    parent: str = ""
    #: The backups to apply, full first, this one last.
    chain: list[str] = []
    #: The RBD snapshot the diff ends at (and the parent's it starts from).
    snap: str = ""
    from_snap: str = ""
    #: The data object's key, its parts and its total size.
    object: str = ""
    parts: list[PartInfo] = []
    stored_bytes: int = 0
    created_at: str = ""
    finished_at: str = ""


def backup_prefix(volume_id: str, backup_id: str) -> str:
    return f"{PREFIX}/volumes/{volume_id}/{backup_id}/"


def data_key(prefix: str) -> str:
    return f"{prefix}data"


def manifest_key(prefix: str) -> str:
    return f"{prefix}manifest.json"


def state_key(name: str) -> str:
    """The object of a cluster state backup file ``name`` (``backup-….db``)."""
    return f"{PREFIX}/state/{name}"


def snap_name(backup_id: str) -> str:
    """The backup snapshot on the volume."""
    return f"bk-{backup_id}"


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2)


def decode_manifest(data: bytes) -> Manifest:
    """The manifest in ``data``; ValueError saying what is wrong when it does not hold together."""
    try:
        m = msgspec.json.decode(data, type=Manifest)
    except msgspec.ValidationError as exc:
        raise ValueError(f"the manifest is not valid: {exc}") from None
    except msgspec.DecodeError:
        raise ValueError("the manifest is not JSON") from None
    problem = manifest_problem(m)
    if problem:
        raise ValueError(f"the manifest is not valid: {problem}")
    return m


def manifest_problem(m: Manifest) -> str | None:
    """Why ``m`` does not hold together (None when it does)."""
    if m.version != 1:
        return f"version {m.version} is not known"
    if not m.chain or m.chain[-1] != m.backup:
        return "its chain does not end with the backup itself"
    if m.parent and (len(m.chain) < 2 or m.chain[-2] != m.parent):
        return "its chain does not name its parent just before it"
    if not m.parent and len(m.chain) != 1:
        return "a full backup's chain is the backup alone"
    if len(set(m.chain)) != len(m.chain):
        return "its chain names a backup twice"
    if [p.number for p in m.parts] != list(range(1, len(m.parts) + 1)):
        return "its parts are not numbered 1, 2, …"
    if sum(p.size for p in m.parts) != m.stored_bytes:
        return "its parts do not add up to its size"
    if any(not re.fullmatch(r"[0-9a-f]{64}", p.sha256) for p in m.parts):
        return "a part's sha256 is not 64 hex digits"
    if m.format == "qcow2" and m.parent:
        return "a qcow2 copy is always full"
    return None


def split_sizes(total: int, part: int = PART_BYTES) -> list[int]:
    """Pure: the part sizes of ``total`` bytes (each ``part`` but the last; one empty part for nothing)."""
    if total <= 0:
        return [0]
    return [min(part, total - i) for i in range(0, total, part)]


# -- chains and retention ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackupFacts:
    """What the chain and retention rules need of one backup record."""

    id: str
    volume: str
    bucket: str
    target: str
    created_at: str
    state: str
    deleted: bool = False
    parent: str = ""
    chain: tuple[str, ...] = ()
    schedule: str = ""

    @classmethod
    def of(cls, obj: Any) -> BackupFacts:
        s = obj.spec
        return cls(
            id=obj.id, volume=s.volume, bucket=s.bucket, target=s.target, created_at=obj.created_at,
            state=obj.status.state, deleted=s.deleted, parent=s.parent, chain=tuple(s.chain), schedule=s.schedule,
        )  # fmt: skip


def newest_first(backups: Iterable[BackupFacts]) -> list[BackupFacts]:
    return sorted(backups, key=lambda b: (b.created_at, b.id), reverse=True)


def pick_parent(backups: Iterable[BackupFacts], volume: str, bucket: str, target: str) -> BackupFacts | None:
    """Pure: what an incremental backup of ``volume`` into ``bucket``/``target`` builds on: the newest backup there
    that is available and not being deleted — or None (a full backup is needed). A backup still being made blocks
    nothing here: the service refuses a second running one."""
    for b in newest_first(backups):
        if (b.volume, b.bucket, b.target) == (volume, bucket, target) and not b.deleted and b.state == "available":
            return b
    return None


def chain_of(parent: BackupFacts | None, backup_id: str) -> list[str]:
    return [*(parent.chain if parent is not None else ()), backup_id]


def dependents(backups: Iterable[BackupFacts], backup_id: str) -> list[str]:
    """Pure: the backups (not being deleted) whose chain needs ``backup_id``, oldest first."""
    found = [b for b in backups if b.id != backup_id and backup_id in b.chain and not b.deleted]
    return [b.id for b in reversed(newest_first(found))]


def to_prune(backups: Iterable[BackupFacts], keep: int) -> list[str]:
    """Pure: the backups of one schedule to delete so that the newest ``keep`` available ones remain restorable —
    those beyond ``keep`` that no kept backup's chain needs (a chain is only ever removed whole, newest first).
    Backups still being made, failed or being deleted are not counted; failed ones beyond ``keep`` go too."""
    ordered = [b for b in newest_first(backups) if not b.deleted]
    available = [b for b in ordered if b.state == "available"]
    kept = available[: max(0, keep)]
    needed = {c for b in kept for c in b.chain}
    running = {c for b in ordered if b.state in ("creating", "uploading") for c in b.chain}
    doomed = [b.id for b in available[max(0, keep) :] if b.id not in needed and b.id not in running]
    cutoff = kept[-1].created_at if len(kept) >= keep and kept else ""
    doomed += [b.id for b in ordered if b.state == "error" and cutoff and b.created_at < cutoff]
    return doomed


def next_is_full(backups: Sequence[BackupFacts], full_every: int, keep: int) -> bool:
    """Pure: whether a schedule's next backup is full: no parent to build on, or the current chain has reached
    ``full_every`` backups (``keep`` when 0), so that retention can drop the older chain whole."""
    newest = next((b for b in newest_first(backups) if b.state == "available" and not b.deleted), None)
    if newest is None:
        return True
    limit = full_every or keep
    return len(newest.chain) >= max(1, limit)


def due(last_run: str | None, every_seconds: int, now: _dt.datetime) -> bool:
    """Pure: whether a schedule runs at ``now`` (never run, or ``every_seconds`` since its last run)."""
    if not last_run:
        return True
    return ids.parse_time(last_run) + _dt.timedelta(seconds=every_seconds) <= now


# -- targets -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """Where a node sends a backup: URL, the key, and how to trust the certificate. ``external``: a caller-chosen
    endpoint (the allow-list applies)."""

    url: str
    access_key: str
    secret_key: str = ""
    region: str = "us-east-1"
    ca_file: str = ""
    ca_pem: str = ""
    external: bool = False

    def __repr__(self) -> str:
        return f"Endpoint(url={self.url!r}, access_key={self.access_key!r}, external={self.external})"


def target_aad(target_id: str) -> bytes:
    return f"backuptarget:{target_id}".encode()


def check_endpoint_url(url: str, policy: Any) -> str:
    """``url`` (https://HOST[:PORT]) when the policy lets a node connect to it (an IP host is judged now; a name
    when it resolves, at connect time); ValidationFailed or AddressRefused otherwise."""
    from yarl import URL

    from minicloud.compute.url_policy import normal_host

    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.scheme not in ("https", "http") or not parsed.host or parsed.path not in ("", "/"):
        raise errors.ValidationFailed(
            "the endpoint is https://HOST[:PORT] (no path)",
            invalid_params=[{"name": "endpoint", "reason": "not https://HOST[:PORT]"}],
        )
    if parsed.user or parsed.password or parsed.query_string:
        raise errors.ValidationFailed(
            "the endpoint carries no user, password or query",
            invalid_params=[{"name": "endpoint", "reason": "credentials or query in the URL"}],
        )
    host = normal_host(parsed.host)
    import ipaddress

    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return str(parsed).rstrip("/")
    if (reason := policy.refusal(host, host)) is not None:
        from minicloud.compute.url_policy import AddressRefused

        raise AddressRefused(
            f"the endpoint is {reason} ({host}), which nodes do not send backups to; ask the operator to allow it in "
            "compute.image_url_allow"
        )
    return str(parsed).rstrip("/")


async def resolve_endpoint(
    store: Store, keystore: Any, *, project: str, target: str, node: str, port: int, ca_file: Path
) -> Endpoint:
    """The endpoint and key a backup of ``project`` uses: the ``backuptarget`` ``target`` (its secret unsealed), or
    this cluster's S3 as the project's service key through the gateway of ``node``."""
    if target:
        record = await store.get(BACKUP_TARGET.name, target)
        if record is None:
            raise errors.NotFound(f"backup target {target} no longer exists")
        t = BACKUP_TARGET.load(record).spec
        secret = keystore.decrypt(t.secret, target_aad(target)).decode()
        return Endpoint(url=t.endpoint, access_key=t.access_key, secret_key=secret, region=t.region,
                        ca_pem=t.ca_bundle, external=True)  # fmt: skip
    from minicloud.objects import buckets
    from minicloud.objects.kinds import S3TENANT, tenant_record_id

    pid = await buckets.project_id(store, project)
    record = await store.get(S3TENANT.name, tenant_record_id(pid))
    if record is None:
        raise errors.Conflict(f"project '{project}' has no object storage tenant yet: create its bucket first")
    tenant = S3TENANT.load(record).spec
    secret = keystore.decrypt(tenant.secret, tenant.access_key.encode()).decode()
    gw = await buckets.local_gateway(store, node, port, ca_file)
    return Endpoint(url=gw.url, access_key=tenant.access_key, secret_key=secret, ca_file=gw.ca_file)


# -- services ------------------------------------------------------------------------------------------------------
async def _volume_backups(store: Store, project: str, volume_id: str) -> list[Any]:
    records = await list_all(store, VOLUME_BACKUP.name, project=project)
    return [VOLUME_BACKUP.load(r) for r in records if r.spec.get("volume") == volume_id]


async def _bucket_of(ctx: Context, store: Store, bucket: str, target: Any | None) -> None:
    """A bucket of this cluster must be a ready bucket of the project; another endpoint's is not checked here."""
    if target is not None:
        return
    from minicloud.objects.kinds import BUCKET

    found = await crud.find(ctx, store, BUCKET, bucket)
    if found is None:
        raise errors.NotFound(f"no bucket '{bucket}' in project '{ctx.project}'; create it with `minicloud bucket "
                              f"create {bucket}`")  # fmt: skip
    if found.spec.deleted or found.status.state != "ready":
        state = "being deleted" if found.spec.deleted else found.status.state
        raise errors.Conflict(f"bucket '{bucket}' is {state}; back up into a ready bucket")


async def default_bucket(ctx: Context, store: Store, *, directory: Directory | None = None) -> str:
    """The project's bucket :data:`DEFAULT_BUCKET`, where schedules without a bucket put their backups (AWS Backup's
    default vault): created on first use (``creating`` until the objects reconciler made it; the schedule is due
    again at the next look meanwhile), by a caller who may create buckets (``storage:buckets:create``, 403
    otherwise). 409 while it is being deleted or without Ceph (as any bucket)."""
    from minicloud.model.objects import BucketCreate
    from minicloud.objects.buckets import create_bucket
    from minicloud.objects.kinds import BUCKET

    for _ in range(3):
        found = await crud.find(ctx, store, BUCKET, DEFAULT_BUCKET)
        if found is not None:
            if found.spec.deleted:
                raise errors.Conflict(
                    f"bucket '{DEFAULT_BUCKET}' is being deleted; give the schedule another bucket with --bucket"
                )
            return DEFAULT_BUCKET
        if directory is not None:  # making a bucket is the caller's to do: the same action as `bucket create`
            await authorize(directory, ctx.principal, "storage:buckets:create", ctx.project)
        try:
            await create_bucket(ctx, store, BucketCreate(name=DEFAULT_BUCKET, description="backups of schedules"))
            return DEFAULT_BUCKET
        except errors.AlreadyExists:
            continue  # made meanwhile by a concurrent schedule: read it
    raise errors.Conflict(f"bucket '{DEFAULT_BUCKET}' kept changing while a schedule was created; retry")


async def create_backup(ctx: Context, store: Store, body: VolumeBackupCreate, *, schedule: str = "") -> Written:
    """Back up a volume into a bucket (state ``creating``; the volume's node makes it). 409 while the volume is not
    available or in use, while another backup of it is being made, for ``incremental`` without a backup to build
    on or of a ``local`` volume (incremental backups need RBD)."""
    from minicloud.storage.kinds import VOLUME

    vol = await crud.get(ctx, store, VOLUME, body.volume)
    if vol.spec.deleted:
        raise errors.Conflict(f"volume '{vol.name}' is being deleted")
    if vol.status.state not in ("available", "in-use"):
        raise errors.Conflict(f"volume '{vol.name}' is {vol.status.state}; back it up once available or in use")
    if body.incremental and vol.spec.driver == "local":
        raise errors.Conflict(
            f"volume '{vol.name}' is in a local pool: its backups are full qcow2 copies (incremental backups need "
            "RBD's diffs, i.e. a ceph pool); leave out --incremental"
        )
    target = await crud.get(ctx, store, BACKUP_TARGET, body.target) if body.target else None
    await _bucket_of(ctx, store, body.bucket, target)
    existing = await _volume_backups(store, ctx.project, vol.id)
    if len(existing) >= MAX_BACKUPS_PER_VOLUME:
        raise errors.Conflict(f"volume '{vol.name}' has {len(existing)} backups, the most a volume may have; delete "
                              "some first")  # fmt: skip
    if busy := [b for b in existing if b.status.state in ("creating", "uploading") and not b.spec.deleted]:
        raise errors.Conflict(f"backup '{busy[0].name}' of volume '{vol.name}' is being made; wait for it")
    facts = [BackupFacts.of(b) for b in existing]
    target_id = target.id if target is not None else ""
    parent = pick_parent(facts, vol.id, body.bucket, target_id) if body.incremental else None
    if body.incremental and parent is None:
        raise errors.Conflict(
            f"volume '{vol.name}' has no available backup in bucket '{body.bucket}' to build an incremental one on; "
            "make a full backup first (leave out --incremental)"
        )
    backup_id = ids.new_id(VOLUME_BACKUP.prefix)
    stamp = ctx.clock()
    name = body.name or f"{vol.name}-{stamp[:19].replace(':', '').replace('-', '')}-{backup_id[-4:]}"
    spec = VolumeBackupSpec(
        volume=vol.id, volume_name=vol.name, pool=vol.spec.pool, driver=vol.spec.driver, node=vol.spec.node,
        bucket=body.bucket, target=target_id, target_name=target.name if target is not None else "",
        prefix=backup_prefix(vol.id, backup_id), incremental=parent is not None,
        parent=parent.id if parent is not None else "", chain=chain_of(parent, backup_id), schedule=schedule,
        size_gib=vol.spec.size_gib, description=body.description,
    )  # fmt: skip
    obj = VOLUME_BACKUP.new(project=ctx.project, name=name, id=backup_id, spec=spec, labels=body.labels, stamp=stamp)
    checks = [Check(kind=VOLUME.name, id=vol.id, expect_revision=vol.revision)]
    if target is not None:  # a target delete sees this backup, or this create fails its Check
        checks.append(await common.still(store, BACKUP_TARGET, target.id, f"backup target '{target.name}'"))
    if parent is not None:
        checks.append(Check(kind=VOLUME_BACKUP.name, id=parent.id, expect_revision=_rev(existing, parent.id)))
    return await crud.create(ctx, store, VOLUME_BACKUP, obj, extra=checks)


def _rev(objs: Iterable[Any], id_: str) -> int:
    return next(o.revision for o in objs if o.id == id_)


async def delete_backup(ctx: Context, store: Store, ref: str, *, node: str, expect: int | None = None) -> Written:
    """Delete a backup: 409 while other backups depend on it (naming them: delete those first, newest first) or while
    it is being made. Marks it ``deleted`` (202): its node removes the objects, then the record; a node that left
    the cluster hands it to the answering ``node``."""
    bk = await crud.get(ctx, store, VOLUME_BACKUP, ref)
    if expect is not None and expect != bk.revision:
        raise errors.PreconditionFailed("the backup was changed since the revision you sent in If-Match")
    if bk.status.state in ("creating", "uploading") and not bk.spec.deleted:
        raise errors.Conflict(f"backup '{bk.name}' is being made; delete it once it is available or failed")
    others = await _volume_backups(store, ctx.project, bk.spec.volume)
    if deps := dependents([BackupFacts.of(b) for b in others], bk.id):
        names = ", ".join(next(o.name for o in others if o.id == d) for d in deps)
        raise errors.InUse(
            f"backup '{bk.name}' is part of the chain of {names}; delete those first (newest first), or keep it"
        )
    owner = bk.spec.node
    if not owner or await common.node_gone(store, owner):
        owner = node
    if bk.spec.deleted and owner == bk.spec.node:
        return Written(VOLUME_BACKUP.to_view(bk), 202, bk.revision)
    marked = bk.replace(spec=msgspec.structs.replace(bk.spec, deleted=True, node=owner), updated_at=ctx.clock())
    from minicloud.storage.volumes import cas

    return await commit(
        ctx, store, [cas(VOLUME_BACKUP, marked)], status=202, label=VOLUME_BACKUP.label,
        respond=lambda rev: VOLUME_BACKUP.to_view(marked.replace(revision=rev)),
    )  # fmt: skip


async def restore_backup(
    ctx: Context, store: Store, ref: str, body: VolumeBackupRestore, *, node: str, quotas: Any = None
) -> Written:
    """Restore a backup into a NEW volume (``creating`` until its node has applied the chain). The pool is the
    backup's volume's unless given; an RBD diff chain restores into a ceph pool only (a qcow2 copy into either).
    409 unless the backup and every backup of its chain are available."""
    from minicloud.storage import pools
    from minicloud.storage.common import still
    from minicloud.storage.kinds import POOL, VOLUME, VolumeSource, VolumeSpec
    from minicloud.storage.quotas import DEFAULT_QUOTAS, charge
    from minicloud.storage.volumes import _check_space

    bk = await crud.get(ctx, store, VOLUME_BACKUP, ref)
    if bk.spec.deleted or bk.status.state != "available":
        state = "being deleted" if bk.spec.deleted else bk.status.state
        raise errors.Conflict(f"backup '{bk.name}' is {state}; only an available backup can be restored")
    checks = [Check(kind=VOLUME_BACKUP.name, id=bk.id, expect_revision=bk.revision)]
    for link in bk.spec.chain[:-1]:
        record = await store.get(VOLUME_BACKUP.name, link)
        if record is None or record.spec.get("deleted") or (record.status or {}).get("state") != "available":
            raise errors.Conflict(
                f"backup '{bk.name}' needs backup {link} of its chain, which is gone or not available"
            )
        checks.append(Check(kind=VOLUME_BACKUP.name, id=link, expect_revision=record.revision))
    pool = await pools.resolve(ctx, store, body.pool if body.pool is not None else bk.spec.pool)
    if bk.spec.driver == "ceph" and pool.spec.driver != "ceph":
        raise errors.Conflict(
            f"backup '{bk.name}' is a chain of RBD diffs: it restores into a ceph pool, not '{pool.name}'"
        )
    minimum = max(1, bk.spec.size_gib, math.ceil(bk.status.size_bytes / (1 << 30)))
    size_gib = body.size_gib or minimum
    if size_gib < minimum:
        raise errors.ValidationFailed(
            f"the backup holds {minimum} GiB: the new volume needs at least that",
            invalid_params=[{"name": "size_gib", "reason": f"less than {minimum}"}],
        )
    vol = VOLUME.new(
        project=ctx.project,
        name=body.name,
        spec=VolumeSpec(
            size_gib=size_gib,
            pool=pool.id,
            pool_name=pool.name,
            driver=pool.spec.driver,
            source=VolumeSource(type="backup", id=bk.id, name=bk.name),
            node=node,
            description=body.description,
        ),
        labels=body.labels,
        stamp=ctx.clock(),
    )

    async def step(_: int) -> Written:
        await _check_space(store, pool, size_gib)
        ops: list[Any] = await charge(ctx, store, ctx.project, volumes=1, gib=size_gib, quotas=quotas or DEFAULT_QUOTAS)
        ops.append(await still(store, POOL, pool.id, f"pool '{pool.name}'"))
        return await crud.create(ctx, store, VOLUME, vol, extra=[*ops, *checks])

    return await common.retrying(step)


async def create_target(ctx: Context, store: Store, keystore: Any, body: BackupTargetCreate, *, policy: Any) -> Written:
    """Record another S3 endpoint (its secret sealed). 403 when the endpoint's address is refused by the allow-list."""
    url = check_endpoint_url(body.endpoint, policy)
    if body.ca_bundle and "-----BEGIN CERTIFICATE-----" not in body.ca_bundle:
        raise errors.ValidationFailed(
            "the CA bundle is PEM (-----BEGIN CERTIFICATE-----)",
            invalid_params=[{"name": "ca_bundle", "reason": "not PEM"}],
        )
    target_id = ids.new_id(BACKUP_TARGET.prefix)
    sealed = keystore.encrypt(body.secret_key.encode(), target_aad(target_id))
    spec = BackupTargetSpec(endpoint=url, region=body.region, access_key=body.access_key, secret=sealed,
                            ca_bundle=body.ca_bundle, description=body.description)  # fmt: skip
    obj = BACKUP_TARGET.new(project=ctx.project, name=body.name, id=target_id, spec=spec, labels=body.labels,
                            stamp=ctx.clock())  # fmt: skip
    return await crud.create(ctx, store, BACKUP_TARGET, obj)


async def create_schedule(
    ctx: Context, store: Store, body: BackupScheduleCreate, *, directory: Directory | None = None
) -> Written:
    """A schedule of volume backups (or, ``state``, of the cluster state: admins only, ``admin:backups:create``)
    every ``every_seconds``, keeping the newest ``keep``."""
    from minicloud.storage.kinds import VOLUME

    if body.every_seconds < MIN_EVERY_SECONDS:
        raise errors.ValidationFailed(
            f"a schedule runs at most every {MIN_EVERY_SECONDS} s",
            invalid_params=[{"name": "every_seconds", "reason": f"less than {MIN_EVERY_SECONDS}"}],
        )
    if not 1 <= body.keep <= MAX_KEEP or body.full_every < 0:
        raise errors.ValidationFailed(
            f"keep is 1 to {MAX_KEEP} and full_every 0 or more",
            invalid_params=[{"name": "keep", "reason": f"not 1..{MAX_KEEP}"}],
        )
    if body.state == (body.volume is not None):
        raise errors.ValidationFailed(
            "a schedule backs up a volume (--volume) or the cluster state (--state), one of the two",
            invalid_params=[{"name": "volume", "reason": "give a volume or state, not both or neither"}],
        )
    if body.state:
        await common.require_admin(ctx, directory, "admin:backups:create", "backing up the cluster state")
    if body.bucket is None and body.target:
        raise errors.ValidationFailed(
            "a schedule to another endpoint needs --bucket: a bucket there",
            invalid_params=[{"name": "bucket", "reason": "required with target"}],
        )
    target = await crud.get(ctx, store, BACKUP_TARGET, body.target) if body.target else None
    if body.bucket is not None:
        bucket = body.bucket
        await _bucket_of(ctx, store, bucket, target)
    else:
        bucket = await default_bucket(ctx, store, directory=directory)
    vol = await crud.get(ctx, store, VOLUME, body.volume) if body.volume is not None else None
    if vol is not None and vol.spec.driver == "local" and body.full_every not in (0, 1):
        raise errors.Conflict(f"volume '{vol.name}' is in a local pool: every backup of it is full (--full-every 1)")
    spec = BackupScheduleSpec(
        volume=vol.id if vol is not None else "", volume_name=vol.name if vol is not None else "", state=body.state,
        bucket=bucket, target=target.id if target is not None else "",
        target_name=target.name if target is not None else "", every_seconds=body.every_seconds, keep=body.keep,
        full_every=1 if vol is not None and vol.spec.driver == "local" else body.full_every,
        description=body.description,
    )  # fmt: skip
    name = body.name or f"{vol.name if vol is not None else 'state'}-every-{body.every_seconds}s"
    obj = BACKUP_SCHEDULE.new(project=ctx.project, name=name, spec=spec, labels=body.labels, stamp=ctx.clock())
    extra = [await common.still(store, BACKUP_TARGET, target.id, f"backup target '{target.name}'")] if target else []
    return await crud.create(ctx, store, BACKUP_SCHEDULE, obj, extra=extra)


async def target_users(store: Store, target: Any) -> list[str]:
    """What uses backup target ``target``: its backups (also those being deleted: their objects are removed through
    it) and schedules, as words for a 409."""
    used = [f"backup '{r.name}'" for r in await list_all(store, VOLUME_BACKUP.name, project=target.project)
            if r.spec.get("target") == target.id]  # fmt: skip
    used += [f"backup schedule '{r.name}'" for r in await list_all(store, BACKUP_SCHEDULE.name, project=target.project)
             if r.spec.get("target") == target.id]  # fmt: skip
    return used


async def delete_target(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Delete a backup target nothing uses: 409 naming the backups and schedules that still do (delete them first;
    a backup's objects are removed through its target). Race-free against creates (:func:`common.delete_marked`)."""

    async def refuse(target: Any) -> None:
        if users := await target_users(store, target):
            more = f" and {len(users) - 5} more" if len(users) > 5 else ""
            raise errors.InUse(
                f"backup target '{target.name}' is still used by {', '.join(users[:5])}{more}; delete them first"
            )

    async def step(_: int) -> Written:
        target = await crud.get(ctx, store, BACKUP_TARGET, ref)
        if expect is not None and expect != target.revision:
            raise errors.PreconditionFailed("the backup target was changed since the revision you sent in If-Match")
        return await common.delete_marked(
            ctx, store, BACKUP_TARGET, target, refuse,
            lambda t: crud.delete_obj(ctx, store, BACKUP_TARGET, t, expect=t.revision),
        )  # fmt: skip

    return await (step(0) if expect is not None else common.retrying(step))


__all__ = [
    "PART_BYTES",
    "PREFIX",
    "BackupFacts",
    "Endpoint",
    "Manifest",
    "PartInfo",
    "backup_prefix",
    "chain_of",
    "check_endpoint_url",
    "create_backup",
    "create_schedule",
    "create_target",
    "data_key",
    "decode_manifest",
    "delete_backup",
    "delete_target",
    "dependents",
    "due",
    "encode_manifest",
    "manifest_key",
    "next_is_full",
    "parse_every",
    "pick_parent",
    "resolve_endpoint",
    "restore_backup",
    "snap_name",
    "to_prune",
]
