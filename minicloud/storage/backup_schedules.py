"""Backup schedules: a services-leader loop (:mod:`minicloud.cluster.leader`) that makes the backups schedules ask
for when they are due and prunes beyond their ``keep``.

Per cycle (every :attr:`BackupScheduler.interval` seconds), for each schedule not paused:

- a **volume** schedule that is due (:func:`~minicloud.storage.backups.due`) and has no backup being made gets a new
  backup through the same service as ``volume backup create`` (as the system, in the schedule's project):
  incremental on the last one, full when there is none or the chain has ``full_every`` backups
  (:func:`~minicloud.storage.backups.next_is_full`); its ``last_run`` is recorded even when the create is refused (the
  reason goes into the schedule's status), so a refusal is retried at the next interval, not every cycle;
- its backups beyond ``keep`` are marked deleted (:func:`~minicloud.storage.backups.to_prune`: never one a kept
  backup's chain needs — a chain goes whole once nothing kept builds on it; ``full_every`` bounds how long that is);
- a **state** schedule (``state = true``) that is due writes the state database (SQLite online backup) on the leader
  to a temporary file, uploads it to ``minicloud-backups/state/<backup-….db>`` of its bucket with its manifest, and
  deletes the oldest state objects beyond ``keep``.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from minicloud import backups as state_backups
from minicloud import errors, ids
from minicloud.cluster.leader import LeaderLoop, Outcome
from minicloud.core.context import Context
from minicloud.state import Store, Txn, TxnFailed, Update, list_all
from minicloud.storage import backups as bk
from minicloud.storage.backup_kinds import BACKUP_SCHEDULE, VOLUME_BACKUP, VolumeBackupCreate

log = logging.getLogger("minicloud.storage.backups")
#: The most backups one cycle creates and prunes (a backlog drains over the next cycles).
BATCH = 50


@dataclass(frozen=True)
class ScheduleFacts:
    id: str
    project: str
    name: str
    revision: int
    spec: Any
    last_run: str | None
    backups: tuple[bk.BackupFacts, ...] = ()


@dataclass
class SchedulePlan:
    create: list[tuple[ScheduleFacts, bool]] = field(default_factory=list)  # (schedule, incremental)
    state: list[ScheduleFacts] = field(default_factory=list)
    prune: list[tuple[str, str]] = field(default_factory=list)  # (project, backup id)

    def __bool__(self) -> bool:
        return bool(self.create or self.state or self.prune)


def plan_schedules(schedules: list[ScheduleFacts], now: _dt.datetime) -> SchedulePlan:
    """Pure: what is due now and what to prune (see the module docstring)."""
    plan = SchedulePlan()
    for s in schedules:
        if s.spec.paused:
            continue
        if s.spec.state:
            if bk.due(s.last_run, s.spec.every_seconds, now):
                plan.state.append(s)
            continue
        busy = any(b.state in ("creating", "uploading") and not b.deleted for b in s.backups)
        if not busy and bk.due(s.last_run, s.spec.every_seconds, now):
            plan.create.append((s, not bk.next_is_full(s.backups, s.spec.full_every, s.spec.keep)))
        plan.prune += [(s.project, b) for b in bk.to_prune(s.backups, s.spec.keep)]
    plan.create, plan.prune = plan.create[:BATCH], plan.prune[:BATCH]
    return plan


class BackupScheduler(LeaderLoop[list[ScheduleFacts], SchedulePlan]):
    """See the module docstring. ``keystore`` unseals the project's S3 key for state uploads."""

    name = "backup-schedules"
    interval = 30.0

    def __init__(self, store: Store, config: Any, keystore: Any) -> None:
        self.store = store
        self.config = config
        self.keystore = keystore

    async def snapshot(self) -> list[ScheduleFacts]:
        schedules = [BACKUP_SCHEDULE.load(r) for r in await list_all(self.store, BACKUP_SCHEDULE.name)]
        if not schedules:
            return []
        by_schedule: dict[str, list[bk.BackupFacts]] = {}
        for r in await list_all(self.store, VOLUME_BACKUP.name):
            if sched := r.spec.get("schedule"):
                by_schedule.setdefault(sched, []).append(bk.BackupFacts.of(VOLUME_BACKUP.load(r)))
        return [
            ScheduleFacts(
                id=s.id,
                project=s.project,
                name=s.name,
                revision=s.revision,
                spec=s.spec,
                last_run=s.status.last_run,
                backups=tuple(by_schedule.get(s.id, ())),
            )
            for s in schedules
        ]

    def decide(self, snapshot: list[ScheduleFacts], now: _dt.datetime) -> SchedulePlan:
        return plan_schedules(snapshot, now)

    def describe(self, plan: SchedulePlan) -> str:
        return f"{len(plan.create)} volume backups, {len(plan.state)} state backups, {len(plan.prune)} to prune"

    async def act(self, plan: SchedulePlan) -> Outcome:
        made = pruned = 0
        for s, incremental in plan.create:
            ctx = Context.system("backup-schedule", project=s.project, action="storage:backups:create")
            reason, last = "", ""
            try:
                written = await bk.create_backup(
                    ctx, self.store,
                    VolumeBackupCreate(volume=s.spec.volume, bucket=s.spec.bucket, target=s.spec.target or None,
                                       incremental=incremental),
                    schedule=s.id,
                )  # fmt: skip
                last = written.body.id
                made += 1
            except errors.MinicloudError as exc:
                reason = str(exc)
                if await self._bucket_coming(s):  # a bucket just made (the default one): try again next look
                    await self._ran(s.id, last, reason, again=True)
                    continue
            await self._ran(s.id, last, reason)
        for project, backup_id in plan.prune:
            ctx = Context.system("backup-schedule", project=project, action="storage:backups:delete")
            try:
                await bk.delete_backup(ctx, self.store, backup_id, node=self.config.node_name)
                pruned += 1
            except errors.MinicloudError as exc:
                log.info(
                    "a backup beyond a schedule's keep stays for now", extra={"backup": backup_id, "error": str(exc)}
                )
        for s in plan.state:
            reason, last = "", ""
            try:
                last = await self._state_backup(s)
            except (errors.MinicloudError, OSError, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # an S3 refusal, an unreachable endpoint
                reason = f"{type(exc).__name__}: {exc}"
            await self._ran(s.id, last, reason)
        return Outcome(f"made {made} backups, {len(plan.state)} state backups, pruned {pruned}")

    async def _bucket_coming(self, s: ScheduleFacts) -> bool:
        """Whether the schedule's bucket of this cluster is still being made (``creating``)."""
        from minicloud.objects.kinds import BUCKET

        if s.spec.target:
            return False
        record = await self.store.get_by_name(BUCKET.name, s.project, s.spec.bucket)
        return (
            record is not None and not record.spec.get("deleted") and (record.status or {}).get("state") == "creating"
        )

    async def _ran(self, schedule_id: str, last: str, reason: str, *, again: bool = False) -> None:
        """Record a run (``again``: the reason only, so that the schedule is due again at the next look)."""
        for _ in range(5):
            record = await self.store.get(BACKUP_SCHEDULE.name, schedule_id)
            if record is None:
                return
            obj = BACKUP_SCHEDULE.load(record)
            when = obj.status.last_run if again else ids.now()
            status = msgspec.structs.replace(obj.status, last_run=when, last_backup=last or obj.status.last_backup,
                                             reason=reason)  # fmt: skip
            try:
                await self.store.commit(Txn([Update(BACKUP_SCHEDULE.dump(obj.replace(status=status)),
                                                    expect_revision=record.revision)]))  # fmt: skip
                return
            except TxnFailed:
                continue

    async def _state_backup(self, s: ScheduleFacts) -> str:
        """The state database into the schedule's bucket, then the oldest state objects beyond ``keep`` go."""
        name = state_backups.new_name(_dt.datetime.now(_dt.UTC))
        async with self._bucket(s) as s3:
            with tempfile.TemporaryDirectory(dir=self.config.data_path) as tmp:
                path = Path(tmp) / name
                await self.store.backup(path)
                await upload_state_file(s3, path, name)
            await prune_state(s3, s.spec.keep)
        return name

    def _bucket(self, s: ScheduleFacts) -> Any:
        parent = self

        class _Ctx:
            async def __aenter__(self) -> Any:
                from agent.storage.backup import S3Bucket
                from minicloud.compute.url_policy import UrlPolicy

                ep = await bk.resolve_endpoint(
                    parent.store, parent.keystore, project=s.project, target=s.spec.target,
                    node=parent.config.node_name, port=parent.config.objects.port,
                    ca_file=parent.config.data_path / "pki" / "ca.crt",
                )  # fmt: skip
                policy = UrlPolicy.from_config(parent.config.compute.image_url_allow) if ep.external else None
                self.s3 = S3Bucket(ep, s.spec.bucket, policy=policy)
                return self.s3

            async def __aexit__(self, *exc: object) -> None:
                await self.s3.close()

        return _Ctx()


async def upload_state_file(s3: Any, path: Path, name: str) -> bk.Manifest:
    """Upload state backup file ``path`` as ``minicloud-backups/state/<name>`` (parts, sha256 each), then its
    manifest (``….manifest.json``)."""
    from agent.storage.backup import upload_parts

    key = bk.state_key(name)
    upload_id = await s3.start_multipart(key)
    with path.open("rb") as f:

        async def read(n: int) -> bytes:
            return await asyncio.to_thread(f.read, n)

        async def progress(done: int, _: str) -> None:
            return None

        parts = await upload_parts(s3, key, upload_id, read, path.with_suffix(".part"), part_bytes=bk.PART_BYTES,
                                   progress=progress)  # fmt: skip
    m = bk.Manifest(kind="state", format="sqlite", backup=name, name=name, chain=[name], object=key, parts=parts,
                    stored_bytes=sum(p.size for p in parts), created_at=ids.now(), finished_at=ids.now())  # fmt: skip
    await s3.request("PUT", f"{key}.manifest.json", body=bk.encode_manifest(m))
    return m


async def list_state(s3: Any) -> list[str]:
    """The state backups in the bucket (their file names), oldest first."""
    import xml.etree.ElementTree as ET

    names: list[str] = []
    token = ""
    while True:
        params = [("list-type", "2"), ("prefix", f"{bk.PREFIX}/state/")] + (
            [("continuation-token", token)] if token else []
        )
        _, _, data = await s3.request("GET", "", params)
        root = ET.fromstring(data)
        for el in root.iter():
            if el.tag.endswith("Key") and el.text and state_backups.NAME.fullmatch(el.text.rsplit("/", 1)[-1]):
                names.append(el.text.rsplit("/", 1)[-1])
        token = next((el.text or "" for el in root.iter() if el.tag.endswith("NextContinuationToken")), "")
        if not token:
            break
    return sorted(names, key=lambda n: n[len("backup-") : len("backup-") + 15])


async def prune_state(s3: Any, keep: int) -> list[str]:
    names = await list_state(s3)
    doomed = names[: max(0, len(names) - keep)]
    for name in doomed:
        await s3.delete(f"{bk.state_key(name)}.manifest.json")
        await s3.delete(bk.state_key(name))
    return doomed


async def download_state(s3: Any, name: str, dest: Path) -> None:
    """A state backup from the bucket into ``dest`` (each part's sha256 checked)."""
    from agent.storage.backup import stream_parts

    _, _, data = await s3.request("GET", f"{bk.state_key(name)}.manifest.json")
    m = bk.decode_manifest(data)
    with dest.open("wb") as f:

        async def write(chunk: bytes) -> None:
            await asyncio.to_thread(f.write, chunk)

        await stream_parts(s3, m.object, m.parts, write)


__all__ = ["BackupScheduler", "download_state", "list_state", "plan_schedules", "prune_state", "upload_state_file"]
