"""``/v1/security-groups``: create, delete (refused while another group's rule names it) and the rules
sub-resource call :mod:`minicloud.network.security_groups`; list, show and update are generic."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model.network import SecurityGroup, SecurityGroupCreate, SecurityGroupRuleCreate
from minicloud.network import security_groups as sg
from minicloud.network.kinds import SECURITY_GROUP

routes = Routes("security-groups")


@routes.post(
    "/v1/security-groups",
    body=SecurityGroupCreate,
    response=SecurityGroup,
    status=201,
    auth=Action("network:securitygroups:create"),
)
async def create_security_group(request: web.Request, body: SecurityGroupCreate) -> Reply:
    """Create a security group (all egress allowed unless rules are given)."""
    written = await sg.create_group(await res.context_of(request), request.app[STORE], body)
    return res.reply(request, written)


generic.add_crud_routes(routes, SECURITY_GROUP)


@routes.delete("/v1/security-groups/{ref}", status=204, auth=Action("network:securitygroups:delete"))
async def delete_security_group(request: web.Request) -> Reply:
    """Delete a security group no other group's rule names (409 naming them)."""
    ctx = await res.context_of(request)
    written = await sg.delete_group(ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request))
    return res.reply(request, written)


@routes.post(
    "/v1/security-groups/{ref}/rules",
    body=SecurityGroupRuleCreate,
    response=SecurityGroup,
    auth=Action("network:securitygroups:rules:create"),
)
async def add_security_group_rule(request: web.Request, body: SecurityGroupRuleCreate) -> Reply:
    """Add a rule; answers the group with it."""
    ctx = await res.context_of(request)
    written = await sg.add_rule(ctx, request.app[STORE], request.match_info["ref"], body, expect=res.if_match(request))
    return res.reply(request, written)


@routes.delete(
    "/v1/security-groups/{ref}/rules/{rule_id}",
    response=SecurityGroup,
    auth=Action("network:securitygroups:rules:delete"),
)
async def remove_security_group_rule(request: web.Request) -> Reply:
    """Remove a rule by id; answers the group without it."""
    ctx = await res.context_of(request)
    m = request.match_info
    written = await sg.remove_rule(ctx, request.app[STORE], m["ref"], m["rule_id"], expect=res.if_match(request))
    return res.reply(request, written)
