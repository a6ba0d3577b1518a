"""``/v1/accesskeys``: S3-style access key pairs for the object store (services: :mod:`minicloud.iam.accesskeys`).

The secret is shown once and then kept only encrypted at rest with the node's key store (:data:`KEYSTORE`)."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import accesskeys
from minicloud.iam.accesskeys import secret_of
from minicloud.iam.keystore import KeyStore
from minicloud.iam.kinds import ACCESSKEY
from minicloud.model import AccessKey, AccessKeyCreate, AccessKeySecret

routes = Routes("accesskeys")
#: The node's key store: seals access key secrets and the replies stored for an Idempotency-Key.
KEYSTORE = web.AppKey("keystore", KeyStore)
__all__ = ["KEYSTORE", "routes", "secret_of"]

generic.add_crud_routes(routes, ACCESSKEY)


@routes.post(
    "/v1/accesskeys", body=AccessKeyCreate, response=AccessKeySecret, status=201, auth=Action("iam:accesskeys:create")
)
async def create_access_key(request: web.Request, body: AccessKeyCreate) -> Reply:
    """Create an access key pair; the secret is in this response only."""
    ctx = await res.context_of(request)
    app = request.app
    return res.reply(request, await accesskeys.create_access_key(ctx, app[STORE], app[DIRECTORY], app[KEYSTORE], body))


@routes.get("/v1/accesskeys/{ref}", response=AccessKey, auth=Action("iam:accesskeys:get"))
async def show_access_key(request: web.Request) -> Reply:
    """Show an access key by id or name (never its secret)."""
    key = await accesskeys.get_access_key(await res.context_of(request), request.app[STORE], request.match_info["ref"])
    return Reply(ACCESSKEY.to_view(key), headers=res.etag(key.revision))


@routes.delete("/v1/accesskeys/{ref}", status=204, auth=Action("iam:accesskeys:delete"))
async def delete_access_key(request: web.Request) -> Reply:
    """Delete an access key pair (one of a principal with cluster-wide roles: only that principal or a cluster
    administrator may)."""
    ctx = await res.context_of(request)
    written = await accesskeys.delete_access_key(
        ctx, request.app[STORE], request.app[DIRECTORY], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)


async def _set_disabled(request: web.Request, disabled: bool) -> Reply:
    ctx = await res.context_of(request)
    written = await accesskeys.set_access_key_disabled(
        ctx,
        request.app[STORE],
        request.app[DIRECTORY],
        request.match_info["ref"],
        disabled,
        expect=res.if_match(request),
    )
    return res.reply(request, written)


@routes.post("/v1/accesskeys/{ref}/disable", response=AccessKey, auth=Action("iam:accesskeys:disable"))
async def disable_access_key(request: web.Request) -> Reply:
    """Disable an access key: the object store refuses it (within a second) until it is enabled again. Who may is
    who may delete it."""
    return await _set_disabled(request, True)


@routes.post("/v1/accesskeys/{ref}/enable", response=AccessKey, auth=Action("iam:accesskeys:enable"))
async def enable_access_key(request: web.Request) -> Reply:
    """Enable a disabled access key again."""
    return await _set_disabled(request, False)
