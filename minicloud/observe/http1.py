"""A small HTTP/1.1 client for the node's own time-series database: GET requests over a pool of keep-alive
connections, answers read whole into bytes.

Why not aiohttp's client: the metrics query API is a proxy in front of the TSDB on the same node, and aiohttp's
client spent about 0.3 ms of CPU per request (request and response objects, header multidicts, the stream reader,
its timers) — more than the rest of the API's path together (``bench/metrics_bench.py``). This client does what the
loopback TSDB needs and no more: plain HTTP (no TLS, no proxies, no redirects, no cookies, no compression: it sends
``Accept-Encoding: identity``), ``Content-Length``, ``chunked`` or read-until-close bodies, one request at a time per
connection, at most ``limit`` connections at once.

Contract: :meth:`Http1Pool.get` returns the status and the whole body, or raises :class:`OSError` (the connection
failed or closed early), :class:`TimeoutError` (no whole answer within ``timeout``) or :class:`ProtocolError` (not
HTTP/1.x). GET is idempotent, so a request that fails on a reused connection before any byte of its answer arrived
(the server closed it while idle) is sent once more on a new connection. A connection goes back to the pool only
after a complete answer that did not say ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

#: The most bytes of a status line and headers.
MAX_HEAD = 65536
#: Idle connections kept per pool (more are closed when they come back).
MAX_IDLE = 16
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:([^\r]*)")
_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding:([^\r]*)")
_CONNECTION = re.compile(rb"\r\nconnection:([^\r]*)")


class ProtocolError(ValueError):
    """The server's bytes are not an HTTP/1.x answer this client understands."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class ResponseParser:
    """Parses one HTTP/1.x response incrementally (pure: bytes in, :class:`Answer` out; no I/O).

    :meth:`feed` takes the bytes received so far (the same growing buffer each time) and returns the answer once it
    is complete, else None; :meth:`eof` is the end of the stream (completes a read-until-close body, else raises)."""

    def __init__(self) -> None:
        self.status = 0
        self.keep_alive = True
        self._head_end = -1
        self._length: int | None = None  # Content-Length
        self._chunked = False
        self._pos = 0  # chunked: where the next chunk-size line starts
        self._body = bytearray()
        #: Bytes of the buffer the answer took (anything after it is unexpected).
        self.consumed = 0

    @property
    def started(self) -> bool:
        return self._head_end >= 0

    def feed(self, buf: bytearray) -> Answer | None:
        if self._head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("the answer's headers are too long")
                return None
            self._head(bytes(buf[:end]))
            self._head_end = self._pos = end + 4
        if self._chunked:
            return self._feed_chunked(buf)
        if self._length is not None:
            end = self._head_end + self._length
            if len(buf) < end:
                return None
            self.consumed = end
            return Answer(self.status, bytes(buf[self._head_end : end]))
        return None  # read until the server closes

    def eof(self, buf: bytearray) -> Answer:
        if self._head_end >= 0 and not self._chunked and self._length is None:
            self.keep_alive = False
            self.consumed = len(buf)
            return Answer(self.status, bytes(buf[self._head_end :]))
        raise ConnectionResetError("the server closed the connection before its answer was complete")

    def _head(self, head: bytes) -> None:
        line, _, fields = head.partition(b"\r\n")
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
        self.status = int(parts[1])
        self.keep_alive = parts[0] == b"HTTP/1.1"
        # Only three fields matter here; found in the lowered block (one pass each) rather than line by line.
        low = b"\r\n" + fields.lower()
        if b"\r\ncontent-length:" in low:
            lengths = {v.strip() for v in _CONTENT_LENGTH.findall(low)}
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise ProtocolError(f"Content-Length {sorted(lengths)!r} is not one number")
            self._length = int(next(iter(lengths)))
        if b"\r\ntransfer-encoding:" in low:
            codings = [v.strip() for v in _TRANSFER_ENCODING.findall(low)]
            if codings != [b"chunked"]:
                raise ProtocolError(f"unsupported Transfer-Encoding {codings!r}")
            self._chunked, self._length = True, None
        if b"\r\nconnection:" in low:
            tokens = {t.strip() for v in _CONNECTION.findall(low) for t in v.split(b",")}
            if b"close" in tokens:
                self.keep_alive = False
            elif b"keep-alive" in tokens:
                self.keep_alive = True
        if self._length is None and not self._chunked and (self.status in (204, 304) or 100 <= self.status < 200):
            self._length = 0

    def _feed_chunked(self, buf: bytearray) -> Answer | None:
        while True:
            line_end = buf.find(b"\r\n", self._pos)
            if line_end < 0:
                if len(buf) - self._pos > 1024:
                    raise ProtocolError("a chunk-size line is too long")
                return None
            size_text = bytes(buf[self._pos : line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"not a chunk size: {size_text[:40]!r}") from None
            data = line_end + 2
            if size == 0:  # the last chunk, then optional trailers and an empty line
                if len(buf) < data + 2:
                    return None
                if buf[data : data + 2] == b"\r\n":
                    end = data + 2
                else:
                    trailers = buf.find(b"\r\n\r\n", data)
                    if trailers < 0:
                        return None
                    end = trailers + 4
                self.consumed = end
                return Answer(self.status, bytes(self._body))
            if len(buf) < data + size + 2:
                return None
            if buf[data + size : data + size + 2] != b"\r\n":
                raise ProtocolError("a chunk does not end with CRLF")
            self._body += buf[data : data + size]
            self._pos = data + size + 2


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._parser: ResponseParser | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        #: The last request failed before any byte of its answer arrived (so sending it again is safe).
        self.failed_unanswered = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # bytes nobody asked for: this connection is not reusable
            self.close()
            return
        self._buf += data
        try:
            answer = self._parser.feed(self._buf)
        except ProtocolError as exc:
            self._finish(exc)
            return
        if answer is not None:
            self._finish(answer)

    def eof_received(self) -> bool:
        if self._parser is not None:
            try:
                self._finish(self._parser.eof(self._buf))
            except OSError as exc:
                self._finish(exc)
        self.closed = True
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is not None:
            self._finish(exc if isinstance(exc, OSError) else ConnectionResetError("the connection was closed"))

    # -- the pool's side
    def request(self, head: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None and self._parser is None
        self._buf.clear()
        self._parser = ResponseParser()
        self._waiter = self.loop.create_future()
        self.transport.write(head)
        return self._waiter

    @property
    def reusable(self) -> bool:
        return not self.closed and self._parser is None

    def _finish(self, outcome: Answer | BaseException) -> None:
        parser, waiter = self._parser, self._waiter
        self._parser = self._waiter = None
        if isinstance(outcome, Answer):
            assert parser is not None
            if not parser.keep_alive or parser.consumed != len(self._buf):
                self.close()
        else:
            self.failed_unanswered = not self._buf
            self.close()
        if waiter is not None and not waiter.done():
            if isinstance(outcome, Answer):
                waiter.set_result(outcome)
            else:
                waiter.set_exception(outcome)

    def abort(self) -> None:
        self._parser = self._waiter = None
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Http1Pool:
    """Keep-alive connections to one ``host:port`` (plain HTTP). Not thread-safe; one event loop."""

    def __init__(self, host: str, port: int, *, headers: dict[str, str] | None = None, limit: int = 64) -> None:
        self.host, self.port = host, port
        host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        fixed = {"Host": host_header, "Accept-Encoding": "identity", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1") + b"\r\n"
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self._closed = False

    async def get(self, target: str, *, timeout: float) -> Answer:
        """``GET target`` (path and query, already quoted); the status and whole body. See the module docstring."""
        if self._closed:
            raise ConnectionResetError("the client was closed")
        head = b"GET " + target.encode("ascii") + b" HTTP/1.1\r\n" + self._fixed
        loop = asyncio.get_running_loop()
        async with self._slots:
            deadline = loop.time() + timeout
            fresh = False
            while True:
                conn, reused = (None, False) if fresh else self._take()
                if conn is None:
                    conn = await self._open(loop, deadline)
                waiter = conn.request(head)
                timer = loop.call_at(deadline, _expire, waiter)
                try:
                    answer = await waiter
                except (TimeoutError, asyncio.CancelledError):  # the connection is in an unknown state
                    conn.abort()
                    raise
                except OSError:
                    if reused and conn.failed_unanswered and loop.time() < deadline:
                        fresh = True  # the server had closed it while idle: once more, on a new connection
                        continue
                    raise
                finally:
                    timer.cancel()
                self._give_back(conn)
                return answer

    def _take(self) -> tuple[_Connection | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn, True
        return None, False

    async def _open(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        async with asyncio.timeout_at(deadline):
            _, conn = await loop.create_connection(lambda: _Connection(loop), self.host, self.port)
        return conn

    def _give_back(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        elif conn.reusable:
            conn.close()

    def close(self) -> None:
        """Close the idle connections; requests in flight finish, and their connections close after."""
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _expire(waiter: asyncio.Future[Answer]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no whole answer in time"))
