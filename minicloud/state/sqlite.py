"""The SQLite backend of the resource store: the source of truth on a single node, the local replica in a cluster.

Writes: callers hand a stamped :class:`Txn` to :meth:`SQLiteStore.commit`. One writer task drains the queue of pending
transactions and applies them in a single SQLite transaction (group commit: one fsync for the whole batch), each
transaction at its own revision, so that many concurrent writers share the cost of durability. ``commit`` returns only
after the batch is durable (``synchronous=FULL`` in WAL mode). A transaction whose condition fails is skipped without
affecting the others in its batch.

Reads go through a separate aiosqlite connection; WAL gives them a consistent snapshot per statement and they see a
write as soon as its ``commit`` has returned (read-your-writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from minicloud.state.cache import RecordCache
from minicloud.state.migrations import INDEXED_SPEC_FIELDS, SPAN_KEYS, migrate
from minicloud.state.records import (
    Change,
    Check,
    Create,
    Delete,
    Op,
    Record,
    Txn,
    TxnFailed,
    Update,
    check_append_only,
)
from minicloud.state.stats import BATCH_BUCKETS, Distribution

log = logging.getLogger(__name__)
#: A consumer's ``hold`` keeps at most this many times ``retain_changes`` revisions of the change log.
HOLD_FACTOR = 10

_enc = msgspec.json.Encoder()


def _json(value: Any) -> str:
    return _enc.encode(value).decode()


_dec_json = msgspec.json.Decoder()
_dec_record = msgspec.json.Decoder(Record)

_COLUMNS = "id, kind, project, name, labels, spec, status, revision, created_at, updated_at"
_MAX_BATCH = 512


#: Called after every commit with its changes, or with None after a reset (see ``SQLiteStore.add_commit_hook``).
CommitHook = Callable[[list[Change] | None], None]


class Compacted(Exception):
    """The change log no longer holds the requested revisions; the reader must re-list and resume from ``revision``."""

    def __init__(self, compacted: int) -> None:
        super().__init__(f"changes up to revision {compacted} were compacted")
        self.compacted = compacted


def _row_to_record(row: sqlite3.Row | tuple[Any, ...]) -> Record:
    return Record(
        id=row[0],
        kind=row[1],
        project=row[2],
        name=row[3],
        labels=_dec_json.decode(row[4]),
        spec=_dec_json.decode(row[5]),
        status=_dec_json.decode(row[6]),
        revision=row[7],
        created_at=row[8],
        updated_at=row[9],
    )


def _record_params(r: Record, revision: int) -> tuple[Any, ...]:
    return (
        r.id,
        r.kind,
        r.project,
        r.name,
        _json(r.labels),
        _json(r.spec),
        _json(r.status),
        revision,
        r.created_at,
        r.updated_at,
    )


#: The INSERT of one record (the parameters are :func:`record_params`): bulk loaders use it with ``executemany``.
INSERT_RECORD = f"INSERT INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"


def record_params(r: Record, revision: int) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT_RECORD` for ``r`` written at ``revision`` (the store's own encoding)."""
    return _record_params(r, revision)


def _integrity_reason(exc: sqlite3.IntegrityError) -> str:
    message = str(exc)
    if "UNIQUE" not in message:
        raise exc
    return "exists" if "records.id" in message else "name-taken"


async def _failure_reason(db: aiosqlite.Connection, kind: str, id_: str) -> str:
    async with db.execute("SELECT 1 FROM records WHERE id = ? AND kind = ?", (id_, kind)) as cur:
        return "revision-mismatch" if await cur.fetchone() else "not-found"


async def apply_txn(db: aiosqlite.Connection, txn: Txn, revision: int) -> list[Change]:
    """Apply ``txn`` at ``revision`` inside the caller's open SQLite transaction; return its changes.

    Deterministic: the outcome depends only on the current rows, ``txn`` and ``revision``. Atomic: on
    :class:`TxnFailed` nothing of ``txn`` remains (multi-op transactions run under a savepoint). The caller writes the
    returned changes to the change log and bumps the stored revision.
    """
    multi = len(txn.ops) > 1
    if multi:
        await db.execute("SAVEPOINT txn")
    changes: list[Change] = []
    try:
        index = 0
        while index < len(txn.ops):
            op = txn.ops[index]
            if isinstance(op, Check):
                await _check(db, index, op)
            elif isinstance(op, Create) and (run := _create_run(txn.ops, index)) >= BULK_CREATES:
                changes += await _create_many(db, index, txn.ops[index : index + run], revision)
                index += run
                continue
            else:
                changes.append(await _apply_op(db, index, op, revision))
            index += 1
    except BaseException:
        if multi:
            await db.execute("ROLLBACK TO txn")
            await db.execute("RELEASE txn")
        raise
    if multi:
        await db.execute("RELEASE txn")
    return changes


#: A run of at least this many consecutive creates in a transaction is inserted with one ``executemany`` (one
#: round trip to SQLite's thread instead of one per record: the close loop's usage records and ledger entries).
BULK_CREATES = 8


def _create_run(ops: Sequence[Op], start: int) -> int:
    end = start
    while end < len(ops) and isinstance(ops[end], Create):
        end += 1
    return end - start


async def _create_many(db: aiosqlite.Connection, start: int, ops: Sequence[Op], revision: int) -> list[Change]:
    """Insert a run of creates at once; if one of them is refused (its id or name is taken), undo the run and apply
    it op by op, so the :class:`TxnFailed` names the same op and reason as the one-at-a-time path would."""
    records = [op.record for op in ops if isinstance(op, Create)]
    await db.execute("SAVEPOINT creates")
    try:
        await db.executemany(INSERT_RECORD, [_record_params(r, revision) for r in records])
    except sqlite3.IntegrityError:
        await db.execute("ROLLBACK TO creates")
        await db.execute("RELEASE creates")
        return [await _apply_op(db, start + k, op, revision) for k, op in enumerate(ops)]  # type: ignore[arg-type]
    await db.execute("RELEASE creates")
    return [
        Change(revision=revision, type="created", kind=r.kind, id=r.id, project=r.project,
               record=msgspec.structs.replace(r, revision=revision))
        for r in records
    ]  # fmt: skip


async def _check(db: aiosqlite.Connection, index: int, op: Check) -> None:
    async with db.execute("SELECT revision FROM records WHERE id = ? AND kind = ?", (op.id, op.kind)) as cur:
        row = await cur.fetchone()
    if row is None:
        raise TxnFailed(index, "not-found", op)
    if row[0] != op.expect_revision:
        raise TxnFailed(index, "revision-mismatch", op)


async def _apply_op(db: aiosqlite.Connection, index: int, op: Create | Update | Delete, revision: int) -> Change:
    if isinstance(op, Create):
        r = op.record
        try:
            await db.execute(
                f"INSERT INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", _record_params(r, revision)
            )
        except sqlite3.IntegrityError as exc:
            raise TxnFailed(index, _integrity_reason(exc), op) from None
        written = msgspec.structs.replace(r, revision=revision)
        return Change(revision=revision, type="created", kind=r.kind, id=r.id, project=r.project, record=written)
    if isinstance(op, Update):
        r = op.record
        sql = (
            "UPDATE records SET project = ?, name = ?, labels = ?, spec = ?, status = ?, revision = ?, "
            "created_at = ?, updated_at = ? WHERE id = ? AND kind = ?"
        )
        params: tuple[Any, ...] = (
            r.project,
            r.name,
            _json(r.labels),
            _json(r.spec),
            _json(r.status),
            revision,
            r.created_at,
            r.updated_at,
            r.id,
            r.kind,
        )
        if op.expect_revision is not None:
            sql += " AND revision = ?"
            params += (op.expect_revision,)
        try:
            cur = await db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise TxnFailed(index, _integrity_reason(exc), op) from None
        if cur.rowcount != 1:
            raise TxnFailed(index, await _failure_reason(db, r.kind, r.id), op)
        written = msgspec.structs.replace(r, revision=revision)
        return Change(revision=revision, type="updated", kind=r.kind, id=r.id, project=r.project, record=written)
    sql = (
        f"DELETE FROM records WHERE id = ? AND kind = ?{' AND revision = ?' if op.expect_revision is not None else ''}"
    )
    sql += f" RETURNING {_COLUMNS}"
    params = (op.id, op.kind) if op.expect_revision is None else (op.id, op.kind, op.expect_revision)
    async with db.execute(sql, params) as cur:
        row = await cur.fetchone()
    if row is None:
        raise TxnFailed(index, await _failure_reason(db, op.kind, op.id), op)
    old = _row_to_record(row)
    return Change(revision=revision, type="deleted", kind=old.kind, id=old.id, project=old.project, record=old)


def list_query(
    kind: str,
    *,
    project: str | None = None,
    name: str | None = None,
    labels: dict[str, str] | None = None,
    where: dict[str, str] | None = None,
    after: tuple[str, ...] | None = None,
    limit: int = 1000,
    span: tuple[str, str, str] | None = None,
) -> tuple[str, tuple[Any, ...]]:
    """The SELECT behind :meth:`SQLiteStore.list` and its parameters (every value is a parameter)."""
    clauses, params = ["kind = ?"], [kind]
    order = "name, id"
    if project is not None:
        clauses.append("project = ?")
        params.append(project)
    if name is not None:
        clauses.append("name = ?")
        params.append(name)
    for field, value in (where or {}).items():
        if field not in INDEXED_SPEC_FIELDS:
            raise ValueError(
                f"spec field {field!r} has no index; add one with a migration (indexed: {sorted(INDEXED_SPEC_FIELDS)})"
            )
        # The expression must be exactly the index's for SQLite to use it; the field name comes from the fixed set.
        clauses.append(f"json_extract(spec, '$.{field}') = ?")
        params.append(value)
    for key, value in (labels or {}).items():
        clauses.append("EXISTS (SELECT 1 FROM json_each(labels) WHERE json_each.key = ? AND json_each.value = ?)")
        params += [key, value]
    if span is not None:
        key, low, high = span
        if key not in SPAN_KEYS:
            raise ValueError(f"{key!r} has no range index; add one with a migration (indexed: {sorted(SPAN_KEYS)})")
        expr = SPAN_KEYS[key].sql  # exactly the index's expression, from the fixed set
        clauses.append(f"{expr} >= ? AND {expr} < ?")
        params += [low, high]
        order = f"{expr}, name, id"
        if after is not None:
            if len(after) != 3:
                raise ValueError("a span read continues after (key value, name, id)")
            clauses.append(f"({expr}, name, id) > (?, ?, ?)")
            params += list(after)
    elif after is not None:
        clauses.append("(name, id) > (?, ?)")
        params += list(after)
    sql = f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(clauses)} ORDER BY {order} LIMIT ?"
    return sql, (*params, limit)


class Subscription:
    """A live feed of committed changes in revision order. Iterate it; it ends if the consumer falls too far behind
    or the replica is reset to a snapshot (``overflowed`` is then true: the consumer re-lists what it follows and
    subscribes again)."""

    def __init__(self, store: SQLiteStore, max_pending: int) -> None:
        self._store = store
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._max_pending = max_pending
        self.overflowed = False

    def _push(self, changes: Iterable[Change]) -> None:
        if self.overflowed:
            return
        for c in changes:
            self._queue.put_nowait(c)
        if self._queue.qsize() > self._max_pending:
            self.overflowed = True
            self._queue.put_nowait(None)

    def close(self) -> None:
        self._store._subscribers.discard(self)
        self._queue.put_nowait(None)

    def _end(self, *, overflowed: bool) -> None:
        """Stop the feed; with ``overflowed`` the consumer must re-list (it missed changes or the store was reset)."""
        self._store._subscribers.discard(self)
        if not self.overflowed:
            self.overflowed = overflowed
            self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[Change]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Change]:
        while (c := await self._queue.get()) is not None:
            yield c


class SQLiteStore:
    """The resource store on one SQLite file. See the module docstring for the write and read paths."""

    def __init__(self, path: Path, *, retain_changes: int = 100_000) -> None:
        self.path = Path(path)
        self.retain_changes = retain_changes
        self._wdb: aiosqlite.Connection | None = None
        self._rdb: aiosqlite.Connection | None = None
        self._revision = 0
        self._compacted = 0
        self._pending: list[tuple[Txn, int | None, asyncio.Future[tuple[int, list[Change]]]]] = []
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._subscribers: set[Subscription] = set()
        self._commit_hooks: list[CommitHook] = []
        self._cache = RecordCache()
        self._closed = False
        #: Transactions per SQLite write transaction (one fsync each): how well commits are grouped.
        self.batch_sizes = Distribution(BATCH_BUCKETS)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._writer is not None and not self._closed

    async def open(self) -> None:
        """Create or migrate the database and start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._migrate)
        self._wdb = await self._connect()
        self._rdb = await self._connect()
        async with self._rdb.execute("SELECT key, value FROM meta") as cur:
            meta = dict(await cur.fetchall())
        self._revision, self._compacted = meta["revision"], meta["compacted"]
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        self._writer.add_done_callback(self._writer_stopped)

    def _migrate(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            applied = migrate(db)
            if applied:
                log.info("state migrated", extra={"path": str(self.path), "migrations": applied})
        finally:
            db.close()

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=10000")
        return db

    async def close(self) -> None:
        """Finish the writes already queued, then close. Later commits raise ``RuntimeError``."""
        self._closed = True
        self._wake.set()
        if self._writer:
            await asyncio.wait([self._writer])  # a writer that died has been logged already
        for sub in list(self._subscribers):
            sub.close()
        for db in (self._wdb, self._rdb):
            if db is not None:
                await db.close()

    # -- writes ----------------------------------------------------------------------------------------------------
    @property
    def revision(self) -> int:
        """The revision of the last durable transaction."""
        return self._revision

    @property
    def writable(self) -> bool:
        """True while the writer task runs (it stops only on close or an unrecoverable error)."""
        return self.alive

    @property
    def alive(self) -> bool:
        """True while the writer task runs. Readiness and the systemd watchdog follow this: a node whose writer died
        can never acknowledge a write again and must be restarted."""
        return self._writer is not None and not self._writer.done() and not self._closed

    async def commit(self, txn: Txn) -> tuple[int, list[Change]]:
        """Apply ``txn`` durably; return its revision and changes. Raises :class:`TxnFailed` when a condition fails
        (nothing written). Safe to call from many tasks at once; callers' transactions are group-committed."""
        check_append_only(txn)
        return await self._enqueue(txn, None)

    async def _enqueue(self, txn: Txn, revision: int | None) -> tuple[int, list[Change]]:
        return await self.submit_at(txn, revision)

    def submit_at(self, txn: Txn, revision: int | None) -> asyncio.Future[tuple[int, list[Change]]]:
        """Queue ``txn`` (at ``revision``, or the next one when None) without waiting for it. Queued transactions
        apply in the order they were submitted, many per SQLite transaction: a replica following a fast stream
        submits each revision as it arrives and pays one fsync per batch, not per revision."""
        if self._closed:
            raise RuntimeError("the store is closed")
        if self._writer is not None and self._writer.done():
            raise RuntimeError("the state database writer stopped; restart the agent")
        fut: asyncio.Future[tuple[int, list[Change]]] = asyncio.get_running_loop().create_future()
        self._pending.append((txn, revision, fut))
        self._wake.set()
        return fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
                self.batch_sizes.observe(len(batch))
                await self._write_batch(batch)
            if self._closed:
                return

    def _writer_stopped(self, task: asyncio.Task[None]) -> None:
        """The writer is gone: nothing queued can ever be written, so fail every waiter rather than leave it hanging.
        ``alive`` is now False: /readyz answers 503 and the systemd watchdog stops, so systemd restarts the agent."""
        if not self._closed:
            exc = None if task.cancelled() else task.exception()
            log.critical("the store writer stopped; this node can no longer write", exc_info=exc)
        pending, self._pending = self._pending, []
        for _, _, fut in pending:
            if not fut.done():
                fut.set_exception(RuntimeError("the state database writer stopped; restart the agent"))

    async def _write_batch(self, batch: list[tuple[Txn, int | None, asyncio.Future[tuple[int, list[Change]]]]]) -> None:
        async with self._write_lock:
            await self._write_batch_locked(batch)

    async def _write_batch_locked(
        self, batch: list[tuple[Txn, int | None, asyncio.Future[tuple[int, list[Change]]]]]
    ) -> None:
        db = self._wdb
        assert db is not None
        revision = self._revision
        outcomes: list[tuple[asyncio.Future[Any], Any]] = []
        published: list[Change] = []
        try:
            await db.execute("BEGIN IMMEDIATE")
            for txn, at, fut in batch:
                target = revision + 1 if at is None else at
                if target <= revision:
                    outcomes.append((fut, ValueError(f"revision {target} is not after {revision}")))
                    continue
                try:
                    changes = await apply_txn(db, txn, target)
                except TxnFailed as exc:
                    outcomes.append((fut, exc))
                    continue
                revision = target
                outcomes.append((fut, (revision, changes)))
                published.extend(changes)
            if revision != self._revision:
                await db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
            if published:
                await db.executemany(
                    "INSERT INTO changes (revision, seq, type, kind, id, project, record) VALUES (?,?,?,?,?,?,?)",
                    [
                        (c.revision, seq, c.type, c.kind, c.id, c.project, _json(c.record))
                        for seq, c in enumerate(published)
                    ],
                )
            await db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            log.error("store write failed", exc_info=exc)
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(RuntimeError(f"the state database could not be written: {exc}"))
            if not isinstance(exc, Exception):
                raise
            return
        self._revision = revision
        if published:
            self._cache.apply(published)
            self._run_hooks(published)
        for fut, outcome in outcomes:
            if fut.done():
                continue
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)
        if published:
            for sub in list(self._subscribers):
                try:
                    sub._push(published)
                except Exception:
                    log.exception("a store subscriber failed; ending its subscription")
                    sub._end(overflowed=True)

    def _run_hooks(self, changes: list[Change] | None) -> None:
        """Call every commit hook; one that raises is logged and skipped, never allowed to stop the writer (the
        transaction is durable already and its writer must hear so)."""
        for hook in self._commit_hooks:
            try:
                hook(changes)
            except Exception:
                log.exception("a store commit hook failed", extra={"hook": getattr(hook, "__qualname__", repr(hook))})

    # -- reads -----------------------------------------------------------------------------------------------------
    @property
    def _db(self) -> aiosqlite.Connection:
        assert self._rdb is not None, "store not open"
        return self._rdb

    async def get(self, kind: str, id_: str) -> Record | None:
        cached = self._cache.by_id(id_)
        if cached is not None:
            return cached if cached.kind == kind else None
        revision = self._revision
        async with self._db.execute(f"SELECT {_COLUMNS} FROM records WHERE id = ? AND kind = ?", (id_, kind)) as cur:
            row = await cur.fetchone()
        return self._remember(row, revision)

    def _remember(self, row: Any, revision: int) -> Record | None:
        if row is None:
            return None
        record = _row_to_record(row)
        if revision == self._revision:  # nothing committed while we read: the row is current
            self._cache.put(record)
        return record

    async def get_by_name(self, kind: str, project: str, name: str) -> Record | None:
        cached = self._cache.by_name(kind, project, name)
        if cached is not None:
            return cached
        revision = self._revision
        async with self._db.execute(
            f"SELECT {_COLUMNS} FROM records WHERE kind = ? AND project = ? AND name = ?",
            (kind, project, name),
        ) as cur:
            row = await cur.fetchone()
        return self._remember(row, revision)

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
    ) -> list[Record]:
        """Records of ``kind`` ordered by (name, id), filtered; ``after`` is the (name, id) to continue after.

        ``where`` matches top-level spec fields exactly, and only fields with an index (:data:`INDEXED_SPEC_FIELDS`;
        another raises ``ValueError``), so a lookup such as "the instances on node N" costs what it returns, not a
        scan of the kind. ``span=(key, low, high)``: only records whose range-indexed key (:data:`SPAN_KEYS`) is in
        [low, high), ordered by (key, name, id), ``after`` then being (key value, name, id); with ``project`` the
        read costs what it returns (:func:`minicloud.state.list_span` pages through it)."""
        sql, params = list_query(
            kind, project=project, name=name, labels=labels, where=where, after=after, limit=limit, span=span
        )
        async with self._db.execute(sql, params) as cur:
            return [_row_to_record(row) for row in await cur.fetchall()]

    async def count(self, kind: str) -> int:
        async with self._db.execute("SELECT count(*) FROM records WHERE kind = ?", (kind,)) as cur:
            (n,) = await cur.fetchone()  # type: ignore[misc]
        return int(n)

    async def changes(self, since: int, *, until: int | None = None, limit: int = 1000) -> list[Change]:
        """Changes with ``since`` < revision <= ``until`` in order (at most ``limit``). Raises :class:`Compacted` if
        some of them were already dropped.

        The compaction floor is read by the same statement as the changes (one SQLite snapshot), so a compaction
        that commits while we read can never leave a silent gap."""
        if since < self._compacted:
            raise Compacted(self._compacted)
        # meta LEFT JOIN changes: always one row (the floor) even when there are no changes.
        async with self._db.execute(
            "SELECT m.value, c.revision, c.type, c.kind, c.id, c.project, c.record FROM meta AS m "
            "LEFT JOIN changes AS c ON c.revision > ? AND c.revision <= ? WHERE m.key = 'compacted' "
            "ORDER BY c.revision, c.seq LIMIT ?",
            (since, until if until is not None else self._revision, limit),
        ) as cur:
            rows = await cur.fetchall()
        floor = int(rows[0][0]) if rows else self._compacted
        if since < floor:
            raise Compacted(floor)
        return [
            Change(revision=r[1], type=r[2], kind=r[3], id=r[4], project=r[5], record=_dec_record.decode(r[6]))
            for r in rows
            if r[1] is not None
        ]

    def add_commit_hook(self, hook: CommitHook) -> None:
        """Call ``hook(changes)`` synchronously after every commit, before any writer's ``commit()`` returns. For
        in-memory caches that must never serve a value older than an acknowledged write. Hooks must not block.

        ``hook(None)`` means the replica was reset to a snapshot (etcd resync): anything may have changed, so a cache
        drops everything. A hook that raises is logged and skipped; it cannot stop the writer."""
        self._commit_hooks.append(hook)

    def subscribe(self, *, max_pending: int = 10_000) -> Subscription:
        """Start receiving every change committed from now on. Call ``close()`` when done."""
        sub = Subscription(self, max_pending)
        self._subscribers.add(sub)
        return sub

    async def compact(self, *, hold: int | None = None) -> int:
        """Drop change-log entries older than the last ``retain_changes`` revisions; returns the new floor.

        ``hold``: a consumer's cursor (the billing meter's revision): changes after it are kept too, but never more
        than :data:`HOLD_FACTOR` x ``retain_changes`` revisions, so a stuck consumer cannot grow the log without
        bound (it resynchronises instead)."""
        floor = self._revision - self.retain_changes
        if hold is not None:
            floor = max(min(floor, hold), self._revision - HOLD_FACTOR * self.retain_changes)
        if floor <= self._compacted:
            return self._compacted
        async with self._write_lock:
            await self._in_transaction(
                ("DELETE FROM changes WHERE revision <= ?", (floor,)),
                ("UPDATE meta SET value = ? WHERE key = 'compacted'", (floor,)),
            )
        self._compacted = floor
        return floor

    async def _in_transaction(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        db = self._wdb
        assert db is not None
        await db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                await db.execute(sql, params)
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def reset(self, records: list[Record], revision: int) -> None:
        """Replace every record with ``records`` as of ``revision`` (a replica resynchronising from a snapshot of
        the cluster state). The change log restarts there: older history is reported as compacted. Commit hooks get
        ``None`` (drop cached state) and every subscription ends as overflowed (re-list, then subscribe again)."""
        async with self._write_lock:
            await self._in_transaction(
                ("DELETE FROM records", ()),
                ("DELETE FROM changes", ()),
                *[
                    (f"INSERT INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", _record_params(r, r.revision))
                    for r in records
                ],
                ("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,)),
                ("UPDATE meta SET value = ? WHERE key = 'compacted'", (revision,)),
            )
            self._revision = self._compacted = revision
            self._cache = RecordCache()
            # Whatever changed in the gap produced no changes: caches drop everything, subscribers re-list.
            self._run_hooks(None)
            for sub in list(self._subscribers):
                sub._end(overflowed=True)

    async def get_meta(self, key: str) -> int | None:
        """A node-local integer setting kept beside the state (e.g. the cluster backend's revision offset)."""
        async with self._db.execute("SELECT value FROM meta WHERE key = ?", (f"x.{key}",)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else None

    async def set_meta(self, key: str, value: int) -> None:
        async with self._write_lock:
            await self._in_transaction(
                ("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                 (f"x.{key}", value)),
            )  # fmt: skip

    async def backup(self, dest: Path) -> None:
        """Write a consistent copy of the whole database to ``dest`` (SQLite online backup)."""
        target = await aiosqlite.connect(dest)
        try:
            await self._db.backup(target)
        finally:
            await target.close()
