"""The HTTP side of the platform kernel, implemented once for every route.

- ``context_of``: the service :class:`~minicloud.core.context.Context` of a request (principal, project, action,
  request id, ``Idempotency-Key`` scoped to caller + project, sealed with the node's key store).
- ``reply``: a service's :class:`~minicloud.core.write.Written` as an HTTP answer (ETag, Location, replay header).
- ``resolve_project``: ``?project=`` validated (an unknown project is 404, whoever asks).
- ``ListQuery`` + ``parse_selector``: paging and ``name``/``label`` filters of every list.
- ``if_match``: ``If-Match: <revision>`` for optimistic concurrency.

Services (``minicloud/<domain>/``) do the rest; they never see a request.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any

import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api.auth import ACTION, AUDITED, principal_of
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.middleware import PROJECT, REQUEST_ID
from minicloud.api.routing import Reply
from minicloud.core import crud
from minicloud.core import write as core_write
from minicloud.core.context import DEFAULT_PROJECT, Context, Idempotency
from minicloud.core.write import Written
from minicloud.iam.kinds import PROJECT as PROJECT_KIND
from minicloud.model import LABEL_KEY_PATTERN, NAME_PATTERN

#: The request's service context, built once (:func:`context_of`).
CONTEXT = web.RequestKey("context", Context)
__all__ = ["DEFAULT_PROJECT"]
_enc = msgspec.json.Encoder()


class ListQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    cursor: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    name: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    label: Annotated[str, msgspec.Meta(max_length=2048, description="label selector: k=v[,k2=v2]")] | None = None


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


def project_of(request: web.Request) -> str:
    """The project a request acts in: ``?project=P``, else ``default`` (validated by :func:`resolve_project`)."""
    return request.get(PROJECT, DEFAULT_PROJECT)


async def resolve_project(request: web.Request) -> str:
    """Validate ``?project=`` and remember it on the request. An unknown project is 404, whoever asks."""
    name = request.query.get("project", DEFAULT_PROJECT)
    if name != DEFAULT_PROJECT and (
        not re.fullmatch(NAME_PATTERN, name)
        or await crud.find(Context.system("api"), request.app[STORE], PROJECT_KIND, name) is None
    ):
        shown = name[:64].encode("unicode_escape").decode()
        raise errors.NotFound(f"no project named '{shown}'; see `minicloud project list`")
    request[PROJECT] = name
    return name


def if_match(request: web.Request) -> int | None:
    """The revision in ``If-Match`` (``"12"``, ``12`` or ``W/"12"``), None when absent, ``*`` means any."""
    value = request.headers.get("If-Match")
    if value is None or value.strip() == "*":
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit() or len(text) > 18:
        raise errors.BadRequest(f'If-Match must be a resource revision such as "12" (got {value!r})')
    return int(text)


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
    check something before they write (a name already taken, say) ask this first, so that a retry gets the
    first answer rather than a conflict with its own result."""
    written = await core_write.replay(await context_of(request), request.app[STORE])
    return reply(request, written) if written is not None else None


def etag(revision: int) -> dict[str, str]:
    return {"ETag": f'"{revision}"'}
