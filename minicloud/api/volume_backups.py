"""``/v1/volume-backups``, ``/v1/backup-targets``, ``/v1/backup-schedules``: create, delete and restore call
:mod:`minicloud.storage.backups`; list, show and update are generic (and delete, for targets and schedules)."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.accesskeys import KEYSTORE
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.storage import Volume
from minicloud.storage import backups
from minicloud.storage.backup_kinds import (
    BACKUP_SCHEDULE,
    BACKUP_TARGET,
    VOLUME_BACKUP,
    BackupSchedule,
    BackupScheduleCreate,
    BackupTarget,
    BackupTargetCreate,
    VolumeBackup,
    VolumeBackupCreate,
    VolumeBackupRestore,
)
from minicloud.storage.quotas import Quotas

routes = Routes("volume-backups")


@routes.post(
    "/v1/volume-backups", body=VolumeBackupCreate, response=VolumeBackup, status=201,
    auth=Action("storage:backups:create"),
)  # fmt: skip
async def create_backup(request: web.Request, body: VolumeBackupCreate) -> Reply:
    """Back up a volume into a bucket (full, or ``incremental`` on the last backup there); its node makes it: poll
    ``status.state`` until ``available``."""
    written = await backups.create_backup(await res.context_of(request), request.app[STORE], body)
    return res.reply(request, written)


generic.add_crud_routes(routes, VOLUME_BACKUP)


@routes.delete("/v1/volume-backups/{ref}", response=VolumeBackup, status=202, auth=Action("storage:backups:delete"))
async def delete_backup(request: web.Request) -> Reply:
    """Delete a backup (409 while later backups of its chain exist). 202: its node removes the objects, then the
    record."""
    written = await backups.delete_backup(
        await res.context_of(request), request.app[STORE], request.match_info["ref"],
        node=request.app[CONFIG].node_name, expect=res.if_match(request),
    )  # fmt: skip
    return res.reply(request, written)


@routes.post(
    "/v1/volume-backups/{ref}/restore", body=VolumeBackupRestore, response=Volume, status=201,
    auth=Action("storage:backups:restore"),
)  # fmt: skip
async def restore_backup(request: web.Request, body: VolumeBackupRestore) -> Reply:
    """Restore a backup into a new volume (``creating`` until the chain is applied, then ``available``)."""
    app = request.app
    written = await backups.restore_backup(
        await res.context_of(request), app[STORE], request.match_info["ref"], body, node=app[CONFIG].node_name,
        quotas=Quotas.from_config(app[CONFIG]),
    )  # fmt: skip
    return res.reply(request, written)


@routes.post(
    "/v1/backup-targets", body=BackupTargetCreate, response=BackupTarget, status=201,
    auth=Action("storage:backuptargets:create"),
)  # fmt: skip
async def create_target(request: web.Request, body: BackupTargetCreate) -> Reply:
    """Record another S3 endpoint for backups (the secret is sealed and never shown again). 403 when the endpoint's
    address is one nodes may not reach (``compute.image_url_allow``)."""
    from minicloud.compute.url_policy import UrlPolicy

    app = request.app
    policy = UrlPolicy.from_config(app[CONFIG].compute.image_url_allow)
    written = await backups.create_target(await res.context_of(request), app[STORE], app[KEYSTORE], body, policy=policy)
    return res.reply(request, written)


generic.add_crud_routes(routes, BACKUP_TARGET)


@routes.delete(
    "/v1/backup-targets/{ref}", response=BackupTarget, status=204, auth=Action("storage:backuptargets:delete")
)
async def delete_target(request: web.Request) -> Reply:
    """Delete a backup target: 409 while backups or schedules use it (naming them)."""
    written = await backups.delete_target(
        await res.context_of(request), request.app[STORE], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)


@routes.post(
    "/v1/backup-schedules", body=BackupScheduleCreate, response=BackupSchedule, status=201,
    auth=Action("storage:backupschedules:create"),
)  # fmt: skip
async def create_schedule(request: web.Request, body: BackupScheduleCreate) -> Reply:
    """Back up a volume (or, ``state``, the cluster state: admins) every ``every_seconds``, keeping ``keep``."""
    written = await backups.create_schedule(
        await res.context_of(request), request.app[STORE], body, directory=request.app[DIRECTORY]
    )
    return res.reply(request, written)


generic.add_crud_routes(routes, BACKUP_SCHEDULE)
