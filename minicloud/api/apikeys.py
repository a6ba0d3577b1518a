"""``/v1/apikeys``: bearer credentials for HTTPS clients. The secret is returned once, at creation.

Create and revoke are :mod:`minicloud.iam.apikeys`; list and show come from the kind's declaration."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import apikeys
from minicloud.iam.kinds import APIKEY
from minicloud.model import ApiKeyCreate, ApiKeySecret

routes = Routes("apikeys")


@routes.post("/v1/apikeys", body=ApiKeyCreate, response=ApiKeySecret, status=201, auth=Action("iam:apikeys:create"))
async def create_apikey(request: web.Request, body: ApiKeyCreate) -> Reply:
    """Create an API key acting as `user` (default: you); the response holds its secret, shown only this once.
    Without a name, the key is named `<user>-<random>`."""
    ctx = await res.context_of(request)
    return res.reply(request, await apikeys.create_apikey(ctx, request.app[STORE], request.app[DIRECTORY], body))


generic.add_crud_routes(routes, APIKEY)


@routes.delete("/v1/apikeys/{ref}", status=204, auth=Action("iam:apikeys:delete"))
async def delete_apikey(request: web.Request) -> Reply:
    """Revoke (delete) an API key; requests using it fail from now on. A key of a principal with cluster-wide roles
    can be revoked only by that principal or a cluster administrator."""
    ctx = await res.context_of(request)
    written = await apikeys.delete_apikey(
        ctx, request.app[STORE], request.app[DIRECTORY], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)
