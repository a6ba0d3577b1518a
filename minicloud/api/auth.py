"""Who is calling, and may they? The seam that the IAM issue fills with users, roles and policies.

- The Unix socket is root-only (mode 0600) and trusted: its callers are the local administrator.
- HTTPS callers present ``Authorization: Bearer <api key>``; API keys are admin credentials for now.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from minicloud import errors
from minicloud.iam import apikeys, policy
from minicloud.iam.directory import Directory, is_project_action
from minicloud.state import Change, Record, Store


@dataclass(frozen=True)
class Principal:
    kind: str  # "local" | "user" | "serviceaccount" | "anonymous"
    name: str
    admin: bool
    key_id: str | None = None

    @property
    def ref(self) -> str:
        """``local:root``, ``user:alice``, ``serviceaccount:ci``: what bindings name, what the audit log records and
        what scopes idempotency keys."""
        return f"{self.kind}:{self.name}"


PRINCIPAL = web.RequestKey("principal", Principal)
#: The action the route declares (``public`` for public routes): what the audit log records.
ACTION = web.RequestKey("action", str)
#: Set once the request's audit entry has been written (in the same transaction as its change).
AUDITED = web.RequestKey("audited", bool)


class KeyCache:
    """API key records by id, so that authenticating a request costs no store read. Entries are dropped by a store
    commit hook in the same step that commits a change to the key, so a revoked key is refused from the moment its
    deletion is acknowledged. The secret is still verified against the hash on every request."""

    def __init__(self, store: Store, max_entries: int = 10_000) -> None:
        self._store = store
        self._records: dict[str, Record | None] = {}
        self._max = max_entries
        store.add_commit_hook(self._invalidate)

    def _invalidate(self, changes: list[Change]) -> None:
        for change in changes:
            if change.kind == apikeys.KIND:
                self._records.pop(change.id, None)

    async def get(self, key_id: str) -> Record | None:
        if key_id in self._records:
            return self._records[key_id]
        record = await self._store.get(apikeys.KIND, key_id)
        # Cache only records that exist: unknown ids are attacker-chosen and must not fill memory.
        if record is not None:
            if len(self._records) >= self._max:
                self._records.clear()
            self._records[key_id] = record
        return record


KEY_CACHE = web.AppKey("key_cache", KeyCache)
DIRECTORY = web.AppKey("directory", Directory)
LOCAL_ROOT = Principal(kind="local", name="root", admin=True)


def _unauthenticated(detail: str) -> errors.Unauthenticated:
    return errors.Unauthenticated(
        detail, headers={"WWW-Authenticate": 'Bearer realm="minicloud", error="invalid_token"'}
    )


async def authenticate(request: web.Request, *, unix: bool) -> Principal | None:
    """The caller, None when anonymous. Raises 401 for credentials that are present but wrong."""
    if unix:
        return LOCAL_ROOT
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthenticated("the Authorization header must be 'Bearer <api key>'")
    token = token.strip()
    key_id = apikeys.key_id_of(token)
    record = await request.app[KEY_CACHE].get(key_id) if key_id else None
    if record is None:
        raise _unauthenticated("the API key is not valid (unknown or revoked)")
    reason = apikeys.verify(record, token)
    if reason:
        raise _unauthenticated(reason)
    owner = record.spec.get("principal", "user:admin")  # keys made before IAM belong to the admin user
    kind, _, name = owner.partition(":")
    return Principal(kind=kind, name=name, admin=False, key_id=record.id)


async def authorize(
    request: web.Request, principal: Principal, action: str, project: str, *, cluster: bool = False
) -> None:
    """Raise unless ``principal`` may perform ``action``: 404 when the action is inside a project the principal
    cannot see at all (names must not leak), else 403 naming the missing action. Local root may do everything.
    ``cluster=True`` evaluates the action cluster-wide (only cluster-scope grants count)."""
    if principal.admin:
        return
    scope = project if is_project_action(action) and not cluster else None
    bindings, roles = await request.app[DIRECTORY].load()
    decision = policy.evaluate(principal.ref, action, scope, bindings, roles)
    if decision.allowed:
        return
    if scope is not None and not policy.visible(principal.ref, scope, bindings, roles):
        raise errors.NotFound(f"no project named '{scope}'; see `minicloud project list`")
    raise errors.Forbidden(decision.reason, action=action)


def principal_of(request: web.Request) -> Principal:
    p = request.get(PRINCIPAL)
    return p if p is not None else Principal(kind="anonymous", name="anonymous", admin=False)
