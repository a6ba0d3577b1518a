"""Requests to a backup target (a caller-chosen S3 endpoint) go through the guarded connector: a name that resolves
to a refused address is refused before anything is sent; the allow-list lets it through."""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp import web

from agent.storage.backup import S3Bucket
from minicloud.compute.url_policy import AddressRefused, UrlPolicy
from minicloud.storage import backups as bk


def _policy(allow=()) -> UrlPolicy:
    return UrlPolicy.from_config(list(allow), own=lambda: [ipaddress.ip_address("192.0.2.10")])


@pytest.fixture
async def server():
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(status=200, body=b"<ListBucketResult/>")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield port, seen
    await runner.cleanup()


def _bucket(port: int, policy: UrlPolicy) -> S3Bucket:
    ep = bk.Endpoint(url=f"http://localhost:{port}", access_key="AK", secret_key="SK", external=True)
    return S3Bucket(ep, "b", policy=policy)


async def test_a_target_name_resolving_to_loopback_is_refused_before_any_request(server):
    port, seen = server
    async with _bucket(port, _policy()) as s3:
        with pytest.raises(AddressRefused, match="loopback"):
            await s3.request("GET", "", [("list-type", "2")])
    assert seen == []


async def test_the_allow_list_lets_a_target_through(server):
    port, seen = server
    async with _bucket(port, _policy(["127.0.0.0/8", "::1/128"])) as s3:
        status, _, body = await s3.request("GET", "", [("list-type", "2")])
    assert status == 200 and body == b"<ListBucketResult/>" and seen == ["/b"]
