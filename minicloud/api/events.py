"""``GET /v1/events``: a WebSocket stream of resource changes, resumable from a revision.

Each text message is one :class:`~minicloud.model.Event` as JSON. ``?since=REV`` replays every change after ``REV``
from the change log, then continues live without gaps or duplicates (the live feed is subscribed *before* the replay
is read, and entries already replayed are skipped by revision). Without ``since`` the stream starts at the current
revision. If ``since`` is older than the retained history the server sends one ``{"type": "error", ...}`` problem
message and closes with code 4410: re-list the resources, then resume from the revision the list reflects.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
from aiohttp import WSCloseCode, web

from minicloud import errors
from minicloud import events as events_service
from minicloud.api import resources as res
from minicloud.api.auth import authorize, principal_of
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Routes
from minicloud.api.websocket import ServerWebSocket
from minicloud.core.kinds import public_kinds
from minicloud.model import Event

routes = Routes("events")
_enc = msgspec.json.Encoder()


class EventsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    since: Annotated[int, msgspec.Meta(ge=0, description="resume after this revision")] | None = None
    kind: (
        Annotated[str, msgspec.Meta(max_length=512, description="comma-separated kinds, e.g. keypair,operation")] | None
    ) = None


@routes.get("/v1/events", query=EventsQuery, response=Event, auth=Action("events:watch"), websocket=True)
async def watch_events(request: web.Request, query: EventsQuery) -> web.WebSocketResponse:
    """Stream resource changes over a WebSocket (resumable with ?since=REVISION)."""
    kinds = set(query.kind.split(",")) if query.kind else None
    known = set(public_kinds())  # internal kinds (no view) are never streamed
    if kinds and (unknown := kinds - known):
        raise errors.ValidationFailed(
            f"unknown kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(sorted(known))}",
            invalid_params=[{"name": "kind", "reason": "unknown kind"}],
        )
    project = res.project_of(request)
    # Cluster-level records (projects, users, role bindings) are streamed to those who administer the cluster.
    try:
        await authorize(request, principal_of(request), "iam:users:list", "", cluster=True)
        scopes = {project, ""}
    except errors.MinicloudError:
        scopes = {project}
    ws = ServerWebSocket(heartbeat=30)  # closes with 1002 on an unmasked client frame (RFC 6455 §5.1)
    if not ws.can_prepare(request).ok:
        raise errors.BadRequest("GET /v1/events is a WebSocket endpoint; connect with a WebSocket client")
    await ws.prepare(request)
    watch = events_service.Watch(
        request.app[STORE],
        since=query.since,
        accept=lambda change: (kinds is None or change.kind in kinds) and change.project in scopes,
    )

    async def read_until_closed() -> None:
        # The client sends nothing but control frames; reading them is how we notice it went away.
        async for _ in ws:
            pass
        watch.close()

    reader = asyncio.create_task(read_until_closed())
    try:
        async for event in watch:
            await ws.send_str(_enc.encode(event).decode())
        if watch.overflowed:
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=f"too slow; resume from {watch.last}".encode())
    except events_service.HistoryCompacted as exc:
        problem = exc.to_problem(instance=request.path)
        await ws.send_str(_enc.encode({"type": "error", "problem": problem}).decode())
        await ws.close(code=4410, message=b"history compacted")
    except ConnectionResetError:
        pass
    finally:
        watch.close()
        reader.cancel()
    return ws
