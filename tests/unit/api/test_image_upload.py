"""``PUT /v1/images/{name}/file`` through the real aiohttp app: a disk streamed in the body becomes an image, and
every bad upload (wrong checksum, cut off, stalled, too large, mislabelled, a qcow2 pointing at another file) is a
4xx that leaves no file and no record. Raw sockets play the clients that misbehave."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
from pathlib import Path

import msgspec
import pytest

from minicloud.api.keys import CONFIG, STORE
from minicloud.compute.kinds import IMAGE
from minicloud.state import list_all
from tests.unit.api.conftest import make_config, start_api

MIB = 1 << 20


def _headers(data: bytes, **extra: str) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(len(data)),
        "X-Checksum-Sha256": hashlib.sha256(data).hexdigest(),
        **extra,
    }


async def _chunks(data: bytes, size: int = 256 << 10):
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _put(api, name: str, data: bytes, query: str = "", headers: dict[str, str] | None = None):
    return await api.request(
        "PUT", f"/v1/images/{name}/file{query}", data=_chunks(data), headers=headers or _headers(data)
    )


def _qcow2(tmp_path: Path, name: str, *options: str) -> bytes:
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "8M"], check=True, timeout=60)
    return path.read_bytes()


async def _nothing_left(api) -> None:
    """No image record, and nothing in the image store: no staging directory, no image directory."""
    assert await list_all(api.app[STORE], IMAGE.name) == []
    root = api.app[CONFIG].data_path / "images"
    assert not root.exists() or list(root.iterdir()) == []


async def _raw_request(api, head: bytes, body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(api.client.server.host, api.client.server.port)
    writer.write(head + body)
    await writer.drain()
    return reader, writer


def _head(api, name: str, length: int, sha256: str = "0" * 64, query: str = "") -> bytes:
    return (
        f"PUT /v1/images/{name}/file{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\nX-Checksum-Sha256: {sha256}\r\n\r\n"
    ).encode()


async def _status(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 10)
    return int(line.split()[1])


async def _until_nothing_left(api) -> None:
    """The handler cleans up after the client has gone: wait for it (bounded), then check."""
    root = api.app[CONFIG].data_path / "images"
    for _ in range(500):
        if not root.exists() or not list(root.iterdir()):
            break
        await asyncio.sleep(0.02)
    await _nothing_left(api)


async def test_a_streamed_raw_disk_becomes_an_image_in_the_default_pool(api):
    data = os.urandom(4 * MIB)
    resp = await _put(api, "up", data, "?firmware=uefi&os_distro=debian&description=hi&labels=env=lab,tier=web")
    assert resp.status == 201, await resp.text()
    image = await resp.json()
    assert image["name"] == "up" and image["boot"] == "disk" and image["format"] == "raw"
    assert image["size_bytes"] == len(data) and image["sha256"] == hashlib.sha256(data).hexdigest()
    assert image["virtual_size_bytes"] == len(data) and image["source"] == "upload" and image["node"] == "n1"
    assert image["firmware"] == "uefi" and image["os"] == {"distro": "debian"} and image["description"] == "hi"
    assert image["labels"] == {"env": "lab", "tier": "web"}
    # The pool fields as a node-path import sets them: the storage reconciler copies the disk into the pool.
    pools = {p["id"]: p for p in (await (await api.get("/v1/pools")).json())["items"]}
    if pools:
        assert image["pool"] in pools and image["pool_state"] == "importing"
    root = api.app[CONFIG].data_path / "images"
    assert (root / image["id"] / "disk").read_bytes() == data
    assert sorted(p.name for p in root.iterdir()) == [image["id"]]  # no staging directory left
    assert resp.headers["ETag"]
    entries = (await (await api.get("/v1/audit?limit=1000")).json())["items"]
    assert [(e["action"], e["method"], e["status"]) for e in entries if e["target"].get("id") == image["id"]] == [
        ("compute:images:create", "PUT", 201)
    ]


async def test_a_qcow2_upload_with_content_digest_and_expected_format(api, tmp_path):
    data = _qcow2(tmp_path, "d.qcow2")
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    headers = {k: v for k, v in _headers(data).items() if k != "X-Checksum-Sha256"}
    resp = await _put(api, "q", data, "?format=qcow2", {**headers, "Content-Digest": f"sha-256=:{digest}:"})
    assert resp.status == 201, await resp.text()
    image = await resp.json()
    assert image["format"] == "qcow2" and image["virtual_size_bytes"] == 8 * MIB


async def test_a_wrong_checksum_is_422_and_keeps_nothing(api):
    data = os.urandom(2 * MIB)
    resp = await _put(api, "bad", data, headers=_headers(data, **{"X-Checksum-Sha256": "ab" * 32}))
    assert resp.status == 422, await resp.text()
    problem = await resp.json()
    assert hashlib.sha256(data).hexdigest() in problem["detail"]
    assert [p["name"] for p in problem["invalid_params"]] == ["sha256"]
    await _nothing_left(api)


@pytest.mark.parametrize(
    ("case", "query", "options"),
    [
        ("raw labelled qcow2", "?format=qcow2", None),
        ("qcow2 with a backing file", "", ("-F", "raw", "-b", "/etc/hostname")),
        ("qcow2 with an external data file", "", ("-o", "data_file=DATA")),
        ("qcow2 labelled raw", "?format=raw", ()),
    ],
)
async def test_a_malformed_or_mislabelled_disk_is_422_and_keeps_nothing(api, tmp_path, case, query, options):
    if options is None:
        data = os.urandom(MIB)
    else:
        options = tuple(o.replace("DATA", str(tmp_path / "data.raw")) for o in options)
        data = _qcow2(tmp_path, "d.qcow2", *options)
    resp = await _put(api, "bad", data, query)
    assert resp.status == 422, (case, await resp.text())
    await _nothing_left(api)


async def test_refusals_before_the_body_read_nothing(api):
    assert (await _put(api, "taken", b"x" * 4096)).status == 201
    root = api.app[CONFIG].data_path / "images"
    before = sorted(p.name for p in root.iterdir())
    cases = [
        # (head, status): each answered without sending the body, so nothing can have been read
        (_head(api, "big", 1 << 50), 413),
        (_head(api, "taken", 1 * MIB), 409),
        (_head(api, "p", MIB, query="?pool=nope"), 404),
        (_head(api, "bad%20name", MIB), 422),
        (_head(api, "c", MIB).replace(b"X-Checksum-Sha256: " + b"0" * 64, b"X-Checksum-Sha256: nope"), 400),
        (_head(api, "c", MIB).replace(b"X-Checksum-Sha256", b"X-Other"), 400),
        (_head(api, "c", MIB).replace(b"application/octet-stream", b"application/json"), 415),
        (_head(api, "c", MIB).replace(b"Content-Length: 1048576", b"Transfer-Encoding: chunked"), 411),
        (_head(api, "c", MIB).replace(f"Bearer {api.token}".encode(), b"Bearer nope"), 401),
        (_head(api, "c", MIB, query="?unknown=1"), 422),
        (_head(api, "c", MIB, query="?labels=Bad%20Key=1"), 422),
    ]
    for head, status in cases:
        reader, writer = await _raw_request(api, head)
        try:
            assert await _status(reader) == status, head
        finally:
            writer.close()
    assert sorted(p.name for p in root.iterdir()) == before
    assert [r.name for r in await list_all(api.app[STORE], IMAGE.name)] == ["taken"]


async def test_a_body_cut_off_by_the_client_keeps_nothing(api):
    _reader, writer = await _raw_request(api, _head(api, "cut", 4 * MIB), os.urandom(MIB))
    root = api.app[CONFIG].data_path / "images"
    for _ in range(500):  # the staging file exists: the upload is under way
        if root.exists() and any(p.name.startswith(".staging-") for p in root.iterdir()):
            break
        await asyncio.sleep(0.01)
    writer.close()
    await _until_nothing_left(api)


@pytest.fixture
async def impatient_api(tmp_path):
    cfg = make_config(tmp_path)
    cfg = msgspec.structs.replace(cfg, compute=msgspec.structs.replace(cfg.compute, image_upload_idle_timeout=0.3))
    a = await start_api(cfg)
    yield a
    await a.client.close()


async def test_a_stalled_upload_is_408_and_keeps_nothing(impatient_api):
    api = impatient_api
    reader, writer = await _raw_request(api, _head(api, "slow", 4 * MIB), os.urandom(MIB))
    try:
        assert await _status(reader) == 408
    finally:
        writer.close()
    await _until_nothing_left(api)


async def test_the_same_idempotency_key_replays_and_another_upload_under_it_is_refused(api):
    data = os.urandom(MIB)
    first = await _put(api, "once", data, headers=_headers(data, **{"Idempotency-Key": "k1"}))
    assert first.status == 201
    again = await _put(api, "once", data, headers=_headers(data, **{"Idempotency-Key": "k1"}))
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == (await first.json())["id"]
    other = os.urandom(MIB)
    reused = await _put(api, "once", other, headers=_headers(other, **{"Idempotency-Key": "k1"}))
    assert reused.status == 422 and (await reused.json())["type"].endswith("idempotency-key-reused")
    assert len(await list_all(api.app[STORE], IMAGE.name)) == 1
    assert len(list((api.app[CONFIG].data_path / "images").iterdir())) == 1


async def test_the_agent_lets_an_upload_outlast_body_timeout_while_bytes_keep_coming(tmp_path):
    """Through the daemon's own server (agent.http_server): a body slower than api.body_timeout is fine for an
    upload (the route takes the deadline over), and the next request on the connection is bounded again."""
    from agent.daemon import serve

    cfg = make_config(tmp_path)
    cfg = msgspec.structs.replace(cfg, api=msgspec.structs.replace(cfg.api, body_timeout=0.3))
    stop = asyncio.Event()
    agent = asyncio.create_task(serve(cfg, stop))
    try:
        for _ in range(600):
            if (cfg.data_path / "agent.json").exists() or agent.done():
                break
            await asyncio.sleep(0.05)
        assert (cfg.data_path / "agent.json").exists(), agent
        data = os.urandom(MIB)
        reader, writer = await asyncio.open_unix_connection(cfg.agent.socket)
        head = (
            "PUT /v1/images/slow/file HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(data)}\r\nX-Checksum-Sha256: {hashlib.sha256(data).hexdigest()}\r\n\r\n"
        ).encode()
        writer.write(head + data[:1000])
        for i in range(1000, len(data), len(data) // 4):  # a pause of 3 x body_timeout between pieces
            await asyncio.sleep(0.9)
            writer.write(data[i : i + len(data) // 4])
        await writer.drain()
        assert await _status(reader) == 201
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"POST /v1/keypairs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            while True:  # the rest of the first answer, then the server closes the slow second request
                await asyncio.wait_for(reader.readexactly(1), 10)
        writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(agent, 60)
