"""Role-based access control: roles, bindings, and the one pure function that decides a request.

Everything here is pure: no I/O, no clock, no randomness, and nothing depends on the order of the bindings it is
given. The API layer loads the bindings and custom roles from the store, then asks :func:`visible` (404 or not) and
:func:`evaluate` (403 or not).

Actions
-------
An action names what a request does as ``service:resource:verb`` (``compute:keypairs:create``,
``cluster:members:promote``); some have two segments (``operations:get``, ``events:watch``, ``cluster:enable``) and
a sub-resource makes four (``compute:instances:console:get``). Segments are lowercase letters, digits and ``-``. The
*read verbs* are ``get``, ``list`` and ``watch``: an action whose last segment is one of them only reads.

Action patterns
---------------
A statement lists action *patterns*: actions in which whole segments may be ``*``.

- a ``*`` segment that is **not last** matches exactly one segment: ``*:*:get`` matches ``compute:keypairs:get`` but
  not ``operations:get`` (two segments) nor ``compute:instances:console:get`` (four);
- a ``*`` segment that **is last** matches one or more remaining segments: ``compute:*`` matches
  ``compute:keypairs:create`` and ``compute:instances:console:get`` but not ``compute`` itself;
  ``cluster:*`` matches ``cluster:get`` and ``cluster:members:promote``;
- ``*`` alone therefore matches every action;
- a ``*`` mixed with other characters (``comp*``) is invalid, and matching is case-sensitive (patterns and actions
  are lowercase, so ``Compute:*`` is rejected by :func:`validate_action_pattern`).

Roles and bindings
------------------
A :class:`Role` is a list of allow/deny statements and a scope. A :class:`Binding` gives a role to a principal
(``user:alice``, ``serviceaccount:ci``) either cluster-wide (``project=None``) or in one project.

=====================  ===================  ===========================================================================
role scope             bound cluster-wide   bound to project ``p``
=====================  ===================  ===========================================================================
``cluster``            every request: in    invalid: grants nothing (:func:`validate_binding` refuses it; a binding
                       any project and      like that read back from the store is reported in the 403 reason)
                       cluster-level ones
``project``            requests in every    requests in project ``p`` only
                       project, never
                       cluster-level ones
=====================  ===================  ===========================================================================

A project-scope role never applies to a cluster-level request (``project=None``), wherever it is bound: otherwise an
``owner`` bound cluster-wide could create cluster-wide bindings (``iam:bindings:create`` with no project) and make
itself ``admin``. Callers evaluate actions on cluster-level things (the cluster, nodes, backups, users, custom role
definitions, creating and deleting projects) with ``project=None``.

Built-in roles
--------------
Built-in roles always exist and cannot be redefined: a custom role named like one (in any letter case) is refused by
:func:`make_role`, and :func:`evaluate` resolves the built-in names from :data:`BUILTIN_ROLES` even if the mapping it
is given says otherwise. "Reads of S" means every action of two to four segments in service S whose last segment is
``get``, ``list`` or ``watch``.

+------------+---------+----------------------------------------------+------------------------------------------------+
| role       | scope   | grants                                       | does not grant                                 |
+============+=========+==============================================+================================================+
| ``admin``  | cluster | every action (``*``), in every project and   | nothing withheld                               |
|            |         | on the cluster                               |                                                |
+------------+---------+----------------------------------------------+------------------------------------------------+
| ``owner``  | project | everything ``member`` grants;                | ``cluster:*``, ``admin:*``, ``nodes:*``;       |
|            |         | ``iam:apikeys:*``, ``iam:accesskeys:*``,     | ``iam:projects:create``,                       |
|            |         | ``iam:bindings:*`` (the project's role       | ``iam:projects:delete``; ``iam:users:create``, |
|            |         | bindings), ``iam:serviceaccounts:*``,        | ``iam:users:update``, ``iam:users:delete``;    |
|            |         | ``iam:projects:update``; reads of ``audit``  | ``iam:roles:create``, ``iam:roles:update``,    |
|            |         |                                              | ``iam:roles:delete`` (custom roles are         |
|            |         |                                              | cluster-level); any service not listed here    |
+------------+---------+----------------------------------------------+------------------------------------------------+
| ``member`` | project | ``compute:*``, ``storage:*``, ``network:*``, | every other ``iam:`` action (no API keys, no   |
|            |         | ``operations:*``, ``events:*``,              | bindings); ``audit:*``; cluster-level actions; |
|            |         | ``metrics:*``; reads of ``iam`` and          | ``billing:`` changes (prices, closing          |
|            |         | ``billing``                                  | invoices); any service not listed here         |
+------------+---------+----------------------------------------------+------------------------------------------------+
| ``viewer`` | project | reads of ``compute``, ``storage``,           | any action whose verb is not ``get``, ``list`` |
|            |         | ``network``, ``operations``, ``events``,     | or ``watch``; ``audit:*``; cluster-level       |
|            |         | ``metrics``, ``billing`` and ``iam``         | actions                                        |
+------------+---------+----------------------------------------------+------------------------------------------------+

A service added later (say ``lb``) is granted to ``owner``, ``member`` and ``viewer`` only once it is added to
:data:`PROJECT_SERVICES`; until then only ``admin`` and custom roles reach it (deny by default).

Evaluation
----------
:func:`evaluate` collects the statements of the principal's bindings that apply to the request (table above). Any
matching ``deny`` statement denies ("explicit deny wins", even over ``admin``); otherwise any matching ``allow``
allows; otherwise the request is denied by default. A binding to a role that does not exist grants nothing.

Tenancy: a caller first asks :func:`visible`; a principal with no binding that applies in a project gets 404 for
anything in it (so project and resource names don't leak), and 403 naming the missing action otherwise. Deciding
whether a principal may *grant* a role (no escalation beyond one's own rights) is the caller's job.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from typing import Final, Literal

import msgspec

from minicloud.model import NAME_PATTERN

__all__ = [
    "ALL",
    "BUILTIN_ROLES",
    "PROJECT_SERVICES",
    "READ_VERBS",
    "AllProjects",
    "Binding",
    "Decision",
    "Effect",
    "Role",
    "Scope",
    "Statement",
    "evaluate",
    "make_role",
    "matches",
    "projects_visible",
    "validate_action",
    "validate_action_pattern",
    "validate_binding",
    "visible",
]

Effect = Literal["allow", "deny"]
Scope = Literal["cluster", "project"]

#: Verbs that only read; an action ending in one of them changes nothing.
READ_VERBS: Final = ("get", "list", "watch")
#: Services whose resources live inside projects, granted to the built-in project roles.
PROJECT_SERVICES: Final = ("compute", "storage", "network", "operations", "events", "metrics", "billing")
#: Project services the built-in project roles only read (their changes are admins': prices, closing invoices).
READ_ONLY_SERVICES: Final = ("billing",)
#: Principal kinds a binding may name (``user:alice``, ``serviceaccount:ci``).
PRINCIPAL_KINDS: Final = ("user", "serviceaccount")

_MAX_ACTION_LEN = 255
_MAX_SEGMENTS = 8
_SEGMENT = re.compile(r"[a-z0-9-]+")
_NAME = re.compile(NAME_PATTERN)


class Statement(msgspec.Struct, frozen=True):
    """Allow or deny every action matching one of ``actions`` (patterns, see the module docs)."""

    effect: Effect
    actions: tuple[str, ...]


class Role(msgspec.Struct, frozen=True):
    """A named set of statements. ``scope`` says where it may be bound and what it applies to (module docs)."""

    name: str
    statements: tuple[Statement, ...]
    scope: Scope
    description: str = ""


class Binding(msgspec.Struct, frozen=True):
    """``principal`` holds ``role`` in ``project``, or cluster-wide when ``project`` is None."""

    principal: str
    role: str
    project: str | None = None


class Decision(msgspec.Struct, frozen=True):
    """The outcome of :func:`evaluate`.

    ``reason`` is one sentence fit for a 403 detail or an audit record. ``missing_action`` is the action when denied
    (None when allowed); ``matched_role`` is the role whose statement decided (the allowing role, or the role with the
    explicit deny), None for a denial by default.
    """

    allowed: bool
    reason: str
    missing_action: str | None
    matched_role: str | None


class AllProjects(enum.Enum):
    """Type of :data:`ALL`."""

    ALL = "all"

    def __repr__(self) -> str:
        return "ALL"


#: Returned by :func:`projects_visible` for a principal that sees every project.
ALL: Final = AllProjects.ALL


# -- actions and patterns ---------------------------------------------------------------------------------------------


def _check(text: str, *, wildcards: bool) -> None:
    what = "action pattern" if wildcards else "action"
    if not isinstance(text, str) or not text:
        raise ValueError(f"an {what} must be a non-empty string like 'compute:keypairs:create'")
    if len(text) > _MAX_ACTION_LEN:
        raise ValueError(f"{what} {text[:40]!r}... is longer than {_MAX_ACTION_LEN} characters")
    segments = text.split(":")
    if len(segments) > _MAX_SEGMENTS:
        raise ValueError(f"{what} {text!r} has {len(segments)} segments; at most {_MAX_SEGMENTS} are allowed")
    for seg in segments:
        if seg == "":
            raise ValueError(f"{what} {text!r} has an empty segment; write segments separated by single ':'")
        if seg == "*":
            if not wildcards:
                raise ValueError(f"action {text!r} contains '*'; only action patterns may use wildcards")
            continue
        if "*" in seg:
            raise ValueError(
                f"{what} {text!r}: segment {seg!r} mixes '*' with other characters; '*' must be a whole segment"
            )
        if not _SEGMENT.fullmatch(seg):
            raise ValueError(
                f"{what} {text!r}: segment {seg!r} may contain only lowercase letters, digits and '-'"
                + (" or be '*'" if wildcards else "")
            )


def validate_action_pattern(pattern: str) -> None:
    """Return None if ``pattern`` is a valid action pattern, else raise ValueError saying what is wrong.

    Valid: 1-8 non-empty ``:``-separated segments, each ``*`` or lowercase letters, digits and ``-``; 255 characters
    at most.
    """
    _check(pattern, wildcards=True)


def validate_action(action: str) -> None:
    """Like :func:`validate_action_pattern`, for a concrete action (no ``*``)."""
    _check(action, wildcards=False)


def matches(pattern: str, action: str) -> bool:
    """Whether the (valid) ``pattern`` matches the concrete ``action``; case-sensitive. See the module docs."""
    pat = pattern.split(":")
    act = action.split(":")
    if pat[-1] == "*":
        head = pat[:-1]
        if len(act) <= len(head):  # the trailing '*' needs at least one segment
            return False
    else:
        head = pat
        if len(act) != len(head):
            return False
    return all(p == "*" or p == a for p, a in zip(head, act, strict=False))


# -- built-in roles ---------------------------------------------------------------------------------------------------


def _reads(service: str) -> tuple[str, ...]:
    """Patterns for every read of ``service``: two to four segments ending in a read verb."""
    return tuple(":".join((service, *("*",) * n, verb)) for verb in READ_VERBS for n in range(3))


_MEMBER_ACTIONS: tuple[str, ...] = (
    *(f"{s}:*" for s in PROJECT_SERVICES if s not in READ_ONLY_SERVICES),
    *(p for s in READ_ONLY_SERVICES for p in _reads(s)),
    *_reads("iam"),
)
_VIEWER_ACTIONS: tuple[str, ...] = tuple(p for s in (*PROJECT_SERVICES, "iam") for p in _reads(s))
_OWNER_ACTIONS: tuple[str, ...] = (
    *_MEMBER_ACTIONS,
    "iam:apikeys:*",
    "iam:accesskeys:*",
    "iam:bindings:*",
    "iam:serviceaccounts:*",
    "iam:projects:update",
    *_reads("audit"),
)

#: The built-in roles, by name. See the table in the module docs.
BUILTIN_ROLES: Final[Mapping[str, Role]] = {
    r.name: r
    for r in (
        Role("admin", (Statement("allow", ("*",)),), "cluster", "full access to the cluster and every project"),
        Role(
            "owner",
            (Statement("allow", _OWNER_ACTIONS),),
            "project",
            "full access within the project, including its role bindings and keys, but no cluster administration",
        ),
        Role(
            "member",
            (Statement("allow", _MEMBER_ACTIONS),),
            "project",
            "manages compute, storage and network resources and reads IAM",
        ),
        Role("viewer", (Statement("allow", _VIEWER_ACTIONS),), "project", "read access only"),
    )
}


# -- custom roles and bindings ----------------------------------------------------------------------------------------


def make_role(name: str, statements: Iterable[Statement], scope: Scope, description: str = "") -> Role:
    """A validated custom role, or ValueError naming the first problem found.

    Refused: a name that is not a resource name (1-63 letters, digits, ``-``, ``_``, ``.``, starting with a letter or
    digit) or that is a built-in role's name in any letter case; no statements; a statement with no actions or an
    effect other than allow/deny; an invalid action pattern; a scope other than cluster/project.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"role name {name!r} is invalid: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    if name.lower() in BUILTIN_ROLES:
        raise ValueError(f"{name!r} is a built-in role and cannot be redefined; choose another name")
    if scope not in ("cluster", "project"):
        raise ValueError(f"role {name!r}: scope must be 'cluster' or 'project', not {scope!r}")
    stmts = tuple(statements)
    if not stmts:
        raise ValueError(f"role {name!r} has no statements; give at least one allow or deny statement")
    for i, st in enumerate(stmts):
        if not isinstance(st, Statement):
            raise ValueError(f"role {name!r}: statement {i} is not a Statement")
        if st.effect not in ("allow", "deny"):
            raise ValueError(f"role {name!r}: statement {i} has effect {st.effect!r}; use 'allow' or 'deny'")
        if not st.actions:
            raise ValueError(f"role {name!r}: statement {i} lists no actions")
        for pattern in st.actions:
            try:
                validate_action_pattern(pattern)
            except ValueError as e:
                raise ValueError(f"role {name!r}: statement {i}: {e}") from None
    return Role(name=name, statements=stmts, scope=scope, description=description)


def _resolve(name: str, roles: Mapping[str, Role]) -> Role | None:
    builtin = BUILTIN_ROLES.get(name)
    if builtin is not None:
        return builtin
    if name.lower() in BUILTIN_ROLES:  # e.g. a stored 'Admin': never let it pass for a built-in one
        return None
    return roles.get(name)


def validate_binding(binding: Binding, roles: Mapping[str, Role]) -> None:
    """Return None if ``binding`` can grant anything, else raise ValueError saying why.

    The principal must read ``user:<name>`` or ``serviceaccount:<name>``; the role must exist (built-in or in
    ``roles``); a cluster-scope role can only be bound cluster-wide; a project must be a valid name.
    """
    kind, sep, pname = binding.principal.partition(":")
    if not sep or kind not in PRINCIPAL_KINDS or not _NAME.fullmatch(pname):
        raise ValueError(f"principal {binding.principal!r} is invalid: write 'user:<name>' or 'serviceaccount:<name>'")
    if binding.project is not None and not _NAME.fullmatch(binding.project):
        raise ValueError(f"project {binding.project!r} is not a valid project name")
    role = _resolve(binding.role, roles)
    if role is None:
        raise ValueError(f"role {binding.role!r} does not exist")
    if role.scope == "cluster" and binding.project is not None:
        raise ValueError(
            f"role {role.name!r} is cluster-scoped and can only be bound cluster-wide, "
            f"not to project {binding.project!r}"
        )


def _applies(role: Role, binding: Binding, project: str | None) -> bool:
    """Whether ``role``, held through ``binding``, applies to a request in ``project`` (None: cluster-level)."""
    if role.scope == "cluster":
        return binding.project is None
    if project is None:
        return False
    return binding.project is None or binding.project == project


# -- evaluation -------------------------------------------------------------------------------------------------------


def _where(project: str | None) -> str:
    return "on the cluster" if project is None else f"in project {project!r}"


def _bound(binding: Binding) -> str:
    return "bound cluster-wide" if binding.project is None else f"bound to project {binding.project!r}"


def _role_list(roles: Iterable[Role]) -> str:
    rs = sorted(roles, key=lambda r: r.name)
    parts = [f"{r.name} ({r.description})" if r.description else r.name for r in rs]
    return ("role " if len(parts) == 1 else "roles ") + ", ".join(parts)


def evaluate(
    principal: str, action: str, project: str | None, bindings: Iterable[Binding], roles: Mapping[str, Role]
) -> Decision:
    """Decide whether ``principal`` may perform ``action`` in ``project`` (None: a cluster-level request).

    ``bindings`` may hold every principal's bindings (others are ignored); ``roles`` holds the custom roles by name
    (built-in names always resolve to :data:`BUILTIN_ROLES`). Deny by default; an explicit deny wins; a binding to an
    unknown role, or a cluster-scope role bound to a project, grants nothing and is named in the reason. Pure and
    independent of the order of ``bindings``. Raises ValueError if ``action`` is not a valid concrete action (a bug in
    the caller, not a user error).
    """
    validate_action(action)
    who = f"{principal} may not perform {action!r} {_where(project)}"

    applicable: list[tuple[Role, Binding]] = []
    notes: set[str] = set()
    for b in bindings:
        if b.principal != principal:
            continue
        covers = b.project is None or b.project == project
        role = _resolve(b.role, roles)
        if role is None:
            if covers:
                notes.add(f"the binding to unknown role {b.role!r} grants nothing")
            continue
        if role.scope == "cluster" and b.project is not None:
            if covers:
                notes.add(f"cluster-scoped role {role.name!r} grants nothing when bound to project {b.project!r}")
            continue
        if _applies(role, b, project):
            applicable.append((role, b))
        elif covers and project is None:
            notes.add(f"project-scoped role {role.name!r} does not apply to cluster-level actions")

    # Deterministic: look at (role, binding) pairs in a fixed order whatever order the bindings came in.
    applicable.sort(key=lambda rb: (rb[0].name, rb[1].project is not None, rb[1].project or ""))

    def first(effect: Effect) -> tuple[Role, Binding] | None:
        for role, b in applicable:
            for st in role.statements:
                if st.effect == effect and any(matches(p, action) for p in st.actions):
                    return role, b
        return None

    denied = first("deny")
    if denied is not None:
        role, b = denied
        return Decision(
            allowed=False,
            reason=f"{who}: explicitly denied by role {role.name} ({_bound(b)})",
            missing_action=action,
            matched_role=role.name,
        )
    allowed = first("allow")
    if allowed is not None:
        role, b = allowed
        return Decision(
            allowed=True,
            reason=f"{principal} may perform {action!r} {_where(project)}: granted by role {role.name} ({_bound(b)})",
            missing_action=None,
            matched_role=role.name,
        )
    if applicable:
        why = f"not granted by {_role_list({r.name: r for r, _ in applicable}.values())}"
    elif project is None:
        why = f"{principal} has no cluster-wide role"
    else:
        why = f"{principal} has no role in project {project!r}"
    if notes:
        why += "; " + "; ".join(sorted(notes))
    return Decision(allowed=False, reason=f"{who}: {why}", missing_action=action, matched_role=None)


def _grants_visibility(principal: str, b: Binding, roles: Mapping[str, Role]) -> Role | None:
    if b.principal != principal:
        return None
    role = _resolve(b.role, roles)
    if role is None or (role.scope == "cluster" and b.project is not None):
        return None
    if not any(st.effect == "allow" for st in role.statements):
        return None  # a deny-only role restricts; it reveals nothing
    return role


def visible(principal: str, project: str, bindings: Iterable[Binding], roles: Mapping[str, Role]) -> bool:
    """Whether ``project`` exists as far as ``principal`` can tell: 404 for anything in it when False.

    True when the principal holds, cluster-wide or in that project, an effective binding (known role, scope allowed
    where bound) to a role with at least one allow statement. The action plays no part: with visibility, a denied
    request is a 403 naming the action.
    """
    return any(
        _grants_visibility(principal, b, roles) is not None and (b.project is None or b.project == project)
        for b in bindings
    )


def projects_visible(
    principal: str, bindings: Iterable[Binding], roles: Mapping[str, Role]
) -> frozenset[str] | Literal[AllProjects.ALL]:
    """The projects ``principal`` can see (for filtering lists), or :data:`ALL` if it holds an effective
    cluster-wide binding. Same rule as :func:`visible`: ``visible(p, x, ...)`` is True exactly when the result is
    ``ALL`` or contains ``x``."""
    seen: set[str] = set()
    for b in bindings:
        if _grants_visibility(principal, b, roles) is None:
            continue
        if b.project is None:
            return ALL
        seen.add(b.project)
    return frozenset(seen)
