"""Metrics over HTTP: the agent's own ``GET /metrics`` (Prometheus text format) and the project-scoped PromQL API
(``GET /v1/metrics/query``, ``GET /v1/metrics/query_range``), plus the middleware that counts API requests.

``/metrics`` is never anonymous: the caller presents the **metrics token** (``Authorization: Bearer <token>``; what the
TSDBs of the cluster and users' own Prometheus use) or is a cluster administrator (an admin credential, or root on
the Unix socket). The token is the content of ``metrics.token_file`` or, by default, derived from the cluster's
session signing key (the same on every node, copied at join), so every node accepts every scraper without a shared
file to distribute; the agent writes it to ``DATA_DIR/metrics/token`` (0600) for the local TSDB and for operators.

The query API answers for ``?project=`` only, enforced by the TSDB on the project's id (``minicloud.observe.query``); ``?scope=cluster``
queries every series and needs ``cluster:metrics:get`` cluster-wide (``admin``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from minicloud import errors
from minicloud.api import auth
from minicloud.api.keys import CONFIG, SESSION_KEY, STORE
from minicloud.api.resources import project_of
from minicloud.api.routing import AUTHENTICATED, Action, Routes
from minicloud.model.metrics import MetricsQuery, MetricsRangeQuery, MetricsResult
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

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(self.node, method, route, str(status)).inc()
        self.duration.labels(self.node, method, route).observe(seconds)


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


def _service(request: web.Request) -> QueryService:
    service = request.app.get(QUERY)
    if service is None:
        raise errors.Unavailable(
            "this node runs no metrics database (metrics.enabled / metrics.tsdb, or a non-voting member): "
            "ask a voting node"
        )
    return service


@routes.get("/v1/metrics/query", query=MetricsQuery, response=MetricsResult, auth=Action("metrics:series:get"))
async def query(request: web.Request, query: MetricsQuery) -> MetricsResult:
    """Evaluate a PromQL expression at one time, over the project's series."""
    project = await _scope(request, query.scope)
    return await _service(request).query(query.query, time=query.time, project=project)


@routes.get(
    "/v1/metrics/query_range", query=MetricsRangeQuery, response=MetricsResult, auth=Action("metrics:series:get")
)
async def query_range(request: web.Request, query: MetricsRangeQuery) -> MetricsResult:
    """Evaluate a PromQL expression over a time range, over the project's series."""
    project = await _scope(request, query.scope)
    return await _service(request).query_range(
        query.query, start=query.start, end=query.end, step=query.step, project=project
    )
