"""``/v1/buckets``: create, delete and ``set`` call :mod:`minicloud.objects.buckets`; list, show and update are
generic. A create answers once recorded (``creating``; the leading node makes the RGW bucket); a delete asks this
node's S3 gateway, so a bucket holding objects is refused (409) from RGW's own answer."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.accesskeys import KEYSTORE
from minicloud.api.keys import CONFIG, PKI, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.objects import Bucket, BucketConfigure, BucketCreate
from minicloud.objects import buckets
from minicloud.objects.kinds import BUCKET

routes = Routes("buckets")
_BASE = "/v1/buckets/{ref}"


@routes.post("/v1/buckets", body=BucketCreate, response=Bucket, status=201, auth=Action("storage:buckets:create"))
async def create_bucket(request: web.Request, body: BucketCreate) -> Reply:
    """Create a bucket (S3 naming rules; versioning, public read and a quota optional)."""
    written = await buckets.create_bucket(await res.context_of(request), request.app[STORE], body)
    return res.reply(request, written)


generic.add_crud_routes(routes, BUCKET)


@routes.post(f"{_BASE}/set", body=BucketConfigure, response=Bucket, auth=Action("storage:buckets:update"))
async def configure_bucket(request: web.Request, body: BucketConfigure) -> Reply:
    """Change versioning, public read or the quota (the fields given)."""
    ctx = await res.context_of(request)
    written = await buckets.configure_bucket(ctx, request.app[STORE], request.match_info["ref"], body)
    return res.reply(request, written)


@routes.delete(_BASE, response=Bucket, status=204, auth=Action("storage:buckets:delete"))
async def delete_bucket(request: web.Request) -> Reply:
    """Delete an empty bucket: 204; 409 when it holds objects (S3's ``BucketNotEmpty``); 202 (``deleting``) when no
    gateway answered here (the leading node finishes it)."""
    app = request.app
    config = app[CONFIG]
    gateway = None
    if config.objects.enabled:
        gateway = await buckets.local_gateway(app[STORE], config.node_name, config.objects.port, app[PKI].ca_cert)
    written = await buckets.delete_bucket(
        await res.context_of(request), app[STORE], app[KEYSTORE], request.match_info["ref"], gateway,
        expect=res.if_match(request),
    )  # fmt: skip
    return res.reply(request, written)
