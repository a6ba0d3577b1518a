"""Image download from a URL: where it may connect, what it reports, what it keeps. Every server here listens on
127.0.0.1; addresses of other ranges appear only in URLs the policy must refuse before any connection is made."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web

from minicloud import errors
from minicloud.compute import image_download
from minicloud.compute.image_download import GuardedResolver, download
from minicloud.compute.url_policy import AddressRefused, UrlPolicy, parse_allow

LOOPBACK = ["127.0.0.1/32"]
BODY = b"minicloud test image " * 5000  # ~100 KB
SECRET_TEXT = "internal-only-text-42"  # what a remote sends that must never reach the caller


def policy(allow=(), own=("192.0.2.10",)) -> UrlPolicy:
    return UrlPolicy.from_config(list(allow), own=lambda: [ipaddress.ip_address(a) for a in own])


# -- the policy ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("169.254.169.254", "link-local"),  # cloud metadata services live here
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # shared (CGNAT)
        ("fd00::1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.10", "own"),  # one of the node's own addresses (a documentation address stands in for it)
    ],
)
def test_internal_addresses_are_refused_by_default(address, reason):
    found = policy().refusal("example.test", address)
    assert found is not None and reason in found, found


def test_public_addresses_are_allowed():
    assert policy().refusal("example.test", "93.184.216.34") is None
    assert policy().refusal("example.test", "2606:2800:220:1:248:1893:25c8:1946") is None


def test_the_operator_allows_internal_addresses_by_cidr_or_host_name():
    p = policy(["10.1.0.0/16", "127.0.0.1", "Mirror.LAN."])
    assert p.refusal("x", "10.1.2.3") is None
    assert p.refusal("x", "10.2.0.1") is not None
    assert p.refusal("x", "127.0.0.1") is None
    assert p.refusal("x", "127.0.0.2") is not None
    assert p.refusal("mirror.lan", "192.168.7.7") is None  # the name is trusted, whatever it resolves to
    assert p.refusal("other.lan", "192.168.7.7") is not None


def test_bad_allow_entries_are_refused_with_the_entry_named():
    for bad in ["10.0.0.0/33", "mirror lan", "-x.lan", ""]:
        with pytest.raises(ValueError, match="neither a CIDR"):
            parse_allow([bad])


async def test_a_name_resolving_to_any_refused_address_is_refused_dns_rebinding():
    """The resolver the connector uses checks every address it returns; an answer that mixes a public and an
    internal address (a rebinding attack's second answer) is refused as a whole."""

    class Rebinding:
        def __init__(self):
            self.calls = 0

        async def resolve(self, host, port=0, family=0):
            self.calls += 1
            first = [{"hostname": host, "host": "93.184.216.34", "port": port, "family": 2, "proto": 0, "flags": 0}]
            return first if self.calls == 1 else [*first, {**first[0], "host": "127.0.0.1"}]

        async def close(self):
            pass

    resolver = GuardedResolver(policy(), inner=Rebinding())
    assert len(await resolver.resolve("rebind.test", 80)) == 1
    with pytest.raises(AddressRefused, match="loopback"):
        await resolver.resolve("rebind.test", 80)


def test_the_socket_factory_refuses_the_exact_address_it_is_asked_to_connect_to():
    guard = image_download.SocketGuard(policy())
    guard.host = "public.test"
    with pytest.raises(AddressRefused, match="link-local"):
        guard((2, 1, 6, "", ("169.254.169.254", 80)))


# -- downloads against a loopback server -------------------------------------------------------------------------


class Served:
    """A loopback HTTP server (aiohttp) and a loopback TCP server that speaks whatever a test wants."""

    def __init__(self):
        self.connections = 0
        self.raw_reply = b""

    async def start(self):
        app = web.Application()
        app.router.add_get("/disk", self.disk)
        app.router.add_get("/missing", self.missing)
        app.router.add_get("/to-private", self.to_private)
        app.router.add_get("/to-disk", self.to_disk)
        app.router.add_get("/loop", self.loop)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.raw = await asyncio.start_server(self.raw_handler, "127.0.0.1", 0)
        self.raw_port = self.raw.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.raw.close()
        await self.runner.cleanup()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def raw_url(self):
        return f"http://127.0.0.1:{self.raw_port}/x"

    @web.middleware
    async def count(self, request, handler):
        return await handler(request)

    async def disk(self, request):
        self.connections += 1
        return web.Response(body=BODY, content_type="application/octet-stream")

    async def missing(self, request):
        self.connections += 1
        return web.Response(status=404, text=SECRET_TEXT, reason=SECRET_TEXT)

    async def to_private(self, request):
        self.connections += 1
        raise web.HTTPFound("http://10.1.2.3/disk")

    async def to_disk(self, request):
        self.connections += 1
        raise web.HTTPFound("/disk")

    async def loop(self, request):
        self.connections += 1
        raise web.HTTPFound("/loop")

    async def raw_handler(self, reader, writer):
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.raw_reply)
        await writer.drain()
        writer.close()


@pytest.fixture
async def served():
    s = await Served().start()
    yield s
    await s.stop()


async def fetch(url, dst, *, allow=LOOPBACK, max_bytes=1 << 30, sha256=None):
    reports = []

    async def report(done, total, message):
        reports.append((done, total, message))

    with ThreadPoolExecutor(1) as ex:
        got = await download(
            url, dst, policy=policy(allow), max_bytes=max_bytes, executor=ex, report=report, expected_sha256=sha256
        )
    return got, reports


async def test_a_download_from_an_allowed_loopback_server_is_kept_with_its_sha256(served, tmp_path):
    got, reports = await fetch(served.url("/disk"), tmp_path / "disk", sha256=hashlib.sha256(BODY).hexdigest().upper())
    assert (got.size_bytes, got.sha256) == (len(BODY), hashlib.sha256(BODY).hexdigest())
    assert (tmp_path / "disk").read_bytes() == BODY
    assert reports[-1] == (len(BODY), len(BODY), "downloaded")


async def test_loopback_is_refused_unless_allowed_and_nothing_connects(served, tmp_path):
    for url in [served.url("/disk"), f"http://localhost:{served.port}/disk", f"http://[::1]:{served.port}/disk"]:
        with pytest.raises(AddressRefused, match="loopback") as exc:
            await fetch(url, tmp_path / "disk", allow=())
        assert exc.value.status == 403 and "compute.image_url_allow" in exc.value.detail
    assert served.connections == 0


async def test_a_redirect_is_checked_like_the_first_url(served, tmp_path):
    with pytest.raises(AddressRefused, match="private"):
        await fetch(served.url("/to-private"), tmp_path / "disk")
    got, _ = await fetch(served.url("/to-disk"), tmp_path / "disk2")
    assert got.size_bytes == len(BODY)
    with pytest.raises(errors.ValidationFailed, match="redirected more than"):
        await fetch(served.url("/loop"), tmp_path / "disk3")


async def test_errors_give_the_status_code_and_never_echo_what_the_remote_sent(served, tmp_path):
    with pytest.raises(errors.ValidationFailed) as exc:
        await fetch(served.url("/missing"), tmp_path / "disk")
    assert "HTTP 404" in exc.value.detail and SECRET_TEXT not in str(exc.value.to_problem())


async def test_a_reply_that_is_not_http_is_a_clean_failure(served, tmp_path):
    served.raw_reply = f"SSH-2.0-OpenSSH_9.2 {SECRET_TEXT}\r\n".encode()
    with pytest.raises(errors.ValidationFailed) as exc:
        await fetch(served.raw_url, tmp_path / "disk")
    assert "not answer with a valid HTTP response" in exc.value.detail
    assert SECRET_TEXT not in str(exc.value.to_problem())


async def test_a_connection_closed_before_content_length_is_a_failure(served, tmp_path):
    served.raw_reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n" + b"x" * 100
    with pytest.raises(errors.ValidationFailed, match="truncated"):
        await fetch(served.raw_url, tmp_path / "disk")


async def test_the_size_cap_stops_a_download(served, tmp_path):
    with pytest.raises(errors.PayloadTooLarge, match="image_url_max_bytes"):  # announced by Content-Length
        await fetch(served.url("/disk"), tmp_path / "disk", max_bytes=1000)
    served.raw_reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 5000  # no length: counted
    with pytest.raises(errors.PayloadTooLarge):
        await fetch(served.raw_url, tmp_path / "disk", max_bytes=1000)


async def test_a_sha256_mismatch_is_a_failure(served, tmp_path):
    with pytest.raises(errors.ValidationFailed, match="SHA-256"):
        await fetch(served.url("/disk"), tmp_path / "disk", sha256="0" * 64)


async def test_urls_that_are_not_plain_http_are_refused(tmp_path):
    for url in ["ftp://example.test/x", "http://user:pw@example.test/x", "http:///x", "file:///etc/passwd"]:
        with pytest.raises(errors.ValidationFailed):
            await fetch(url, tmp_path / "disk")


def test_the_config_refuses_a_bad_allow_entry(tmp_path):
    from minicloud import config
    from minicloud.errors import ConfigError

    path = tmp_path / "minicloud.toml"
    path.write_text('[compute]\nimage_url_allow = ["10.0.0.0/8", "not a host"]\n')
    with pytest.raises(ConfigError, match=r"compute\.image_url_allow: 'not a host'"):
        config.load(path, env={})
    path.write_text('[compute]\nimage_url_allow = ["10.0.0.0/8", "mirror.lan"]\nimage_url_max_bytes = 1000\n')
    assert config.load(path, env={}).compute.image_url_max_bytes == 1000
