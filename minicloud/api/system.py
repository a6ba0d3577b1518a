"""Health, version, node facts, the CA certificate and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from minicloud import __version__
from minicloud.api.keys import CONFIG, HOST, PKI, STORE
from minicloud.api.routing import PUBLIC, Action, Reply, Routes, json_response
from minicloud.cluster.kinds import NODE
from minicloud.model import CACertificate, Health, Node, Version

routes = Routes("system")


@routes.get("/healthz", response=Health, auth=PUBLIC)
async def healthz(request: web.Request) -> Health:
    """Liveness: 200 while the process serves HTTP."""
    return Health(status="ok")


@routes.get("/readyz", response=Health, auth=PUBLIC)
async def readyz(request: web.Request) -> Reply:
    """Readiness: 200 when the store answers reads and accepts writes, else 503."""
    store = request.app[STORE]
    checks = {}
    try:
        await store.get(NODE.name, "-")
        checks["store"] = "ok"
    except Exception as exc:  # readiness reports, it does not raise
        checks["store"] = f"failing: {exc}"
    # A dead writer never recovers (the watchdog stops too); a node without a quorum only refuses writes for now.
    checks["store_writer"] = "ok" if store.alive else "stopped: restart the agent"
    checks["store_writes"] = "ok" if store.writable else "refused: no quorum reachable"
    ok = all(v == "ok" for v in checks.values())
    return Reply(Health(status="ok" if ok else "unavailable", checks=checks), status=200 if ok else 503)


@routes.get("/v1/version", response=Version, auth=PUBLIC)
async def version(request: web.Request) -> Version:
    """The server's version, API version, node name and CA fingerprint."""
    return Version(
        version=__version__,
        api="v1",
        node=request.app[CONFIG].node_name,
        ca_fingerprint=request.app[PKI].ca_fingerprint,
    )


@routes.get("/v1/ca", response=CACertificate, auth=PUBLIC)
async def ca_certificate(request: web.Request) -> CACertificate:
    """The cluster CA certificate, for clients to pin (compare its fingerprint with `minicloud node show` on the node)."""
    pki = request.app[PKI]
    return CACertificate(fingerprint=pki.ca_fingerprint, pem=pki.ca_cert.read_text())


@routes.get("/v1/node", response=Node, auth=Action("nodes:get"))
async def node(request: web.Request) -> Node:
    """Facts about the node that answers: CPUs, memory, disks, virtualization."""
    return request.app[HOST].node()


@routes.get("/v1/openapi.json", auth=PUBLIC)
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API, generated from the route declarations."""
    from minicloud.api.openapi import document

    return json_response(document(request.app))
