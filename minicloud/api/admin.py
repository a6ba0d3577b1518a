"""``/v1/admin``: whole-state backups (a long-running operation), their list, download and deletion.

Backups are files on the node that made them (``minicloud.backups``): these routes answer for the node they are
sent to. Each node keeps its newest ``retention.backups_keep`` and admits one backup at a time, at most one per
``retention.backup_min_interval`` seconds. With ``?bucket=B[&target=T]`` a backup is also uploaded into bucket B
of the caller's project (or of backup target T), and the list shows that bucket's state backups."""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import time
from pathlib import Path

import msgspec
from aiohttp import web

from minicloud import backups, errors
from minicloud.api import resources as res
from minicloud.api.accesskeys import KEYSTORE
from minicloud.api.keys import BACKUP_GATE, CONFIG, OPERATIONS, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model import Operation, Page
from minicloud.model.backups import Backup
from minicloud.operations import Reporter

routes = Routes("admin")


class BucketQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: A bucket of the caller's project (or of ``target``) the backup also goes to / whose backups are listed.
    bucket: str = ""
    #: A backup target (name or id): another S3 endpoint holding ``bucket``.
    target: str = ""


async def _place(request: web.Request, query: BucketQuery) -> backups.BucketPlace | None:
    if not query.bucket:
        if query.target:
            raise errors.ValidationFailed(
                "a target needs a bucket: give ?bucket=B too",
                invalid_params=[{"name": "bucket", "reason": "missing"}],
            )
        return None
    return await backups.bucket_place(
        await res.context_of(request), request.app[STORE], query.bucket, query.target or None
    )


def backups_dir(request: web.Request) -> Path:
    return request.app[CONFIG].data_path / "backups"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@routes.post(
    "/v1/admin/backups", query=BucketQuery, response=Operation, status=202, auth=Action("admin:backups:create")
)
async def create_backup(request: web.Request, query: BucketQuery) -> Reply:
    """Write a consistent backup of the whole state on this node; returns an operation whose result names the file
    (and, with ``bucket``, the object it was uploaded to). 409 while another backup runs on this node, 429 within
    ``retention.backup_min_interval`` of the last one; 404/409 for a bucket that is not a ready bucket of the
    project."""
    place = await _place(request, query)
    store = request.app[STORE]
    operations = request.app[OPERATIONS]
    config = request.app[CONFIG]
    gate = request.app[BACKUP_GATE]
    directory = backups_dir(request)
    name = backups.new_name(_dt.datetime.now(_dt.UTC))
    keep = config.retention.backups_keep

    async def work(report: Reporter) -> dict[str, object]:
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = directory / name
            revision = store.revision
            steps = 4 if place is not None else 3
            await report(0, steps, "copying the state database")
            await store.backup(target)
            await report(1, steps, "checksumming")
            digest = await asyncio.to_thread(_sha256, target)
            extra: dict[str, object] = {}
            if place is not None:
                await report(2, steps, f"uploading to bucket {place.bucket}")
                key = await backups.to_bucket(store, request.app[KEYSTORE], config, place, target)
                extra = {"bucket": place.bucket, "object": key, "target": place.target}
            await report(steps - 1, steps, f"keeping the newest {keep} backups")
            size = target.stat().st_size
            pruned = await asyncio.to_thread(backups.prune, directory, keep)
            await report(steps, steps, "done")
            return {"name": name, "size_bytes": size, "sha256": digest, "revision": revision, "pruned": pruned, **extra}
        finally:
            gate.release(op_id)

    if (replay := await res.replayed(request)) is not None:
        return replay  # a retry with the same Idempotency-Key: the first answer, never a 409/429 about itself
    op_id = operations.new_id()
    previous = gate.admit(op_id, time.monotonic(), config.retention.backup_min_interval)
    try:
        written = await operations.start(
            await res.context_of(request),
            "admin.backup",
            {"kind": "backup", "name": name},
            lambda record: work,
            op_id=op_id,
        )
    except BaseException:
        gate.release(op_id, restore=previous, started=False)
        raise
    if written.replayed:
        gate.release(op_id, restore=previous, started=False)
    return res.reply(request, written)


@routes.get("/v1/admin/backups", query=BucketQuery, response=Page[Backup], auth=Action("admin:backups:list"))
async def list_backups(request: web.Request, query: BucketQuery) -> Page[Backup]:
    """The backup files on this node, newest first (at most ``retention.backups_keep``); with ``bucket``, the state
    backups in that bucket instead."""
    node = request.app[CONFIG].node_name
    if (place := await _place(request, query)) is not None:
        app = request.app
        files = await backups.bucket_listing(app[STORE], app[KEYSTORE], app[CONFIG], place)
        return Page(items=[Backup(name=f.name, size_bytes=f.size_bytes, created_at=f.created_at, node="",
                                  bucket=place.bucket) for f in files])  # fmt: skip
    files = await asyncio.to_thread(backups.listing, backups_dir(request))
    return Page(items=[Backup(name=f.name, size_bytes=f.size_bytes, created_at=f.created_at, node=node) for f in files])


@routes.get("/v1/admin/backups/{name}", auth=Action("admin:backups:get"))
async def download_backup(request: web.Request) -> web.StreamResponse:
    """Download a backup file made by POST /v1/admin/backups."""
    path = backups.path_of(backups_dir(request), request.match_info["name"])
    return web.FileResponse(path, headers={"Content-Type": "application/vnd.sqlite3"})


@routes.delete("/v1/admin/backups/{name}", status=204, auth=Action("admin:backups:delete"))
async def delete_backup(request: web.Request) -> Reply:
    """Delete a backup file on this node."""
    await asyncio.to_thread(backups.delete, backups_dir(request), request.match_info["name"])
    return Reply(None, 204)
