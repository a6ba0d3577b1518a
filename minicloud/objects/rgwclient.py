"""A small async client for RGW: S3 requests and the admin ops API (``/admin/…``), signed with :mod:`sigv4`.

Used by the objects reconciler (tenants, keys, quotas, buckets) and by the bucket services (a delete asks RGW, so a
non-empty bucket is refused from RGW's own answer). No boto3 in the server.
"""

from __future__ import annotations

import json
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from minicloud.objects import sigv4

Params = Iterable[tuple[str, str]] | Mapping[str, str]


class S3Error(Exception):
    """RGW answered with an error: ``status`` (HTTP), ``code`` (S3's, e.g. ``BucketNotEmpty``), ``message``."""

    def __init__(self, status: int, code: str, message: str = "", what: str = "") -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(f"{what}: {status} {code}" + (f" ({message})" if message else ""))


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the gateway against the cluster CA (host names are not checked, as for the API: nodes are reached by
    whatever address the operator has; the pinned private CA is the trust anchor)."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.check_hostname = False
    return ctx


def _error_of(status: int, body: bytes, what: str) -> S3Error:
    code, message = "", ""
    text = body.strip()
    if text.startswith(b"{"):
        try:
            data = json.loads(text)
            code = str(data.get("Code", ""))
            message = str(data.get("Message", ""))
        except ValueError:
            pass
    elif text.startswith(b"<"):
        try:
            root = ET.fromstring(text)
            code = root.findtext("Code") or ""
            message = root.findtext("Message") or ""
        except ET.ParseError:
            pass
    return S3Error(status, code or f"HTTP{status}", message, what)


class RgwClient:
    """Signed requests to one gateway as one key. ``close()`` when done (or use ``async with``)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        ssl_ctx: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        region: str = "us-east-1",
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self._ssl = ssl_ctx
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RgwClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        params: Params = (),
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        ok: Iterable[int] = (),
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one signed request; ``(status, headers, body)``. A status ≥ 300 not in ``ok`` raises S3Error."""
        items = list(params.items()) if isinstance(params, Mapping) else list(params)
        query = sigv4.canonical_query(items)
        raw_path = quote(path, safe="/-_.~")
        url = f"{self.endpoint}{raw_path}" + (f"?{query}" if query else "")
        signed = sigv4.sign(
            method, url, access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            headers=headers, body=body,
        )  # fmt: skip
        async with self._sess().request(
            method, URL(url, encoded=True), data=body if body or method in ("PUT", "POST") else None,
            headers=signed, ssl=self._ssl if self._ssl is not None else True,
        ) as resp:  # fmt: skip
            data = await resp.read()
            status = resp.status
            out_headers = {k.lower(): v for k, v in resp.headers.items()}
        if status >= 300 and status not in set(ok):
            raise _error_of(status, data, f"{method} {path}")
        return status, out_headers, data

    # -- admin ops ---------------------------------------------------------------------------------------------------
    async def admin(self, method: str, resource: str, params: Params = (), *, ok: Iterable[int] = ()) -> Any:
        """``METHOD /admin/<resource>?format=json&…``; the decoded JSON answer (None when empty)."""
        items = list(params.items()) if isinstance(params, Mapping) else list(params)
        status, _, data = await self.request(method, f"/admin/{resource}", [("format", "json"), *items], ok=ok)
        if status >= 300 or not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None


__all__ = ["RgwClient", "S3Error", "ssl_context"]
