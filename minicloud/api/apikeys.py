"""``/v1/apikeys``: bearer credentials for HTTPS clients. The secret is returned once, at creation."""

from __future__ import annotations

from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.auth import authorize, principal_of
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import apikeys
from minicloud.iam.directory import USER_KIND
from minicloud.model import ApiKey, ApiKeyCreate, ApiKeySecret, Page

routes = Routes("apikeys")
KIND = res.register_kind(res.Kind(apikeys.KIND, "apikeys", apikeys.PREFIX, apikeys.view, "apikey"))


@routes.get("/v1/apikeys", query=res.ListQuery, response=Page[ApiKey], auth=Action("iam:apikeys:list"))
async def list_apikeys(request: web.Request, query: res.ListQuery) -> Page[ApiKey]:
    """List API keys (never their secrets)."""
    return await res.list_page(request, KIND, query)


@routes.post("/v1/apikeys", body=ApiKeyCreate, response=ApiKeySecret, status=201, auth=Action("iam:apikeys:create"))
async def create_apikey(request: web.Request, body: ApiKeyCreate) -> Reply:
    """Create an API key; the response holds its secret, shown only this once."""
    caller = principal_of(request)
    if body.user is not None:
        user = await request.app[STORE].get_by_name(USER_KIND, "", body.user)
        if user is None:
            raise errors.NotFound(f"no user named '{body.user}'; create it with `minicloud user create {body.user}`")
        owner = f"{user.spec.get('type', 'user')}:{user.name}"
        if owner != caller.ref:  # keys for someone else: user administration
            await authorize(request, caller, "iam:users:update", "", cluster=True)
    else:
        owner = caller.ref if caller.kind in ("user", "serviceaccount") else "user:admin"
    record, token = apikeys.new_key(
        res.project_of(request), body.name, body.description, body.expires_in, body.labels, principal=owner
    )
    return await res.create(request, KIND, record, respond=lambda r: apikeys.view_with_secret(r, token))


@routes.get("/v1/apikeys/{ref}", response=ApiKey, auth=Action("iam:apikeys:get"))
async def show_apikey(request: web.Request) -> Reply:
    """Show an API key by id or name."""
    record = await res.resolve(request, KIND)
    return Reply(apikeys.view(record), headers=res.etag(record.revision))


@routes.delete("/v1/apikeys/{ref}", status=204, auth=Action("iam:apikeys:delete"))
async def delete_apikey(request: web.Request) -> Reply:
    """Revoke (delete) an API key; requests using it fail from now on."""
    return await res.delete(request, KIND)
