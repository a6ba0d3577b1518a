"""``/v1/users``, ``/v1/rolebindings``, ``/v1/roles``: who exists, and which roles they hold where.

Handlers decode, call the IAM services (:mod:`minicloud.iam.users`, :mod:`~minicloud.iam.bindings`,
:mod:`~minicloud.iam.roles`) and render; listing and showing users come from the kind's declaration."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import bindings, roles, users
from minicloud.iam.bindings import binding_id
from minicloud.iam.kinds import USER
from minicloud.iam.roles import RoleCreate
from minicloud.model import Page, RoleBinding, RoleBindingCreate, RoleInfo, User, UserCreate

routes = Routes("iam")
__all__ = ["RoleCreate", "binding_id", "routes"]


# -- users ---------------------------------------------------------------------------------------------------------
@routes.post("/v1/users", body=UserCreate, response=User, status=201, auth=Action("iam:users:create"))
async def create_user(request: web.Request, body: UserCreate) -> Reply:
    """Create a user (with an optional password) or a service account (never a password)."""
    return res.reply(request, await users.create_user(await res.context_of(request), request.app[STORE], body))


generic.add_crud_routes(routes, USER)


@routes.delete("/v1/users/{ref}", status=204, auth=Action("iam:users:delete"))
async def delete_user(request: web.Request) -> Reply:
    """Delete a user or service account, and in the same transaction every API key, session, access key and role
    binding of theirs: nothing they held works any more, and a new user of the same name inherits nothing."""
    ctx = await res.context_of(request)
    written = await users.delete_user(ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request))
    return res.reply(request, written)


# -- role bindings -------------------------------------------------------------------------------------------------
class BindingQuery(res.ListQuery, forbid_unknown_fields=True, kw_only=True):
    principal: Annotated[str, msgspec.Meta(max_length=300)] | None = None


@routes.get("/v1/rolebindings", query=BindingQuery, response=Page[RoleBinding], auth=Action("iam:bindings:list"))
async def list_bindings(request: web.Request, query: BindingQuery) -> Page[RoleBinding]:
    """List role bindings (of one principal with ?principal=)."""
    page = await bindings.list_bindings(
        await res.context_of(request),
        request.app[STORE],
        request.app[DIRECTORY],
        principal=query.principal,
        limit=query.limit,
        cursor=query.cursor,
        name=query.name,
        labels=res.parse_selector(query.label),
    )
    return Page(items=[bindings.view(b) for b in page.items], next_cursor=page.next_cursor)


@routes.post(
    "/v1/rolebindings", body=RoleBindingCreate, response=RoleBinding, status=201, auth=Action("iam:bindings:create")
)
async def grant_role(request: web.Request, body: RoleBindingCreate) -> Reply:
    """Grant a role to a user or service account, in a project or cluster-wide."""
    ctx = await res.context_of(request)
    return res.reply(request, await bindings.grant_role(ctx, request.app[STORE], request.app[DIRECTORY], body))


@routes.delete("/v1/rolebindings/{ref}", status=204, auth=Action("iam:bindings:delete"))
async def revoke_role(request: web.Request) -> Reply:
    """Revoke a role binding."""
    ctx = await res.context_of(request)
    written = await bindings.revoke_role(
        ctx, request.app[STORE], request.app[DIRECTORY], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)


# -- roles -----------------------------------------------------------------------------------------------------------
@routes.get("/v1/roles", response=list[RoleInfo], auth=Action("iam:roles:list"))
async def list_roles(request: web.Request) -> list[RoleInfo]:
    """List the built-in and custom roles."""
    return await roles.list_roles(request.app[DIRECTORY])


@routes.post("/v1/roles", body=RoleCreate, response=RoleInfo, status=201, auth=Action("iam:roles:create"))
async def create_role(request: web.Request, body: RoleCreate) -> Reply:
    """Define a custom role from allowed and denied action patterns (wildcards: `compute:*`, `*:*:get`)."""
    return res.reply(request, await roles.create_role(await res.context_of(request), request.app[STORE], body))


@routes.delete("/v1/roles/{ref}", status=204, auth=Action("iam:roles:delete"))
async def delete_role(request: web.Request) -> Reply:
    """Delete a custom role. Refused (409) while role bindings use it (they are named); built-in roles stay."""
    ctx = await res.context_of(request)
    written = await roles.delete_role(ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request))
    return res.reply(request, written)
