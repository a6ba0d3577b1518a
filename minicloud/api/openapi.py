"""The OpenAPI 3.1 document, generated from the route declarations and the msgspec types they name."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from minicloud import __version__
from minicloud.api.routing import SPECS_BY_HANDLER, Action, Authenticated, RouteSpec
from minicloud.model import Problem

_CACHE = web.AppKey("openapi_cache", dict)
_PROJECT_PARAMETER = {
    "name": "project",
    "in": "query",
    "required": False,
    "description": "the project the request acts in (default: 'default')",
    "schema": {"type": "string"},
}


def _query_parameters(spec: RouteSpec, components: dict[str, Any], schemas: dict[type, Any]) -> list[dict[str, Any]]:
    if spec.query is None:
        return []
    schema = schemas[spec.query]
    ref = schema["$ref"].rsplit("/", 1)[1]
    props = components[ref].get("properties", {})
    required = set(components[ref].get("required", []))
    return [{"name": name, "in": "query", "required": name in required, "schema": prop} for name, prop in props.items()]


def build(specs: list[RouteSpec]) -> dict[str, Any]:
    types: list[Any] = [Problem]
    for s in specs:
        types += [t for t in (s.body, s.query, s.response) if t is not None]
    unique = list(dict.fromkeys(types))
    schemas, components = msgspec.json.schema_components(unique, ref_template="#/components/schemas/{name}")
    by_type = dict(zip(unique, schemas, strict=True))
    problem = {"application/problem+json": {"schema": by_type[Problem]}}
    paths: dict[str, dict[str, Any]] = {}
    for s in specs:
        op: dict[str, Any] = {
            "operationId": s.handler.__name__,
            "summary": s.summary,
            "tags": [s.tag],
            "parameters": [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in s.path_params
            ]
            + _query_parameters(s, components, by_type)
            + [_PROJECT_PARAMETER],
            "responses": {"default": {"description": "an error", "content": problem}},
        }
        if isinstance(s.auth, Action):
            op["x-minicloud-action"] = s.auth.name
            op["security"] = [{"bearer": []}]
        elif isinstance(s.auth, Authenticated):
            op["security"] = [{"bearer": []}]
        else:
            op["security"] = []
        if s.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": by_type[s.body]}},
            }
        if s.websocket:
            op["description"] = "WebSocket endpoint: each text message is one JSON object of the response schema."
        ok: dict[str, Any] = {"description": "success"}
        if s.response is not None:
            ok["content"] = {"application/json": {"schema": by_type[s.response]}}
        op["responses"][str(s.status)] = ok
        paths.setdefault(s.path, {})[s.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "minicloud API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an API key"}},
        },
    }


def app_specs(app: web.Application) -> list[RouteSpec]:
    specs = []
    for route in app.router.routes():
        spec = SPECS_BY_HANDLER.get(route.handler)
        if spec is not None and route.method != "HEAD":
            specs.append(spec)
    return specs


def document(app: web.Application) -> dict[str, Any]:
    cache = app[_CACHE]
    if "doc" not in cache:
        cache["doc"] = build(app_specs(app))
    return cache["doc"]


def install(app: web.Application) -> None:
    app[_CACHE] = {}
