"""``/v1/s3/endpoint``: where the project's S3 endpoint is, the CA its certificates chain to, and client settings."""

from __future__ import annotations

import msgspec
from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.keys import CONFIG, PKI, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.objects import S3Endpoint
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
