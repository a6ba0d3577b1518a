"""``/v1/audit``: the append-only audit log (every mutating request and every denied one), newest last.

Refused requests (401, 429) appear once per source and minute with their ``count`` (see
:class:`minicloud.iam.audit.RefusalAggregator`)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from aiohttp import web

from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Routes
from minicloud.iam import audit
from minicloud.model import AuditEntry, Page

routes = Routes("audit")


class AuditQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    since: (
        Annotated[str, msgspec.Meta(max_length=64, description="RFC 3339 time, or a duration back: 90s 15m 2h 7d")]
        | None
    ) = None
    user: (
        Annotated[
            str, msgspec.Meta(max_length=300, description="principal, e.g. local:root, user:alice, serviceaccount:ci")
        ]
        | None
    ) = None
    result: Literal["allowed", "denied", "failed"] | None = None
    in_project: Annotated[str, msgspec.Meta(max_length=63, description="only entries of this project")] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    cursor: Annotated[str, msgspec.Meta(max_length=512)] | None = None


@routes.get("/v1/audit", query=AuditQuery, response=Page[AuditEntry], auth=Action("audit:records:list"))
async def list_audit(request: web.Request, query: AuditQuery) -> Page[AuditEntry]:
    """List audit entries in time order (filters: since, user, result, in_project)."""
    items, next_cursor = await audit.list_entries(
        request.app[STORE],
        since=query.since,
        user=query.user,
        result=query.result,
        in_project=query.in_project,
        limit=query.limit,
        cursor=query.cursor,
    )
    return Page(items=items, next_cursor=next_cursor)
