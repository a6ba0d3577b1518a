"""Backups of the whole state: node-local files in ``<data_dir>/backups``, their retention and admission.

A backup is made by an operation (``POST /v1/admin/backups``) on the node that received the request and stays on
that node (``GET /v1/admin/backups`` lists the files of the node it is sent to). Bounded two ways:

- **retention count**: after each backup the node keeps its newest ``retention.backups_keep`` files
  (:func:`to_prune` decides, :func:`prune` deletes);
- **admission** (:class:`BackupGate`): one backup at a time per node (409 naming the running operation) and at least
  ``retention.backup_min_interval`` seconds between two starts (429 with ``Retry-After``).

With a bucket (``admin backup --bucket B [--target T]``) the file is also uploaded, once made, to
``minicloud-backups/state/<name>`` of bucket B of the caller's project (or of backup target T: another S3
endpoint) with its manifest (:func:`to_bucket`), where backup schedules with ``state = true`` put theirs; a plain S3
GET of that object is the SQLite file ``admin restore`` takes. :func:`bucket_listing` lists them.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minicloud import errors
from minicloud.iam.ratelimit import too_many_requests

NAME = re.compile(r"^backup-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}\.db$")
NAME_HINT = "backup names look like backup-20260101T000000-0123abcd.db; `minicloud admin backup list` shows them"


def new_name(now: _dt.datetime) -> str:
    """A fresh backup file name, with the time it was started (to the second)."""
    return f"backup-{now:%Y%m%dT%H%M%S}-{os.urandom(4).hex()}.db"


@dataclass(frozen=True)
class BackupFile:
    name: str
    size_bytes: int
    created_at: str
    #: When the file was last written (orders backups started within the same second).
    mtime_ns: int = 0


def newest_first(files: Iterable[BackupFile]) -> list[BackupFile]:
    """Pure: ``files`` newest first: by the start time in the name (seconds), then by when the file was written."""
    return sorted(files, key=lambda b: (b.name[len("backup-") : len("backup-") + 15], b.mtime_ns, b.name), reverse=True)


def listing(directory: Path) -> list[BackupFile]:
    """The backup files in ``directory``, newest first (files being written, ``*.part``, and others are ignored)."""
    out = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not NAME.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        stamp = _dt.datetime.fromtimestamp(st.st_mtime, _dt.UTC).isoformat(timespec="milliseconds")
        out.append(BackupFile(entry.name, st.st_size, stamp.replace("+00:00", "Z"), st.st_mtime_ns))
    return newest_first(out)


def to_prune(files: Iterable[BackupFile], keep: int) -> list[str]:
    """Pure: the names of the backups to delete so that the newest ``keep`` remain."""
    return [b.name for b in newest_first(files)[keep:]]


def prune(directory: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` backups in ``directory``; returns the names deleted. Idempotent."""
    doomed = to_prune(listing(directory), keep)
    for name in doomed:
        (directory / name).unlink(missing_ok=True)
    return doomed


def path_of(directory: Path, name: str) -> Path:
    """The file of backup ``name``; NotFound for a name that is not a backup's or a file that does not exist."""
    if not NAME.fullmatch(name):
        raise errors.NotFound(f"no such backup; {NAME_HINT}")
    path = directory / name
    if path.is_symlink() or not path.is_file():
        raise errors.NotFound(f"backup {name} does not exist on this node; `minicloud admin backup list` shows them")
    return path


def delete(directory: Path, name: str) -> None:
    """Delete backup ``name``; NotFound if there is none (also when it was pruned meanwhile)."""
    try:
        path_of(directory, name).unlink()
    except FileNotFoundError:
        raise errors.NotFound(
            f"backup {name} does not exist on this node; `minicloud admin backup list` shows them"
        ) from None


class BackupGate:
    """Admission of backups on this node: one at a time, and ``min_interval`` seconds between starts.

    ``admit`` and ``release`` run on the event loop without awaiting in between, so two requests cannot both pass."""

    def __init__(self) -> None:
        self.running: str | None = None
        self.last_start: float | None = None

    def admit(self, op_id: str, now: float, min_interval: float) -> float | None:
        """Reserve the node for backup ``op_id`` at ``now`` (monotonic seconds). Returns the previous start, for
        :meth:`release` to restore if the backup is not started after all. Raises Conflict or TooManyRequests."""
        if self.running is not None:
            raise errors.Conflict(
                f"a backup is already running on this node (operation {self.running}); wait for it with "
                f"`minicloud operation wait {self.running}`, then try again"
            )
        if self.last_start is not None and now - self.last_start < min_interval:
            wait = min_interval - (now - self.last_start)
            raise too_many_requests(
                wait,
                f"a backup was started on this node less than {min_interval:g} s ago (retention.backup_min_interval); "
                f"retry in {max(1, round(wait))} s",
            )
        previous, self.running, self.last_start = self.last_start, op_id, now
        return previous

    def release(self, op_id: str, *, restore: float | None = None, started: bool = True) -> None:
        """Backup ``op_id`` ended (``started``) or never started (then its start time is forgotten: ``restore``)."""
        if self.running == op_id:
            self.running = None
            if not started:
                self.last_start = restore


@dataclass(frozen=True)
class BucketPlace:
    """Where a state backup goes besides the node: ``bucket`` of the caller's project in this cluster's S3, or of
    backup target ``target`` (its id; another S3 endpoint, reached under the URL allow-list)."""

    project: str
    bucket: str
    target: str = ""


async def bucket_place(ctx: Any, store: Any, bucket: str, target: str | None) -> BucketPlace:
    """Check the caller's ``bucket`` (a ready bucket of the project) or ``target`` (a backup target of the project)
    before any work starts: 404/409 with what to do."""
    from minicloud.core import crud
    from minicloud.objects.buckets import bucket_name_problem
    from minicloud.objects.kinds import BUCKET
    from minicloud.storage.backup_kinds import BACKUP_TARGET

    if problem := bucket_name_problem(bucket):
        raise errors.ValidationFailed(problem, invalid_params=[{"name": "bucket", "reason": problem}])
    if target:
        t = await crud.get(ctx, store, BACKUP_TARGET, target)
        return BucketPlace(project=ctx.project, bucket=bucket, target=t.id)
    found = await crud.find(ctx, store, BUCKET, bucket)
    if found is None:
        raise errors.NotFound(
            f"no bucket '{bucket}' in project '{ctx.project}'; create it with `minicloud bucket create {bucket}`"
        )
    if found.spec.deleted or found.status.state != "ready":
        state = "being deleted" if found.spec.deleted else found.status.state
        raise errors.Conflict(f"bucket '{bucket}' is {state}; back up into a ready bucket")
    return BucketPlace(project=ctx.project, bucket=bucket)


def _s3(store: Any, keystore: Any, config: Any, place: BucketPlace) -> Any:
    """An async context manager: the place's bucket as an :class:`agent.storage.backup.S3Bucket`."""
    from agent.storage.backup import S3Bucket
    from minicloud.compute.url_policy import UrlPolicy
    from minicloud.storage import backups as bk

    class _Open:
        async def __aenter__(self) -> Any:
            ep = await bk.resolve_endpoint(
                store, keystore, project=place.project, target=place.target, node=config.node_name,
                port=config.objects.port, ca_file=config.data_path / "pki" / "ca.crt",
            )  # fmt: skip
            policy = UrlPolicy.from_config(config.compute.image_url_allow) if ep.external else None
            self.s3 = S3Bucket(ep, place.bucket, policy=policy)
            return self.s3

        async def __aexit__(self, *exc: object) -> None:
            await self.s3.close()

    return _Open()


async def to_bucket(store: Any, keystore: Any, config: Any, place: BucketPlace, path: Path) -> str:
    """Upload backup file ``path`` into the place's bucket (parts with their sha256, then the manifest); the key."""
    import aiohttp

    from minicloud.objects.rgwclient import S3Error
    from minicloud.storage import backups as bk
    from minicloud.storage.backup_schedules import upload_state_file

    try:
        async with _s3(store, keystore, config, place) as s3:
            await upload_state_file(s3, path, path.name)
    except (S3Error, aiohttp.ClientError, OSError, TimeoutError) as exc:
        where = f"bucket '{place.bucket}'" + (f" of backup target {place.target}" if place.target else "")
        raise errors.Unavailable(
            f"the backup {path.name} was made and is kept on this node, but uploading it to {where} failed: "
            f"{exc or type(exc).__name__}"
        ) from None
    return bk.state_key(path.name)


async def bucket_listing(store: Any, keystore: Any, config: Any, place: BucketPlace) -> list[BackupFile]:
    """The state backups in the place's bucket, newest first (sizes and times from their manifests)."""
    from minicloud.storage import backups as bk
    from minicloud.storage.backup_schedules import list_state

    out = []
    async with _s3(store, keystore, config, place) as s3:
        for name in await list_state(s3):
            _, _, data = await s3.request("GET", f"{bk.state_key(name)}.manifest.json")
            m = bk.decode_manifest(data)
            out.append(BackupFile(name, m.stored_bytes, m.finished_at or m.created_at))
    return newest_first(out)
