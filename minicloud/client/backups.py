"""SDK for volume backups: ``client.volume_backups``, ``client.backup_targets``, ``client.backup_schedules``. List,
get, update (and delete for targets and schedules) come from each kind's declaration; creates and verbs are here."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from minicloud.client.collection import Collection, quote
from minicloud.model.storage import Volume
from minicloud.storage.backup_kinds import (
    BACKUP_SCHEDULE,
    BACKUP_TARGET,
    VOLUME_BACKUP,
    BackupSchedule,
    BackupTarget,
    VolumeBackup,
)

if TYPE_CHECKING:
    from minicloud.client import Client


def _body(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class VolumeBackups(Collection[VolumeBackup]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, VOLUME_BACKUP)

    def create(self, *, volume: str, bucket: str, incremental: bool = False, **fields: Any) -> VolumeBackup:
        """``name=``, ``target=`` (a backup target), ``description=``, ``labels=``."""
        return self._create(_body(volume=volume, bucket=bucket, incremental=incremental, **fields))

    def delete(self, ref: str, *, if_match: int | None = None) -> VolumeBackup | None:  # type: ignore[override]
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        return self._c.call("DELETE", f"{self.path}/{quote(ref)}", VolumeBackup, headers=headers)

    def restore(self, ref: str, *, name: str, **fields: Any) -> Volume:
        """Into a new volume ``name`` (``pool=``, ``size_gib=``, ``description=``, ``labels=``)."""
        return self._c.call("POST", f"{self.path}/{quote(ref)}/restore", Volume, json=_body(name=name, **fields))

    def wait(self, ref: str, *, timeout: float = 3600, interval: float = 0.5) -> VolumeBackup:
        """The backup once it is ``available`` or ``error``; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            b = self.get(ref)
            if b.status.state in ("available", "error"):
                return b
            if time.monotonic() >= deadline:
                raise TimeoutError(f"backup {ref} is still {b.status.state} after {timeout:g} s")
            time.sleep(interval)


class BackupTargets(Collection[BackupTarget]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, BACKUP_TARGET)

    def create(self, *, name: str, endpoint: str, access_key: str, secret_key: str, **fields: Any) -> BackupTarget:
        """``region=``, ``ca_bundle=`` (PEM text), ``description=``, ``labels=``."""
        body = _body(name=name, endpoint=endpoint, access_key=access_key, secret_key=secret_key, **fields)
        return self._create(body)


class BackupSchedules(Collection[BackupSchedule]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, BACKUP_SCHEDULE)

    def create(self, *, every_seconds: int, keep: int, bucket: str | None = None, **fields: Any) -> BackupSchedule:
        """``volume=`` or ``state=True``; ``bucket=`` (default: the project's bucket ``backups``, made on first
        use), ``name=``, ``target=``, ``full_every=``, ``description=``, ``labels=``."""
        return self._create(_body(bucket=bucket, every_seconds=every_seconds, keep=keep, **fields))
