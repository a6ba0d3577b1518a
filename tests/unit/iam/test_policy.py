"""The RBAC policy: built-in roles against an explicit expectation table, wildcards, explicit deny, unknown roles,
visibility (404 vs 403), validation and order independence."""

from __future__ import annotations

import random

import msgspec
import pytest

from minicloud.iam.policy import (
    ALL,
    BUILTIN_ROLES,
    Binding,
    Decision,
    Role,
    Statement,
    evaluate,
    make_role,
    matches,
    projects_visible,
    validate_action,
    validate_action_pattern,
    validate_binding,
    visible,
)

# -- the matrix -------------------------------------------------------------------------------------------------------

# What each built-in project role grants inside the project it is bound to, written out by hand: O = owner,
# M = member, V = viewer; "-" = denied. admin is allowed everything everywhere; nobody is allowed nothing.
EXPECTATIONS = """
compute:keypairs:list            O M V
compute:keypairs:get             O M V
compute:keypairs:create          O M -
compute:keypairs:update          O M -
compute:keypairs:delete          O M -
compute:instances:create         O M -
compute:instances:delete         O M -
compute:instances:watch          O M V
compute:instances:console:get    O M V
compute:instances:console:reset  O M -
compute:images:list              O M V
storage:volumes:create           O M -
storage:volumes:list             O M V
network:vpcs:get                 O M V
network:vpcs:delete              O M -
operations:list                  O M V
operations:get                   O M V
operations:delete                O M -
events:watch                     O M V
iam:apikeys:list                 O M V
iam:apikeys:get                  O M V
iam:apikeys:create               O - -
iam:apikeys:delete               O - -
iam:accesskeys:list              O M V
iam:accesskeys:create            O - -
iam:bindings:list                O M V
iam:bindings:create              O - -
iam:bindings:delete              O - -
iam:serviceaccounts:create       O - -
iam:roles:list                   O M V
iam:roles:get                    O M V
iam:roles:create                 - - -
iam:roles:update                 - - -
iam:roles:delete                 - - -
iam:users:list                   O M V
iam:users:get                    O M V
iam:users:create                 - - -
iam:users:update                 - - -
iam:users:delete                 - - -
iam:projects:get                 O M V
iam:projects:update              O - -
iam:projects:create              - - -
iam:projects:delete              - - -
audit:records:list               O - -
admin:backups:create             - - -
admin:backups:get                - - -
admin:backups:list               - - -
admin:backups:delete             - - -
nodes:get                        - - -
cluster:get                      - - -
cluster:enable                   - - -
cluster:recover                  - - -
cluster:join                     - - -
cluster:tokens:create            - - -
cluster:members:promote          - - -
cluster:members:delete           - - -
billing:invoices:list            O M V
billing:invoices:get             O M V
billing:invoices:close           - - -
billing:prices:create            - - -
lb:balancers:get                 - - -
keypairs:create                  - - -
"""


def _parse(table: str) -> dict[str, dict[str, bool]]:
    out: dict[str, dict[str, bool]] = {}
    for line in table.strip().splitlines():
        action, o, m, v = line.split()
        assert (o, m, v) in {(a, b, c) for a in "O-" for b in "M-" for c in "V-"}, line
        out[action] = {"owner": o == "O", "member": m == "M", "viewer": v == "V"}
    return out


TABLE = _parse(EXPECTATIONS)
ACTIONS = list(TABLE)

# principal -> (role, where it is bound: a project, or None for cluster-wide); None role = no binding at all
PRINCIPALS: dict[str, tuple[str | None, str | None]] = {
    "user:root": ("admin", None),
    "user:olga": ("owner", "p1"),
    "user:mike": ("member", "p1"),
    "user:vera": ("viewer", "p1"),
    "user:otto": ("owner", "p2"),
    "user:auditor": ("viewer", None),  # a project role bound cluster-wide: every project, nothing cluster-level
    "serviceaccount:ci": ("member", "p2"),
    "user:nobody": (None, None),
}
PROJECTS = ["p1", "p2", None]

BINDINGS = [Binding(p, role, where) for p, (role, where) in PRINCIPALS.items() if role is not None]


def expected(principal: str, action: str, project: str | None) -> bool:
    role, where = PRINCIPALS[principal]
    if role is None:
        return False
    if role == "admin":
        return True
    if project is None:  # project roles never reach cluster-level requests
        return False
    if where is not None and where != project:
        return False
    return TABLE[action][role]


MATRIX = [
    pytest.param(principal, action, project, id=f"{principal}|{action}|{project or 'cluster'}")
    for principal in PRINCIPALS
    for action in ACTIONS
    for project in PROJECTS
]


@pytest.mark.parametrize(("principal", "action", "project"), MATRIX)
def test_builtin_roles_match_the_expectation_table(principal: str, action: str, project: str | None) -> None:
    want = expected(principal, action, project)
    d = evaluate(principal, action, project, BINDINGS, {})
    assert d.allowed is want, d.reason
    assert principal in d.reason
    assert repr(action) in d.reason
    assert (repr(project) if project else "on the cluster") in d.reason
    if want:
        assert d.missing_action is None
        assert d.matched_role == PRINCIPALS[principal][0]
    else:
        assert d.missing_action == action
        assert d.matched_role is None  # denied by default, never explicitly, by the built-in roles


# -- reasons ----------------------------------------------------------------------------------------------------------


def test_reason_for_a_viewer_says_read_only() -> None:
    d = evaluate("user:bob", "compute:keypairs:delete", "web", [Binding("user:bob", "viewer", "web")], {})
    assert d == Decision(
        allowed=False,
        reason="user:bob may not perform 'compute:keypairs:delete' in project 'web': "
        "not granted by role viewer (read access only)",
        missing_action="compute:keypairs:delete",
        matched_role=None,
    )


def test_reason_without_any_role_in_the_project() -> None:
    d = evaluate("user:bob", "compute:keypairs:get", "p2", [Binding("user:bob", "owner", "p1")], {})
    assert (
        d.reason
        == "user:bob may not perform 'compute:keypairs:get' in project 'p2': user:bob has no role in project 'p2'"
    )


def test_reason_for_a_cluster_level_request() -> None:
    d = evaluate("user:bob", "cluster:enable", None, [], {})
    assert d.reason == "user:bob may not perform 'cluster:enable' on the cluster: user:bob has no cluster-wide role"


def test_reason_when_allowed_names_the_role_and_where_it_is_bound() -> None:
    d = evaluate("user:olga", "compute:keypairs:create", "p1", BINDINGS, {})
    assert d == Decision(
        allowed=True,
        reason="user:olga may perform 'compute:keypairs:create' in project 'p1': "
        "granted by role owner (bound to project 'p1')",
        missing_action=None,
        matched_role="owner",
    )
    d = evaluate("user:root", "cluster:members:promote", None, BINDINGS, {})
    assert d.reason.endswith("granted by role admin (bound cluster-wide)")


def test_project_role_bound_cluster_wide_does_not_reach_cluster_level_requests() -> None:
    # An owner everywhere may manage bindings in every project but may not create cluster-wide ones (no escalation).
    bindings = [Binding("user:olga", "owner", None)]
    assert evaluate("user:olga", "iam:bindings:create", "p1", bindings, {}).allowed
    assert evaluate("user:olga", "iam:bindings:create", "p7", bindings, {}).allowed
    d = evaluate("user:olga", "iam:bindings:create", None, bindings, {})
    assert not d.allowed
    assert "project-scoped role 'owner' does not apply to cluster-level actions" in d.reason


# -- wildcards --------------------------------------------------------------------------------------------------------

WILDCARDS = [
    ("*", "compute:keypairs:get", True),
    ("*", "events:watch", True),
    ("*", "cluster:members:promote", True),
    ("*", "compute:instances:console:get", True),
    ("compute:*", "compute:keypairs:create", True),
    ("compute:*", "compute:instances:console:get", True),
    ("compute:*", "compute", False),
    ("compute:*", "computer:keypairs:get", False),
    ("compute:*", "storage:volumes:get", False),
    ("*:*:get", "compute:keypairs:get", True),
    ("*:*:get", "cluster:members:promote", False),
    ("*:*:get", "operations:get", False),
    ("*:*:get", "compute:instances:console:get", False),
    ("*:*:get", "compute:keypairs:list", False),
    ("*:get", "operations:get", True),
    ("*:get", "compute:keypairs:get", False),
    ("*:*", "events:watch", True),
    ("*:*", "compute:keypairs:get", True),
    ("*:*", "nodes", False),
    ("compute:keypairs:*", "compute:keypairs:delete", True),
    ("compute:keypairs:*", "compute:keypairs:x:y", True),
    ("compute:keypairs:*", "compute:keypairs", False),
    ("compute:keypairs:*", "compute:images:delete", False),
    ("compute:*:*", "compute:keypairs:get", True),
    ("compute:*:*", "compute:get", False),
    ("cluster:*", "cluster:get", True),
    ("cluster:*", "cluster:members:promote", True),
    ("cluster:*:promote", "cluster:members:promote", True),
    ("*:members:*", "cluster:members:delete", True),
    ("*:members:*", "cluster:tokens:create", False),
    ("compute:keypairs:get", "compute:keypairs:get", True),
    ("compute:keypairs:get", "compute:keypairs:get:x", False),
    ("compute:keypairs", "compute:keypairs:get", False),
    ("compute:keypairs:get", "compute:keypairs:list", False),
    ("compute:*", "Compute:keypairs:get", False),
    ("compute:keypairs:get", "compute:KEYPAIRS:get", False),
]


@pytest.mark.parametrize(("pattern", "action", "want"), WILDCARDS, ids=[f"{p}~{a}" for p, a, _ in WILDCARDS])
def test_wildcard_matching(pattern: str, action: str, want: bool) -> None:
    validate_action_pattern(pattern)
    assert matches(pattern, action) is want


def test_custom_role_wildcards_through_evaluate() -> None:
    roles = {"getter": make_role("getter", [Statement("allow", ("*:*:get",))], "project")}
    bindings = [Binding("user:g", "getter", "p1")]
    assert evaluate("user:g", "compute:keypairs:get", "p1", bindings, roles).allowed
    assert evaluate("user:g", "iam:users:get", "p1", bindings, roles).allowed
    assert not evaluate("user:g", "operations:get", "p1", bindings, roles).allowed  # two segments
    assert not evaluate("user:g", "compute:keypairs:list", "p1", bindings, roles).allowed
    assert not evaluate("user:g", "compute:keypairs:get", "p2", bindings, roles).allowed


def test_evaluate_refuses_a_malformed_action() -> None:
    with pytest.raises(ValueError, match="lowercase"):
        evaluate("user:root", "Compute:keypairs:get", "p1", BINDINGS, {})
    with pytest.raises(ValueError, match="only action patterns"):
        evaluate("user:root", "compute:*", "p1", BINDINGS, {})


# -- explicit deny ----------------------------------------------------------------------------------------------------

NO_DELETE_CLUSTER = make_role("no-delete", [Statement("deny", ("compute:*:delete",))], "cluster")
NO_DELETE_PROJECT = make_role("no-delete-here", [Statement("deny", ("compute:*:delete",))], "project")
LOCKDOWN = make_role("lockdown", [Statement("deny", ("*",))], "project")
CUSTOM = {r.name: r for r in (NO_DELETE_CLUSTER, NO_DELETE_PROJECT, LOCKDOWN)}


def test_deny_in_a_cluster_role_beats_admin() -> None:
    bindings = [Binding("user:root", "admin"), Binding("user:root", "no-delete")]
    for project in ("p1", "p2"):
        d = evaluate("user:root", "compute:keypairs:delete", project, bindings, CUSTOM)
        assert not d.allowed
        assert d.matched_role == "no-delete"
        assert d.missing_action == "compute:keypairs:delete"
        assert "explicitly denied by role no-delete (bound cluster-wide)" in d.reason
        assert evaluate("user:root", "compute:keypairs:create", project, bindings, CUSTOM).allowed
    assert evaluate("user:root", "cluster:members:delete", None, bindings, CUSTOM).allowed


def test_deny_bound_to_one_project_beats_admin_there_only() -> None:
    bindings = [Binding("user:root", "admin"), Binding("user:root", "no-delete-here", "p1")]
    d = evaluate("user:root", "compute:instances:delete", "p1", bindings, CUSTOM)
    assert not d.allowed
    assert d.matched_role == "no-delete-here"
    assert "(bound to project 'p1')" in d.reason
    assert evaluate("user:root", "compute:instances:delete", "p2", bindings, CUSTOM).allowed
    assert evaluate("user:root", "compute:instances:create", "p1", bindings, CUSTOM).allowed


def test_deny_beats_allow_from_another_binding() -> None:
    bindings = [Binding("user:olga", "owner", "p1"), Binding("user:olga", "no-delete-here", "p1")]
    assert not evaluate("user:olga", "compute:keypairs:delete", "p1", bindings, CUSTOM).allowed
    assert evaluate("user:olga", "compute:keypairs:update", "p1", bindings, CUSTOM).allowed
    assert evaluate("user:olga", "iam:bindings:delete", "p1", bindings, CUSTOM).allowed


def test_deny_beats_allow_in_the_same_role() -> None:
    role = make_role(
        "careful",
        [Statement("allow", ("compute:*",)), Statement("deny", ("compute:keypairs:delete",))],
        "project",
    )
    bindings = [Binding("user:c", "careful", "p1")]
    d = evaluate("user:c", "compute:keypairs:delete", "p1", bindings, {"careful": role})
    assert (d.allowed, d.matched_role) == (False, "careful")
    assert evaluate("user:c", "compute:keypairs:create", "p1", bindings, {"careful": role}).allowed


def test_deny_elsewhere_or_for_someone_else_changes_nothing() -> None:
    bindings = [
        Binding("user:olga", "owner", "p1"),
        Binding("user:olga", "lockdown", "p2"),
        Binding("user:mike", "lockdown", "p1"),
        Binding("serviceaccount:olga", "lockdown", None),
    ]
    assert evaluate("user:olga", "compute:keypairs:delete", "p1", bindings, CUSTOM).allowed


def test_deny_in_a_project_role_bound_cluster_wide_covers_projects_not_the_cluster() -> None:
    bindings = [Binding("user:root", "admin"), Binding("user:root", "lockdown")]
    assert not evaluate("user:root", "compute:keypairs:get", "p1", bindings, CUSTOM).allowed
    assert not evaluate("user:root", "compute:keypairs:get", "p9", bindings, CUSTOM).allowed
    assert evaluate("user:root", "cluster:enable", None, bindings, CUSTOM).allowed


def test_two_denies_name_the_same_role_whatever_the_order() -> None:
    bindings = [Binding("user:root", "no-delete"), Binding("user:root", "no-delete-here", "p1")]
    for bs in (bindings, bindings[::-1]):
        assert evaluate("user:root", "compute:keypairs:delete", "p1", bs, CUSTOM).matched_role == "no-delete"


# -- unknown and misbound roles ---------------------------------------------------------------------------------------


def test_unknown_role_grants_nothing_and_says_so() -> None:
    bindings = [Binding("user:g", "ghost", "p1")]
    d = evaluate("user:g", "compute:keypairs:get", "p1", bindings, CUSTOM)
    assert (d.allowed, d.matched_role, d.missing_action) == (False, None, "compute:keypairs:get")
    assert "the binding to unknown role 'ghost' grants nothing" in d.reason
    assert not visible("user:g", "p1", bindings, CUSTOM)
    assert projects_visible("user:g", bindings, CUSTOM) == set()


def test_unknown_role_beside_a_known_one() -> None:
    bindings = [Binding("user:v", "ghost"), Binding("user:v", "viewer", "p1")]
    assert evaluate("user:v", "compute:keypairs:get", "p1", bindings, {}).allowed
    d = evaluate("user:v", "compute:keypairs:create", "p1", bindings, {})
    assert not d.allowed
    assert "not granted by role viewer (read access only)" in d.reason
    assert "unknown role 'ghost'" in d.reason
    assert "unknown role 'ghost'" in evaluate("user:v", "cluster:get", None, bindings, {}).reason


def test_unknown_role_in_another_project_is_not_mentioned() -> None:
    d = evaluate("user:g", "compute:keypairs:get", "p1", [Binding("user:g", "ghost", "p2")], {})
    assert "ghost" not in d.reason


def test_builtin_names_cannot_be_shadowed_by_the_roles_mapping() -> None:
    fake_admin = Role("admin", (Statement("deny", ("*",)),), "cluster")
    fake_viewer = Role("viewer", (Statement("allow", ("*",)),), "project")
    roles = {
        "admin": fake_admin,
        "viewer": fake_viewer,
        "Admin": Role("Admin", (Statement("allow", ("*",)),), "cluster"),
    }
    assert evaluate("user:root", "cluster:enable", None, [Binding("user:root", "admin")], roles).allowed
    assert not evaluate("user:v", "compute:keypairs:delete", "p1", [Binding("user:v", "viewer", "p1")], roles).allowed
    d = evaluate("user:x", "cluster:enable", None, [Binding("user:x", "Admin")], roles)
    assert not d.allowed
    assert "unknown role 'Admin'" in d.reason


def test_cluster_role_bound_to_a_project_grants_nothing() -> None:
    ops = make_role("ops", [Statement("allow", ("*",))], "cluster")
    roles = {"ops": ops}
    for role in ("ops", "admin"):
        bindings = [Binding("user:x", role, "p1")]
        d = evaluate("user:x", "compute:keypairs:get", "p1", bindings, roles)
        assert not d.allowed
        assert f"cluster-scoped role {role!r} grants nothing when bound to project 'p1'" in d.reason
        assert not evaluate("user:x", "cluster:get", None, bindings, roles).allowed
        assert not visible("user:x", "p1", bindings, roles)
        with pytest.raises(ValueError, match="can only be bound cluster-wide"):
            validate_binding(bindings[0], roles)


def test_builtin_roles_need_no_roles_mapping() -> None:
    assert evaluate("user:root", "compute:keypairs:get", "p1", BINDINGS, {}).allowed
    assert evaluate("user:root", "compute:keypairs:get", "p1", BINDINGS, CUSTOM).allowed


# -- visibility -------------------------------------------------------------------------------------------------------

VISIBILITY = {
    "user:root": {"p1": True, "p2": True, "p9": True},
    "user:olga": {"p1": True, "p2": False, "p9": False},
    "user:mike": {"p1": True, "p2": False, "p9": False},
    "user:vera": {"p1": True, "p2": False, "p9": False},
    "user:otto": {"p1": False, "p2": True, "p9": False},
    "user:auditor": {"p1": True, "p2": True, "p9": True},
    "serviceaccount:ci": {"p1": False, "p2": True, "p9": False},
    "user:nobody": {"p1": False, "p2": False, "p9": False},
}
VISIBLE_PROJECTS = {
    "user:root": ALL,
    "user:olga": {"p1"},
    "user:mike": {"p1"},
    "user:vera": {"p1"},
    "user:otto": {"p2"},
    "user:auditor": ALL,
    "serviceaccount:ci": {"p2"},
    "user:nobody": set(),
}


@pytest.mark.parametrize(
    ("principal", "project"), [pytest.param(p, x, id=f"{p}|{x}") for p in VISIBILITY for x in ("p1", "p2", "p9")]
)
def test_visible(principal: str, project: str) -> None:
    assert visible(principal, project, BINDINGS, {}) is VISIBILITY[principal][project]


@pytest.mark.parametrize("principal", list(VISIBLE_PROJECTS))
def test_projects_visible(principal: str) -> None:
    assert projects_visible(principal, BINDINGS, {}) == VISIBLE_PROJECTS[principal]


def test_projects_visible_collects_every_project() -> None:
    bindings = [Binding("user:x", "viewer", "b"), Binding("user:x", "member", "a"), Binding("user:x", "owner", "b")]
    assert projects_visible("user:x", bindings, {}) == frozenset({"a", "b"})
    assert repr(ALL) == "ALL"


def test_deny_only_role_reveals_no_project() -> None:
    bindings = [Binding("user:x", "lockdown", "p1"), Binding("user:x", "no-delete")]
    assert not visible("user:x", "p1", bindings, CUSTOM)
    assert projects_visible("user:x", bindings, CUSTOM) == set()


def test_visible_projects_without_the_action_is_403_not_404() -> None:
    # vera sees p1 (so a denied write there is a 403 naming the action) but not p2 (404).
    assert visible("user:vera", "p1", BINDINGS, {})
    d = evaluate("user:vera", "compute:keypairs:create", "p1", BINDINGS, {})
    assert not d.allowed
    assert d.missing_action == "compute:keypairs:create"
    assert not visible("user:vera", "p2", BINDINGS, {})


# -- validation -------------------------------------------------------------------------------------------------------

BAD_PATTERNS = [
    ("", "non-empty"),
    ("Compute:*", "lowercase letters"),
    ("compute:KEYPAIRS:get", "lowercase letters"),
    ("compute::get", "empty segment"),
    (":compute", "empty segment"),
    ("compute:", "empty segment"),
    ("comp*:get", "'\\*' must be a whole segment"),
    ("compute:key*", "'\\*' must be a whole segment"),
    ("**", "'\\*' must be a whole segment"),
    ("compute:keypairs:get ", "lowercase letters"),
    ("compute/keypairs", "lowercase letters"),
    ("compute:key_pairs:get", "lowercase letters"),
    ("compute.keypairs.get", "lowercase letters"),
    (":".join(["a"] * 9), "at most 8"),
    ("a" * 256, "longer than 255"),
]


@pytest.mark.parametrize(("pattern", "message"), BAD_PATTERNS, ids=[repr(p)[:30] for p, _ in BAD_PATTERNS])
def test_bad_action_patterns_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_action_pattern(pattern)


@pytest.mark.parametrize("pattern", ["*", "compute:*", "*:*:get", "a-b:c1:*", ":".join(["a"] * 8), "x" * 255])
def test_good_action_patterns_pass(pattern: str) -> None:
    assert validate_action_pattern(pattern) is None


def test_actions_may_not_contain_wildcards() -> None:
    assert validate_action("cluster:members:promote") is None
    with pytest.raises(ValueError, match="only action patterns may use wildcards"):
        validate_action("compute:*")


def test_every_builtin_pattern_is_valid() -> None:
    assert set(BUILTIN_ROLES) == {"admin", "owner", "member", "viewer"}
    assert {n: r.scope for n, r in BUILTIN_ROLES.items()} == {
        "admin": "cluster",
        "owner": "project",
        "member": "project",
        "viewer": "project",
    }
    for role in BUILTIN_ROLES.values():
        assert all(st.effect == "allow" for st in role.statements), "built-in roles must not deny (deny wins)"
        for st in role.statements:
            for pattern in st.actions:
                validate_action_pattern(pattern)


BAD_ROLES = [
    ("", [Statement("allow", ("*",))], "project", "role name '' is invalid"),
    ("-x", [Statement("allow", ("*",))], "project", "is invalid"),
    ("a b", [Statement("allow", ("*",))], "project", "is invalid"),
    ("x" * 64, [Statement("allow", ("*",))], "project", "is invalid"),
    ("admin", [Statement("allow", ("*",))], "cluster", "built-in role"),
    ("Owner", [Statement("allow", ("*",))], "project", "built-in role"),
    ("VIEWER", [Statement("allow", ("*",))], "project", "built-in role"),
    ("ops", [], "project", "has no statements"),
    ("ops", [Statement("allow", ())], "project", "statement 0 lists no actions"),
    ("ops", [Statement("permit", ("*",))], "project", "effect 'permit'"),  # type: ignore[arg-type]
    ("ops", [Statement("allow", ("*",)), Statement("deny", ("Compute:*",))], "project", "role 'ops': statement 1: "),
    ("ops", [Statement("allow", ("*",))], "global", "scope must be"),
    ("ops", ["compute:*"], "project", "is not a Statement"),
]


@pytest.mark.parametrize(
    ("name", "statements", "scope", "message"), BAD_ROLES, ids=[f"{i}-{r[3][:20]}" for i, r in enumerate(BAD_ROLES)]
)
def test_bad_custom_roles_are_refused(name: str, statements: list, scope: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_role(name, statements, scope)  # type: ignore[arg-type]


def test_make_role_returns_an_immutable_role_from_any_iterable() -> None:
    role = make_role("ci.deployer", (s for s in [Statement("allow", ("compute:instances:*",))]), "project", "deploys")
    assert role == Role("ci.deployer", (Statement("allow", ("compute:instances:*",)),), "project", "deploys")
    with pytest.raises(AttributeError):
        role.name = "other"  # type: ignore[misc]


def test_roles_and_bindings_round_trip_through_msgspec() -> None:
    for value in (BUILTIN_ROLES["owner"], NO_DELETE_CLUSTER, Binding("serviceaccount:ci", "member", "p2")):
        assert msgspec.json.decode(msgspec.json.encode(value), type=type(value)) == value


@pytest.mark.parametrize(
    "binding",
    [Binding("user:alice", "admin"), Binding("serviceaccount:ci", "viewer", "p1"), Binding("user:a.b", "ops", None)],
)
def test_valid_bindings(binding: Binding) -> None:
    assert validate_binding(binding, {"ops": make_role("ops", [Statement("allow", ("nodes:get",))], "cluster")}) is None


@pytest.mark.parametrize(
    ("binding", "message"),
    [
        (Binding("alice", "viewer", "p1"), "principal 'alice' is invalid"),
        (Binding("group:devs", "viewer", "p1"), "principal 'group:devs' is invalid"),
        (Binding("user:", "viewer", "p1"), "is invalid"),
        (Binding("user:a b", "viewer", "p1"), "is invalid"),
        (Binding("user:alice", "ghost", "p1"), "role 'ghost' does not exist"),
        (Binding("user:alice", "viewer", "p 1"), "not a valid project name"),
        (Binding("user:alice", "admin", "p1"), "can only be bound cluster-wide"),
    ],
)
def test_invalid_bindings(binding: Binding, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_binding(binding, {})


# -- determinism ------------------------------------------------------------------------------------------------------

MIXED = [
    *BINDINGS,
    Binding("user:root", "no-delete"),
    Binding("user:olga", "no-delete-here", "p1"),
    Binding("user:olga", "member", "p1"),
    Binding("user:olga", "ghost", "p1"),
    Binding("user:mike", "lockdown", "p2"),
    Binding("user:mike", "viewer", "p2"),
    Binding("user:vera", "admin", "p1"),
    Binding("user:auditor", "member", "p2"),
]


@pytest.mark.parametrize("seed", range(10))
def test_order_of_bindings_does_not_change_any_decision(seed: int) -> None:
    shuffled = list(MIXED)
    random.Random(seed).shuffle(shuffled)
    for principal in PRINCIPALS:
        for action in ACTIONS:
            for project in PROJECTS:
                want = evaluate(principal, action, project, MIXED, CUSTOM)
                assert evaluate(principal, action, project, shuffled, CUSTOM) == want
                assert evaluate(principal, action, project, iter(shuffled[::-1]), CUSTOM) == want
        assert projects_visible(principal, shuffled, CUSTOM) == projects_visible(principal, MIXED, CUSTOM)
        for project in ("p1", "p2", "p9"):
            assert visible(principal, project, shuffled, CUSTOM) is visible(principal, project, MIXED, CUSTOM)


def test_several_allowing_roles_report_the_same_one_whatever_the_order() -> None:
    bindings = [
        Binding("user:olga", "owner", "p1"),
        Binding("user:olga", "member", "p1"),
        Binding("user:olga", "admin"),
    ]
    got = {
        evaluate("user:olga", "compute:keypairs:get", "p1", bs, {}).matched_role for bs in (bindings, bindings[::-1])
    }
    assert got == {"admin"}


def test_visible_agrees_with_projects_visible() -> None:
    for principal in PRINCIPALS:
        seen = projects_visible(principal, MIXED, CUSTOM)
        for project in ("p1", "p2", "p9"):
            assert visible(principal, project, MIXED, CUSTOM) is (seen is ALL or project in seen)
