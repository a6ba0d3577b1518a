"""The cluster backend of the store: etcd is the write path, this node's SQLite file is a full replica.

Layout in etcd::

    /mc/r/<kind>/<id>               the record (JSON; its revision is implied by the key's mod_revision)
    /mc/n/<kind>/<project>/<name>   the record's id: makes names unique with a compare on create_revision
    /mc/meta                        {"offset": O, "base": B}: how etcd revisions map to resource revisions
    /mc/txn/<random>                a marker each write transaction puts (on a 2-minute lease): lets a write whose
                                    reply was lost and that was re-sent tell that its first attempt committed

Writes: :meth:`EtcdStore.commit` turns a :class:`Txn` into one etcd transaction — compare-and-swap on each record's
mod_revision and on the name keys — so etcd decides every conflict. A successful write returns only once the local
replica has applied the revision etcd gave it (read-your-writes).

Replication: one watch on ``/mc/r/`` from the replica's revision onwards; every etcd revision is applied to SQLite as
one transaction with :meth:`SQLiteStore.submit_at` (the same apply path as a single node, so events, caches and
hooks behave identically). If etcd has compacted the history the replica needs, it reloads a snapshot.

Revisions: a resource revision is ``etcd revision + O``. ``minicloud cluster enable`` copies a single node's records
into etcd in one transaction at etcd revision ``B`` with ``O`` = the node's last SQLite revision, and keeps each
record's original revision inside its value, so no record changes and revisions keep increasing across the move.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import msgspec

from minicloud import errors
from minicloud.state.etcd_client import (
    KV,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    WatchBatch,
    cmp_create,
    cmp_mod,
    op_delete,
    op_put,
    op_range,
    prefix_end,
    range_kvs,
)
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
from minicloud.state.sqlite import CommitHook, SQLiteStore, Subscription

log = logging.getLogger(__name__)

RECORDS = b"/mc/r/"
NAMES = b"/mc/n/"
META = b"/mc/meta"
#: ``/mc/txn/<random>``: one marker per committed transaction, on a short lease (see ``EtcdStore.commit``).
MARKS = b"/mc/txn/"
MARK_TTL = 120
_enc = msgspec.json.Encoder()
_dec_record = msgspec.json.Decoder(Record)
_ATTEMPTS = 8
#: Without a successful round trip to a quorum for this long, reads are reported as possibly stale.
STALE_AFTER = 3.0


class ClusterMeta(msgspec.Struct):
    offset: int
    base: int


def rkey(kind: str, id_: str) -> bytes:
    return RECORDS + f"{kind}/{id_}".encode()


def nkey(kind: str, project: str, name: str) -> bytes:
    return NAMES + f"{kind}/{project}/{name}".encode()


def encode_record(record: Record, keep_revision: bool = False) -> bytes:
    return _enc.encode(record if keep_revision else msgspec.structs.replace(record, revision=0))


class EtcdStore:
    """The :class:`~minicloud.state.Store` of a cluster node. See the module docstring."""

    def __init__(self, replica: SQLiteStore, client: EtcdClient, *, apply_timeout: float = 30.0) -> None:
        self.replica = replica
        self.client = client
        self.apply_timeout = apply_timeout
        self.meta: ClusterMeta | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._waiters: dict[int, list[asyncio.Future[list[Change]]]] = {}
        self._last_contact = 0.0
        self._closed = False
        self._mark_lock = asyncio.Lock()
        self._mark_lease_id = 0
        self._mark_lease_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the replica, read the cluster's revision mapping, catch up, and start following etcd."""
        if not self.replica.is_open:
            await self.replica.open()
        offset, base = await self.replica.get_meta("etcd_offset"), await self.replica.get_meta("etcd_base")
        if offset is not None and base is not None and self.replica.revision >= offset + base:
            # A restart: the replica knows the mapping and is consistent up to its revision. Serve it at once and
            # catch up in the background, so a node that cannot reach a quorum still starts and serves stale reads.
            self.meta = ClusterMeta(offset=offset, base=base)
        else:
            kv = await self._read_meta()
            self.meta = msgspec.json.decode(kv.value, type=ClusterMeta)
            self._touch()
            await self._resync()
        self._watcher = asyncio.create_task(self._follow(), name="etcd-watch")

    async def _read_meta(self) -> KV:
        while True:
            try:
                kv = await self.client.get(META)
                break
            except EtcdUnavailable as exc:
                log.warning("waiting for etcd", extra={"error": str(exc)})
                await asyncio.sleep(1)
        if kv is None:
            raise errors.Unavailable("etcd holds no minicloud state; run `minicloud cluster enable` first")
        return kv

    async def close(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(errors.Unavailable("the agent is stopping"))
        await self.client.close()
        await self.replica.close()

    # -- revision mapping ------------------------------------------------------------------------------------------
    def _public(self, etcd_revision: int) -> int:
        assert self.meta is not None
        return etcd_revision + self.meta.offset

    def _etcd(self, public_revision: int) -> int:
        """The etcd mod_revision of a record whose resource revision is ``public_revision``."""
        assert self.meta is not None
        return public_revision - self.meta.offset if public_revision > self.meta.offset else self.meta.base

    def _record_from_kv(self, kv: KV) -> Record:
        assert self.meta is not None
        record = _dec_record.decode(kv.value)
        if kv.mod_revision == self.meta.base and record.revision:
            return record  # migrated by `cluster enable` and untouched since: keeps its original revision
        return msgspec.structs.replace(record, revision=self._public(kv.mod_revision))

    # -- status ----------------------------------------------------------------------------------------------------
    def _touch(self) -> None:
        self._last_contact = time.monotonic()

    @property
    def revision(self) -> int:
        return self.replica.revision

    @property
    def stale(self) -> bool:
        """True when this node has not reached a quorum recently: its replica may be behind the cluster."""
        return time.monotonic() - self._last_contact > STALE_AFTER

    @property
    def alive(self) -> bool:
        """The replica's writer and the replication loop both run (a lost quorum does not make a node dead)."""
        return self.replica.alive and self._watcher is not None and not self._watcher.done()

    @property
    def writable(self) -> bool:
        return self.alive and not self.stale

    async def check_quorum(self) -> bool:
        """One linearizable read (it commits nothing); marks the replica fresh when it succeeds."""
        try:
            await self.client.range(META, keys_only=True, seconds=2.0)
        except EtcdError:
            return False
        self._touch()
        return True

    # -- writes ----------------------------------------------------------------------------------------------------
    async def commit(self, txn: Txn) -> tuple[int, list[Change]]:
        """Apply ``txn`` through etcd; return its resource revision and changes once the local replica has it.

        Raises :class:`TxnFailed` on a failed condition and ``errors.Unavailable`` (503) without a quorum.
        """
        check_append_only(txn)
        if self.stale and not await self.check_quorum():
            # Refused before anything is proposed: the write has certainly not happened.
            raise errors.Unavailable(
                "this node cannot reach a quorum of the cluster, so it refuses writes until it can; nothing was "
                "written. Retry, or send the request to another node"
            )
        # A marker key written by the transaction itself: the client re-sends a request that timed out to the next
        # endpoint, and if the first attempt did commit, the re-sent one fails its compares. The failure branch
        # reads the marker back, so a write that happened is reported as the success it was, never as a conflict.
        mark = MARKS + secrets.token_hex(12).encode()
        for _ in range(_ATTEMPTS):
            compares, requests = await self._build(txn)
            try:
                lease = await self._mark_lease()
                ok, header, responses = await self.client.txn(
                    compares, [*requests, op_put(mark, b"", lease=lease)], [op_range(mark)]
                )
            except EtcdError as exc:
                if not isinstance(exc, EtcdUnavailable) and "lease not found" in str(exc):
                    self._mark_lease_id = 0  # expired (or a recovered cluster forgot it): take a new one
                    continue
                if not isinstance(exc, EtcdUnavailable):
                    raise
                raise errors.Unavailable(
                    "this node lost contact with the cluster's quorum during the write, so it may or may not have "
                    "been applied; retry with the same Idempotency-Key to be sure it happens once "
                    f"({exc})"
                ) from None
            self._touch()
            if ok:
                public = self._public(header)
                return public, await self._wait_applied(public)
            applied = range_kvs(responses[0]) if responses else []
            if applied:  # an earlier attempt of this very transaction committed (its reply was lost)
                public = self._public(applied[0].mod_revision)
                return public, await self._wait_applied(public)
            failure = await self._diagnose(txn)
            if failure is not None:
                raise failure
            # Our replica was behind etcd when we built the compares: catch up and build them again.
            await self._wait_applied(self._public(header))
        raise errors.Conflict("the records kept changing while this write was retried; retry it")

    async def _mark_lease(self) -> int:
        """The lease transaction markers are written with: a new one every ``MARK_TTL / 2`` seconds, left to
        expire (etcd then drops its markers), so markers never accumulate and cost one lease grant a minute."""
        async with self._mark_lock:
            now = time.monotonic()
            if not self._mark_lease_id or now - self._mark_lease_at > MARK_TTL / 2:
                self._mark_lease_id = await self.client.lease_grant(MARK_TTL)
                self._mark_lease_at = now
            return self._mark_lease_id

    async def _current(self, kind: str, id_: str) -> Record | None:
        return await self.replica.get(kind, id_)

    async def _build(self, txn: Txn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        compares: list[dict[str, Any]] = []
        requests: list[dict[str, Any]] = []
        for index, op in enumerate(txn.ops):
            if isinstance(op, Create):
                r = op.record
                compares += [cmp_create(rkey(r.kind, r.id), 0), cmp_create(nkey(r.kind, r.project, r.name), 0)]
                requests += [
                    op_put(rkey(r.kind, r.id), encode_record(r)),
                    op_put(nkey(r.kind, r.project, r.name), r.id.encode()),
                ]
                continue
            if isinstance(op, Check):  # a compare only: the record is at that revision (absent: mod_revision 0)
                compares.append(cmp_mod(rkey(op.kind, op.id), self._etcd(op.expect_revision)))
                continue
            kind, id_ = (op.record.kind, op.record.id) if isinstance(op, Update) else (op.kind, op.id)
            current = await self._current(kind, id_)
            if current is None:
                # Either it does not exist, or our replica has not seen it yet: etcd decides.
                kv = await self.client.get(rkey(kind, id_))
                if kv is None:
                    raise TxnFailed(index, "not-found", op)
                current = self._record_from_kv(kv)
            expect = op.expect_revision if op.expect_revision is not None else current.revision
            compares.append(cmp_mod(rkey(kind, id_), self._etcd(expect)))
            if isinstance(op, Update):
                r = op.record
                requests.append(op_put(rkey(kind, id_), encode_record(r)))
                if (r.project, r.name) != (current.project, current.name):
                    compares.append(cmp_create(nkey(kind, r.project, r.name), 0))
                    requests += [
                        op_delete(nkey(kind, current.project, current.name)),
                        op_put(nkey(kind, r.project, r.name), id_.encode()),
                    ]
            else:
                requests += [op_delete(rkey(kind, id_)), op_delete(nkey(kind, current.project, current.name))]
        return compares, requests

    async def _diagnose(self, txn: Txn) -> TxnFailed | None:
        """Why did etcd refuse ``txn``? None when the only reason was our replica lagging (retry)."""
        for index, op in enumerate(txn.ops):
            if isinstance(op, Create):
                r = op.record
                if await self.client.get(rkey(r.kind, r.id)) is not None:
                    return TxnFailed(index, "exists", op)
                if await self.client.get(nkey(r.kind, r.project, r.name)) is not None:
                    return TxnFailed(index, "name-taken", op)
                continue
            kind, id_ = (op.record.kind, op.record.id) if isinstance(op, Update) else (op.kind, op.id)
            kv = await self.client.get(rkey(kind, id_))
            if kv is None:
                return TxnFailed(index, "not-found", op)
            if op.expect_revision is not None and kv.mod_revision != self._etcd(op.expect_revision):
                return TxnFailed(index, "revision-mismatch", op)
            if isinstance(op, Check):
                continue
            if isinstance(op, Update):
                current = self._record_from_kv(kv)
                r = op.record
                if (r.project, r.name) != (current.project, current.name):
                    holder = await self.client.get(nkey(kind, r.project, r.name))
                    if holder is not None and holder.value.decode() != id_:
                        return TxnFailed(index, "name-taken", op)
        return None

    async def _wait_applied(self, public: int) -> list[Change]:
        """The changes of revision ``public`` once the replica has applied it (applied already: from its log)."""
        if self.replica.revision >= public:
            with contextlib.suppress(Exception):
                return await self.replica.changes(public - 1, until=public)
            return []
        fut: asyncio.Future[list[Change]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(public, []).append(fut)
        try:
            async with asyncio.timeout(self.apply_timeout):
                return await fut
        except TimeoutError:
            raise errors.Unavailable(
                f"the write was committed at revision {public}, but this node's replica has not applied it yet; "
                "it will appear shortly"
            ) from None

    def _release(self, applied: int, changes: list[Change]) -> None:
        for revision in [r for r in self._waiters if r <= applied]:
            for fut in self._waiters.pop(revision):
                if not fut.done():
                    fut.set_result(changes if revision == applied else [])

    # -- replication -----------------------------------------------------------------------------------------------
    def _batch_to_txn(self, batch: WatchBatch) -> Txn:
        ops: list[Op] = []
        for event in batch.events:
            kind, _, id_ = event.kv.key[len(RECORDS) :].decode().partition("/")
            if event.type == "DELETE":
                ops.append(Delete(kind=kind, id=id_))
            elif event.kv.create_revision == event.kv.mod_revision:
                ops.append(Create(self._record_from_kv(event.kv)))
            else:
                ops.append(Update(self._record_from_kv(event.kv)))
        return Txn(ops)

    async def _follow(self) -> None:
        while not self._closed:
            try:
                await self._follow_once()
            except EtcdCompacted:
                log.warning("etcd compacted the history this replica needs; reloading a snapshot")
                await self._resync_retrying()
            except TxnFailed as exc:
                log.error("replica diverged from etcd; reloading a snapshot", extra={"error": str(exc)})
                await self._resync_retrying()
            except EtcdUnavailable as exc:
                log.info("etcd watch interrupted; resuming", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replication loop failed; resuming")
                await asyncio.sleep(1)

    async def _follow_once(self) -> None:
        """Apply the watch stream until it breaks. Each revision is submitted to the replica as it arrives (the
        replica batches them into few SQLite transactions); a failed apply stops the stream for a resync."""
        inflight: list[asyncio.Future[tuple[int, list[Change]]]] = []
        submitted = self.replica.revision
        try:
            async for batch in self.client.watch(RECORDS, self._etcd(submitted) + 1):
                self._touch()
                public = self._public(batch.revision)
                if not batch.events or public <= submitted:
                    continue
                fut = self.replica.submit_at(self._batch_to_txn(batch), public)
                fut.add_done_callback(functools.partial(self._applied, public))
                inflight.append(fut)
                submitted = public
                for f in inflight:
                    if f.done() and (exc := f.exception()) is not None:
                        raise exc
                inflight = [f for f in inflight if not f.done()]
        finally:
            # Let what was submitted land before anyone resumes or resyncs from the replica's revision.
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    def _applied(self, public: int, fut: asyncio.Future[tuple[int, list[Change]]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        _, changes = fut.result()
        self._release(public, changes)

    async def _resync_retrying(self) -> None:
        while not self._closed:
            try:
                await self._resync()
                return
            except EtcdError:
                await asyncio.sleep(1)

    async def _resync(self) -> None:
        """Load every record from one consistent etcd snapshot into the replica."""
        assert self.meta is not None
        kvs: list[KV] = []
        key, revision = RECORDS, 0
        while True:
            page, header, more = await self.client.range(key, prefix_end(RECORDS), revision=revision, limit=1000)
            revision = revision or header
            kvs += page
            if not more:
                break
            key = page[-1].key + b"\0"
        records = [self._record_from_kv(kv) for kv in kvs]
        public = max(self._public(revision), self.replica.revision)
        await self.replica.reset(records, public)
        await self.replica.set_meta("etcd_offset", self.meta.offset)
        await self.replica.set_meta("etcd_base", self.meta.base)
        self._touch()
        self._release(public, [])
        log.info("replica loaded from etcd", extra={"records": len(records), "revision": public})

    # -- reads: the local replica ----------------------------------------------------------------------------------
    async def get(self, kind: str, id_: str) -> Record | None:
        return await self.replica.get(kind, id_)

    async def get_by_name(self, kind: str, project: str, name: str) -> Record | None:
        return await self.replica.get_by_name(kind, project, name)

    async def list(self, kind: str, **kw: Any) -> list[Record]:
        return await self.replica.list(kind, **kw)

    async def count(self, kind: str) -> int:
        return await self.replica.count(kind)

    async def changes(self, since: int, *, until: int | None = None, limit: int = 1000) -> list[Change]:
        return await self.replica.changes(since, until=until, limit=limit)

    def subscribe(self, *, max_pending: int = 10_000) -> Subscription:
        return self.replica.subscribe(max_pending=max_pending)

    def add_commit_hook(self, hook: CommitHook) -> None:
        self.replica.add_commit_hook(hook)

    async def compact(self, *, hold: int | None = None) -> int:
        return await self.replica.compact(hold=hold)

    async def backup(self, dest: Path) -> None:
        await self.replica.backup(dest)


async def migrate_to_etcd(replica: SQLiteStore, client: EtcdClient) -> ClusterMeta:
    """Copy every record of a single node's store into an empty etcd, in one transaction, keeping revisions.

    Idempotent in the sense that a second call finds ``/mc/meta`` and returns it without writing.
    """
    existing = await client.get(META)
    if existing is not None:
        return msgspec.json.decode(existing.value, type=ClusterMeta)
    records: list[Record] = []
    after = None
    for kind in await _kinds(replica):
        while True:
            page = await replica.list(kind, after=after, limit=1000)
            records += page
            if len(page) < 1000:
                after = None
                break
            after = (page[-1].name, page[-1].id)
    offset = replica.revision
    requests = []
    for r in records:
        requests += [
            op_put(rkey(r.kind, r.id), encode_record(r, keep_revision=True)),
            op_put(nkey(r.kind, r.project, r.name), r.id.encode()),
        ]
    # etcd gives a transaction the revision after the current one; at enable time nobody else writes, so the meta
    # key can name the migration's revision in the same transaction (checked below, and corrected if it differs).
    _, current, _ = await client.range(META, keys_only=True)
    meta = ClusterMeta(offset=offset, base=current + 1)
    ok, header, _ = await client.txn([cmp_create(META, 0)], [*requests, op_put(META, _enc.encode(meta))])
    if not ok:
        existing = await client.get(META)
        assert existing is not None
        return msgspec.json.decode(existing.value, type=ClusterMeta)
    if header != meta.base:
        meta = ClusterMeta(offset=offset, base=header)
        await client.put(META, _enc.encode(meta))
    return meta


async def _kinds(replica: SQLiteStore) -> list[str]:
    async with replica._db.execute("SELECT DISTINCT kind FROM records ORDER BY kind") as cur:
        return [row[0] for row in await cur.fetchall()]
