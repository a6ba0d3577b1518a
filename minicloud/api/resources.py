"""The conventions every resource collection follows, implemented once.

- ``list_page``: ``limit`` + opaque ``cursor`` pagination, ``name`` and ``label`` (``k=v,k2=v2``) filters.
- ``resolve``: ``/v1/<plural>/{ref}`` accepts an id or a name.
- ``write``: every mutating request goes through it. It maps store conflicts onto problems (409/412/404) and makes
  ``Idempotency-Key`` atomic: the key's record is written in the same transaction as the change it protects, so a
  crash can never leave one without the other, and a repeated key replays the first response.
- ``if_match``: parses ``If-Match: <revision>`` for optimistic concurrency.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from aiohttp import web

from minicloud import errors, ids
from minicloud.api.auth import ACTION, AUDITED, principal_of
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.middleware import PROJECT, REQUEST_ID
from minicloud.api.routing import Reply
from minicloud.core import crud
from minicloud.core import write as core_write
from minicloud.core.context import Context, Idempotency
from minicloud.core.kinds import Kind as CoreKind
from minicloud.core.write import IDEMPOTENCY_KIND, Written
from minicloud.model import LABEL_KEY_PATTERN, NAME_PATTERN, Page
from minicloud.state import Create, Delete, Op, Record, Update

DEFAULT_PROJECT = "default"
PROJECT_KIND = "project"
#: The request's service context, built once (:func:`context_of`).
CONTEXT = web.RequestKey("context", Context)
__all__ = ["IDEMPOTENCY_KIND"]


@dataclass(frozen=True)
class Kind:
    """A resource kind as the API sees it. ``view`` turns a record into its public representation."""

    name: str
    plural: str
    prefix: str
    view: Callable[[Record], msgspec.Struct]
    cli_noun: str
    #: Records of the cluster itself (users, projects, role bindings), not of a project: stored with project "".
    cluster_level: bool = False


#: Public kinds by name: the events stream and error messages use it. Internal kinds are simply not listed.
KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    KINDS[kind.name] = kind
    return kind


def expose(kind: CoreKind[Any, Any]) -> Kind:
    """Make a declared kind (:mod:`minicloud.core.kinds`) known to the API's events stream and project checks."""
    return register_kind(
        Kind(
            name=kind.name,
            plural=kind.plural,
            prefix=kind.prefix,
            view=kind.view_record,
            cli_noun=kind.noun or kind.name,
            cluster_level=kind.scope == "cluster",
        )
    )


class ListQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    cursor: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    name: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    label: Annotated[str, msgspec.Meta(max_length=2048, description="label selector: k=v[,k2=v2]")] | None = None


def encode_cursor(record: Record) -> str:
    return crud.encode_cursor(record.name, record.id)


decode_cursor = crud.decode_cursor


def parse_selector(selector: str | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    if not selector:
        return labels
    for term in selector.split(","):
        key, sep, value = term.partition("=")
        if not sep or not re.fullmatch(LABEL_KEY_PATTERN, key):
            raise errors.ValidationFailed(
                f"label selector term '{term}' is not key=value with a lowercase key; e.g. ?label=env=prod,tier=web",
                invalid_params=[{"name": "label", "reason": "malformed selector"}],
            )
        labels[key] = value
    return labels


def scope_of(request: web.Request, kind: Kind) -> str:
    """The project a record of ``kind`` lives in for this request ("" for cluster-level kinds)."""
    return "" if kind.cluster_level else project_of(request)


def project_of(request: web.Request) -> str:
    """The project a request acts in: ``?project=P``, else ``default`` (validated by :func:`resolve_project`)."""
    return request.get(PROJECT, DEFAULT_PROJECT)


async def resolve_project(request: web.Request) -> str:
    """Validate ``?project=`` and remember it on the request. An unknown project is 404, whoever asks."""
    name = request.query.get("project", DEFAULT_PROJECT)
    if name != DEFAULT_PROJECT and (
        not re.fullmatch(NAME_PATTERN, name) or await request.app[STORE].get_by_name(PROJECT_KIND, "", name) is None
    ):
        shown = name[:64].encode("unicode_escape").decode()
        raise errors.NotFound(f"no project named '{shown}'; see `minicloud project list`")
    request[PROJECT] = name
    return name


async def list_page(request: web.Request, kind: Kind, query: ListQuery) -> Page[Any]:
    after = decode_cursor(query.cursor) if query.cursor else None
    records = await request.app[STORE].list(
        kind.name,
        project=scope_of(request, kind),
        name=query.name,
        labels=parse_selector(query.label),
        after=after,
        limit=query.limit + 1,
    )
    more = len(records) > query.limit
    records = records[: query.limit]
    return Page(
        items=[kind.view(r) for r in records],
        next_cursor=encode_cursor(records[-1]) if more and records else None,
    )


async def resolve(request: web.Request, kind: Kind, ref: str | None = None) -> Record:
    """The record ``ref`` (default: the ``{ref}`` path parameter) names, by id or by name, in the caller's project."""
    ref = ref if ref is not None else request.match_info["ref"]
    store = request.app[STORE]
    project = scope_of(request, kind)
    record = None
    if len(ref) <= 255:
        record = await store.get(kind.name, ref) if ref.startswith(kind.prefix) else None
        if record is not None and record.project != project:
            record = None
        if record is None:
            record = await store.get_by_name(kind.name, project, ref)
    if record is None:
        shown = ref if len(ref) <= 80 and ref.isprintable() else ref[:80].encode("unicode_escape").decode() + "…"
        raise errors.NotFound(
            f"no {kind.name} with the name or id '{shown}' in project '{project}'; see `minicloud {kind.cli_noun} list`"
        )
    return record


def if_match(request: web.Request) -> int | None:
    """The revision in ``If-Match`` (``"12"``, ``12`` or ``W/"12"``), None when absent, ``*`` means any."""
    value = request.headers.get("If-Match")
    if value is None or value.strip() == "*":
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit() or len(text) > 18:
        raise errors.BadRequest(f'If-Match must be a resource revision such as "12" (got {value!r})')
    return int(text)


def new_record(kind: Kind, request: web.Request, name: str, labels: dict[str, str], spec: dict[str, Any]) -> Record:
    stamp = ids.now()
    return Record(
        kind=kind.name,
        id=ids.new_id(kind.prefix),
        project=scope_of(request, kind),
        name=name,
        labels=labels,
        spec=spec,
        created_at=stamp,
        updated_at=stamp,
    )


_enc = msgspec.json.Encoder()


async def context_of(request: web.Request) -> Context:
    """The service :class:`Context` of a request: its principal, project, authorised action, request id and
    ``Idempotency-Key`` (sealed with the node's key store). Built once per request."""
    ctx = request.get(CONTEXT)
    if ctx is None:
        idem = await _idempotency(request)
        ctx = Context(
            principal=principal_of(request),
            project=project_of(request),
            action=request.get(ACTION, ""),
            request_id=request.get(REQUEST_ID, ""),
            idempotency=Idempotency(idem[0], idem[1], _keystore(request), request.app[CONFIG].api.idempotency_ttl)
            if idem is not None
            else None,
            source=request.remote or "unix",
            method=request.method,
            path=request.path,
        )
        request[CONTEXT] = ctx
    return ctx


def _keystore(request: web.Request) -> Any:
    from minicloud.api.accesskeys import KEYSTORE  # the app's key store (a module-level import would be a cycle)

    return request.app[KEYSTORE]


def reply(request: web.Request, written: Written, headers: dict[str, str] | None = None) -> Reply:
    """The HTTP answer of a service's write: a replay says so; a fresh write was audited in its transaction."""
    if written.replayed:
        return Reply(written.body, written.status, {"Idempotent-Replayed": "true", **etag(written.revision)})
    request[AUDITED] = True
    extra = etag(written.revision) if written.status in (200, 201) else {}
    return Reply(written.body, written.status, {**written.headers, **extra, **(headers or {})})


async def write(
    request: web.Request,
    ops: list[Op],
    *,
    status: int,
    respond: Callable[[int], Any],
    kind_name: str,
    headers: Callable[[int], dict[str, str]] | None = None,
) -> Reply:
    """Commit ``ops`` through the service write layer (:func:`minicloud.core.write.commit`: audit entry and
    ``Idempotency-Key`` record in the same transaction) and answer with ``respond(revision)``."""
    written = await core_write.commit(
        await context_of(request), request.app[STORE], ops, respond=respond, status=status, label=kind_name
    )
    if written.replayed:
        return reply(request, written)
    request[AUDITED] = True
    return Reply(written.body, status, headers(written.revision) if headers else {})


async def create(
    request: web.Request, kind: Kind, record: Record, *, respond: Callable[[Record], Any] | None = None
) -> Reply:
    """``POST /v1/<plural>``: commit the new ``record`` (through :func:`write`, so idempotency and audit apply) and
    answer 201 with its view — or ``respond(record)``, e.g. to add a one-time secret — and Location and ETag."""
    render = respond or kind.view
    return await write(
        request,
        [Create(record)],
        status=201,
        kind_name=kind.name,
        respond=lambda rev: render(msgspec.structs.replace(record, revision=rev)),
        headers=lambda rev: {"Location": f"/v1/{kind.plural}/{record.id}", **etag(rev)},
    )


async def _idempotency(request: web.Request) -> tuple[str, str] | None:
    """(record id, request fingerprint) of the request's ``Idempotency-Key`` (POST only), None without one."""
    key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
    if key is None:
        return None
    if not (1 <= len(key) <= 255 and key.isprintable()):
        raise errors.BadRequest("Idempotency-Key must be 1-255 printable characters, e.g. a UUID")
    # Scoped to the caller *and the project*: the same key in another project is another request, never a replay
    # of this project's reply. The fingerprint covers the whole query (sorted), so the same key with other
    # parameters is refused (422) instead of replayed.
    scope = f"{principal_of(request).ref}\0{project_of(request)}\0{key}"
    idem_id = "idem-" + hashlib.sha256(scope.encode()).hexdigest()[:40]
    query = _enc.encode(sorted(request.query.items()))
    request_line = f"{request.method} {request.path}\0".encode() + query + b"\0"
    fingerprint = hashlib.sha256(request_line + await request.read()).hexdigest()
    return idem_id, fingerprint


async def replayed(request: web.Request) -> Reply | None:
    """The stored reply when this request repeats an ``Idempotency-Key`` already answered, else None. Handlers that
    check something before :func:`write` (a name already taken, say) ask this first, so that a retry gets the
    first answer rather than a conflict with its own result."""
    written = await core_write.replay(await context_of(request), request.app[STORE])
    return reply(request, written) if written is not None else None


def delete_op(record: Record, expect: int | None) -> Delete:
    return Delete(kind=record.kind, id=record.id, expect_revision=expect if expect is not None else record.revision)


async def delete(request: web.Request, kind: Kind, record: Record | None = None) -> Reply:
    """``DELETE /v1/<plural>/{ref}``: remove the record (``If-Match`` honoured); 204."""
    record = record if record is not None else await resolve(request, kind)
    return await write(
        request, [delete_op(record, if_match(request))], status=204, kind_name=kind.name, respond=lambda rev: None
    )


_UPDATE_ATTEMPTS = 5


async def update(request: web.Request, kind: Kind, mutate: Callable[[Record], Record]) -> Reply:
    """``PATCH``-style read-modify-write of the ``{ref}`` record with ``mutate(record) -> record``.

    With ``If-Match`` the write is conditional on that revision (412 if stale). Without it, a concurrent change is
    not lost either: the write is a compare-and-swap on the revision just read, retried on a fresh read.
    """
    expect = if_match(request)
    for attempt in range(_UPDATE_ATTEMPTS):
        record = await resolve(request, kind)
        updated = msgspec.structs.replace(mutate(record), updated_at=ids.now())
        try:
            return await write(
                request,
                [Update(updated, expect_revision=expect if expect is not None else record.revision)],
                status=200,
                kind_name=kind.name,
                respond=lambda rev, u=updated: kind.view(msgspec.structs.replace(u, revision=rev)),
                headers=etag,
            )
        except errors.PreconditionFailed:
            if expect is not None:
                raise
            if attempt == _UPDATE_ATTEMPTS - 1:
                raise errors.Conflict(f"the {kind.name} kept changing while this request ran; retry it") from None
    raise AssertionError("unreachable")


async def show(request: web.Request, kind: Kind) -> Reply:
    """``GET /v1/<plural>/{ref}``: the record's view, with its revision as ETag."""
    record = await resolve(request, kind)
    return Reply(kind.view(record), headers=etag(record.revision))


async def update_description_labels(request: web.Request, kind: Kind, body: Any) -> Reply:
    """``PATCH /v1/<plural>/{ref}`` for resources whose only mutable fields are ``description`` and ``labels``
    (JSON merge patch: absent fields stay; honours If-Match)."""

    def mutate(record: Record) -> Record:
        spec = dict(record.spec)
        if body.description is not msgspec.UNSET:
            spec["description"] = body.description
        labels = record.labels if body.labels is msgspec.UNSET else body.labels
        return msgspec.structs.replace(record, spec=spec, labels=labels)

    return await update(request, kind, mutate)


def etag(revision: int) -> dict[str, str]:
    return {"ETag": f'"{revision}"'}
