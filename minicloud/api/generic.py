"""HTTP routes derived from a kind's declaration: ``GET /v1/<plural>``, ``GET|PATCH|DELETE /v1/<plural>/{ref}``.

Each handler is three steps — build the :class:`~minicloud.core.context.Context` from the request, call the generic
service (:mod:`minicloud.core.crud`), render — and each route declares its authorisation
(``<action>:list|get|update|delete``), its types and so its OpenAPI entry, like every hand-written route.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Handler, Reply, Routes
from minicloud.core import crud
from minicloud.core.kinds import Kind
from minicloud.model import Page


def _named(handler: Handler, name: str, doc: str) -> Handler:
    handler.__name__ = handler.__qualname__ = name
    handler.__doc__ = doc
    return handler


def add_crud_routes(routes: Routes, kind: Kind[Any, Any]) -> Routes:
    """Declare on ``routes`` the generic verbs ``kind.generic`` names. Returns ``routes``."""
    assert kind.view is not None, f"kind {kind.name} has no view: it cannot have routes"
    base = f"/v1/{kind.plural}"
    singular = kind.plural.rstrip("s").replace("-", "_")
    title = kind.label

    if "list" in kind.generic:

        async def list_(request: web.Request, query: res.ListQuery) -> Page[Any]:
            ctx = await res.context_of(request)
            result = await crud.list_objects(
                ctx,
                request.app[STORE],
                kind,
                limit=query.limit,
                cursor=query.cursor,
                name=query.name,
                labels=res.parse_selector(query.label),
            )
            return Page(items=[kind.to_view(o) for o in result.items], next_cursor=result.next_cursor)

        routes.get(base, query=res.ListQuery, response=Page[kind.view], auth=Action(kind.actions("list")))(
            _named(list_, f"list_{kind.plural.replace('-', '_')}", f"List {title}s (paged; name and label filters).")
        )

    if "show" in kind.generic:

        async def show(request: web.Request) -> Reply:
            ctx = await res.context_of(request)
            obj = await crud.get(ctx, request.app[STORE], kind, request.match_info["ref"])
            return Reply(kind.to_view(obj), headers=res.etag(obj.revision))

        routes.get(f"{base}/{{ref}}", response=kind.view, auth=Action(kind.actions("get")))(
            _named(show, f"show_{singular}", f"Show a {title} by id or name.")
        )

    if "patch" in kind.generic and kind.patch is not None:

        async def patch(request: web.Request, body: Any) -> Reply:
            ctx = await res.context_of(request)
            written = await crud.patch(
                ctx, request.app[STORE], kind, request.match_info["ref"], body, expect=res.if_match(request)
            )
            return res.reply(request, written)

        routes.patch(f"{base}/{{ref}}", body=kind.patch, response=kind.view, auth=Action(kind.actions("update")))(
            _named(
                patch,
                f"update_{singular}",
                f"Change a {title}'s description or labels (JSON merge patch; honours If-Match).",
            )
        )

    if "delete" in kind.generic:

        async def delete(request: web.Request) -> Reply:
            ctx = await res.context_of(request)
            written = await crud.delete(
                ctx, request.app[STORE], kind, request.match_info["ref"], expect=res.if_match(request)
            )
            return res.reply(request, written)

        routes.delete(f"{base}/{{ref}}", status=204, auth=Action(kind.actions("delete")))(
            _named(delete, f"delete_{singular}", f"Delete a {title} (honours If-Match).")
        )
    return routes
