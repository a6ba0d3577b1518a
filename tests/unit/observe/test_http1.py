"""The loopback HTTP/1.1 client the query service uses for the node's TSDB (``minicloud.observe.http1``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from minicloud.observe.http1 import Answer, Http1Pool, ProtocolError, ResponseParser

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"
)
LENGTH = b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 11\r\n\r\nhello world"


def parse_in_pieces(raw: bytes, size: int) -> tuple[Answer, ResponseParser]:
    parser, buf = ResponseParser(), bytearray()
    for i in range(0, len(raw), size):
        buf += raw[i : i + size]
        answer = parser.feed(buf)
        if answer is not None:
            return answer, parser
    raise AssertionError("no answer")


@pytest.mark.parametrize("raw", [CHUNKED, LENGTH])
def test_an_answer_is_the_same_however_its_bytes_arrive(raw):
    expected = parse_in_pieces(raw, len(raw))[0]
    assert expected.body in (b"hello, world", b"hello world")
    for size in range(1, 20):
        answer, parser = parse_in_pieces(raw, size)
        assert answer == expected
        assert parser.keep_alive and parser.consumed == len(raw)


def test_chunked_trailers_are_read_past_and_connection_close_is_honoured():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n"
    answer, parser = parse_in_pieces(raw, 3)
    assert answer == Answer(200, b"ok") and not parser.keep_alive and parser.consumed == len(raw)


def test_a_body_without_length_runs_to_the_end_of_the_stream():
    parser, buf = ResponseParser(), bytearray(b"HTTP/1.0 200 OK\r\n\r\npartial")
    assert parser.feed(buf) is None
    buf += b" body"
    assert parser.eof(buf) == Answer(200, b"partial body") and not parser.keep_alive


def test_an_answer_cut_short_is_an_error_not_a_short_body():
    parser, buf = ResponseParser(), bytearray(LENGTH[:-3])
    assert parser.feed(buf) is None
    with pytest.raises(ConnectionResetError):
        parser.eof(buf)


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
    ],
)
def test_what_is_not_http_is_a_protocol_error(raw):
    with pytest.raises(ProtocolError):
        ResponseParser().feed(bytearray(raw))


# -- the pool against a small server -------------------------------------------------------------------------------
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def serve(handler: Handler) -> AsyncIterator[tuple[Http1Pool, list[int]]]:
    """A server calling ``handler(reader, writer, connection number)``; yields a pool to it and the connections."""
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await handler(reader, writer, connections[-1])
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool("127.0.0.1", port, headers={"Authorization": "Basic x"})
    try:
        yield pool, connections
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.fixture
async def keep_alive() -> AsyncIterator[tuple[Http1Pool, list[int]]]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            try:
                head = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            target = head.split(b" ")[1]
            body = target + b" " + head.split(b"Authorization: ")[1].split(b"\r\n")[0]
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            )
            await writer.drain()

    async for pool in serve(handler):
        yield pool


async def test_requests_share_kept_alive_connections_and_send_the_pools_headers(keep_alive):
    pool, connections = keep_alive
    for _ in range(5):
        assert await pool.get("/q?a=1", timeout=5) == Answer(200, b"/q?a=1 Basic x")
    answers = await asyncio.gather(*(pool.get(f"/c{i}", timeout=5) for i in range(4)))
    assert [a.body for a in answers] == [f"/c{i} Basic x".encode() for i in range(4)]
    assert len(connections) <= 4  # one for the five in a row, at most four for the four at once


async def test_a_kept_connection_the_server_closes_unanswered_is_replaced_and_the_request_sent_again():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % n)
        await writer.drain()
        if n == 0:  # the idle-timeout race: the next request arrives as the server closes the connection
            await read_request(reader)

    async for pool, connections in serve(handler):
        assert await pool.get("/", timeout=5) == Answer(200, b"0")
        assert await pool.get("/", timeout=5) == Answer(200, b"1")
        assert len(connections) == 2


async def test_a_connection_that_said_close_is_not_reused():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n%d" % n)
            await writer.drain()

    async for pool, connections in serve(handler):
        assert [(await pool.get("/", timeout=5)).body for _ in range(3)] == [b"0", b"1", b"2"]
        assert len(connections) == 3


async def test_an_answer_cut_off_midway_fails_and_is_not_sent_again():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async for pool, connections in serve(handler):
        with pytest.raises(ConnectionResetError):
            await pool.get("/", timeout=5)
        assert len(connections) == 1


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:
            await asyncio.sleep(5)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async for pool, connections in serve(handler):
        with pytest.raises(TimeoutError):
            await pool.get("/", timeout=0.2)
        assert await pool.get("/", timeout=5) == Answer(204, b"")
        assert len(connections) == 2


async def test_nothing_listening_is_an_os_error():
    pool = Http1Pool("127.0.0.1", 9)
    with pytest.raises(OSError):
        await pool.get("/", timeout=2)
    pool.close()
