"""``/v1/audit``: the append-only audit log (every mutating request and every denied one), newest last.

Refused requests (401, 429) appear once per source and minute with their ``count`` (see
:class:`minicloud.iam.audit.RefusalAggregator`)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Routes
from minicloud.iam import audit, principals
from minicloud.model import AuditEntry, Page
from minicloud.state import Record

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


def view(r: Record) -> AuditEntry:
    s = r.spec
    return AuditEntry(
        id=r.id,
        time=s["time"],
        principal=s["principal"],
        project=r.project,
        action=s["action"],
        method=s["method"],
        path=s["path"],
        target=s.get("target", {}),
        result=s["result"],
        status=s["status"],
        request_id=s["request_id"],
        source=s["source"],
        count=s.get("count", 1),
    )


@routes.get("/v1/audit", query=AuditQuery, response=Page[AuditEntry], auth=Action("audit:records:list"))
async def list_audit(request: web.Request, query: AuditQuery) -> Page[AuditEntry]:
    """List audit entries in time order (filters: since, user, result, in_project)."""
    after: tuple[str, str] | None = None
    if query.cursor:
        after = res.decode_cursor(query.cursor)
    elif query.since:
        try:
            after = (audit.id_floor(audit.parse_since(query.since)), "")
        except ValueError as exc:  # malformed, or out of range (800000d): the message names the valid range
            raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "since", "reason": str(exc)}]) from None
    labels = {}
    if query.user:  # entries name principals by id; `user:alice` (or `alice`) means that user's id
        user = None if query.user.startswith("local:") else await principals.find_user(request.app[STORE], query.user)
        labels["principal"] = principals.ref_of(user) if user is not None else query.user
    if query.result:
        labels["result"] = query.result
    records = await request.app[STORE].list(
        audit.KIND, project=query.in_project, labels=labels, after=after, limit=query.limit + 1
    )
    more = len(records) > query.limit
    records = records[: query.limit]
    return Page(items=[view(r) for r in records], next_cursor=res.encode_cursor(records[-1]) if more else None)
