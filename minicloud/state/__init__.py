"""The resource store: records, their revisions and the one narrow write path.

``Store`` is the interface every caller uses. Today it has one backend, :class:`SQLiteStore`, which is the source of
truth on a single node; the cluster backend (etcd as the write path, SQLite as every node's replica) implements the same
interface, so callers never change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from minicloud.state.migrations import SPAN_KEYS
from minicloud.state.records import Change, Check, Create, Delete, Op, Record, Txn, TxnFailed, Update
from minicloud.state.sqlite import CommitHook, Compacted, SQLiteStore, Subscription

__all__ = [
    "Change",
    "Check",
    "Compacted",
    "Create",
    "Delete",
    "Op",
    "Record",
    "SQLiteStore",
    "Store",
    "Subscription",
    "Txn",
    "TxnFailed",
    "Update",
    "list_all",
    "list_span",
    "open_store",
]


class Store(Protocol):
    """What the control plane needs from the state store. Writes are atomic and durable when ``commit`` returns;
    reads are local and see every write whose ``commit`` has returned."""

    @property
    def revision(self) -> int: ...

    @property
    def writable(self) -> bool: ...

    @property
    def alive(self) -> bool:
        """False once the write machinery has died (not merely lost a quorum): the node must be restarted."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def commit(self, txn: Txn) -> tuple[int, list[Change]]: ...

    async def get(self, kind: str, id_: str) -> Record | None: ...

    async def get_by_name(self, kind: str, project: str, name: str) -> Record | None: ...

    async def list(
        self,
        kind: str,
        *,
        project: str | None = None,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        where: dict[str, str] | None = None,
        after: tuple[str, ...] | None = None,
        limit: int = 1000,
        span: tuple[str, str, str] | None = None,
    ) -> list[Record]: ...

    async def count(self, kind: str) -> int: ...

    async def changes(self, since: int, *, until: int | None = None, limit: int = 1000) -> list[Change]: ...

    def subscribe(self, *, max_pending: int = 10_000) -> Subscription: ...

    def add_commit_hook(self, hook: CommitHook) -> None: ...

    async def compact(self, *, hold: int | None = None) -> int:
        """Drop change-log entries older than the retention; ``hold``: a consumer's cursor to keep changes after
        (bounded, see :meth:`SQLiteStore.compact`)."""
        ...

    async def backup(self, dest: Path) -> None: ...


def open_store(data_dir: Path) -> Store:
    """The store for a node's data directory (not yet opened)."""
    return SQLiteStore(Path(data_dir) / "state.db")


async def list_all(store: Store, kind: str, *, page: int = 1000, **filters: Any) -> list[Record]:
    """Every record of ``kind`` that matches ``filters`` (``Store.list`` keywords, e.g. ``where={"node": n}`` for an
    indexed lookup), read a page at a time. Request paths must filter on an index: this costs what it returns."""
    out: list[Record] = []
    after = None
    while True:
        batch = await store.list(kind, after=after, limit=page, **filters)
        out += batch
        if len(batch) < page:
            return out
        after = (batch[-1].name, batch[-1].id)


async def list_span(
    store: Store, kind: str, key: str, low: str, high: str, *, page: int = 1000, **filters: Any
) -> list[Record]:
    """Every record of ``kind`` whose range-indexed ``key`` (:data:`~minicloud.state.migrations.SPAN_KEYS`) is in
    [low, high), in (key, name, id) order, read a page at a time. With ``project=`` in ``filters`` it reads only that
    range of the index (a day of a project's ledger, not the whole ledger)."""
    value = SPAN_KEYS[key].value
    out: list[Record] = []
    after = None
    while True:
        batch = await store.list(kind, after=after, limit=page, span=(key, low, high), **filters)
        out += batch
        if len(batch) < page:
            return out
        last = batch[-1]
        after = (value(last) or "", last.name, last.id)
