"""``/v1/operations``: long-running work started by other endpoints (``202 Accepted`` answers point here)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.keys import OPERATIONS, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.core import crud
from minicloud.core.operation import OPERATION
from minicloud.model import Operation, Page

routes = Routes("operations")


class OperationListQuery(res.ListQuery, forbid_unknown_fields=True, kw_only=True):
    state: Literal["running", "succeeded", "failed"] | None = None


class WaitQuery(msgspec.Struct, forbid_unknown_fields=True):
    wait: Annotated[float, msgspec.Meta(ge=0, le=300, description="seconds to wait for the operation to end")] = 0


@routes.get("/v1/operations", query=OperationListQuery, response=Page[Operation], auth=Action("operations:list"))
async def list_operations(request: web.Request, query: OperationListQuery) -> Page[Operation]:
    """List operations (optionally only those in one state)."""
    result = await crud.list_objects(
        await res.context_of(request),
        request.app[STORE],
        OPERATION,
        limit=query.limit,
        cursor=query.cursor,
        name=query.name,
        labels=res.parse_selector(query.label),
    )
    items = [OPERATION.to_view(op) for op in result.items if not query.state or op.status.state == query.state]
    return Page(items=items, next_cursor=result.next_cursor)


@routes.get("/v1/operations/{ref}", query=WaitQuery, response=Operation, auth=Action("operations:get"))
async def show_operation(request: web.Request, query: WaitQuery) -> Reply:
    """Show an operation; with ?wait=SECONDS, answer as soon as it ends (or when the time is up)."""
    op = await crud.get(await res.context_of(request), request.app[STORE], OPERATION, request.match_info["ref"])
    if query.wait and op.status.state == "running":
        waited = await request.app[OPERATIONS].wait(op.id, query.wait)
        if waited is None:
            raise errors.NotFound(f"operation {op.id} was deleted while waiting")
        op = OPERATION.load(waited)
    return Reply(OPERATION.to_view(op), headers=res.etag(op.revision))


@routes.delete("/v1/operations/{ref}", status=204, auth=Action("operations:delete"))
async def delete_operation(request: web.Request) -> Reply:
    """Forget a finished operation."""
    ctx = await res.context_of(request)
    store = request.app[STORE]
    op = await crud.get(ctx, store, OPERATION, request.match_info["ref"])
    if op.status.state == "running":
        raise errors.Conflict(f"operation {op.id} is still running; wait for it to finish before deleting it")
    return res.reply(request, await crud.delete_obj(ctx, store, OPERATION, op, expect=res.if_match(request)))
