"""``/v1/users``, ``/v1/rolebindings``, ``/v1/roles``: who exists, and which roles they hold where."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.auth import DIRECTORY, authorize, principal_of
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import passwords, policy, principals
from minicloud.iam.directory import BINDING_KIND, ROLE_KIND, USER_KIND
from minicloud.model import NAME_PATTERN, Page, RoleBinding, RoleBindingCreate, RoleInfo, User, UserCreate
from minicloud.state import Check, Op, Record

routes = Routes("iam")


def user_view(r: Record) -> User:
    return User(
        **r.common_fields(),
        email=r.spec.get("email", ""),
        type=r.spec.get("type", "user"),
        has_password=bool(r.spec.get("password_hash")),
    )


def binding_view(r: Record) -> RoleBinding:
    return RoleBinding(
        **r.common_fields(),
        principal=r.spec["principal"],
        principal_name=r.spec.get("principal_name", ""),
        role=r.spec["role"],
        scope_project=r.spec.get("project"),
        scope_project_id=r.spec.get("project_id"),
    )


USERS = res.register_kind(res.Kind(USER_KIND, "users", "usr", user_view, "user", cluster_level=True))
BINDINGS = res.register_kind(res.Kind(BINDING_KIND, "rolebindings", "rb", binding_view, "role", cluster_level=True))


# -- users ---------------------------------------------------------------------------------------------------------
@routes.get("/v1/users", query=res.ListQuery, response=Page[User], auth=Action("iam:users:list"))
async def list_users(request: web.Request, query: res.ListQuery) -> Page[User]:
    """List users and service accounts."""
    return await res.list_page(request, USERS, query)


@routes.post("/v1/users", body=UserCreate, response=User, status=201, auth=Action("iam:users:create"))
async def create_user(request: web.Request, body: UserCreate) -> Reply:
    """Create a user (with an optional password) or a service account (never a password)."""
    if body.name.startswith(principals.USER_ID_PREFIX):
        raise errors.ValidationFailed(
            f"user names may not start with '{principals.USER_ID_PREFIX}' (that is how user ids start); choose another",
            invalid_params=[{"name": "name", "reason": "looks like a user id"}],
        )
    spec: dict[str, object] = {"email": body.email, "type": body.type}
    if body.password is not None:
        if body.type == "serviceaccount":
            raise errors.ValidationFailed(
                "service accounts have no password; give them API keys (`minicloud apikey create --user NAME`)",
                invalid_params=[{"name": "password", "reason": "not allowed for service accounts"}],
            )
        passwords.check_password_policy(body.password)
        spec["password_hash"] = await asyncio.to_thread(passwords.hash_password, body.password)
    record = res.new_record(USERS, request, body.name, body.labels, spec)
    return await res.create(request, USERS, record)


@routes.get("/v1/users/{ref}", response=User, auth=Action("iam:users:get"))
async def show_user(request: web.Request) -> Reply:
    """Show a user."""
    record = await res.resolve(request, USERS)
    return Reply(user_view(record), headers=res.etag(record.revision))


@routes.delete("/v1/users/{ref}", status=204, auth=Action("iam:users:delete"))
async def delete_user(request: web.Request) -> Reply:
    """Delete a user or service account, and in the same transaction every API key, session, access key and role
    binding of theirs: nothing they held works any more, and a new user of the same name inherits nothing."""
    record = await res.resolve(request, USERS)
    if record.id == principals.ADMIN_ID:
        raise errors.Conflict(
            "the built-in admin user cannot be deleted; revoke its API keys (`minicloud apikey delete NAME`) instead"
        )
    ops = [res.delete_op(record, res.if_match(request))]
    ops += await principals.revocation_ops(request.app[STORE], principals.ref_of(record))
    return await res.write(request, ops, status=204, kind_name=USERS.name, respond=lambda rev: None)


# -- role bindings -------------------------------------------------------------------------------------------------
class BindingQuery(res.ListQuery, forbid_unknown_fields=True, kw_only=True):
    principal: Annotated[str, msgspec.Meta(max_length=300)] | None = None


@routes.get("/v1/rolebindings", query=BindingQuery, response=Page[RoleBinding], auth=Action("iam:bindings:list"))
async def list_bindings(request: web.Request, query: BindingQuery) -> Page[RoleBinding]:
    """List role bindings (of one principal with ?principal=)."""
    project = res.project_of(request)
    page = await res.list_page(request, BINDINGS, query)
    caller = principal_of(request)
    if query.principal is not None:  # by id or by name: ``user:alice`` and ``user:usr-…`` both work
        user = await principals.find_user(request.app[STORE], query.principal)
        query.principal = principals.ref_of(user) if user is not None else query.principal
    try:
        await authorize(request, caller, "iam:bindings:list", "", cluster=True)
        everything = True
    except errors.MinicloudError:
        everything = False
    page.items = [
        b
        for b in page.items
        if (everything or b.scope_project == project) and (query.principal is None or b.principal == query.principal)
    ]
    return page


def binding_id(principal: str, role: str, project_id: str | None) -> str:
    """The binding's id, fixed by what it binds (principal id ref, role, project id): granting twice is a conflict."""
    return "rb-" + hashlib.sha256(f"{principal}\0{role}\0{project_id or ''}".encode()).hexdigest()[:20]


@routes.post(
    "/v1/rolebindings", body=RoleBindingCreate, response=RoleBinding, status=201, auth=Action("iam:bindings:create")
)
async def grant_role(request: web.Request, body: RoleBindingCreate) -> Reply:
    """Grant a role to a user or service account, in a project or cluster-wide."""
    caller = principal_of(request)
    if body.scope_project is None:
        await authorize(request, caller, "iam:bindings:create", "", cluster=True)
    elif body.scope_project != res.project_of(request):
        await authorize(request, caller, "iam:bindings:create", body.scope_project)
    store = request.app[STORE]
    kind, _, name = body.principal.partition(":")
    user = await principals.find_user(store, body.principal)
    if user is None:
        raise errors.NotFound(f"no {kind} named '{name}'; create it with `minicloud user create {name}`")
    ref = principals.ref_of(user)
    guards: list[Op] = [Check(kind=USER_KIND, id=user.id, expect_revision=user.revision)]
    if body.role.lower() not in policy.BUILTIN_ROLES:  # a custom role deleted meanwhile: the grant fails
        custom = await store.get_by_name(ROLE_KIND, "", body.role)
        if custom is not None:
            guards.append(Check(kind=ROLE_KIND, id=custom.id, expect_revision=custom.revision))
    project_id = None
    if body.scope_project == res.DEFAULT_PROJECT:
        project_id = principals.DEFAULT_PROJECT_ID
    elif body.scope_project is not None:
        project = await store.get_by_name(res.PROJECT_KIND, "", body.scope_project)
        if project is None or project.status.get("state") == "deleting":
            raise errors.NotFound(f"no project named '{body.scope_project}'; see `minicloud project list`")
        project_id = project.id
        guards.append(Check(kind=res.PROJECT_KIND, id=project.id, expect_revision=project.revision))
    _, roles = await request.app[DIRECTORY].load()
    binding = policy.Binding(principal=ref, role=body.role, project=body.scope_project)
    try:
        policy.validate_binding(binding, roles)
    except ValueError as exc:
        raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "role", "reason": str(exc)}]) from None
    spec = {
        "principal": ref, "principal_name": user.name, "role": body.role,
        "project": body.scope_project, "project_id": project_id,
    }  # fmt: skip
    record = res.new_record(BINDINGS, request, binding_id(ref, body.role, project_id), {}, spec)
    record = msgspec.structs.replace(record, id=record.name)
    # The user and the project must still be there, unchanged, when the binding commits: deleting either deletes
    # its bindings in one transaction, and a grant racing with that delete fails here instead of surviving it.
    return await res.write(
        request,
        [res.Create(record), *guards],
        status=201,
        kind_name=BINDINGS.name,
        respond=lambda rev: binding_view(msgspec.structs.replace(record, revision=rev)),
        headers=lambda rev: {"Location": f"/v1/rolebindings/{record.id}", **res.etag(rev)},
    )


@routes.delete("/v1/rolebindings/{ref}", status=204, auth=Action("iam:bindings:delete"))
async def revoke_role(request: web.Request) -> Reply:
    """Revoke a role binding."""
    caller = principal_of(request)
    project = res.project_of(request)
    record = await res.resolve(request, BINDINGS)
    if record.spec.get("project") != project:
        await authorize(request, caller, "iam:bindings:delete", "", cluster=True)
    return await res.delete(request, BINDINGS, record)


# -- roles -----------------------------------------------------------------------------------------------------------
class RoleCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    scope: Literal["project", "cluster"] = "project"
    allow: list[Annotated[str, msgspec.Meta(max_length=255)]] = []
    deny: list[Annotated[str, msgspec.Meta(max_length=255)]] = []
    description: Annotated[str, msgspec.Meta(max_length=255)] = ""


def role_view(role: policy.Role, builtin: bool) -> RoleInfo:
    return RoleInfo(
        name=role.name,
        scope=role.scope,
        description=role.description,
        builtin=builtin,
        statements=[msgspec.to_builtins(s) for s in role.statements],
    )


@routes.get("/v1/roles", response=list[RoleInfo], auth=Action("iam:roles:list"))
async def list_roles(request: web.Request) -> list[RoleInfo]:
    """List the built-in and custom roles."""
    _, custom = await request.app[DIRECTORY].load()
    return [role_view(r, True) for r in policy.BUILTIN_ROLES.values()] + [
        role_view(r, False) for r in sorted(custom.values(), key=lambda r: r.name)
    ]


@routes.post("/v1/roles", body=RoleCreate, response=RoleInfo, status=201, auth=Action("iam:roles:create"))
async def create_role(request: web.Request, body: RoleCreate) -> Reply:
    """Define a custom role from allowed and denied action patterns (wildcards: `compute:*`, `*:*:get`)."""
    statements = []
    if body.allow:
        statements.append(policy.Statement("allow", tuple(body.allow)))
    if body.deny:
        statements.append(policy.Statement("deny", tuple(body.deny)))
    try:
        role = policy.make_role(body.name, statements, body.scope, body.description)
    except ValueError as exc:
        raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "allow/deny", "reason": str(exc)}]) from None
    kind = res.Kind(ROLE_KIND, "roles", "role", lambda r: r, "role", cluster_level=True)  # type: ignore[arg-type,return-value]
    record = res.new_record(
        kind, request, role.name, {},
        {"scope": role.scope, "description": role.description, "statements": [msgspec.to_builtins(s) for s in statements]},
    )  # fmt: skip
    return await res.write(
        request, [res.Create(record)], status=201, kind_name="role", respond=lambda rev: role_view(role, False)
    )


@routes.delete("/v1/roles/{ref}", status=204, auth=Action("iam:roles:delete"))
async def delete_role(request: web.Request) -> Reply:
    """Delete a custom role. Refused (409) while role bindings use it (they are named); built-in roles stay."""
    name = request.match_info["ref"]
    if name.lower() in policy.BUILTIN_ROLES:
        raise errors.Conflict(f"'{name}' is a built-in role and cannot be deleted")
    store = request.app[STORE]
    record = await store.get_by_name(ROLE_KIND, "", name) if len(name) <= 63 else None
    if record is None:
        raise errors.NotFound(f"no custom role named '{name[:63]}'; see `minicloud role list`")
    users = [b for b in await store.list(BINDING_KIND, limit=100_000) if b.spec.get("role") == record.name]
    if users:
        shown = ", ".join(
            f"{b.id} ({b.spec.get('principal_name') or b.spec['principal']} in "
            f"{b.spec.get('project') or 'the whole cluster'})"
            for b in users[:10]
        )
        more = f" and {len(users) - 10} more" if len(users) > 10 else ""
        raise errors.Conflict(
            f"role '{record.name}' is still bound: {shown}{more}; revoke those bindings first "
            "(`minicloud role revoke ID`)"
        )
    return await res.write(
        request,
        [res.delete_op(record, res.if_match(request))],
        status=204,
        kind_name="role",
        respond=lambda rev: None,
    )
