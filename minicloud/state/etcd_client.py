"""A small asyncio client for etcd v3 through its JSON gateway (``/v3/...``), over mutual TLS.

Why not a gRPC client: the Python etcd3 packages pin old protobuf/grpc versions and are synchronous; the gateway is
part of every etcd 3.4+ server, speaks JSON we already decode with msgspec, and streams watches over plain HTTP.
Keys and values are bytes (base64 on the wire); 64-bit integers travel as JSON strings and are returned as ints.

The client tries each endpoint in turn and sticks to the first that answers; any transport failure moves on to the
next one. Requests that reach no endpoint raise :class:`EtcdUnavailable`. A timed-out request may have been applied
by the endpoint that timed out and is then sent again to the next one: writes must be safe to repeat or, like
``EtcdStore.commit``, able to tell that the first attempt applied (its transaction marker).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

_dec = msgspec.json.Decoder()


class EtcdError(Exception):
    """etcd answered with an error (``code`` is the gRPC status code)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached, or the cluster has no quorum (gRPC UNAVAILABLE / DEADLINE_EXCEEDED)."""


class EtcdCompacted(EtcdError):
    """A watch asked for revisions etcd no longer keeps; ``revision`` is the oldest it still has."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted history up to revision {revision}")
        self.revision = revision


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KV:
        return cls(
            key=unb64(d.get("key")),
            value=unb64(d.get("value")),
            create_revision=int(d.get("create_revision", 0)),
            mod_revision=int(d.get("mod_revision", 0)),
            version=int(d.get("version", 0)),
            lease=int(d.get("lease", 0)),
        )


@dataclass(frozen=True)
class Event:
    type: str  # "PUT" | "DELETE"
    kv: KV


@dataclass
class WatchBatch:
    revision: int
    events: list[Event] = field(default_factory=list)


# -- transaction builders ------------------------------------------------------------------------------------------
def cmp_create(key: bytes, revision: int, result: str = "EQUAL") -> dict[str, Any]:
    return {"target": "CREATE", "key": b64(key), "create_revision": str(revision), "result": result}


def cmp_mod(key: bytes, revision: int, result: str = "EQUAL") -> dict[str, Any]:
    return {"target": "MOD", "key": b64(key), "mod_revision": str(revision), "result": result}


def op_put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def op_delete(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def op_range(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def range_kvs(response: dict[str, Any]) -> list[KV]:
    """The keys a ``request_range`` inside a transaction returned (one entry of ``txn()``'s responses)."""
    return [KV.from_json(d) for d in response.get("response_range", {}).get("kvs", [])]


class EtcdClient:
    """One client per process; safe to share between tasks."""

    def __init__(self, endpoints: list[str], ssl_context: ssl.SSLContext | None = None, timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self._ssl = ssl_context
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._current = 0

    def set_endpoints(self, endpoints: list[str]) -> None:
        if endpoints and endpoints != self.endpoints:
            current = self.endpoints[self._current % len(self.endpoints)]
            self.endpoints = list(endpoints)
            self._stick(current)

    def _stick(self, endpoint: str) -> None:
        """Use ``endpoint`` first from now on (it answered); the first one when it is no longer listed."""
        self._current = self.endpoints.index(endpoint) if endpoint in self.endpoints else 0

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl or False, limit=64))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, path: str, body: dict[str, Any], *, seconds: float | None = None) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` on the first endpoint that answers; return the decoded reply."""
        errors = []
        endpoints = list(self.endpoints)  # set_endpoints() may replace the list while we are awaiting
        n = len(endpoints)
        for attempt in range(n):
            endpoint = endpoints[(self._current + attempt) % n]
            url = f"{endpoint}/v3/{path}"
            try:
                async with self._http().post(
                    url, data=msgspec.json.encode(body), timeout=aiohttp.ClientTimeout(total=seconds or self._timeout)
                ) as resp:
                    data = await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(f"{endpoint}: {exc.__class__.__name__} {exc}")
                continue
            self._stick(endpoint)
            reply = _dec.decode(data) if data else {}
            if resp.status != 200:
                code = int(reply.get("code", 0)) if isinstance(reply, dict) else 0
                message = reply.get("message") or reply.get("error") if isinstance(reply, dict) else str(data[:200])
                if code in (4, 14) or resp.status in (503, 504) or "learner" in str(message):
                    # DEADLINE_EXCEEDED / UNAVAILABLE (no quorum), or a learner that serves no such request.
                    errors.append(f"{endpoint}: {message}")
                    continue
                raise EtcdError(f"etcd {path}: {message}", code)
            return reply
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    # -- KV ------------------------------------------------------------------------------------------------------
    async def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        seconds: float | None = None,
    ) -> tuple[list[KV], int, bool]:
        """``(kvs, header_revision, more)``; linearizable read."""
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        if revision:
            body["revision"] = str(revision)
        if limit:
            body["limit"] = str(limit)
        if keys_only:
            body["keys_only"] = True
        reply = await self.call("kv/range", body, seconds=seconds)
        kvs = [KV.from_json(d) for d in reply.get("kvs", [])]
        return kvs, int(reply["header"]["revision"]), bool(reply.get("more", False))

    async def get(self, key: bytes) -> KV | None:
        kvs, _, _ = await self.range(key)
        return kvs[0] if kvs else None

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        reply = await self.call("kv/put", body)
        return int(reply["header"]["revision"])

    async def delete(self, key: bytes) -> int:
        reply = await self.call("kv/deleterange", {"key": b64(key)})
        return int(reply["header"]["revision"])

    async def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]], failure: list[dict[str, Any]] | None = None
    ) -> tuple[bool, int, list[dict[str, Any]]]:
        """``(succeeded, header_revision, responses)``."""
        reply = await self.call("kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        return bool(reply.get("succeeded", False)), int(reply["header"]["revision"]), reply.get("responses", [])

    # -- leases --------------------------------------------------------------------------------------------------
    async def lease_grant(self, ttl: int) -> int:
        reply = await self.call("lease/grant", {"TTL": str(ttl)})
        return int(reply["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """Renew ``lease``; returns the remaining TTL (0 or less: the lease is gone)."""
        reply = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(reply.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        with contextlib.suppress(EtcdError):
            await self.call("lease/revoke", {"ID": str(lease)})

    # -- cluster -------------------------------------------------------------------------------------------------
    async def status(self, endpoint: str | None = None) -> dict[str, Any]:
        if endpoint is None:
            return await self.call("maintenance/status", {})
        async with self._http().post(
            f"{endpoint}/v3/maintenance/status", data=b"{}", timeout=aiohttp.ClientTimeout(total=self._timeout)
        ) as resp:
            return _dec.decode(await resp.read())

    async def defragment(self, endpoint: str, seconds: float = 300.0) -> None:
        """Defragment the member at ``endpoint`` (it serves nothing while this runs: one member at a time)."""
        async with self._http().post(
            f"{endpoint}/v3/maintenance/defragment", data=b"{}", timeout=aiohttp.ClientTimeout(total=seconds)
        ) as resp:
            if resp.status != 200:
                raise EtcdError(f"defragment {endpoint}: HTTP {resp.status} {(await resp.read())[:200]!r}")

    async def alarms(self) -> list[tuple[int, str]]:
        """The cluster's active alarms as ``(member_id, "NOSPACE" | "CORRUPT")``."""
        reply = await self.call("maintenance/alarm", {"action": "GET", "memberID": "0", "alarm": "NONE"})
        return [(int(a.get("memberID", 0)), str(a.get("alarm", ""))) for a in reply.get("alarms", [])]

    async def alarm_disarm(self, member_id: int, alarm: str = "NOSPACE") -> None:
        await self.call("maintenance/alarm", {"action": "DEACTIVATE", "memberID": str(member_id), "alarm": alarm})

    async def member_list(self) -> list[dict[str, Any]]:
        return (await self.call("cluster/member/list", {})).get("members", [])

    async def member_add(self, peer_urls: list[str], learner: bool = False) -> dict[str, Any]:
        return await self.call("cluster/member/add", {"peerURLs": peer_urls, "isLearner": learner})

    async def member_remove(self, member_id: int) -> None:
        await self.call("cluster/member/remove", {"ID": str(member_id)})

    async def member_promote(self, member_id: int) -> None:
        await self.call("cluster/member/promote", {"ID": str(member_id)})

    # -- watch ---------------------------------------------------------------------------------------------------
    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Every change under ``prefix`` from ``start_revision`` on, one :class:`WatchBatch` per revision, in order.

        Raises :class:`EtcdCompacted` when ``start_revision`` is older than etcd's history and
        :class:`EtcdUnavailable` when the stream breaks; the caller resumes from the last revision it handled + 1.
        """
        body = {
            "create_request": {
                "key": b64(prefix),
                "range_end": b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
                "progress_notify": True,
            }
        }
        endpoint = self.endpoints[self._current % len(self.endpoints)]
        try:
            async with self._http().post(
                f"{endpoint}/v3/watch",
                data=msgspec.json.encode(body),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=30),
            ) as resp:
                if resp.status != 200:
                    raise EtcdUnavailable(f"watch on {endpoint}: HTTP {resp.status}")
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if not line.strip():
                            continue
                        for batch in _watch_batches(_dec.decode(line)):
                            yield batch
        except (aiohttp.ClientError, TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            self._rotate()
            raise EtcdUnavailable(f"watch on {endpoint} broke: {exc.__class__.__name__} {exc}") from None
        self._rotate()
        raise EtcdUnavailable(f"watch on {endpoint} ended")


def _watch_batches(message: dict[str, Any]) -> list[WatchBatch]:
    if "error" in message:
        raise EtcdUnavailable(f"watch error: {message['error'].get('message', message['error'])}")
    result = message.get("result", {})
    compact = int(result.get("compact_revision", 0))
    if compact:
        raise EtcdCompacted(compact)
    if result.get("created"):
        return []  # the creation ack: its header revision says nothing about what has been sent yet
    if result.get("canceled"):
        raise EtcdUnavailable(f"watch canceled: {result.get('cancel_reason', '')}")
    batches: list[WatchBatch] = []
    for e in result.get("events", []):
        kv = KV.from_json(e["kv"])
        event = Event(type=e.get("type", "PUT"), kv=kv)
        if not batches or batches[-1].revision != kv.mod_revision:
            batches.append(WatchBatch(revision=kv.mod_revision))
        batches[-1].events.append(event)
    if not batches and "header" in result:
        # A progress notification (or the creation ack): everything up to the header revision has been sent.
        batches.append(WatchBatch(revision=int(result["header"].get("revision", 0))))
    return batches
