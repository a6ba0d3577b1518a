"""Generic services of every declared kind: get (id or name), list (paging, name and label filters), create, patch of
description and labels, delete. They take a :class:`Context` and the store, never a request, and write through
:func:`minicloud.core.write.commit` (audit + idempotency in the same transaction).

Contracts: ``get`` raises 404 naming the kind and the CLI command to list it; ``patch`` is a compare-and-swap on the
revision read (or the caller's ``expect``), retried on a fresh read when the caller gave none, so a concurrent change
is never lost; ``delete`` is a compare-and-swap too. Nothing here is half-done on error: one transaction per call.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from minicloud import errors
from minicloud.core.context import Context
from minicloud.core.kinds import Kind, Obj
from minicloud.core.write import Written, commit, conflict
from minicloud.state import Create, Delete, Op, Store, Update


def shown(ref: str, limit: int = 80) -> str:
    """``ref`` safe to echo in a message (bounded, printable)."""
    return ref if len(ref) <= limit and ref.isprintable() else ref[:limit].encode("unicode_escape").decode() + "…"


def not_found(kind: Kind[Any, Any], ref: str, scope: str) -> errors.NotFound:
    where = f" in project '{scope}'" if kind.scope == "project" else ""
    return errors.NotFound(
        f"no {kind.label} with the name or id '{shown(ref)}'{where}; see `minicloud {kind.noun or kind.name} list`"
    )


async def refuse_beyond(store: Store, kind: Kind[Any, Any], project: str, most: int, setting: str = "") -> None:
    """409 when ``project`` already has ``most`` records of ``kind`` (a per-project cap on a kind members can grow one
    create at a time); ``setting`` names the configuration that sets it."""
    if len(await store.list(kind.name, project=project, limit=most)) >= most:
        allows = f"the most {setting} allows" if setting else "the most a project may have"
        raise errors.Conflict(f"project '{project}' has {most} {kind.plural}, {allows}; delete one first")


async def find(ctx: Context, store: Store, kind: Kind[Any, Any], ref: str) -> Obj[Any, Any] | None:
    """The object ``ref`` names (an id of the kind's prefix, or a name) in the context's scope, or None."""
    scope = ctx.scope(kind.scope == "cluster")
    if len(ref) > 255:
        return None
    record = await store.get(kind.name, ref) if ref.startswith(kind.prefix + "-") else None
    if record is not None and record.project != scope:
        record = None
    if record is None:
        record = await store.get_by_name(kind.name, scope, ref)
    return kind.load(record) if record is not None else None


async def get(ctx: Context, store: Store, kind: Kind[Any, Any], ref: str) -> Obj[Any, Any]:
    """The object ``ref`` names; 404 when there is none in the context's scope."""
    obj = await find(ctx, store, kind, ref)
    if obj is None:
        raise not_found(kind, ref, ctx.scope(kind.scope == "cluster"))
    return obj


@dataclass
class ListResult:
    items: list[Obj[Any, Any]]
    next_cursor: str | None


def encode_cursor(name: str, id_: str) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode([name, id_])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        name, id_ = msgspec.json.decode(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)), type=tuple[str, str]
        )
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise errors.ValidationFailed(
            "the cursor is not valid; pass back the next_cursor of the previous page unchanged",
            invalid_params=[{"name": "cursor", "reason": "malformed"}],
        ) from None
    return name, id_


async def list_objects(
    ctx: Context,
    store: Store,
    kind: Kind[Any, Any],
    *,
    limit: int = 100,
    cursor: str | None = None,
    name: str | None = None,
    labels: dict[str, str] | None = None,
) -> ListResult:
    """One page of the kind's objects in the context's scope, in (name, id) order."""
    records = await store.list(
        kind.name,
        project=ctx.scope(kind.scope == "cluster"),
        name=name,
        labels=labels or {},
        after=decode_cursor(cursor) if cursor else None,
        limit=limit + 1,
    )
    more = len(records) > limit
    records = records[:limit]
    return ListResult(
        items=[kind.load(r) for r in records],
        next_cursor=encode_cursor(records[-1].name, records[-1].id) if more and records else None,
    )


async def create(
    ctx: Context,
    store: Store,
    kind: Kind[Any, Any],
    obj: Obj[Any, Any],
    *,
    respond: Callable[[Obj[Any, Any]], Any] | None = None,
    extra: Sequence[Op] = (),
) -> Written:
    """Create ``obj`` (with ``extra`` ops in the same transaction); answers 201 with its view, or ``respond(obj)``
    (e.g. to add a one-time secret)."""
    render = respond or kind.to_view
    record = kind.dump(obj)
    written = await commit(
        ctx,
        store,
        [Create(record), *extra],
        status=201,
        label=kind.label,
        respond=lambda rev: render(obj.replace(revision=rev)),
    )
    written.headers["Location"] = f"/v1/{kind.plural}/{obj.id}"
    return written


_UPDATE_ATTEMPTS = 5


async def update(
    ctx: Context,
    store: Store,
    kind: Kind[Any, Any],
    ref: str,
    mutate: Callable[[Obj[Any, Any]], Obj[Any, Any]],
    *,
    expect: int | None = None,
    extra: Callable[[Obj[Any, Any]], Sequence[Op]] | None = None,
) -> Written:
    """Read-modify-write of the object ``ref`` names with ``mutate(obj) -> obj`` (which may raise to refuse).

    With ``expect`` the write is conditional on that revision (412 if stale). Without it, a concurrent change is not
    lost either: the write is a compare-and-swap on the revision just read, retried on a fresh read."""
    for attempt in range(_UPDATE_ATTEMPTS):
        current = await get(ctx, store, kind, ref)
        updated = mutate(current).replace(updated_at=ctx.clock())
        ops: list[Op] = [Update(kind.dump(updated), expect_revision=expect if expect is not None else current.revision)]
        if extra is not None:
            ops.extend(extra(updated))
        try:
            return await commit(
                ctx,
                store,
                ops,
                status=200,
                label=kind.label,
                respond=lambda rev, u=updated: kind.to_view(u.replace(revision=rev)),
            )
        except errors.PreconditionFailed:
            if expect is not None:
                raise
            if attempt == _UPDATE_ATTEMPTS - 1:
                raise errors.Conflict(f"the {kind.label} kept changing while this request ran; retry it") from None
    raise AssertionError("unreachable")


def merge_patch(obj: Obj[Any, Any], patch: Any) -> Obj[Any, Any]:
    """JSON merge patch of ``description`` and ``labels``: absent (UNSET) fields stay."""
    spec = obj.spec
    if getattr(patch, "description", msgspec.UNSET) is not msgspec.UNSET:
        spec = msgspec.structs.replace(spec, description=patch.description)
    labels = obj.labels if getattr(patch, "labels", msgspec.UNSET) is msgspec.UNSET else patch.labels
    return obj.replace(spec=spec, labels=labels)


async def patch(
    ctx: Context, store: Store, kind: Kind[Any, Any], ref: str, body: Any, *, expect: int | None = None
) -> Written:
    """The generic ``PATCH``: description and labels (merge patch)."""
    return await update(ctx, store, kind, ref, lambda obj: merge_patch(obj, body), expect=expect)


def delete_op(obj: Obj[Any, Any], expect: int | None = None) -> Delete:
    return Delete(kind=obj.kind, id=obj.id, expect_revision=expect if expect is not None else obj.revision)


async def delete(
    ctx: Context,
    store: Store,
    kind: Kind[Any, Any],
    ref: str,
    *,
    expect: int | None = None,
    extra: Sequence[Op] = (),
) -> Written:
    """Remove the object ``ref`` names (compare-and-swap on ``expect`` or the revision read); 204."""
    return await delete_read(ctx, store, kind, lambda: get(ctx, store, kind, ref), expect=expect, extra=extra)


async def delete_read(
    ctx: Context,
    store: Store,
    kind: Kind[Any, Any],
    read: Callable[[], Awaitable[Obj[Any, Any]]],
    *,
    expect: int | None = None,
    extra: Sequence[Op] = (),
) -> Written:
    """Remove the object ``read()`` returns (compare-and-swap on ``expect`` or the revision read); 204. Without
    ``expect`` (no If-Match) a write that lands between the read and the delete (a reconciler's or a loop's status)
    makes it read again and retry, so a caller never gets 412 for a revision it did not send."""
    for attempt in range(_DELETE_TRIES):
        obj = await read()
        try:
            return await delete_obj(ctx, store, kind, obj, expect=expect, extra=extra)
        except errors.PreconditionFailed:
            if expect is not None or attempt == _DELETE_TRIES - 1:
                raise
    raise AssertionError("unreachable")


_DELETE_TRIES = 4


async def delete_obj(
    ctx: Context,
    store: Store,
    kind: Kind[Any, Any],
    obj: Obj[Any, Any],
    *,
    expect: int | None = None,
    extra: Sequence[Op] = (),
) -> Written:
    return await commit(
        ctx, store, [delete_op(obj, expect), *extra], status=204, label=kind.label, respond=lambda rev: None
    )


__all__ = [
    "ListResult",
    "conflict",
    "create",
    "delete",
    "delete_obj",
    "delete_read",
    "find",
    "get",
    "list_objects",
    "merge_patch",
    "patch",
    "update",
]
