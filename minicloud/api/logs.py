"""``/v1/logs``: every node's logs merged by time, through any node; ``/v1/logs/node``: this node's own.

``GET /v1/logs`` reads this node's files itself and asks every other node of the cluster for its lines over HTTPS
with **mutual TLS**: the asking node presents its node certificate (signed by the cluster CA, ``clientAuth``) and
checks the other's against the cluster CA and its node name. The node endpoint answers a request that presents a
cluster node's certificate (the asking node has already decided what the caller may see, and sends it as filters),
or an administrator. Answers are merged by time with a heap merge; the newest ``limit`` lines are kept.

Who reads what:

- administrators (``cluster:logs:get``, the ``admin`` role): every service of every node, the audit log included;
- project members (``compute:instances:console``): the consoles of their project's instances only — one instance
  with ``instance=`` (another project's is 404), else all of the project's; asking for a service is 403.

``follow=true`` answers NDJSON: the newest ``limit`` lines merged, then new lines as each node sees them (one JSON
object per line; a node that fails is a line ``{"node": …, "error": …}``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api import auth
from minicloud.api import resources as res
from minicloud.api.keys import CLUSTER, CONFIG, PKI, STORE
from minicloud.api.routing import PUBLIC, Action, Routes
from minicloud.model.logs import LogLine, LogsAnswer, LogsQuery, NodeAnswer, NodeLogsQuery
from minicloud.observe import log_access
from minicloud.observe import logs as nodelogs

log = logging.getLogger("minicloud.logs")
routes = Routes("logs")

#: Reading every service's lines (administrators).
CLUSTER_ACTION = "cluster:logs:get"
#: Seconds between two looks at the files while following.
FOLLOW_INTERVAL = 0.5
#: New lines a follow keeps while another node still sends its backlog (the newest; the rest are counted).
EARLY_MAX = 10_000
#: Audit entries one request reads at most (newest first, in windows back from now).
AUDIT_MAX_ENTRIES = 100_000
#: Seconds another node has to answer a (non-follow) query.
PEER_TIMEOUT = 30.0
_enc = msgspec.json.Encoder()
FORWARDER = web.AppKey("logs_forwarder", object)


# -- who may read what ----------------------------------------------------------------------------------------------
async def _is_admin(request: web.Request) -> bool:
    try:
        await auth.authorize(request, auth.principal_of(request), CLUSTER_ACTION, res.project_of(request), cluster=True)
    except (errors.Forbidden, errors.NotFound):
        return False
    return True


def _services(text: str | None) -> set[str] | None:
    if not text:
        return None
    names = {s.strip() for s in text.split(",") if s.strip()}
    unknown = names - set(nodelogs.SERVICES)
    if unknown:
        reason = f"unknown service {', '.join(sorted(unknown))}; use {', '.join(nodelogs.SERVICES)}"
        raise errors.ValidationFailed(reason, invalid_params=[{"name": "service", "reason": reason}])
    return names or None


def _since(text: str | None) -> float | None:
    if not text:
        return None
    from minicloud.iam.audit import parse_since

    try:
        return parse_since(text).timestamp()
    except ValueError as exc:
        raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "since", "reason": str(exc)}]) from None


async def _pattern(pattern: str | None) -> str | None:
    if pattern is None:
        return None
    try:
        await asyncio.to_thread(nodelogs.check_pattern, pattern)
    except nodelogs.PatternError as exc:
        raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "grep", "reason": str(exc)}]) from None
    return pattern


async def _scope(request: web.Request, query: LogsQuery) -> tuple[set[str] | None, set[str] | None]:
    """``(services, instances)`` the caller may read and asked for (instances None: any)."""
    from minicloud.compute.instances import get_instance

    services = _services(query.service)
    if query.instance is not None:
        if services is not None and services != {"console"}:
            reason = "an instance's logs are its console: leave out service, or say service=console"
            raise errors.ValidationFailed(reason, invalid_params=[{"name": "service", "reason": reason}])
        ctx = await res.context_of(request)
        obj = await get_instance(ctx, request.app[STORE], query.instance)  # 404 outside the caller's project
        return {"console"}, {obj.id}
    if await _is_admin(request):
        return services, None
    if services is not None and services != {"console"}:
        # not an administrator: name the missing action (403), as for any other refused request
        await auth.authorize(request, auth.principal_of(request), CLUSTER_ACTION, res.project_of(request), cluster=True)
    return {"console"}, await log_access.project_instance_ids(request.app[STORE], res.project_of(request))


# -- the node endpoint ----------------------------------------------------------------------------------------------
def peer_node(request: web.Request) -> str | None:
    """The cluster node whose certificate the caller presented (verified against the cluster CA), else None."""
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    orgs = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "organizationName"}
    if "minicloud" not in orgs or len(names) != 1:
        return None
    return next(iter(names))


def _node_filter(request: web.Request, query: NodeLogsQuery) -> nodelogs.Filter:
    config = request.app[CONFIG]
    instances = None
    if query.instances is not None:
        instances = {i for i in query.instances.split(",") if i}
    return nodelogs.Filter(
        since=_since(query.since),
        services=_services(query.service),
        instances=instances,
        pattern=query.grep,
        grep_timeout=config.logs.grep_timeout,
    )


async def _read_local(request: web.Request, flt: nodelogs.Filter, limit: int) -> list[LogLine]:
    config = request.app[CONFIG]
    try:
        return await asyncio.to_thread(nodelogs.read_node, config.data_path, config.node_name, flt, limit)
    except nodelogs.PatternError as exc:
        raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "grep", "reason": str(exc)}]) from None


@routes.get("/v1/logs/node", query=NodeLogsQuery, response=LogsAnswer, auth=PUBLIC)
async def node_logs(request: web.Request, query: NodeLogsQuery) -> web.StreamResponse:
    """This node's lines (the node certificate of another cluster node, or an administrator)."""
    node = peer_node(request)
    if node is None or not await _known_node(request, node):
        principal = auth.principal_of(request)
        if principal.kind == "anonymous":
            # a public route (other nodes call it with their certificate, no credential): to anyone else it is not there
            raise errors.NotFound(
                "GET /v1/logs/node answers the cluster's nodes (their certificates) and administrators"
            )
        await auth.authorize(request, principal, CLUSTER_ACTION, res.project_of(request), cluster=True)
    config = request.app[CONFIG]
    limit = min(query.limit, config.logs.query_max_lines)
    if query.grep is not None:
        await _pattern(query.grep)
    flt = _node_filter(request, query)
    if not query.follow:
        lines = await _read_local(request, flt, limit + 1)
        body = LogsAnswer(lines=lines[-limit:], nodes=[NodeAnswer(node=config.node_name)], truncated=len(lines) > limit)
        return web.Response(body=_enc.encode(body), content_type="application/json")
    resp = await _ndjson(request)
    follower = await asyncio.to_thread(nodelogs.Follower, config.data_path, config.node_name, flt)
    for line in await _read_local(request, flt, limit):
        await resp.write(_enc.encode(line) + b"\n")
    await resp.write(b'{"live":true}\n')
    await _follow_local(resp, follower)
    return resp


async def _known_node(request: web.Request, name: str) -> bool:
    if name == request.app[CONFIG].node_name:
        return True
    return await log_access.is_node(request.app[STORE], name)


async def _ndjson(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
    await resp.prepare(request)
    return resp


async def _follow_local(resp: web.StreamResponse, follower: nodelogs.Follower) -> None:
    while True:
        await asyncio.sleep(FOLLOW_INTERVAL)
        try:
            lines = await asyncio.to_thread(follower.poll)
        except nodelogs.PatternError as exc:
            await resp.write(_enc.encode({"node": follower.node, "error": str(exc)}) + b"\n")
            return
        for line in lines:
            await resp.write(_enc.encode(line) + b"\n")


# -- asking the other nodes -----------------------------------------------------------------------------------------
def client_ssl_context(request: web.Request) -> ssl.SSLContext:
    """TLS to another node: its certificate checked against the cluster CA; ours presented (mutual TLS)."""
    pki = request.app[PKI]
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))  # and the node's name: server_hostname below
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    return ctx


async def _peers(request: web.Request, only: str | None) -> list[tuple[str, str]]:
    """``(name, https base URL)`` of every other node (or just ``only``); 404 for an unknown ``only``."""
    me = request.app[CONFIG].node_name
    cluster = request.app.get(CLUSTER)
    peers: list[tuple[str, str]] = []
    if cluster is not None and cluster.enabled:
        port = log_access.own_https_port(request.app[CONFIG].data_path)
        peers = await log_access.other_nodes(request.app[STORE], me, port)
    if only is not None:
        if only != me and only not in {n for n, _ in peers}:
            raise errors.NotFound(f"no node named '{only}' in this cluster", node=only)
        peers = [(n, u) for n, u in peers if n == only]
    return peers


def _peer_params(query: LogsQuery, services: set[str] | None, instances: set[str] | None, limit: int) -> dict[str, str]:
    params = {"limit": str(limit)}
    node_services = (services or set(nodelogs.NODE_SERVICES)) - {"audit"}
    if services is not None:
        params["service"] = ",".join(sorted(node_services))
    if instances is not None:
        params["instances"] = ",".join(sorted(instances))
    if query.since:
        params["since"] = query.since
    if query.grep:
        params["grep"] = query.grep
    return params


async def _ask(
    http: aiohttp.ClientSession, name: str, url: str, params: dict[str, str], ctx: ssl.SSLContext
) -> list[LogLine]:
    if not url:
        raise aiohttp.ClientError("the node has not registered its HTTPS address")
    async with http.get(
        f"{url}/v1/logs/node",
        params=params,
        ssl=ctx,
        server_hostname=name,  # the certificate must name the node we meant (node certificates carry it as a DNS name)
        timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT),
    ) as resp:
        body = await resp.read()
        if resp.status != 200:
            detail = ""
            with contextlib.suppress(Exception):
                detail = msgspec.json.decode(body).get("detail", "")
            if resp.status == 422:
                raise errors.ValidationFailed(detail or "refused by another node")
            raise aiohttp.ClientError(f"HTTP {resp.status} {detail}".strip())
        return msgspec.json.decode(body, type=LogsAnswer).lines


async def _audit_lines(request: web.Request, since: float | None, pattern: str | None, limit: int) -> list[LogLine]:
    """The newest ``limit`` audit entries since ``since`` (the cluster's audit log, read from the store).

    The store lists oldest first, so the log is read in windows going back from now (1 min, then each twice the last)
    and reading stops once ``limit`` lines are found or ``since`` (default 7 days) is reached: the newest entries are
    never the ones left out. A window holding more than :data:`AUDIT_MAX_ENTRIES` entries is halved (towards now)
    until it fits; one request keeps at most four times that many entries."""
    config = request.app[CONFIG]
    now = time.time()
    floor = since if since is not None else now - 7 * 86400
    found: list[list[LogLine]] = []  # per window, newest window first
    count, total, narrowed, width, end = 0, 0, 0, 60.0, now + 60
    while count < limit and end > floor and total < 4 * AUDIT_MAX_ENTRIES:
        start = max(floor, end - width)
        lines, complete = await _audit_window(request, start, end, AUDIT_MAX_ENTRIES)
        if not complete and end - start > 0.002 and narrowed < 40:
            narrowed += 1
            width = (end - start) / 2  # too many entries in this window to read them all: a narrower one
            continue
        total += len(lines)
        if pattern:
            hits = await asyncio.to_thread(nodelogs.grep, pattern, [ln.line for ln in lines], config.logs.grep_timeout)
            lines = [ln for ln, hit in zip(lines, hits, strict=True) if hit]
        kept = lines[-(limit - count) :]
        found.append(kept)
        count += len(kept)
        end, width = start, width * 2
    return [ln for window in reversed(found) for ln in window]


async def _audit_window(request: web.Request, start: float, end: float, cap: int) -> tuple[list[LogLine], bool]:
    """The audit entries in ``[start, end)``, at most ``cap`` (oldest first), and whether that is all of them."""
    from minicloud.iam import audit

    node = request.app[CONFIG].node_name
    out: list[LogLine] = []
    cursor = None
    while len(out) < cap:
        entries, cursor = await audit.list_entries(
            request.app[STORE], since=nodelogs.iso(start), limit=min(1000, cap - len(out) + 1), cursor=cursor
        )
        lines = [audit_line(e, node) for e in entries]
        out.extend(ln for ln in lines if start <= ln.ts < end)
        if cursor is None or not lines or lines[-1].ts >= end:
            return out[:cap], len(out) <= cap
    return out[:cap], False


def audit_line(entry: Any, node: str) -> LogLine:
    from minicloud.iam.audit import parse_since

    ts = parse_since(entry.time).timestamp()
    text = (
        f"{entry.principal} {entry.method} {entry.path} -> {entry.status} {entry.result}"
        f" action={entry.action} project={entry.project or '-'} source={entry.source} request={entry.request_id}"
        + (f" count={entry.count}" if entry.count != 1 else "")
    )
    return LogLine(time=nodelogs.iso(ts), ts=ts, node=node, service="audit", line=text, source="audit")


@routes.get("/v1/logs", query=LogsQuery, response=LogsAnswer, auth=Action("compute:instances:console"))
async def logs(request: web.Request, query: LogsQuery) -> web.StreamResponse:
    """Every node's lines merged by time, the newest ``limit`` (``follow``: then new lines, NDJSON). Administrators
    read every service; project members the consoles of their project's instances."""
    config = request.app[CONFIG]
    services, instances = await _scope(request, query)
    pattern = await _pattern(query.grep)
    since = _since(query.since)
    limit = min(query.limit, config.logs.query_max_lines)
    peers = await _peers(request, query.node)
    local = query.node in (None, config.node_name)
    node_services = None if services is None else services - {"audit"}
    flt = nodelogs.Filter(
        since=since, services=node_services, instances=instances, pattern=pattern, grep_timeout=config.logs.grep_timeout
    )
    with_audit = instances is None and query.node is None and (services is None or "audit" in services)
    ctx = client_ssl_context(request) if peers else None
    params = _peer_params(query, services, instances, limit + 1)
    if not query.follow:
        return await _answer(request, flt, peers, params, ctx, local, with_audit, node_services, since, pattern, limit)
    return await _follow(request, flt, peers, params, ctx, local, limit)


async def _answer(
    request: web.Request,
    flt: nodelogs.Filter,
    peers: list[tuple[str, str]],
    params: dict[str, str],
    ctx: ssl.SSLContext | None,
    local: bool,
    with_audit: bool,
    node_services: set[str] | None,
    since: float | None,
    pattern: str | None,
    limit: int,
) -> web.Response:
    config = request.app[CONFIG]
    per_node: list[list[LogLine]] = []
    answers: list[NodeAnswer] = []
    if local and node_services != set():
        per_node.append(await _read_local(request, flt, limit + 1))
        answers.append(NodeAnswer(node=config.node_name))
    if peers and node_services != set():
        assert ctx is not None
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(
                *(_ask(http, name, url, params, ctx) for name, url in peers), return_exceptions=True
            )
        for (name, _), result in zip(peers, results, strict=True):
            if isinstance(result, errors.ValidationFailed):
                raise result
            if isinstance(result, BaseException):
                answers.append(NodeAnswer(node=name, error=str(result) or type(result).__name__))
                continue
            per_node.append(result)
            answers.append(NodeAnswer(node=name))
    if with_audit:
        per_node.append(await _audit_lines(request, since, pattern, limit + 1))
    merged = nodelogs.merge(per_node, limit + 1)
    body = LogsAnswer(lines=merged[-limit:], nodes=answers, truncated=len(merged) > limit)
    return web.Response(body=_enc.encode(body), content_type="application/json")


async def _follow(
    request: web.Request,
    flt: nodelogs.Filter,
    peers: list[tuple[str, str]],
    params: dict[str, str],
    ctx: ssl.SSLContext | None,
    local: bool,
    limit: int,
) -> web.StreamResponse:
    """The newest ``limit`` lines of every node merged by time, then each new line as it comes."""
    config = request.app[CONFIG]
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=10_000)
    tasks: list[asyncio.Task[None]] = []

    async def local_lines() -> None:
        follower = await asyncio.to_thread(nodelogs.Follower, config.data_path, config.node_name, flt)
        backlog = await _read_local(request, flt, limit)
        await queue.put(("backlog", (config.node_name, backlog)))
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            for line in await asyncio.to_thread(follower.poll):
                await queue.put(("line", line))

    async def peer_lines(http: aiohttp.ClientSession, name: str, url: str) -> None:
        backlog: list[LogLine] = []
        live = False
        try:
            if not url:
                raise aiohttp.ClientError("the node has not registered its HTTPS address")
            async with http.get(
                f"{url}/v1/logs/node",
                params={**params, "follow": "true", "limit": str(limit)},
                ssl=ctx,
                server_hostname=name,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            ) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientError(f"HTTP {resp.status}")
                async for raw in resp.content:
                    obj = msgspec.json.decode(raw)
                    if obj.get("live"):
                        live = True
                        await queue.put(("backlog", (name, backlog)))
                    elif "error" in obj and "line" not in obj:
                        raise aiohttp.ClientError(obj["error"])
                    elif live:
                        await queue.put(("line", msgspec.convert(obj, LogLine)))
                    else:
                        backlog.append(msgspec.convert(obj, LogLine))
            raise aiohttp.ClientError("the node closed the stream")
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            if not live:
                await queue.put(("backlog", (name, [])))
            await queue.put(("error", (name, str(exc) or type(exc).__name__)))

    http = aiohttp.ClientSession() if peers else None
    resp = await _ndjson(request)
    try:
        if local:
            tasks.append(asyncio.create_task(local_lines()))
        for name, url in peers:
            assert http is not None
            tasks.append(asyncio.create_task(peer_lines(http, name, url)))
        waiting = len(tasks)
        backlogs: list[list[LogLine]] = []
        early = EarlyLines(config.node_name, EARLY_MAX)
        while waiting:
            kind, item = await queue.get()
            if kind == "backlog":
                backlogs.append(item[1])
                waiting -= 1
            elif kind == "error":
                early.error(item[0], item[1])
            else:
                early.line(item)
        for line in nodelogs.merge(backlogs, limit):
            await resp.write(_enc.encode(line) + b"\n")
        for chunk in early.drain():
            await resp.write(chunk)
        while True:
            kind, item = await queue.get()
            if kind == "error":
                await resp.write(_enc.encode({"node": item[0], "error": item[1]}) + b"\n")
            elif kind == "line":
                await resp.write(_enc.encode(item) + b"\n")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if http is not None:
            await http.close()
    return resp


class EarlyLines:
    """What a follow sees while a slow node still sends its backlog: every node error, and the newest ``cap`` new
    lines (older ones are counted and said in one error line, so a slow peer cannot grow this without bound)."""

    def __init__(self, node: str, cap: int) -> None:
        self.node = node
        self.errors: list[bytes] = []
        self.lines: collections.deque[bytes] = collections.deque(maxlen=cap)
        self.seen = 0

    def error(self, node: str, message: str) -> None:
        self.errors.append(_enc.encode({"node": node, "error": message}) + b"\n")

    def line(self, line: LogLine) -> None:
        self.lines.append(_enc.encode(line) + b"\n")
        self.seen += 1

    def drain(self) -> list[bytes]:
        out = list(self.errors)
        if self.seen > len(self.lines):
            note = f"{self.seen - len(self.lines)} new lines dropped while waiting for a slow node's backlog"
            out.append(_enc.encode({"node": self.node, "error": note}) + b"\n")
        return out + list(self.lines)


# -- this node's retention and forwarding ----------------------------------------------------------------------------
async def logs_ctx(app: web.Application) -> AsyncIterator[None]:
    """This node's log retention (rotation by size, removal by age, console time notes) every
    ``logs.rotate_interval``, and the syslog forwarder when ``logs.forward`` names a collector."""
    config = app[CONFIG]
    c = config.logs

    async def retention() -> None:
        while True:
            try:
                rotated = await asyncio.to_thread(
                    nodelogs.retention_pass,
                    config.data_path,
                    max_bytes=c.max_bytes,
                    backups=c.backups,
                    max_age=c.max_age_days * 86400,
                )
                if rotated:
                    log.info("log files rotated", extra={"count": rotated})
            except Exception:
                log.exception("log retention failed; will retry")
            await asyncio.sleep(c.rotate_interval)

    task = asyncio.create_task(retention(), name="logs-retention")
    forwarder = None
    if c.forward:
        from minicloud.observe.syslog import Forwarder

        forwarder = Forwarder(
            c.forward,
            data_path=config.data_path,
            node=config.node_name,
            services=c.forward_services,
            ca_file=c.forward_ca_file,
            queue=c.forward_queue,
        )
        forwarder.start()
        app[FORWARDER] = forwarder
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if forwarder is not None:
        await forwarder.close()


def agent_log_file(data_path: Path) -> Path:
    """Where the agent writes its own log (JSON lines), beside its stdout."""
    return data_path / "logs" / "agent.log"
