"""Middlewares: request ids, problem+json for every error, and authentication with the route's declared auth.

Order (outermost first): ``problem_middleware`` turns anything raised below it into RFC 9457 problem+json (unknown
exceptions become a 500 with the request id logged, never a traceback); ``auth_middleware`` identifies the caller and
enforces the route's declaration from :mod:`minicloud.api.routing`.
"""

from __future__ import annotations

import logging
import os
import socket

import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api import auth
from minicloud.api.keys import STORE
from minicloud.api.routing import PROBLEM_JSON, SPECS_BY_HANDLER, Action, Authenticated
from minicloud.iam import audit
from minicloud.state import Create, Record, Txn

log = logging.getLogger("minicloud.api")
_enc = msgspec.json.Encoder()
REQUEST_ID = web.RequestKey("request_id", str)
#: The project a request acts in (set by ``resources.project_of``).
PROJECT = web.RequestKey("project", str)


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
    with its change (see ``resources.write``). Writing the entry never changes the response."""
    response = await handler(request)
    status = response.status
    denied = status in (401, 403)
    if auth.ACTION not in request or request.get(auth.AUDITED) or not (denied or request.method in MUTATING):
        return response
    result = "denied" if denied else "failed" if status >= 400 else "allowed"
    try:
        await request.app[STORE].commit(Txn([Create(audit_entry(request, result, status))]))
    except Exception:  # the store is unwritable (no quorum): the request's own outcome stands; the log says so
        log.warning("audit entry not written", extra={"request_id": request.get(REQUEST_ID), "status": status})
    return response


def audit_entry(request: web.Request, result: str, status: int, target: dict[str, str] | None = None) -> Record:
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
    principal = await auth.authenticate(request, unix=via_unix_socket(request))
    request[auth.PRINCIPAL] = principal
    auth.rate_limit(request, principal)
    if isinstance(spec.auth, Action | Authenticated) and principal is None:
        raise errors.Unauthenticated(
            "this endpoint needs credentials: send 'Authorization: Bearer <api key>' "
            "(create one with `minicloud apikey create` on the node), or use the local Unix socket as root",
            headers={"WWW-Authenticate": 'Bearer realm="minicloud"'},
        )
    from minicloud.api.resources import resolve_project  # resources imports this module

    await resolve_project(request)
    if isinstance(spec.auth, Action):
        assert principal is not None
        await auth.authorize(request, principal, spec.auth.name, request[PROJECT])
    return await handler(request)
