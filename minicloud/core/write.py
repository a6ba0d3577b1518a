"""The write layer every service commits through: audit and idempotency belong here, not to HTTP.

:func:`commit` writes a list of store ops atomically **with** the audit entry of the change and, when the context
carries an ``Idempotency-Key``, the record of the first reply — so a leader loop, a reconciler, a test without HTTP
and an HTTP handler all get the same behaviour, and a crash can never separate a change from its audit entry or its
idempotency record. Store conflicts become problems (409/412/404) that say what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from minicloud import errors
from minicloud.core.context import Context
from minicloud.core.kinds import Kind, declare
from minicloud.iam import audit, tenancy
from minicloud.state import Create, Delete, Op, Record, Store, Txn, TxnFailed

#: What an idempotency record without its own ``expires`` is kept for (the ``api.idempotency_ttl`` default).
DEFAULT_IDEMPOTENCY_TTL = 86400


class IdempotencySpec(msgspec.Struct, kw_only=True):
    """The first reply to a request made under an ``Idempotency-Key`` (record id: caller, project and key hashed)."""

    #: SHA-256 of the request (method, path, query, body): the same key with another request is refused (422).
    fingerprint: str
    #: The reply's HTTP status.
    status: int
    #: The reply body, AES-GCM-sealed with the node key store (the record id as associated data).
    sealed_body: str = ""
    #: Seconds the record is kept after its creation (``api.idempotency_ttl`` when it was stored); retention
    #: (:mod:`minicloud.retention`) deletes it after that.
    expires: int = DEFAULT_IDEMPOTENCY_TTL
    #: The reply in clear: only records written before replies were sealed have it (never written now).
    body: Any = msgspec.UNSET


#: Internal (no view: never streamed, never routed). Growth: one per keyed write, expired by retention after
#: ``expires`` seconds; looked up by id only.
IDEMPOTENCY = declare(
    Kind(name="idempotency", plural="idempotency", prefix="idem", spec=IdempotencySpec, scope="cluster")
)
IDEMPOTENCY_KIND = IDEMPOTENCY.name


@dataclass
class Written:
    """What a committed (or replayed) change answers: the body, its status, the revision it was written at."""

    body: Any
    status: int
    revision: int
    replayed: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def audit_target(ops: list[Op]) -> dict[str, str]:
    first = ops[0] if ops else None
    record: Record | None = getattr(first, "record", None)
    if record is not None:
        return {"kind": record.kind, "id": record.id, "name": record.name}
    if isinstance(first, Delete):
        return {"kind": first.kind, "id": first.id}
    return {}


def audit_record(ctx: Context, result: str, status: int, target: dict[str, str] | None = None) -> Record:
    """The audit entry of ``ctx``'s call with its outcome."""
    return audit.entry(
        principal=ctx.principal.ref,
        project=ctx.project,
        action=ctx.action,
        method=ctx.method,
        path=ctx.path,
        target=target or {},
        result=result,
        status=status,
        request_id=ctx.request_id,
        source=ctx.source,
    )


def conflict(exc: TxnFailed, label: str) -> errors.MinicloudError:
    """The problem a failed transaction condition means to the caller."""
    if (refusal := tenancy.refused(exc)) is not None:
        return refusal
    record: Record | None = getattr(exc.op, "record", None)
    if exc.reason == "name-taken" and record is not None:
        return errors.AlreadyExists(
            f"a {record.kind} named '{record.name}' already exists in project '{record.project}'; "
            "choose another name or delete the existing one"
        )
    if exc.reason == "revision-mismatch":
        return errors.PreconditionFailed(
            "the resource was changed by someone else since the revision you sent in If-Match; "
            "read it again and retry with its current revision"
        )
    if exc.reason == "not-found":
        return errors.NotFound(f"the {label} was deleted while this request ran")
    return errors.Conflict(f"the change conflicts with the current state ({exc.reason}); retry")


async def replay(ctx: Context, store: Store) -> Written | None:
    """The stored reply when ``ctx`` repeats an ``Idempotency-Key`` already answered, else None. Services that check
    something before :func:`commit` (a name already taken, say) ask this first, so that a retry gets the first
    answer rather than a conflict with its own result."""
    idem = ctx.idempotency
    if idem is None:
        return None
    record = await store.get(IDEMPOTENCY.name, idem.record_id)
    if record is None:
        return None
    stored = IDEMPOTENCY.load(record)
    if stored.spec.fingerprint != idem.fingerprint:
        raise errors.IdempotencyKeyReused(
            "this Idempotency-Key was already used for a different request; use a new key for a new request"
        )
    if stored.spec.sealed_body:
        body = msgspec.json.decode(idem.sealer.decrypt(stored.spec.sealed_body, record.id.encode()))
    else:  # written before replies were sealed
        body = None if stored.spec.body is msgspec.UNSET else stored.spec.body
    if isinstance(body, dict) and body.get("revision") == 0:
        body = {**body, "revision": record.revision}
    return Written(body, stored.spec.status, record.revision, replayed=True)


async def commit(
    ctx: Context,
    store: Store,
    ops: list[Op],
    *,
    respond: Callable[[int], Any],
    status: int = 200,
    label: str = "resource",
) -> Written:
    """Commit ``ops`` atomically with their audit entry (and idempotency record) and build the answer from the new
    revision with ``respond(revision)``.

    With ``ctx.idempotency`` the reply is stored in the same transaction and replayed for a repeat of the same call
    by the same caller; a different call under the same key is refused (422)."""
    if (first := await replay(ctx, store)) is not None:
        return first
    target = audit_target(ops)
    ops = [*ops, *await tenancy.guards(store, ops)]  # nothing is created in a project being deleted
    ops = [*ops, Create(audit_record(ctx, "allowed", status, target))]
    idem = ctx.idempotency
    if idem is not None:
        stamp = ctx.clock()
        # The reply is rendered with revision 0 and patched with the transaction's revision on replay: the key's
        # record and the resource share that revision because they commit together.
        body = msgspec.to_builtins(respond(0))
        # Replies may carry one-time secrets (API keys, access keys), which must never be at rest in clear — not in
        # the store, the change log, etcd or a backup: every stored reply is sealed (AES-GCM with the node key store,
        # the record id as associated data), so no reply kind can be forgotten. Every node holds the same key store.
        sealed = idem.sealer.encrypt(msgspec.json.encode(body), idem.record_id.encode())
        key = IDEMPOTENCY.new(
            project="",
            id=idem.record_id,
            name=idem.record_id,
            spec=IdempotencySpec(fingerprint=idem.fingerprint, status=status, sealed_body=sealed, expires=idem.ttl),
            stamp=stamp,
        )
        ops = [*ops, Create(IDEMPOTENCY.dump(key))]
    try:
        revision, _ = await store.commit(Txn(ops))
    except TxnFailed as exc:
        # A concurrent call with the same key may have won the race (its change conflicts with ours, or its key
        # record does): answer as it did.
        if idem is not None and (first := await replay(ctx, store)) is not None:
            return first
        raise conflict(exc, label) from None
    return Written(respond(revision), status, revision)
