"""Middlewares: request ids, problem+json for every error, and authentication with the route's declared auth.

Order (outermost first): ``audit_middleware`` records what needs recording; ``problem_middleware`` turns anything
raised below it into RFC 9457 problem+json (unknown exceptions become a 500 with the request id logged, never a
traceback); ``auth_middleware`` identifies the caller and enforces the route's declaration from
:mod:`minicloud.api.routing`.

Floods of bad credentials are cheap to refuse: each source address has a bucket of failed authentications
(``api.auth_failure_rps``/``auth_failure_burst``), checked *before* authenticating and charged by every ``401``; once
it is spent the source gets ``429`` without a store read. Refusals (``401``, ``429``) are audited in aggregate — one
entry per source and minute with a ``count`` (:class:`minicloud.iam.audit.RefusalAggregator`, flushed by
:func:`refusals_ctx`) — never one durable write per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from minicloud import errors, ids
from minicloud.api import auth
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import PROBLEM_JSON, SPECS_BY_HANDLER, Action, Authenticated
from minicloud.iam import audit
from minicloud.iam.ratelimit import RateLimiter, too_many_requests

log = logging.getLogger("minicloud.api")
_enc = msgspec.json.Encoder()
REQUEST_ID = web.RequestKey("request_id", str)
#: The project a request acts in (set by ``resources.project_of``).
PROJECT = web.RequestKey("project", str)
#: Failed authentications per source address (checked before authenticating, charged by each 401).
AUTH_FAILURES = web.AppKey("auth_failures", RateLimiter)
#: Refused requests (401, 429) counted in memory, written as one audit entry per source and minute.
REFUSALS = web.AppKey("refusals", audit.RefusalAggregator)
#: How often finished minutes of refusals are written.
REFUSALS_FLUSH_INTERVAL = 10.0
#: Salted hashes (``hash()``) of Authorization headers that authenticated lately: they skip the failure check.
_GOOD_CREDENTIALS = web.AppKey("good_credentials", OrderedDict)
_MAX_GOOD_CREDENTIALS = 10_000


def _remember(good: OrderedDict[int, None], credential: int) -> None:
    if credential in good:
        good.move_to_end(credential)
        return
    good[credential] = None
    if len(good) > _MAX_GOOD_CREDENTIALS:
        good.popitem(last=False)


def problem_response(exc: errors.MinicloudError, request: web.Request) -> web.Response:
    body = exc.to_problem(instance=request.path)
    body["request_id"] = request.get(REQUEST_ID, "")
    headers = dict(exc.headers)
    return web.Response(body=_enc.encode(body), status=exc.status, content_type=PROBLEM_JSON, headers=headers)


_HTTP_EXCEPTIONS: dict[int, type[errors.MinicloudError]] = {
    400: errors.BadRequest,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
}


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> errors.MinicloudError:
    cls = _HTTP_EXCEPTIONS.get(exc.status, errors.BadRequest if exc.status < 500 else errors.MinicloudError)
    if exc.status == 404:
        return errors.NotFound(f"there is no API endpoint at {request.path}; see GET /v1/openapi.json for the API")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return errors.MethodNotAllowed(
            f"{request.method} is not supported on {request.path}; use one of: {allowed}",
            headers={"Allow": allowed},
        )
    if exc.status == 413:
        return errors.PayloadTooLarge("the request body is too large (api.max_body_bytes)")
    err = cls(exc.text or exc.reason)
    err.status = exc.status  # type: ignore[misc]
    return err


@web.middleware
async def problem_middleware(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")
    if not (0 < len(rid) <= 64 and rid.isprintable()):
        rid = os.urandom(8).hex()
    request[REQUEST_ID] = rid
    try:
        response = await handler(request)
    except errors.MinicloudError as exc:
        response = problem_response(exc, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = problem_response(_from_http_exception(exc, request), request)
    except Exception:
        log.exception("unhandled error", extra={"request_id": rid, "path": request.path, "method": request.method})
        response = problem_response(
            errors.MinicloudError(f"an internal error occurred; the agent log has the details under request id {rid}"),
            request,
        )
    if not response.prepared:
        response.headers["X-Request-Id"] = rid
        store = request.app.get(STORE)
        if store is not None and getattr(store, "stale", False):
            # This node has lost contact with the cluster's quorum: what it serves may be out of date.
            response.headers["X-Minicloud-Stale"] = "true"
    return response


def via_unix_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@web.middleware
async def audit_middleware(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    """Outermost: record every mutating request and every denied one whose entry was not already written together
    with its change (``minicloud.core.write.commit``). Writing the entry never changes the response."""
    response = await handler(request)
    status = response.status
    denied = status in (401, 403)
    if auth.ACTION not in request or request.get(auth.AUDITED) or not (denied or request.method in MUTATING):
        return response
    result = "denied" if denied else "failed" if status >= 400 else "allowed"
    refusals = request.app.get(REFUSALS)
    if status in (401, 429) and refusals is not None:  # refused before any work: counted, written once a minute
        principal = request.get(auth.PRINCIPAL)
        refusals.note(
            source=request.remote or "unix",
            principal=principal.ref if principal is not None else "anonymous",
            project=request.get(PROJECT, ""),
            action=request.get(auth.ACTION, ""),
            method=request.method,
            path=request.path,
            result=result,
            status=status,
            request_id=request.get(REQUEST_ID, ""),
        )
        return response
    try:
        await audit.append(request.app[STORE], [audit_entry(request, result, status)])
    except Exception:  # the store is unwritable (no quorum): the request's own outcome stands; the log says so
        log.warning("audit entry not written", extra={"request_id": request.get(REQUEST_ID), "status": status})
    return response


async def flush_refusals(app: web.Application, *, everything: bool = False, now: float | None = None) -> int:
    """Write the aggregated refusals of the minutes that are over (all of them with ``everything``) in one
    transaction; returns how many entries. An unwritable store (no quorum) loses them, and the log says so."""
    refusals = app.get(REFUSALS)
    records = refusals.drain(now, everything=everything) if refusals is not None else []
    if records:
        try:
            await audit.append(app[STORE], records)
        except Exception:
            log.warning("aggregated refusal audit entries not written", extra={"entries": len(records)})
            return 0
    return len(records)


async def refusals_ctx(app: web.Application) -> AsyncIterator[None]:
    """The failed-authentication limiter and the refusal aggregator, flushed every
    :data:`REFUSALS_FLUSH_INTERVAL` seconds and once more (everything) at shut-down, before the store closes."""
    api = app[CONFIG].api
    app[AUTH_FAILURES] = RateLimiter(api.auth_failure_rps, api.auth_failure_burst)
    app[REFUSALS] = audit.RefusalAggregator()
    app[_GOOD_CREDENTIALS] = OrderedDict()

    async def loop() -> None:
        while True:
            await asyncio.sleep(REFUSALS_FLUSH_INTERVAL)
            await flush_refusals(app)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await flush_refusals(app, everything=True)


def audit_entry(request: web.Request, result: str, status: int, target: dict[str, str] | None = None) -> audit.Record:
    principal = request.get(auth.PRINCIPAL)
    return audit.entry(
        principal=principal.ref if principal is not None else "anonymous",
        project=request.get(PROJECT, ""),
        action=request.get(auth.ACTION, ""),
        method=request.method,
        path=request.path,
        target=target or {},
        result=result,
        status=status,
        request_id=request.get(REQUEST_ID, ""),
        source=request.remote or "unix",
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    spec = SPECS_BY_HANDLER.get(request.match_info.handler)
    if spec is None:  # aiohttp's own 404/405 handlers
        return await handler(request)
    request[auth.ACTION] = (
        spec.auth.name
        if isinstance(spec.auth, Action)
        else "authenticated"
        if isinstance(spec.auth, Authenticated)
        else "public"
    )
    unix = via_unix_socket(request)
    failures = None if unix else request.app.get(AUTH_FAILURES)
    source = request.remote or ""
    credential = hash(request.headers.get("Authorization"))
    if failures is not None and (wait := failures.wait(source)) and credential not in request.app[_GOOD_CREDENTIALS]:
        # Checked before authenticating: a flood of bad credentials costs neither a store read nor an audit write.
        # A credential that authenticated before is still tried (and fully checked), so a flood from a shared
        # address does not lock out the clients behind it that hold valid keys.
        raise too_many_requests(
            wait, f"too many failed authentications from {source}; retry in {int(wait)} s with valid credentials"
        )
    try:
        principal = await auth.authenticate(request, unix=unix)
        request[auth.PRINCIPAL] = principal
        if principal is not None and failures is not None:
            _remember(request.app[_GOOD_CREDENTIALS], credential)
        auth.rate_limit(request, principal)
        if isinstance(spec.auth, Action | Authenticated) and principal is None:
            # No credentials at all is not a guess: not charged to the source (its anonymous bucket limits it).
            failures = None
            raise errors.Unauthenticated(
                "this endpoint needs credentials: send 'Authorization: Bearer <api key>' "
                "(create one with `minicloud apikey create` on the node), or use the local Unix socket as root",
                headers={"WWW-Authenticate": 'Bearer realm="minicloud"'},
            )
        if isinstance(spec.auth, Action):
            from minicloud.api.resources import resolve_project  # resources imports this module

            # Only routes that act in a project resolve ?project=, and only once the caller is authenticated: public
            # and merely-authenticated routes ignore it, so nobody can probe which projects exist.
            await resolve_project(request)
            assert principal is not None
            await auth.authorize(request, principal, spec.auth.name, request[PROJECT])
            if request.method == "POST":  # an enforced budget that is spent refuses new billable resources (409)
                from minicloud.billing.budgets import refuse_if_exhausted

                await refuse_if_exhausted(
                    request.app[STORE], request[PROJECT], spec.auth.name, ids.parse_time(ids.now())
                )
        return await handler(request)
    except errors.Unauthenticated:  # bad credentials, or a wrong password at login
        if failures is not None:
            failures.take(source)
        raise
