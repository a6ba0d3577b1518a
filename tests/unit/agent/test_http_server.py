"""Slow clients: the agent's HTTP server closes connections that trickle their request headers or body, and leaves
idle keep-alive connections, prompt clients and WebSockets alone. Real sockets on loopback; bounds of a second or
less, and the assertions are about closure, not timing."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
from aiohttp import web

from agent.http_server import GuardedRunner

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5


async def _echo(request: web.Request) -> web.Response:
    return web.Response(text=f"{len(await request.read())}")


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(msg.data)
    return ws


async def _released(request: web.Request) -> web.Response:
    """A route that bounds its body itself (as image upload does): it takes the body deadline over."""
    released = request.protocol.release_body_deadline()  # type: ignore[union-attr]
    return web.Response(text=f"{released} {len(await request.read())}")


@pytest.fixture
async def server():
    app = web.Application()
    app.router.add_get("/", _echo)
    app.router.add_post("/", _echo)
    app.router.add_post("/released", _released)
    app.router.add_get("/ws", _ws)
    runner = GuardedRunner(app, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield "127.0.0.1", site._server.sockets[0].getsockname()[1]
    await runner.cleanup()


async def closed_by_server(reader: asyncio.StreamReader, within: float = 10.0) -> bool:
    """True when the server closes the connection (EOF or reset) before ``within`` seconds (a generous cap, many
    times the configured bound, so a slow machine does not fail the test)."""
    try:
        while await asyncio.wait_for(reader.read(65536), within):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_a_partial_request_line_is_closed(server):
    reader, writer = await asyncio.open_connection(*server)
    writer.write(b"GET / HT")
    assert await closed_by_server(reader)
    writer.close()


async def test_a_connection_that_sends_nothing_is_closed(server):
    reader, writer = await asyncio.open_connection(*server)
    assert await closed_by_server(reader)
    writer.close()


async def test_trickled_header_bytes_do_not_extend_the_deadline(server):
    reader, writer = await asyncio.open_connection(*server)

    async def trickle() -> None:
        with pytest.raises(ConnectionError):
            for _ in range(200):  # 20 s of one byte every 0.1 s, far past the bound
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.1)

    trickler = asyncio.create_task(trickle())
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert await closed_by_server(reader)
    trickler.cancel()
    writer.close()


async def test_a_slow_body_is_closed(server):
    reader, writer = await asyncio.open_connection(*server)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part of it")
    assert await closed_by_server(reader)
    writer.close()


async def test_a_route_that_takes_the_body_deadline_over_may_read_slowly_and_the_next_request_is_guarded(server):
    reader, writer = await asyncio.open_connection(*server)
    writer.write(b"POST /released HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
    await writer.drain()
    await asyncio.sleep(BODY_TIMEOUT * 3)  # past the body deadline: not closed, the route released it
    writer.write(b"world")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(len(b"True 10")) == b"True 10"
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part of it")
    assert await closed_by_server(reader)  # the next request's body is bounded again
    writer.close()


async def test_prompt_requests_and_idle_keep_alive_connections_are_served(server):
    reader, writer = await asyncio.open_connection(*server)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(1) == b"5"
    # Idle for longer than both bounds: still open (keepalive_timeout governs idle connections).
    await asyncio.sleep(HEADER_TIMEOUT + BODY_TIMEOUT + 0.5)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    # ... and the next request is bounded again once it starts.
    await reader.readexactly(1)
    writer.write(b"GET / HT")
    assert await closed_by_server(reader)
    writer.close()


async def test_a_websocket_may_stay_quiet(server):
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(f"http://{server[0]}:{server[1]}/ws") as ws:
        await asyncio.sleep(HEADER_TIMEOUT + BODY_TIMEOUT + 0.5)
        await ws.send_str("still here")
        assert (await ws.receive()).data == "still here"


async def test_the_agent_closes_a_tls_client_that_trickles_its_headers(tmp_path):
    """Through the daemon itself: its HTTPS listener with a short configured bound."""
    import msgspec

    from agent.daemon import serve
    from tests.unit.api.conftest import make_config

    cfg = make_config(tmp_path)
    cfg = msgspec.structs.replace(cfg, api=msgspec.structs.replace(cfg.api, header_timeout=1.0, body_timeout=1.0))
    stop = asyncio.Event()
    agent = asyncio.create_task(serve(cfg, stop))
    state = cfg.data_path / "agent.json"
    try:
        for _ in range(600):
            if state.exists() or agent.done():
                break
            await asyncio.sleep(0.05)
        assert state.exists(), agent
        host, _, port = json.loads(state.read_text())["https"].rpartition(":")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        await writer.drain()
        assert await closed_by_server(reader)
        writer.close()
        # A prompt client on a new connection is served.
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(agent, 60)
