"""``/v1/operations``: long-running work started by other endpoints (``202 Accepted`` answers point here)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.keys import OPERATIONS
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model import Operation, Page, Problem, Progress
from minicloud.operations import KIND as OP_KIND
from minicloud.state import Record

routes = Routes("operations")


def view(r: Record) -> Operation:
    st = r.status
    error = st.get("error")
    return Operation(
        **r.common_fields(),
        action=r.spec["action"],
        target=r.spec.get("target", {}),
        node=r.spec.get("node", ""),
        state=st["state"],
        progress=msgspec.convert(st.get("progress", {}), Progress),
        result=st.get("result"),
        error=msgspec.convert(error, Problem) if error else None,
    )


KIND = res.register_kind(res.Kind(OP_KIND, "operations", "op", view, "operation"))


class OperationListQuery(res.ListQuery, forbid_unknown_fields=True, kw_only=True):
    state: Literal["running", "succeeded", "failed"] | None = None


class WaitQuery(msgspec.Struct, forbid_unknown_fields=True):
    wait: Annotated[float, msgspec.Meta(ge=0, le=300, description="seconds to wait for the operation to end")] = 0


@routes.get("/v1/operations", query=OperationListQuery, response=Page[Operation], auth=Action("operations:list"))
async def list_operations(request: web.Request, query: OperationListQuery) -> Page[Operation]:
    """List operations (optionally only those in one state)."""
    page = await res.list_page(request, KIND, query)
    if query.state:
        page.items = [op for op in page.items if op.state == query.state]
    return page


@routes.get("/v1/operations/{ref}", query=WaitQuery, response=Operation, auth=Action("operations:get"))
async def show_operation(request: web.Request, query: WaitQuery) -> Reply:
    """Show an operation; with ?wait=SECONDS, answer as soon as it ends (or when the time is up)."""
    record = await res.resolve(request, KIND)
    if query.wait and record.status.get("state") == "running":
        waited = await request.app[OPERATIONS].wait(record.id, query.wait)
        if waited is None:
            raise errors.NotFound(f"operation {record.id} was deleted while waiting")
        record = waited
    return Reply(view(record), headers=res.etag(record.revision))


@routes.delete("/v1/operations/{ref}", status=204, auth=Action("operations:delete"))
async def delete_operation(request: web.Request) -> Reply:
    """Forget a finished operation."""
    record = await res.resolve(request, KIND)
    if record.status.get("state") == "running":
        raise errors.Conflict(f"operation {record.id} is still running; wait for it to finish before deleting it")
    return await res.delete(request, KIND, record)
