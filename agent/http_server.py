"""The daemon's HTTP server: aiohttp's, with deadlines for slow clients.

aiohttp bounds an *idle* keep-alive connection (``keepalive_timeout``) but not one that trickles: a client that sends
half a request line, or one header byte every few seconds, or a body more slowly than it promised, holds its
connection (and, over TLS, a handshake's worth of memory) for as long as it likes. :class:`GuardedRunner` serves the
app with a request handler that closes such connections:

- **headers**: a new connection must complete a request's headers within ``header_timeout`` seconds of its TLS
  handshake (or TCP accept); on a keep-alive connection the clock starts at the first byte of the next request, so
  an idle connection is left to ``keepalive_timeout``;
- **body**: once the headers are complete, the whole body must arrive within ``body_timeout`` seconds.

WebSockets are not affected once upgraded (their heartbeat governs). A route that streams a large body on purpose
(image upload, ``PUT /v1/images/{name}/file``) takes the body deadline over once the caller is authenticated and
authorised: it calls :meth:`GuardedRequestHandler.release_body_deadline` (found as ``request.protocol``) and bounds the
body itself (an idle timeout and a minimum rate, see ``minicloud/compute/image_upload.py``). The check is one timer per connection; it costs
nothing per byte beyond a counter comparison. It relies on two private attributes of aiohttp's ``RequestHandler``
(``_request_count``, ``_messages``); ``tests/unit/agent/test_http_server.py`` fails if an aiohttp release moves them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("minicloud.agent")

_IDLE, _HEADERS, _BODY = "idle", "headers", "body"


class GuardedRequestHandler(RequestHandler):
    """aiohttp's request handler with the header and body deadlines described in the module docstring."""

    __slots__ = ("_body_timeout", "_deadline", "_header_timeout", "_payload", "_phase")

    def __init__(self, manager: Any, *, header_timeout: float, body_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._phase = _IDLE
        self._deadline: asyncio.TimerHandle | None = None
        self._payload: Any = None

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self._loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = _IDLE

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self._phase != phase or self.transport is None:
            return
        if phase == _BODY and (self._payload is None or self._payload.is_eof()):
            self._phase = _IDLE
            return
        peer = self.transport.get_extra_info("peername")
        log.info(
            "closing a slow connection",
            extra={
                "peer": str(peer),
                "waiting_for": phase,
                "seconds": self._header_timeout if phase == _HEADERS else self._body_timeout,
            },
        )
        self.force_close()

    def release_body_deadline(self) -> bool:
        """Stop the ``body_timeout`` clock of the request being read: its handler bounds the body itself from now
        on. Returns whether a body deadline was running. The next request on the connection is guarded as usual."""
        if self._phase != _BODY:
            return False
        self._disarm()  # self._payload stays: data_received sees the rest of the body as body, not a new request
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A new connection has header_timeout to complete its first request's headers, bytes or not.
        self._arm(_HEADERS, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        in_body = self._payload is not None and not self._payload.is_eof()
        super().data_received(data)
        if self._upgraded or self._force_close:
            self._disarm()
            return
        if self._request_count > before:  # a request's headers are complete
            payload = self._messages[-1][1] if self._messages else None
            if payload is not None and not payload.is_eof():
                self._payload = payload
                self._arm(_BODY, self._body_timeout)
            else:
                self._payload = None
                self._disarm()
        elif in_body:
            if self._payload.is_eof():  # the body is in (what else came in this read is left to keepalive_timeout)
                self._payload = None
                self._disarm()
        elif self._phase == _IDLE and data:
            # The first bytes of the next request on a kept-alive connection: its headers are due. (Not re-armed by
            # later bytes: trickling does not extend the deadline.)
            self._arm(_HEADERS, self._header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._payload = None
        super().connection_lost(exc)


class _GuardedServer(web.Server):
    """:class:`aiohttp.web.Server` whose connections get :class:`GuardedRequestHandler`."""

    def __init__(self, *args: Any, header_timeout: float, body_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = {"header_timeout": header_timeout, "body_timeout": body_timeout}

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._guard, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """:class:`aiohttp.web.AppRunner` whose server closes slow clients (``header_timeout``, ``body_timeout``
    seconds); every other argument is the AppRunner's."""

    def __init__(self, app: web.Application, *, header_timeout: float, body_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = {"header_timeout": header_timeout, "body_timeout": body_timeout}

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _GuardedServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **self._guard,
            **server._kwargs,
        )
