"""``/v1/s3/endpoint``: where the project's S3 endpoint is, the CA its certificates chain to, and client settings;
``/v1/s3/usage``: the project's quota and its buckets' usage and metering; ``/v1/s3/quota``: an administrator sets
the project's quota."""

from __future__ import annotations

import msgspec
from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.accesskeys import KEYSTORE
from minicloud.api.auth import AUDITED
from minicloud.api.keys import CONFIG, PKI, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.objects import S3Endpoint, S3QuotaSet, S3Usage
from minicloud.objects import buckets

routes = Routes("s3")


class EndpointQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: An access key id to put in the client settings.
    key: str = ""


@routes.get("/v1/s3/endpoint", query=EndpointQuery, response=S3Endpoint, auth=Action("storage:buckets:list"))
async def show_endpoint(request: web.Request, query: EndpointQuery) -> Reply:
    """The S3 endpoint: this node's gateway URL and every node's, the CA bundle, ``aws``/rclone settings."""
    app = request.app
    config = app[CONFIG]
    pki = app[PKI]
    body = await buckets.endpoint(
        await res.context_of(request), app[STORE], node=config.node_name, port=config.objects.port,
        domain=config.objects.domain, ca_file=pki.ca_cert, ca_fingerprint=pki.ca_fingerprint, access_key=query.key,
        enabled=config.objects.enabled,
    )  # fmt: skip
    return Reply(body)


@routes.get("/v1/s3/usage", response=S3Usage, auth=Action("storage:buckets:list"))
async def show_usage(request: web.Request) -> Reply:
    """The project's quota in force and what its buckets hold and served (bytes, objects, requests, bytes out and
    in, per bucket and summed), as RGW last reported them."""
    cfg = request.app[CONFIG].objects
    body = await buckets.project_usage(
        await res.context_of(request), request.app[STORE], default_bytes=cfg.quota_bytes,
        default_objects=cfg.quota_objects,
    )  # fmt: skip
    return Reply(body)


@routes.post("/v1/s3/quota", body=S3QuotaSet, response=S3Usage, auth=Action("cluster:s3quotas:update"))
async def set_quota(request: web.Request, body: S3QuotaSet) -> Reply:
    """Set the project's quota on everything its buckets hold (administrators: a project's members cannot raise
    their own); 0 is unlimited, null the configuration's. Applied by the leading storage node within a second."""
    app = request.app
    cfg = app[CONFIG].objects
    usage = await buckets.set_project_quota(
        await res.context_of(request), app[STORE], app[KEYSTORE], body, default_bytes=cfg.quota_bytes,
        default_objects=cfg.quota_objects,
    )  # fmt: skip
    request[AUDITED] = True  # in the quota's transaction
    return Reply(usage)
