"""Who may do what, as this node knows it: users, role bindings and custom roles from the store, kept in memory.

Authorising a request must not cost store reads, so the bindings and custom roles live in memory, reloaded lazily
after a commit hook (which runs before any writer's ``commit()`` returns) marks them stale: a revoked grant stops
working the moment its revocation is acknowledged. The decision itself is :func:`minicloud.iam.policy.evaluate`.
"""

from __future__ import annotations

import msgspec

from minicloud.iam import policy
from minicloud.iam.policy import PROJECT_SERVICES, Binding, Role, Statement
from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID, PROJECT_KIND
from minicloud.state import Change, Store

USER_KIND = "user"
BINDING_KIND = "rolebinding"
ROLE_KIND = "role"
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
            for r in await self.store.list(BINDING_KIND, limit=100_000):
                project = None
                if r.spec.get("project") is not None:
                    project = names.get(r.spec.get("project_id") or "")
                    if project is None or project != r.spec["project"]:
                        continue
                bindings.append(Binding(principal=r.spec["principal"], role=r.spec["role"], project=project))
            roles = {}
            for r in await self.store.list(ROLE_KIND, limit=10_000):
                statements = tuple(msgspec.convert(s, Statement) for s in r.spec.get("statements", []))
                roles[r.name] = Role(r.name, statements, r.spec.get("scope", "project"), r.spec.get("description", ""))
            if generation == self._generation:  # no grant changed while we read: the copy is current
                self._bindings, self._roles = bindings, roles
        return bindings, roles
