"""Roles: the built-in ones (:data:`minicloud.iam.policy.BUILTIN_ROLES`) and custom ones defined from action
patterns — the services behind ``/v1/roles``. Custom roles are addressed by name."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.write import Written
from minicloud.iam import policy
from minicloud.iam.directory import Directory
from minicloud.iam.kinds import ROLE, ROLEBINDING, RoleSpec, RoleStatement
from minicloud.model import NAME_PATTERN, RoleInfo
from minicloud.state import Store


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


async def list_roles(directory: Directory) -> list[RoleInfo]:
    """The built-in roles, then the custom ones by name (from the directory's memory: no store read)."""
    _, custom = await directory.load()
    return [role_view(r, True) for r in policy.BUILTIN_ROLES.values()] + [
        role_view(r, False) for r in sorted(custom.values(), key=lambda r: r.name)
    ]


async def create_role(ctx: Context, store: Store, body: RoleCreate) -> Written:
    """Define a custom role from allowed and denied action patterns (422 naming the first problem)."""
    statements = []
    if body.allow:
        statements.append(policy.Statement("allow", tuple(body.allow)))
    if body.deny:
        statements.append(policy.Statement("deny", tuple(body.deny)))
    try:
        role = policy.make_role(body.name, statements, body.scope, body.description)
    except ValueError as exc:
        raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "allow/deny", "reason": str(exc)}]) from None
    spec = RoleSpec(
        scope=role.scope,
        description=role.description,
        statements=[RoleStatement(effect=s.effect, actions=list(s.actions)) for s in statements],
    )
    obj = ROLE.new(project="", name=role.name, spec=spec, stamp=ctx.clock())
    written = await crud.create(ctx, store, ROLE, obj, respond=lambda _obj: role_view(role, False))
    written.headers.pop("Location", None)  # roles are addressed by name, and there is no GET of one
    return written


async def delete_role(ctx: Context, store: Store, name: str, *, expect: int | None = None) -> Written:
    """Delete a custom role. Refused (409) for a built-in role, and while role bindings use it (they are named)."""
    if name.lower() in policy.BUILTIN_ROLES:
        raise errors.Conflict(f"'{name}' is a built-in role and cannot be deleted")
    record = await store.get_by_name(ROLE.name, "", name) if len(name) <= 63 else None
    if record is None:
        raise errors.NotFound(f"no custom role named '{name[:63]}'; see `minicloud role list`")
    role = ROLE.load(record)
    users = [
        b for b in map(ROLEBINDING.load, await store.list(ROLEBINDING.name, limit=100_000)) if b.spec.role == role.name
    ]
    if users:
        shown = ", ".join(
            f"{b.id} ({b.spec.principal_name or b.spec.principal} in {b.spec.project or 'the whole cluster'})"
            for b in users[:10]
        )
        more = f" and {len(users) - 10} more" if len(users) > 10 else ""
        raise errors.Conflict(
            f"role '{role.name}' is still bound: {shown}{more}; revoke those bindings first "
            "(`minicloud role revoke ID`)"
        )
    return await crud.delete_obj(ctx, store, ROLE, role, expect=expect)
