"""``/v1/apikeys``: bearer credentials for HTTPS clients. The secret is returned once, at creation."""

from __future__ import annotations

import secrets

import msgspec
from aiohttp import web

from minicloud.api import credentials
from minicloud.api import resources as res
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import apikeys, principals
from minicloud.model import ApiKey, ApiKeyCreate, ApiKeySecret, Page

routes = Routes("apikeys")
KIND = res.register_kind(res.Kind(apikeys.KIND, "apikeys", apikeys.PREFIX, apikeys.view, "apikey"))


@routes.get("/v1/apikeys", query=res.ListQuery, response=Page[ApiKey], auth=Action("iam:apikeys:list"))
async def list_apikeys(request: web.Request, query: res.ListQuery) -> Page[ApiKey]:
    """List API keys (never their secrets)."""
    return await res.list_page(request, KIND, query)


@routes.post("/v1/apikeys", body=ApiKeyCreate, response=ApiKeySecret, status=201, auth=Action("iam:apikeys:create"))
async def create_apikey(request: web.Request, body: ApiKeyCreate) -> Reply:
    """Create an API key acting as `user` (default: you); the response holds its secret, shown only this once.
    Without a name, the key is named `<user>-<random>`."""
    user, guard = await credentials.owner_of_new(request, body.user)
    name = body.name or f"{user.name[:55]}-{secrets.token_hex(3)}"
    record, token = apikeys.new_key(
        res.project_of(request), name, body.description, body.expires_in, body.labels, principal=principals.ref_of(user)
    )
    return await res.write(
        request,
        [res.Create(record), guard],
        status=201,
        kind_name=KIND.name,
        respond=lambda rev: apikeys.view_with_secret(msgspec.structs.replace(record, revision=rev), token),
        headers=lambda rev: {"Location": f"/v1/apikeys/{record.id}", **res.etag(rev)},
    )


@routes.get("/v1/apikeys/{ref}", response=ApiKey, auth=Action("iam:apikeys:get"))
async def show_apikey(request: web.Request) -> Reply:
    """Show an API key by id or name."""
    record = await res.resolve(request, KIND)
    return Reply(apikeys.view(record), headers=res.etag(record.revision))


@routes.delete("/v1/apikeys/{ref}", status=204, auth=Action("iam:apikeys:delete"))
async def delete_apikey(request: web.Request) -> Reply:
    """Revoke (delete) an API key; requests using it fail from now on. A key of a principal with cluster-wide roles
    can be revoked only by that principal or a cluster administrator."""
    record = await res.resolve(request, KIND)
    await credentials.may_revoke(request, record, "API key")
    return await res.delete(request, KIND, record)
