"""Route declarations: method, path, types and authorisation in one place, next to each handler.

Each API module makes one :class:`Routes` table and declares its handlers with it::

    routes = Routes("keypairs")

    @routes.post("/v1/keypairs", body=KeyPairCreate, response=KeyPair, status=201, auth=Action("keypairs:create"))
    async def create_keypair(request, body): ...

The declaration is the single source for three things: request decoding (body and query are decoded strictly into the
declared msgspec types, so handlers only ever see valid input), authorisation (``auth`` is a required argument, so a
route cannot be declared without one) and the OpenAPI document, which is generated from these declarations.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from minicloud import errors

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
_enc = msgspec.json.Encoder()


@dataclass(frozen=True)
class Public:
    """Anyone may call the route, authenticated or not (health, version, CA certificate)."""


@dataclass(frozen=True)
class Action:
    """The caller must be authenticated and allowed to perform ``name`` (``service:resource:verb``)."""

    name: str


@dataclass(frozen=True)
class Authenticated:
    """Any authenticated caller, whatever their roles (e.g. logging out of one's own session)."""


Auth = Public | Action | Authenticated
PUBLIC = Public()
AUTHENTICATED = Authenticated()


@dataclass
class Reply:
    """A handler's answer when it needs a status or headers other than the route's defaults."""

    body: Any
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    handler: Handler
    auth: Auth
    tag: str
    summary: str
    body: type | None = None
    query: type | None = None
    response: Any = None
    status: int = 200
    websocket: bool = False

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{(\w+)", self.path)


class Routes:
    """The routes of one API module. ``register(app)`` adds them to an application."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.specs: list[RouteSpec] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        auth: Auth,
        body: type | None = None,
        query: type | None = None,
        response: Any = None,
        status: int = 200,
        websocket: bool = False,
    ) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            summary = (handler.__doc__ or handler.__name__).strip().splitlines()[0]
            self.specs.append(
                RouteSpec(method, path, handler, auth, self.tag, summary, body, query, response, status, websocket)
            )
            return handler

        return decorate

    def get(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **kw)

    def register(self, app: web.Application) -> None:
        for spec in self.specs:
            resource_route = app.router.add_route(spec.method, spec.path, _wrap(spec))
            SPECS_BY_HANDLER[resource_route.handler] = spec


#: Maps every wrapped handler to its declaration: the auth middleware and the route-coverage test read it.
SPECS_BY_HANDLER: dict[Any, RouteSpec] = {}


def undeclared_routes(app: web.Application) -> list[str]:
    """Routes of ``app`` that were not declared through :class:`Routes` (and so have no authorisation)."""
    return [
        f"{r.method} {r.resource.canonical if r.resource else '?'}"
        for r in app.router.routes()
        if r.method != "HEAD" and r.handler not in SPECS_BY_HANDLER
    ]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_enc.encode(body), status=status, content_type=JSON, headers=headers)


def _explain_validation(exc: msgspec.ValidationError, where: str) -> errors.MinicloudError:
    """Turn msgspec's message ("Expected `int`, got `str` - at `$.limit`") into a problem naming the field."""
    message = str(exc)
    m = re.search(r" - at `(key` in `)?\$(.*)`$", message)
    reason = message[: m.start()] if m else message
    if m and m[1]:
        reason = "a key: " + reason
    field_path = (m[2].lstrip(".") if m else "") or where
    if reason.startswith("Object contains unknown field"):
        unknown = re.search(r"`([^`]*)`", reason)
        name = (field_path + "." if field_path != where else "") + (unknown[1] if unknown else "")
        return errors.ValidationFailed(
            f"unknown field '{name}' in the {where}; remove it (see GET /v1/openapi.json for the accepted fields)",
            invalid_params=[{"name": name, "reason": "unknown field"}],
        )
    if reason.startswith("Object missing required field"):
        missing = re.search(r"`([^`]*)`", reason)
        name = (field_path + "." if field_path != where else "") + (missing[1] if missing else "")
        return errors.ValidationFailed(
            f"the {where} is missing the required field '{name}'",
            invalid_params=[{"name": name, "reason": "required"}],
        )
    return errors.ValidationFailed(
        f"invalid value for '{field_path}' in the {where}: {reason}",
        invalid_params=[{"name": field_path, "reason": reason}],
    )


async def decode_body(request: web.Request, body_type: type) -> Any:
    """Read and strictly decode the JSON body. Every failure is a 4xx problem that says what to change."""
    ctype = request.content_type
    if ctype not in (JSON, "application/merge-patch+json"):
        raise errors.UnsupportedMediaType(
            f"the request body must be JSON; send 'Content-Type: application/json' (got '{ctype or 'none'}')"
        )
    max_size = request.app[_MAX_BODY]
    if request.content_length is not None and request.content_length > max_size:
        raise errors.PayloadTooLarge(
            f"the body is {request.content_length} bytes; the limit is {max_size} (api.max_body_bytes)"
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.PayloadTooLarge(
            f"the body is larger than the limit of {max_size} bytes (api.max_body_bytes)"
        ) from None
    if not raw:
        raise errors.BadRequest("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        raise _explain_validation(exc, "body") from None
    except msgspec.DecodeError as exc:
        raise errors.BadRequest(f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise errors.BadRequest(f"the body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8") from None


def decode_query(request: web.Request, query_type: type) -> Any:
    params: dict[str, Any] = {}
    for key in request.query:
        if key == "project":  # every route takes it; resources.resolve_project validates it
            continue
        values = request.query.getall(key)
        if len(values) > 1:
            raise errors.ValidationFailed(
                f"query parameter '{key}' is given {len(values)} times; give it once",
                invalid_params=[{"name": key, "reason": "repeated"}],
            )
        params[key] = values[0]
    try:
        return msgspec.convert(params, query_type, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain_validation(exc, "query string") from None


_MAX_BODY = web.AppKey("max_body_bytes", int)


def _wrap(spec: RouteSpec) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        kwargs: dict[str, Any] = {}
        if spec.body is not None:
            kwargs["body"] = await decode_body(request, spec.body)
        if spec.query is not None:
            kwargs["query"] = decode_query(request, spec.query)
        elif (extra := [k for k in request.query if k != "project"]) and not spec.websocket:
            raise errors.ValidationFailed(
                f"{spec.method} {spec.path} takes no query parameters but 'project'; remove '?{request.query_string}'",
                invalid_params=[{"name": k, "reason": "unknown parameter"} for k in extra],
            )
        result = await spec.handler(request, **kwargs)
        if isinstance(result, web.StreamResponse):
            return result
        if isinstance(result, Reply):
            if result.status == 204:
                return web.Response(status=204, headers=result.headers)
            return json_response(result.body, result.status or spec.status, result.headers)
        if spec.status == 204:
            return web.Response(status=204)
        return json_response(result, spec.status)

    handler.__name__ = spec.handler.__name__
    handler.__qualname__ = spec.handler.__qualname__
    return handler


def set_max_body(app: web.Application, size: int) -> None:
    app[_MAX_BODY] = size
