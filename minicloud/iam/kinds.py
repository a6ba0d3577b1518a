"""IAM's resource kinds, declared once (see :mod:`minicloud.core.kinds`): users and service accounts, role bindings,
custom roles, projects, API keys, S3 access keys, login sessions and audit entries.

The API, the services (:mod:`minicloud.iam.users`, :mod:`~minicloud.iam.bindings`, :mod:`~minicloud.iam.roles`,
:mod:`~minicloud.iam.projects`, :mod:`~minicloud.iam.apikeys`, :mod:`~minicloud.iam.accesskeys`,
:mod:`~minicloud.iam.logins`), the SDK and the CLI read them from here. Every spec field has a default, so records
written by older versions (fields missing) still load. Like every declaration module it imports msgspec and the
public model alone.

Retention (CONVENTIONS 22): audit entries (``retention.audit_days``, 90 d) and expired sessions are deleted by the
retention leader loop (:mod:`minicloud.retention`); the other kinds are deleted by their owners.
"""

from __future__ import annotations

from typing import Any

import msgspec

from minicloud.core.kinds import Column, Kind, Obj, declare
from minicloud.model import AccessKey, ApiKey, AuditEntry, Project, ProjectUpdate, RoleBinding, RoleInfo, User

#: The built-in administrator (``minicloud init``'s key acts as it). Its id is fixed so that nodes bootstrap it alike.
ADMIN_ID = "usr-admin"
ADMIN_REF = f"user:{ADMIN_ID}"


# -- users and service accounts ------------------------------------------------------------------------------------
class UserSpec(msgspec.Struct, kw_only=True):
    #: ``user`` or ``serviceaccount`` (service accounts never have a password).
    type: str = "user"
    email: str = ""
    #: scrypt (``minicloud.iam.passwords``); None: API keys only. Never rendered.
    password_hash: str | None = None


def _render_user(obj: Obj[UserSpec, Any]) -> User:
    s = obj.spec
    return User(
        **obj.common_fields(),
        email=s.email,
        type="serviceaccount" if s.type == "serviceaccount" else "user",
        has_password=bool(s.password_hash),
    )


#: Create (password hashing) and delete (revokes every credential and binding) are written by hand.
USER = declare(
    Kind(
        name="user",
        plural="users",
        prefix="usr",
        spec=UserSpec,
        scope="cluster",
        action="iam:users",
        view=User,
        render=_render_user,
        noun="user",
        columns=(Column("name", "name"), Column("type", "type"), Column("email", "email"), Column("id", "id")),
        generic=frozenset({"list", "show"}),
    )
)


# -- role bindings -------------------------------------------------------------------------------------------------
class RoleBindingSpec(msgspec.Struct, kw_only=True):
    #: ``user:usr-…`` / ``serviceaccount:usr-…``: by id, never by name.
    principal: str = ""
    #: The principal's name when granted (for reading only).
    principal_name: str = ""
    role: str = ""
    #: The project's name (None: cluster-wide) and id: the binding applies to that project only, and goes with it.
    project: str | None = None
    project_id: str | None = None


def _render_binding(obj: Obj[RoleBindingSpec, Any]) -> RoleBinding:
    s = obj.spec
    return RoleBinding(
        **obj.common_fields(),
        principal=s.principal,
        principal_name=s.principal_name,
        role=s.role,
        scope_project=s.project,
        scope_project_id=s.project_id,
    )


#: Listing filters by principal and by what the caller may see, granting and revoking check the scope: no generic
#: verb. The id is derived from what it binds (:func:`minicloud.iam.bindings.binding_id`) and is also its name.
ROLEBINDING = declare(
    Kind(
        name="rolebinding",
        plural="rolebindings",
        prefix="rb",
        spec=RoleBindingSpec,
        scope="cluster",
        action="iam:bindings",
        view=RoleBinding,
        render=_render_binding,
        noun="role",
        title="role binding",
        columns=(
            Column("principal", "principal"),
            Column("role", "role"),
            Column("project", "scope_project"),
            Column("id", "id"),
        ),
        generic=frozenset(),
    )
)


# -- custom roles --------------------------------------------------------------------------------------------------
class RoleStatement(msgspec.Struct, kw_only=True):
    effect: str
    actions: list[str] = []


class RoleSpec(msgspec.Struct, kw_only=True):
    scope: str = "project"
    description: str = ""
    statements: list[RoleStatement] = []


def _render_role(obj: Obj[RoleSpec, Any]) -> RoleInfo:
    s = obj.spec
    return RoleInfo(
        name=obj.name,
        scope=s.scope,
        description=s.description,
        builtin=False,
        statements=[msgspec.to_builtins(st) for st in s.statements],
    )


#: Custom roles are addressed by name; the listing merges the built-in roles in: no generic verb. Not in the events
#: stream (as before: a role's change shows in the bindings and decisions it affects), so it declares no ``view``;
#: ``render`` gives its :class:`~minicloud.model.RoleInfo`.
ROLE = declare(
    Kind(
        name="role",
        plural="roles",
        prefix="role",
        spec=RoleSpec,
        scope="cluster",
        action="iam:roles",
        render=_render_role,
        noun="role",
        title="custom role",
        columns=(
            Column("name", "name"),
            Column("scope", "scope"),
            Column("builtin", "builtin"),
            Column("description", "description"),
        ),
        generic=frozenset(),
    )
)


# -- projects ------------------------------------------------------------------------------------------------------
class ProjectSpec(msgspec.Struct, kw_only=True):
    description: str = ""


class ProjectStatus(msgspec.Struct, kw_only=True):
    #: ``deleting`` while its deletion checks that it is empty (creates in it are refused then).
    state: str = "active"


#: Delete is race-free and takes the project's bindings (:func:`minicloud.iam.projects.delete_project`).
PROJECT = declare(
    Kind(
        name="project",
        plural="projects",
        prefix="prj",
        spec=ProjectSpec,
        status=ProjectStatus,
        scope="cluster",
        action="iam:projects",
        view=Project,
        noun="project",
        columns=(
            Column("name", "name"),
            Column("description", "description"),
            Column("id", "id"),
            Column("created", "created_at"),
        ),
        patch=ProjectUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


# -- API keys ------------------------------------------------------------------------------------------------------
class ApiKeySpec(msgspec.Struct, kw_only=True):
    #: SHA-256 of the secret (never rendered).
    hash: str = ""
    #: The token's first characters, to recognise it.
    prefix: str = ""
    description: str = ""
    expires_at: str | None = None
    #: Keys made before IAM act as the built-in admin.
    principal: str = ADMIN_REF


class ApiKeyStatus(msgspec.Struct, kw_only=True):
    #: Written at most once a minute per key (:class:`minicloud.iam.apikeys.LastUsed`).
    last_used_at: str | None = None


#: Create returns the one-time secret and delete checks who may revoke: both by hand.
APIKEY = declare(
    Kind(
        name="apikey",
        plural="apikeys",
        prefix="ak",
        spec=ApiKeySpec,
        status=ApiKeyStatus,
        action="iam:apikeys",
        view=ApiKey,
        noun="apikey",
        title="API key",
        columns=(
            Column("name", "name"),
            Column("prefix", "prefix"),
            Column("expires", "expires_at"),
            Column("created", "created_at"),
            Column("last used", "last_used_at"),
            Column("id", "id"),
        ),
        generic=frozenset({"list", "show"}),
    )
)


# -- S3 access keys ------------------------------------------------------------------------------------------------
class AccessKeySpec(msgspec.Struct, kw_only=True):
    principal: str = ""
    description: str = ""
    #: The secret access key, sealed with the node key store (the key id as associated data). Never rendered.
    secret: str = ""
    #: A disabled key is refused by the object store (the agent sets its RGW key's mode to none) until enabled.
    disabled: bool = False
    #: RFC 3339 UTC; from then on the object store refuses the key. Empty: no expiry.
    expires_at: str = ""


#: Ids are AWS-shaped (``MCAK`` + 16 characters, no dash), so show (by id or name) and delete (who may revoke) are
#: written by hand; only the listing is generic.
ACCESSKEY = declare(
    Kind(
        name="accesskey",
        plural="accesskeys",
        prefix="MCAK",
        spec=AccessKeySpec,
        action="iam:accesskeys",
        view=AccessKey,
        noun="accesskey",
        title="access key",
        columns=(
            Column("access key id", "id"),
            Column("name", "name"),
            Column("principal", "principal"),
            Column("disabled", "disabled"),
            Column("expires", "expires_at"),
            Column("created", "created_at"),
        ),
        generic=frozenset({"list"}),
    )
)


# -- login sessions (internal) -------------------------------------------------------------------------------------
class SessionSpec(msgspec.Struct, kw_only=True):
    principal: str = ""
    #: RFC 3339; empty: unknown (the retention loop keeps such a record rather than guess).
    expires_at: str = ""
    source: str = ""


#: A session token names its record; deleting the record (logout, user deleted) revokes the token on every node.
SESSION = declare(Kind(name="session", plural="sessions", prefix="ses", spec=SessionSpec, scope="cluster"))


# -- audit entries (internal: listed through their own query) ------------------------------------------------------
class AuditSpec(msgspec.Struct, kw_only=True):
    principal: str = ""
    action: str = ""
    method: str = ""
    path: str = ""
    target: dict[str, str] = {}
    result: str = "allowed"
    status: int = 0
    request_id: str = ""
    source: str = ""
    time: str = ""
    #: How many requests the entry stands for (refusals are aggregated per source and minute).
    count: int = 1


def _render_audit(obj: Obj[AuditSpec, Any]) -> AuditEntry:
    s = obj.spec
    return AuditEntry(
        id=obj.id,
        time=s.time,
        principal=s.principal,
        project=obj.project,
        action=s.action,
        method=s.method,
        path=s.path,
        target=s.target,
        result=s.result,  # type: ignore[arg-type]
        status=s.status,
        request_id=s.request_id,
        source=s.source,
        count=s.count,
    )


#: Append-only (the store refuses updates and deletes but the retention loop's); not in the events stream, and not
#: a project's content: :data:`view` is None so no generic route, events rendering or emptiness check sees it.
AUDIT = declare(Kind(name="audit", plural="audit", prefix="au", spec=AuditSpec, action="audit:records"))


def audit_view(obj: Obj[AuditSpec, Any]) -> AuditEntry:
    """The public representation of an audit entry (``GET /v1/audit``)."""
    return _render_audit(obj)
