"""Metrics over HTTP: the agent's own ``GET /metrics`` (Prometheus text format) and the project-scoped PromQL API
(``GET /v1/metrics/query``, ``GET /v1/metrics/query_range``), plus the middleware that counts API requests.

``/metrics`` is never anonymous: the caller presents the **metrics token** (``Authorization: Bearer <token>``; what the
TSDBs of the cluster and users' own Prometheus use) or is a cluster administrator (an admin credential, or root on
the Unix socket). The token is the content of ``metrics.token_file`` or, by default, derived from the cluster's
session signing key (the same on every node, copied at join), so every node accepts every scraper without a shared
file to distribute; the agent writes it to ``DATA_DIR/metrics/token`` (0600) for the local TSDB and for operators.

The query API answers for ``?project=`` only, enforced by the TSDB on the project's id (``minicloud.observe.query``); ``?scope=cluster``
queries every series and needs ``cluster:metrics:get`` cluster-wide (``admin``).

Any node answers: a node that runs no TSDB (a learner) decides the caller's scope itself, then forwards the query to
a voting node's ``/v1/metrics/node/query[_range]`` over mutual TLS (its node certificate; the voter's checked
against the cluster CA and its name), trying the voters in turn; that endpoint answers cluster nodes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from minicloud import errors
from minicloud.api import auth
from minicloud.api.keys import CONFIG, SESSION_KEY, STORE
from minicloud.api.resources import project_of
from minicloud.api.routing import AUTHENTICATED, PUBLIC, Action, Routes
from minicloud.model.metrics import MetricsQuery, MetricsRangeQuery, MetricsResult, NodeMetricsQuery
from minicloud.observe import names
from minicloud.observe.query import ProjectScope, QueryService
from minicloud.observe.scope import project_scope

routes = Routes("metrics")

#: Every collector this node exports at ``/metrics`` (the API's here; the node's added by ``agent.node``).
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
#: The query service in front of this node's TSDB (absent: this node runs none).
QUERY = web.AppKey("metrics_query", QueryService)
_API = web.AppKey("api_metrics", "ApiMetrics")
_TOKEN = web.AppKey("metrics_token_cache", dict)

#: What ``?scope=cluster`` and a non-token ``/metrics`` scrape need: cluster-wide (admin only by default).
CLUSTER_ACTION = "cluster:metrics:get"
SCRAPER = auth.Principal(kind="metrics", name="scraper", admin=False)


class ApiMetrics:
    """API requests by route template and status, and their latency."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.node = node
        self.requests = Counter(
            names.API_REQUESTS.family, names.API_REQUESTS.help, list(names.API_REQUESTS.labels), registry=registry
        )
        self.duration = Histogram(
            names.API_REQUEST_DURATION.name,
            names.API_REQUEST_DURATION.help,
            list(names.API_REQUEST_DURATION.labels),
            buckets=names.BUCKETS,
            registry=registry,
        )

        #: The children of both per (method, route, status): ``labels()`` looked them up on every request.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(self.node, method, route, str(status)),
                self.duration.labels(self.node, method, route),
            )
            if len(self._children) < 4096:  # bounded whatever methods clients invent
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


def install(app: web.Application) -> None:
    """Give ``app`` its metrics registry and the API request metrics (``create_app`` calls it)."""
    registry = CollectorRegistry(auto_describe=False)
    app[REGISTRY] = registry
    app[_API] = ApiMetrics(registry, app[CONFIG].node_name)
    app[_TOKEN] = {}


def _route_of(request: web.Request) -> str:
    """The route template (``/v1/instances/{ref}``), never the raw path: label values stay bounded."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    """Outermost: count every request with the status the client got and time it."""
    api = request.app.get(_API)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if api is not None:
            api.observe(request.method, _route_of(request), status, time.perf_counter() - start)


# -- the metrics token ---------------------------------------------------------------------------------------------
def derive_token(session_key_pem: bytes) -> str:
    """The default metrics token: HMAC-SHA256 of a fixed label under the cluster's session signing key. Every node of
    a cluster holds that key, so every node derives the same token; it reveals nothing about the key."""
    return "mcm_" + hmac.new(session_key_pem, b"minicloud metrics token v1", hashlib.sha256).hexdigest()


def metrics_token(app: web.Application) -> str:
    """This node's metrics token now (``metrics.token_file``, else derived; a changed file or key is picked up)."""
    cache = app[_TOKEN]
    path = app[CONFIG].metrics.token_file
    if path:
        try:
            stat = Path(path).stat()
        except OSError:
            return ""  # a missing token file accepts no token (admins still can scrape)
        if cache.get("file") != (path, stat.st_mtime_ns):
            cache["file"] = (path, stat.st_mtime_ns)
            cache["token"] = Path(path).read_text().strip()
        return str(cache["token"])
    key = app[SESSION_KEY].key
    if cache.get("key") is not key:
        pem = key.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        cache["key"] = key
        cache["token"] = derive_token(pem)
    return str(cache["token"])


def write_token_file(app: web.Application) -> Path:
    """Write the token scrapers present to ``DATA_DIR/metrics/token`` (0600) unless ``metrics.token_file`` names
    one; returns the file the TSDB reads."""
    config = app[CONFIG]
    if config.metrics.token_file:
        return Path(config.metrics.token_file)
    path = config.data_path / "metrics" / "token"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = metrics_token(app)
    try:
        if path.read_text() == token:
            return path
    except OSError:
        pass
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(token)
    tmp.replace(path)
    return path


def scraper_principal(request: web.Request, token: str) -> auth.Principal | None:
    """The scraper principal when ``token`` is this node's metrics token (compared in constant time), else None.
    ``auth.authenticate`` asks only for ``GET /metrics``: the token opens nothing else."""
    if _TOKEN not in request.app:
        return None
    expected = metrics_token(request.app)
    if expected and hmac.compare_digest(token.encode(), expected.encode()):
        return SCRAPER
    return None


# -- routes --------------------------------------------------------------------------------------------------------
@routes.get("/metrics", auth=AUTHENTICATED)
async def scrape(request: web.Request) -> web.Response:
    """This node's metrics in the Prometheus text format (the metrics token, or an admin credential)."""
    principal = auth.principal_of(request)
    if principal is not SCRAPER and not principal.admin:
        await auth.authorize(request, principal, CLUSTER_ACTION, "default", cluster=True)
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _scope(request: web.Request, scope: str) -> ProjectScope | None:
    """The project to enforce (its id; its name for display), or None for cluster scope (after checking the caller
    may use it)."""
    if scope == "cluster":
        await auth.authorize(request, auth.principal_of(request), CLUSTER_ACTION, project_of(request), cluster=True)
        return None
    return await project_scope(request.app[STORE], project_of(request))


_NO_TSDB = (
    "this node runs no metrics database (metrics.enabled / metrics.tsdb) and no voting node answered: ask a voting node"
)
#: Seconds a voting node has to answer a forwarded query.
FORWARD_TIMEOUT = 35.0


@routes.get("/v1/metrics/query", query=MetricsQuery, response=MetricsResult, auth=Action("metrics:series:get"))
async def query(request: web.Request, query: MetricsQuery) -> MetricsResult:
    """Evaluate a PromQL expression at one time, over the project's series."""
    project = await _scope(request, query.scope)
    service = request.app.get(QUERY)
    if service is None:
        return await _forward(request, "query", {"query": query.query, "time": query.time}, project)
    return await service.query(query.query, time=query.time, project=project, passthrough=True)


@routes.get(
    "/v1/metrics/query_range", query=MetricsRangeQuery, response=MetricsResult, auth=Action("metrics:series:get")
)
async def query_range(request: web.Request, query: MetricsRangeQuery) -> MetricsResult:
    """Evaluate a PromQL expression over a time range, over the project's series."""
    project = await _scope(request, query.scope)
    service = request.app.get(QUERY)
    if service is None:
        params = {"query": query.query, "start": query.start, "end": query.end, "step": query.step}
        return await _forward(request, "query_range", params, project)
    return await service.query_range(
        query.query, start=query.start, end=query.end, step=query.step, project=project, passthrough=True
    )


# -- a node without a TSDB asks a voting node ----------------------------------------------------------------------
async def _voters(request: web.Request) -> list[tuple[str, str]]:
    """``(name, https base URL)`` of the cluster's voting nodes but this one (registered ones only)."""
    from minicloud.api.keys import CLUSTER
    from minicloud.observe.log_access import other_nodes, own_https_port

    cluster = request.app.get(CLUSTER)
    if cluster is None or not cluster.enabled:
        return []
    config = request.app[CONFIG]
    return await other_nodes(request.app[STORE], config.node_name, own_https_port(config.data_path), voters_only=True)


class _Forwarded(msgspec.Struct, kw_only=True, rename={"result_type": "resultType"}):
    """A voting node's :class:`MetricsResult`, its ``result`` kept as the bytes it sent (passed on unchanged)."""

    result_type: str
    result: msgspec.Raw
    start: float | None = None
    end: float | None = None
    step: float | None = None


async def _forward(
    request: web.Request, kind: str, params: dict[str, str | None], project: ProjectScope | None
) -> MetricsResult:
    """Ask the voting nodes in turn (starting at a random one); the first answer is the answer. A 422 (the query)
    is the caller's; transport errors and 5xx move on to the next voter; none answering is a 503."""
    import random

    import aiohttp

    from minicloud.api.logs import client_ssl_context

    voters = await _voters(request)
    if not voters:
        raise errors.Unavailable(_NO_TSDB, headers={"Retry-After": "5"})
    first = random.randrange(len(voters))
    voters = voters[first:] + voters[:first]
    sent = {k: v for k, v in params.items() if v is not None}
    if project is not None:
        sent.update(project_id=project.id, project_name=project.name)
    ctx = client_ssl_context(request)
    failures = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)) as http:
        for name, url in voters:
            try:
                async with http.get(
                    f"{url}/v1/metrics/node/{kind}", params=sent, ssl=ctx, server_hostname=name
                ) as resp:
                    body = await resp.read()
                    if resp.status == 200:  # the voter's answer (already in the caller's scope), its series unparsed
                        got = msgspec.json.decode(body, type=_Forwarded)
                        return MetricsResult(
                            result_type=got.result_type, result=got.result, start=got.start, end=got.end, step=got.step
                        )
                    problem: dict = {}
                    with contextlib.suppress(Exception):
                        problem = msgspec.json.decode(body)
                    if resp.status == 422:
                        raise errors.ValidationFailed(
                            str(problem.get("detail", "the query was refused")),
                            invalid_params=problem.get("invalid_params") or [],
                        )
                    failures.append(f"{name}: HTTP {resp.status} {str(problem.get('detail', ''))[:200]}".strip())
            except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as exc:
                failures.append(f"{name}: {str(exc)[:200] or type(exc).__name__}")
    raise errors.Unavailable(
        f"this node runs no metrics database and no voting node answered ({'; '.join(failures)}); retry",
        headers={"Retry-After": "5"},
    )


async def _from_node(request: web.Request) -> None:
    """The caller presented a cluster node's certificate (mutual TLS), else this endpoint is not there (404)."""
    from minicloud.api.logs import _known_node, peer_node

    node = peer_node(request)
    if node is None or node == request.app[CONFIG].node_name or not await _known_node(request, node):
        raise errors.NotFound("GET /v1/metrics/node/* answers the cluster's nodes (their certificates)")


def _node_service(request: web.Request, query: NodeMetricsQuery) -> tuple[QueryService, ProjectScope | None]:
    service = request.app.get(QUERY)
    if service is None:
        raise errors.Unavailable("this node runs no metrics database either", headers={"Retry-After": "5"})
    if query.project_id is None:
        return service, None
    return service, ProjectScope(id=query.project_id, name=query.project_name or "")


@routes.get("/v1/metrics/node/query", query=NodeMetricsQuery, response=MetricsResult, auth=PUBLIC)
async def node_query(request: web.Request, query: NodeMetricsQuery) -> MetricsResult:
    """An instant query forwarded by another node of the cluster, in the scope it decided."""
    await _from_node(request)
    service, project = _node_service(request, query)
    return await service.query(query.query, time=query.time, project=project, passthrough=True)


@routes.get("/v1/metrics/node/query_range", query=NodeMetricsQuery, response=MetricsResult, auth=PUBLIC)
async def node_query_range(request: web.Request, query: NodeMetricsQuery) -> MetricsResult:
    """A range query forwarded by another node of the cluster, in the scope it decided."""
    await _from_node(request)
    service, project = _node_service(request, query)
    return await service.query_range(
        query.query, start=query.start, end=query.end, step=query.step, project=project, passthrough=True
    )
