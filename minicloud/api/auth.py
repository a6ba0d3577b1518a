"""Who is calling, and may they? The seam that the IAM issue fills with users, roles and policies.

- The Unix socket is root-only (mode 0600) and trusted: its callers are the local administrator.
- HTTPS callers present ``Authorization: Bearer <api key>``; API keys are admin credentials for now.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from minicloud import errors
from minicloud.iam import apikeys
from minicloud.state import Change, Record, Store


@dataclass(frozen=True)
class Principal:
    kind: str  # "local" | "apikey"
    name: str
    admin: bool
    key_id: str | None = None

    @property
    def ref(self) -> str:
        """Stable identity used to scope idempotency keys and, later, audit records."""
        return f"{self.kind}:{self.key_id or self.name}"


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
    return Principal(kind="apikey", name=record.name, admin=True, key_id=record.id)


def authorize(principal: Principal, action: str) -> None:
    """Raise 403 naming ``action`` unless ``principal`` may perform it. Admins may do everything."""
    if not principal.admin:
        raise errors.Forbidden(f"you are not allowed to perform '{action}'")


def principal_of(request: web.Request) -> Principal:
    p = request.get(PRINCIPAL)
    return p if p is not None else Principal(kind="anonymous", name="anonymous", admin=False)
