"""``/v1/admin``: whole-state backups (a long-running operation) and their download."""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import os
import re
from pathlib import Path

import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.keys import CONFIG, OPERATIONS, STORE
from minicloud.api.operations import view as operation_view
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model import Operation
from minicloud.operations import Reporter

routes = Routes("admin")
_BACKUP_NAME = re.compile(r"^backup-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}\.db$")


def backups_dir(request: web.Request) -> Path:
    return request.app[CONFIG].data_path / "backups"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@routes.post("/v1/admin/backups", response=Operation, status=202, auth=Action("admin:backups:create"))
async def create_backup(request: web.Request) -> Reply:
    """Write a consistent backup of the whole state; returns an operation whose result names the file."""
    store = request.app[STORE]
    operations = request.app[OPERATIONS]
    directory = backups_dir(request)
    name = f"backup-{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%S}-{os.urandom(4).hex()}.db"

    async def work(report: Reporter) -> dict[str, object]:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = directory / name
        revision = store.revision
        await report(0, 2, "copying the state database")
        await store.backup(target)
        await report(1, 2, "checksumming")
        digest = await asyncio.to_thread(_sha256, target)
        await report(2, 2, "done")
        return {"name": name, "size_bytes": target.stat().st_size, "sha256": digest, "revision": revision}

    record = operations.new_record("admin.backup", {"kind": "backup", "name": name}, res.project_of(request))
    reply = await res.write(
        request,
        [res.Create(record)],
        status=202,
        kind_name="operation",
        respond=lambda rev: operation_view(msgspec.structs.replace(record, revision=rev)),
        headers=lambda rev: {"Location": f"/v1/operations/{record.id}"},
    )
    if not reply.headers.get("Idempotent-Replayed"):
        operations.run(record, work)
    return reply


@routes.get("/v1/admin/backups/{name}", auth=Action("admin:backups:get"))
async def download_backup(request: web.Request) -> web.StreamResponse:
    """Download a backup file made by POST /v1/admin/backups."""
    name = request.match_info["name"]
    if not _BACKUP_NAME.match(name):
        raise errors.NotFound("no such backup; backup names look like backup-20260101T000000-0123abcd.db")
    path = backups_dir(request) / name
    if not path.is_file():
        raise errors.NotFound(f"backup {name} does not exist on this node")
    return web.FileResponse(path, headers={"Content-Type": "application/vnd.sqlite3"})
