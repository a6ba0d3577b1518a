"""Role bindings: who holds which role where — the services behind ``/v1/rolebindings``.

A binding references its principal and its project **by id** (a user or project deleted and re-created under the
same name inherits nothing) and its id is derived from what it binds, so granting twice is a conflict.
"""

from __future__ import annotations

import hashlib
from typing import Any

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.iam import policy, principals
from minicloud.iam.directory import Directory, allowed, authorize
from minicloud.iam.kinds import PROJECT, ROLE, ROLEBINDING, USER, RoleBindingSpec
from minicloud.iam.tenancy import DEFAULT_PROJECT, is_deleting
from minicloud.model import RoleBinding, RoleBindingCreate
from minicloud.state import Check, Op, Store

Binding = Obj[RoleBindingSpec, Any]


def binding_id(principal: str, role: str, project_id: str | None) -> str:
    """The binding's id, fixed by what it binds (principal id ref, role, project id): granting twice is a conflict."""
    return "rb-" + hashlib.sha256(f"{principal}\0{role}\0{project_id or ''}".encode()).hexdigest()[:20]


async def list_bindings(
    ctx: Context,
    store: Store,
    directory: Directory,
    *,
    principal: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
    name: str | None = None,
    labels: dict[str, str] | None = None,
) -> crud.ListResult:
    """One page of role bindings: all of them for whoever may list bindings cluster-wide, else those of ``ctx``'s
    project; with ``principal`` (``user:alice`` or ``user:usr-…``) only that principal's. The filters apply to the
    page read, so a page may hold fewer than ``limit`` items while ``next_cursor`` says there are more."""
    page = await crud.list_objects(ctx, store, ROLEBINDING, limit=limit, cursor=cursor, name=name, labels=labels)
    if principal is not None:  # by id or by name: ``user:alice`` and ``user:usr-…`` both work
        user = await principals.find_user(store, principal)
        principal = principals.ref_of(user) if user is not None else principal
    everything = await allowed(directory, ctx.principal, "iam:bindings:list", "", cluster=True)
    page.items = [
        b
        for b in page.items
        if (everything or b.spec.project == ctx.project) and (principal is None or b.spec.principal == principal)
    ]
    return page


async def grant_role(ctx: Context, store: Store, directory: Directory, body: RoleBindingCreate) -> Written:
    """Grant a role to a user or service account, in a project or cluster-wide. Granting outside ``ctx``'s project
    takes ``iam:bindings:create`` there (cluster-wide: a cluster-scope grant). The user, the project and a custom
    role must be unchanged when the binding commits: deleting any of them fails a racing grant instead of leaving
    a binding behind."""
    caller = ctx.principal
    if body.scope_project is None:
        await authorize(directory, caller, "iam:bindings:create", "", cluster=True)
    elif body.scope_project != ctx.project:
        await authorize(directory, caller, "iam:bindings:create", body.scope_project)
    kind, _, name = body.principal.partition(":")
    user = await principals.find_user(store, body.principal)
    if user is None:
        raise errors.NotFound(f"no {kind} named '{name}'; create it with `minicloud user create {name}`")
    ref = principals.ref_of(user)
    guards: list[Op] = [Check(kind=USER.name, id=user.id, expect_revision=user.revision)]
    if body.role.lower() not in policy.BUILTIN_ROLES:  # a custom role deleted meanwhile: the grant fails
        custom = await store.get_by_name(ROLE.name, "", body.role)
        if custom is not None:
            guards.append(Check(kind=ROLE.name, id=custom.id, expect_revision=custom.revision))
    project_id = None
    if body.scope_project == DEFAULT_PROJECT:
        project_id = principals.DEFAULT_PROJECT_ID
    elif body.scope_project is not None:
        record = await store.get_by_name(PROJECT.name, "", body.scope_project)
        project = PROJECT.load(record) if record is not None else None
        if project is None or is_deleting(project):
            raise errors.NotFound(f"no project named '{body.scope_project}'; see `minicloud project list`")
        project_id = project.id
        guards.append(Check(kind=PROJECT.name, id=project.id, expect_revision=project.revision))
    _, roles = await directory.load()
    try:
        policy.validate_binding(policy.Binding(principal=ref, role=body.role, project=body.scope_project), roles)
    except ValueError as exc:
        raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "role", "reason": str(exc)}]) from None
    spec = RoleBindingSpec(
        principal=ref, principal_name=user.name, role=body.role, project=body.scope_project, project_id=project_id
    )
    bid = binding_id(ref, body.role, project_id)
    binding = ROLEBINDING.new(project="", name=bid, spec=spec, id=bid, stamp=ctx.clock())
    return await crud.create(ctx, store, ROLEBINDING, binding, extra=guards)


async def revoke_role(
    ctx: Context, store: Store, directory: Directory, ref: str, *, expect: int | None = None
) -> Written:
    """Revoke a role binding; one outside ``ctx``'s project (or cluster-wide) takes ``iam:bindings:delete``
    cluster-wide."""
    binding = await crud.get(ctx, store, ROLEBINDING, ref)
    if binding.spec.project != ctx.project:
        await authorize(directory, ctx.principal, "iam:bindings:delete", "", cluster=True)
    return await crud.delete_obj(ctx, store, ROLEBINDING, binding, expect=expect)


def view(binding: Binding) -> RoleBinding:
    return ROLEBINDING.to_view(binding)
