"""Who may do what, as this node knows it: users, role bindings and custom roles from the store, kept in memory.

Authorising a request must not cost store reads, so the bindings and custom roles live in memory, reloaded lazily
after a commit hook (which runs before any writer's ``commit()`` returns) marks them stale: a revoked grant stops
working the moment its revocation is acknowledged. The decision itself is :func:`minicloud.iam.policy.evaluate`.
"""

from __future__ import annotations

from minicloud import errors
from minicloud.core.context import Caller
from minicloud.iam import policy
from minicloud.iam.kinds import PROJECT, ROLE, ROLEBINDING, USER
from minicloud.iam.policy import PROJECT_SERVICES, Binding, Role, Statement
from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
from minicloud.state import Change, Store

USER_KIND = USER.name
BINDING_KIND = ROLEBINDING.name
ROLE_KIND = ROLE.name
PROJECT_KIND = PROJECT.name
_MAX_DECISIONS = 50_000
#: IAM actions that act inside one project (the rest of ``iam:`` is cluster administration).
_PROJECT_IAM = ("iam:apikeys:", "iam:bindings:", "iam:accesskeys:", "iam:serviceaccounts:")


def is_project_action(action: str) -> bool:
    """True when ``action`` acts inside a project (it is evaluated for the request's project); otherwise it is a
    cluster-level action (evaluated with project None: only cluster-scope grants such as ``admin`` allow it)."""
    return action.split(":", 1)[0] in PROJECT_SERVICES or action.startswith(_PROJECT_IAM)


class Directory:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._bindings: list[Binding] | None = None
        self._roles: dict[str, Role] | None = None
        self._generation = 0
        #: Decisions already made for the current bindings and roles: ``policy.evaluate`` is pure, so the same
        #: question has the same answer until a grant changes (then the whole memo goes, in the commit hook).
        self._decisions: dict[tuple[str, str, str | None], policy.Decision] = {}
        store.add_commit_hook(self._invalidate)

    def _invalidate(self, changes: list[Change] | None) -> None:
        # None: the store was reset to a snapshot (etcd resync), so any grant may have changed.
        for change in changes if changes is not None else [None]:
            if change is None or change.kind in (BINDING_KIND, ROLE_KIND, PROJECT_KIND):
                self._bindings = None
                self._roles = None
                self._decisions = {}
                self._generation += 1
                return

    async def decide(self, principal: str, action: str, project: str | None) -> policy.Decision:
        """``policy.evaluate`` over the current bindings and roles, memoised until a binding or role changes."""
        key = (principal, action, project)
        decision = self._decisions.get(key)
        if decision is not None:
            return decision
        generation = self._generation
        bindings, roles = await self.load()
        decision = policy.evaluate(principal, action, project, bindings, roles)
        if generation == self._generation:  # nothing changed while we decided
            if len(self._decisions) >= _MAX_DECISIONS:
                self._decisions = {}
            self._decisions[key] = decision
        return decision

    async def load(self) -> tuple[list[Binding], dict[str, Role]]:
        """Every binding and custom role (from memory unless a change made them stale)."""
        bindings, roles = self._bindings, self._roles
        if bindings is None or roles is None:
            generation = self._generation
            # A project binding applies to the project whose id it holds: it grants nothing once that project is
            # gone, even before its delete (which takes the binding with it) has been seen, and never to a newer
            # project that took the name.
            names = {r.id: r.name for r in await self.store.list(PROJECT_KIND, limit=100_000)}
            names[DEFAULT_PROJECT_ID] = DEFAULT_PROJECT
            bindings = []
            for record in await self.store.list(BINDING_KIND, limit=100_000):
                b = ROLEBINDING.load(record).spec
                project = None
                if b.project is not None:
                    project = names.get(b.project_id or "")
                    if project is None or project != b.project:
                        continue
                bindings.append(Binding(principal=b.principal, role=b.role, project=project))
            roles = {}
            for record in await self.store.list(ROLE_KIND, limit=10_000):
                role = ROLE.load(record)
                statements = tuple(
                    Statement(st.effect, tuple(st.actions))  # type: ignore[arg-type]
                    for st in role.spec.statements
                )
                roles[role.name] = Role(role.name, statements, role.spec.scope, role.spec.description)  # type: ignore[arg-type]
            if generation == self._generation:  # no grant changed while we read: the copy is current
                self._bindings, self._roles = bindings, roles
        return bindings, roles


async def authorize(directory: Directory, caller: Caller, action: str, project: str, *, cluster: bool = False) -> None:
    """Raise unless ``caller`` may perform ``action``: 404 when the action is inside a project the caller cannot see
    at all (names must not leak), else 403 naming the missing action. A caller with ``admin`` (local root, the
    platform itself) may do everything. ``cluster=True`` evaluates the action cluster-wide (only cluster-scope grants
    count). What the HTTP layer and every service that checks more than its route's action call."""
    if caller.admin:
        return
    scope = project if is_project_action(action) and not cluster else None
    decision = await directory.decide(caller.ref, action, scope)
    if decision.allowed:
        return
    bindings, roles = await directory.load()
    if scope is not None and not policy.visible(caller.ref, scope, bindings, roles):
        raise errors.NotFound(f"no project named '{scope}'; see `minicloud project list`")
    raise errors.Forbidden(decision.reason, action=action)


async def allowed(directory: Directory, caller: Caller, action: str, project: str, *, cluster: bool = False) -> bool:
    """Whether :func:`authorize` would let ``caller`` do ``action`` (no exception)."""
    try:
        await authorize(directory, caller, action, project, cluster=cluster)
    except errors.MinicloudError:
        return False
    return True
