"""Download a disk image from an http(s) URL for an import, without letting the URL reach inside the node's network.

The contract of :func:`download`:

- **Where it connects.** Every address a connection is opened to is checked *at connect time* (a socket factory on
  the connector sees the exact address, after resolution; the resolver also refuses a name when any address it
  resolves to is refused), so DNS rebinding cannot slip past a check made earlier. Refused unless
  ``compute.image_url_allow`` lists them (a CIDR, or the host name as written in the URL): loopback, link-local,
  private, shared (CGNAT), multicast, unspecified and reserved addresses, and every address of the node's own
  interfaces. Redirects (at most 5, http/https only) are followed by hand and each hop is checked the same way.
  No proxy from the environment is used.
- **What it reports.** Errors name what went wrong on our side of the wire (could not connect, HTTP status code,
  not HTTP, too large, truncated, checksum) and never echo anything the remote sent: no reason phrase, header,
  body or redirect target.
- **What it keeps.** The body is written to ``dst`` and fsynced. A body larger than ``max_bytes``, shorter or longer
  than its ``Content-Length``, cut off early, or with another SHA-256 than ``expected_sha256`` is a failure; the
  caller removes ``dst`` on any failure (see ``compute/images.py``), so nothing is kept.
- File writes and hashing run in the caller's executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from minicloud import errors
from minicloud.compute.url_policy import UrlPolicy, normal_host

CHUNK = 1 << 20
MAX_REDIRECTS = 5
#: How often progress is written to the operation record while bytes arrive.
PROGRESS_EVERY_S = 1.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Downloaded:
    size_bytes: int
    sha256: str


def _url_error(message: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(message, invalid_params=[{"name": "url", "reason": message}])


class GuardedResolver(AbstractResolver):
    """A resolver that refuses a name when any address it resolves to is refused (a mixed answer is an attack)."""

    def __init__(self, policy: UrlPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._policy.check(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


class SocketGuard:
    """The connector's socket factory: the last check, on the exact address a socket is about to connect to.
    ``host`` is the host of the URL being fetched (set it before each request; redirects are followed one at a
    time)."""

    def __init__(self, policy: UrlPolicy, host: str = "") -> None:
        self.policy = policy
        self.host = host

    def __call__(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, address = addr_info
        self.policy.check(self.host, str(address[0]))
        return socket.socket(family=family, type=type_, proto=proto)


def guarded_connector(
    policy: UrlPolicy, host: str = "", *, ssl: Any = True, limit: int = 1
) -> tuple[aiohttp.TCPConnector, SocketGuard]:
    """A connector for requests to a caller-chosen address under ``policy``: every address a name resolves to is
    checked (:class:`GuardedResolver`) and so is the exact address each socket connects to (:class:`SocketGuard`,
    returned so that the caller sets its ``host`` per request); one address tried at a time, no DNS cache. Image
    downloads, alarm webhooks and backups to another S3 endpoint use it."""
    guard = SocketGuard(policy, normal_host(host) if host else "")
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(policy),
        socket_factory=guard,
        happy_eyeballs_delay=None,  # one address at a time: a refusal from the socket factory ends the attempt
        use_dns_cache=False,
        limit=limit,
        ssl=ssl,
    )
    return connector, guard


def check_url(url: str, policy: UrlPolicy) -> URL:
    """The URL parsed; refused at once when its host is an IP address the policy refuses (no connection made)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise _url_error("the URL is not valid; give an http:// or https:// URL of a qcow2 or raw disk") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _url_error("the URL must be http:// or https:// with a host name or address")
    if parsed.user is not None or parsed.password is not None:
        raise _url_error("the URL must not carry a user name or password")
    host = normal_host(parsed.host)
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return parsed  # a name: checked when it resolves, at connect time
    policy.check(host, host)
    return parsed


Report = Callable[[int, int, str], Awaitable[None]]


def _write(fout: Any, digest: Any, chunk: bytes) -> None:
    digest.update(chunk)
    fout.write(chunk)


def _close(fout: Any, sync: bool) -> None:
    try:
        if sync:
            fout.flush()
            os.fsync(fout.fileno())
    finally:
        fout.close()


async def download(
    url: str,
    dst: Path,
    *,
    policy: UrlPolicy,
    max_bytes: int,
    executor: Executor,
    report: Report,
    expected_sha256: str | None = None,
    connect_timeout: float = 30.0,
    read_timeout: float = 120.0,
) -> Downloaded:
    """Fetch ``url`` into ``dst`` under ``policy`` (see the module docstring). The caller removes ``dst`` on failure."""
    loop = asyncio.get_running_loop()
    target = check_url(url, policy)
    connector, guard = guarded_connector(policy)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
    headers = {"Accept-Encoding": "identity", "User-Agent": "minicloud-image-import"}
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
        ) as session:
            for _ in range(MAX_REDIRECTS + 1):
                guard.host = normal_host(target.host or "")
                async with session.get(target, headers=headers, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS and "Location" in resp.headers:
                        try:
                            target = check_url(str(target.join(URL(resp.headers["Location"]))), policy)
                        except errors.ValidationFailed:
                            raise _url_error("the server redirected to a URL that is not http(s)") from None
                        continue
                    if resp.status != 200:
                        raise _url_error(f"the server answered HTTP {resp.status} (expected 200); check the URL")
                    return await _receive(resp, dst, loop, executor, report, max_bytes, expected_sha256)
            raise _url_error(f"the server redirected more than {MAX_REDIRECTS} times")
    except errors.MinicloudError:
        raise
    except aiohttp.ClientConnectorError:
        raise _url_error("could not connect to the server in the URL; check the host and port") from None
    except aiohttp.ClientPayloadError:
        raise _url_error("the download was cut off before the end (truncated); nothing was kept, retry it") from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError):
        raise _url_error("the server did not answer with a valid HTTP response; check the URL") from None
    except TimeoutError:
        raise _url_error("the server stopped sending (timed out); nothing was kept, retry it") from None
    except (aiohttp.ClientError, OSError, ValueError):
        raise _url_error("the download failed; check the URL and retry") from None


async def _receive(
    resp: aiohttp.ClientResponse,
    dst: Path,
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
    report: Report,
    max_bytes: int,
    expected_sha256: str | None,
) -> Downloaded:
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise errors.PayloadTooLarge(_too_large(max_bytes))
    total = declared or 0
    digest = hashlib.sha256()
    size = 0
    fout = await loop.run_in_executor(executor, dst.open, "wb")
    complete = False
    try:
        await report(0, total, "downloading")
        last = time.monotonic()
        async for chunk in resp.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise errors.PayloadTooLarge(_too_large(max_bytes))
            if declared is not None and size > declared:
                raise _url_error("the server sent more than its Content-Length; nothing was kept, retry it")
            await loop.run_in_executor(executor, _write, fout, digest, chunk)
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                await report(size, total, "downloading")
        if declared is not None and size != declared:
            raise _url_error("the download was cut off before the end (truncated); nothing was kept, retry it")
        complete = True
    finally:
        await loop.run_in_executor(executor, _close, fout, complete)
    sha256 = digest.hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        raise _url_error(
            f"the download's SHA-256 is {sha256}, not the expected {expected_sha256.lower()}; nothing was kept"
        )
    await report(size, total or size, "downloaded")
    return Downloaded(size, sha256)


def _too_large(max_bytes: int) -> str:
    shown = f"{max_bytes / (1 << 30):g} GiB" if max_bytes >= 1 << 30 else f"{max_bytes} bytes"
    return f"the image is larger than {shown}, the most a URL import downloads (compute.image_url_max_bytes)"
