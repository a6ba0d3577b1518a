"""RFC 6455 §5.1 on the events WebSocket: the server closes with 1002 on a client frame that is not masked."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest
from aiohttp import WSMsgType

from minicloud.api.websocket import _MaskedFramesOnly


async def _handshake(api) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/events HTTP/1.1\r\n"
            f"Host: {server.host}:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {api.token}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _frame(payload: bytes, *, opcode: int = 0x1, masked: bool) -> bytes:
    if not masked:
        return bytes([0x80 | opcode, len(payload)]) + payload
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _close_code(reader: asyncio.StreamReader) -> int:
    """The code of the close frame the server sends (skipping any other frames it sends first)."""
    while True:
        first, second = await asyncio.wait_for(reader.readexactly(2), 10)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        payload = await reader.readexactly(length)
        if first & 0x0F == 0x8:
            return struct.unpack("!H", payload[:2])[0]


@pytest.mark.parametrize("split", [False, True])
async def test_an_unmasked_client_frame_closes_the_stream_with_1002(api, split):
    reader, writer = await _handshake(api)
    try:
        # A masked frame first (fine), then an unmasked one; split: byte by byte, so headers span reads, and only up
        # to the end of the unmasked header (the server closes there; writing on would race its close).
        data = _frame(b"ping?", masked=True) + _frame(b"hello", masked=False)
        if split:
            for i in range(len(data) - len(b"hello")):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.01)
        else:
            writer.write(data)
        assert await _close_code(reader) == 1002
    finally:
        writer.close()


async def test_masked_client_frames_are_accepted(api):
    ws = await api.ws("/v1/events")
    await ws.send_str("a" * 300)  # the aiohttp client masks; a 16-bit length
    await ws.ping()
    await api.post("/v1/projects", json={"name": "seen"})
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == WSMsgType.TEXT and '"seen"' in msg.data
    await ws.close()


def test_the_scanner_follows_frame_boundaries_of_every_length_form():
    fed = []

    class Reader:
        def feed_data(self, data):
            fed.append(data)
            return False, b""

    class Queue:
        exc = None

        def set_exception(self, exc):
            Queue.exc = exc

    guard = _MaskedFramesOnly(Reader(), Queue())
    # 7-bit, 16-bit and 64-bit lengths, masked: all pass.
    mask = b"\x01\x02\x03\x04"
    frames = (
        bytes([0x82, 0x80 | 5]) + mask + b"x" * 5
        + bytes([0x82, 0x80 | 126]) + struct.pack("!H", 300) + mask + b"y" * 300
        + bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 70000) + mask + b"z" * 70000
    )  # fmt: skip
    for i in range(0, len(frames), 7):
        assert guard.feed_data(frames[i : i + 7]) == (False, b"")
    assert Queue.exc is None and b"".join(fed) == frames
    # The next header is unmasked: refused, and so is everything after.
    assert guard.feed_data(bytes([0x81, 0x01]) + b"!") == (True, b"")
    assert Queue.exc is not None and Queue.exc.code == 1002
    assert guard.feed_data(_frame(b"late", masked=True)) == (True, b"")
