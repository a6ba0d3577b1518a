"""``POST /v1/images`` with a URL through the API: an operation (202) that cannot reach internal addresses unless the
operator allows them, keeps nothing when it fails, and never blocks the request. Servers listen on 127.0.0.1 only."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from minicloud.api.keys import CONFIG, STORE
from minicloud.iam import apikeys
from minicloud.state import Create, Txn
from tests.unit.api.conftest import make_config, start_api

SECRET_TEXT = "internal-only-text-42"


async def _api(tmp_path, allow):
    cfg = make_config(tmp_path)
    return await start_api(
        msgspec.structs.replace(cfg, compute=msgspec.structs.replace(cfg.compute, image_url_allow=allow))
    )


@pytest.fixture
async def api(tmp_path):
    """The default: nothing internal allowed."""
    a = await _api(tmp_path, [])
    yield a
    await a.client.close()


@pytest.fixture
async def api_loopback(tmp_path):
    a = await _api(tmp_path, ["127.0.0.1/32"])
    yield a
    await a.client.close()


class RawServer:
    """A loopback TCP server: ``reply`` is sent after the request's headers; ``hold`` delays it until set."""

    def __init__(self, reply: bytes):
        self.reply = reply
        self.hold: asyncio.Event | None = None
        self.connections = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/disk.img"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _handle(self, reader, writer):
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if self.hold is not None:
            await self.hold.wait()
        writer.write(self.reply)
        await writer.drain()
        writer.close()


def _http(body: bytes, length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (length, body)


async def _finished(api, resp) -> dict:
    assert resp.status == 202, await resp.text()
    op = await resp.json()
    for _ in range(100):
        op = await (await api.get(f"/v1/operations/{op['id']}?wait=5")).json()
        if op["state"] != "running":
            return op
    raise AssertionError("the import never ended")


async def _nothing_kept(api):
    assert (await (await api.get("/v1/images")).json())["items"] == []
    store_dir = api.app[CONFIG].data_path / "images"
    assert not store_dir.exists() or list(store_dir.iterdir()) == []


async def test_loopback_and_internal_urls_are_refused_by_default_without_connecting(api):
    async with RawServer(_http(b"x" * 1000)) as server:
        resp = await api.post("/v1/images", json={"name": "a", "url": server.url})
        assert resp.status == 403 and "compute.image_url_allow" in (await resp.json())["detail"]
        for url in ["http://10.1.2.3/x", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x"]:
            assert (await api.post("/v1/images", json={"name": "a", "url": url})).status == 403, url
        # A name is resolved in the operation, and refused there at connect time.
        port = server.url.split(":")[2].split("/")[0]
        op = await _finished(api, await api.post("/v1/images", json={"name": "a", "url": f"http://localhost:{port}/"}))
        assert op["state"] == "failed" and op["error"]["status"] == 403 and "loopback" in op["error"]["detail"]
        assert server.connections == 0
    await _nothing_kept(api)


async def test_a_download_cut_off_early_fails_and_keeps_nothing(api_loopback):
    async with RawServer(_http(b"x" * 100, length=1 << 20)) as server:
        op = await _finished(
            api_loopback, await api_loopback.post("/v1/images", json={"name": "cut", "url": server.url})
        )
    assert op["state"] == "failed" and "truncated" in op["error"]["detail"]
    await _nothing_kept(api_loopback)


async def test_a_reply_that_is_not_http_is_a_failed_operation_that_echoes_nothing(api_loopback):
    async with RawServer(f"SSH-2.0-OpenSSH_9.2 {SECRET_TEXT}\r\n".encode()) as server:
        op = await _finished(
            api_loopback, await api_loopback.post("/v1/images", json={"name": "ssh", "url": server.url})
        )
    assert op["state"] == "failed" and op["error"]["status"] == 422
    assert SECRET_TEXT not in msgspec.json.encode(op).decode()
    await _nothing_kept(api_loopback)


async def test_the_size_cap_fails_the_import(tmp_path):
    cfg = make_config(tmp_path)
    compute = msgspec.structs.replace(cfg.compute, image_url_allow=["127.0.0.1/32"], image_url_max_bytes=1000)
    api = await start_api(msgspec.structs.replace(cfg, compute=compute))
    try:
        async with RawServer(_http(b"x" * 5000)) as server:
            op = await _finished(api, await api.post("/v1/images", json={"name": "big", "url": server.url}))
        assert op["state"] == "failed" and op["error"]["status"] == 413
        await _nothing_kept(api)
    finally:
        await api.client.close()


async def test_the_request_answers_at_once_while_the_download_runs(api_loopback):
    """The download is an operation: the POST returns while the server has not sent a byte, and other requests are
    served meanwhile. (Before, the import ran inside the request.)"""
    async with RawServer(_http(b"x" * 100)) as server:
        server.hold = asyncio.Event()
        resp = await asyncio.wait_for(api_loopback.post("/v1/images", json={"name": "slow", "url": server.url}), 60)
        assert resp.status == 202
        op = await resp.json()
        assert op["state"] == "running" and op["target"]["name"] == "slow"
        assert (await api_loopback.get("/v1/images")).status == 200
        server.hold.set()
        op = await _finished(api_loopback, resp)
    # 100 bytes of "x" is a raw image by qemu-img's reading: the import succeeds.
    assert op["state"] == "succeeded", op
    image = await (await api_loopback.get("/v1/images/slow")).json()
    assert image["format"] == "raw" and image["size_bytes"] == 100


async def test_a_retried_url_import_with_its_idempotency_key_starts_one_download(api_loopback):
    async with RawServer(_http(b"y" * 100)) as server:
        h = {"Idempotency-Key": "import-1"}
        first = await api_loopback.post("/v1/images", json={"name": "once", "url": server.url}, headers=h)
        again = await api_loopback.post("/v1/images", json={"name": "once", "url": server.url}, headers=h)
        assert first.status == again.status == 202
        assert (await again.json())["id"] == (await first.json())["id"]
        op = await _finished(api_loopback, first)
    assert op["state"] == "succeeded" and server.connections == 1


async def test_the_image_of_a_finished_url_import_is_audited_as_the_requesters_create(api_loopback):
    """Before, the operation committed the image straight to the store: no audit entry, and no project guard."""
    api = api_loopback
    mia = await (await api.post("/v1/users", json={"name": "mia"})).json()
    grant = {"role": "member", "principal": "user:mia", "scope_project": "default"}
    assert (await api.post("/v1/rolebindings", json=grant)).status == 201
    record, token = apikeys.new_key("default", "mia-key", "", None, {}, principal=f"user:{mia['id']}")
    await api.app[STORE].commit(Txn([Create(record)]))
    async with RawServer(_http(b"z" * 100)) as server:
        resp = await api.client.post(
            "/v1/images", json={"name": "mine", "url": server.url}, headers={"Authorization": f"Bearer {token}"}
        )
        op = await _finished(api, resp)
    assert op["state"] == "succeeded", op
    image_id = op["result"]["image_id"]
    entries = [
        e.spec
        for e in await api.app[STORE].list("audit", project=None, limit=1000)
        if e.spec["target"].get("id") == image_id
    ]
    assert [(e["principal"], e["action"], e["result"]) for e in entries] == [
        (f"user:{mia['id']}", "compute:images:create", "allowed")
    ]
