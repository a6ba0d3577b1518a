"""Backups of the whole state: node-local files in ``<data_dir>/backups``, their retention and admission.

A backup is made by an operation (``POST /v1/admin/backups``) on the node that received the request and stays on
that node (``GET /v1/admin/backups`` lists the files of the node it is sent to). Bounded two ways:

- **retention count**: after each backup the node keeps its newest ``retention.backups_keep`` files
  (:func:`to_prune` decides, :func:`prune` deletes);
- **admission** (:class:`BackupGate`): one backup at a time per node (409 naming the running operation) and at least
  ``retention.backup_min_interval`` seconds between two starts (429 with ``Retry-After``).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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
