"""A server WebSocket that enforces RFC 6455 §5.1: every frame a client sends must be masked.

aiohttp's reader accepts unmasked client frames (it unmasks when the bit is set and reads the payload as is when it
is not). :class:`ServerWebSocket` puts a small frame-header scanner in front of that reader: it follows frame
boundaries without copying payloads, and on the first unmasked frame fails the connection with close code 1002
(protocol error), as the RFC requires ("The server MUST close the connection upon receiving a frame that is not
masked"). Nothing of that frame, of the read it arrived in, or of anything after it reaches the application.

This reaches into two private parts of aiohttp (``RequestHandler._payload_parser`` / ``_message_tail`` and
``WebSocketResponse._post_start`` / ``_reader``); ``tests/unit/api/test_websocket_masking.py`` fails if a new aiohttp
moves them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp.http_websocket import WebSocketError


class _MaskedFramesOnly:
    """Feeds aiohttp's WebSocket reader, after checking that each frame header has the mask bit set.

    Tracks only frame boundaries: header bytes (2, plus 2 or 8 of extended length, plus the 4-byte mask key), then
    ``length`` payload bytes skipped. Headers split across reads are handled."""

    def __init__(self, reader: Any, queue: Any) -> None:
        self._reader = reader
        self._queue = queue
        self._header = bytearray()
        self._skip = 0  # payload bytes of the current frame still to pass
        self._failed = False

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._failed:
            return True, b""
        if not self._all_masked(memoryview(data)):
            self._failed = True
            self._queue.set_exception(
                WebSocketError(WSCloseCode.PROTOCOL_ERROR, "client frames must be masked (RFC 6455 section 5.1)")
            )
            return True, b""
        return self._reader.feed_data(data)  # type: ignore[no-any-return]

    def _all_masked(self, data: memoryview) -> bool:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            self._header.append(data[pos])
            pos += 1
            header = self._header
            if len(header) < 2:
                continue
            if not header[1] & 0x80:
                return False
            flag = header[1] & 0x7F
            size = 2 + (2 if flag == 126 else 8 if flag == 127 else 0) + 4
            if len(header) < size:
                continue
            length = int.from_bytes(header[2 : size - 4], "big") if flag >= 126 else flag
            self._header = bytearray()
            self._skip = length
        return True


class ServerWebSocket(web.WebSocketResponse):
    """:class:`aiohttp.web.WebSocketResponse` that closes with 1002 on an unmasked client frame."""

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        handler = request.protocol
        # Bytes that arrived with (or right after) the handshake are fed to the reader when it is installed: take
        # them first so that they are checked too.
        early = handler._message_tail
        handler._message_tail = b""
        super()._post_start(request, protocol, writer)
        guard = _MaskedFramesOnly(handler._payload_parser, self._reader)
        handler._payload_parser = guard
        if early:
            eof, _ = guard.feed_data(early)
            if eof:
                handler.close()
