"""The store as the rest of the node sees it: one object whose backend can change from SQLite alone to etcd.

Both backends share the same SQLite file (the replica *is* the single node's store), so caches, commit hooks and
event subscriptions registered on it keep working across ``minicloud cluster enable`` and ``minicloud join``. Only
the write path moves. :meth:`switch` quiesces writes while it runs: new commits wait, in-flight ones finish, the
switch function runs (e.g. copies the state into etcd), then writes resume on the new backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from minicloud.state.records import Change, Record, Txn
from minicloud.state.sqlite import CommitHook, SQLiteStore, Subscription
from minicloud.state.stats import COMMIT_BUCKETS, Distribution


class StoreHandle:
    def __init__(self, local: SQLiteStore, backend: Any = None) -> None:
        self.local = local
        self.backend: Any = backend or local
        self._gate = asyncio.Event()
        self._gate.set()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: Seconds each commit took, as callers see it (group commit on one node, etcd and the replica in a cluster).
        self.commit_seconds = Distribution(COMMIT_BUCKETS)

    @property
    def clustered(self) -> bool:
        return self.backend is not self.local

    async def open(self) -> None:
        await self.backend.open()

    async def close(self) -> None:
        await self.backend.close()
        if self.local.is_open:
            await self.local.close()

    async def switch(self, change: Callable[[], Awaitable[Any]]) -> None:
        """Run ``change()`` with writes paused; it returns the new backend (already open)."""
        self._gate.clear()
        try:
            await self._idle.wait()
            self.backend = await change()
        finally:
            self._gate.set()

    async def commit(self, txn: Txn) -> tuple[int, list[Change]]:
        await self._gate.wait()
        self._inflight += 1
        self._idle.clear()
        started = time.perf_counter()
        try:
            return await self.backend.commit(txn)
        finally:
            self.commit_seconds.observe(time.perf_counter() - started)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    @property
    def revision(self) -> int:
        return self.backend.revision

    @property
    def writable(self) -> bool:
        return bool(self.backend.writable)

    @property
    def alive(self) -> bool:
        """The write machinery runs (the SQLite writer, and in a cluster the replication loop): what readiness and
        the systemd watchdog report. Unlike ``writable`` it stays true on a node that merely lacks a quorum."""
        return bool(self.backend.alive)

    @property
    def stale(self) -> bool:
        return bool(getattr(self.backend, "stale", False))

    async def get(self, kind: str, id_: str) -> Record | None:
        return await self.local.get(kind, id_)

    async def get_by_name(self, kind: str, project: str, name: str) -> Record | None:
        return await self.local.get_by_name(kind, project, name)

    async def list(self, kind: str, **kw: Any) -> list[Record]:
        return await self.local.list(kind, **kw)

    async def count(self, kind: str) -> int:
        return await self.local.count(kind)

    async def changes(self, since: int, *, until: int | None = None, limit: int = 1000) -> list[Change]:
        return await self.local.changes(since, until=until, limit=limit)

    def subscribe(self, *, max_pending: int = 10_000) -> Subscription:
        return self.local.subscribe(max_pending=max_pending)

    def add_commit_hook(self, hook: CommitHook) -> None:
        self.local.add_commit_hook(hook)

    async def compact(self, *, hold: int | None = None) -> int:
        return await self.local.compact(hold=hold)

    async def backup(self, dest: Path) -> None:
        await self.local.backup(dest)
