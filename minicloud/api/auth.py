"""Who is calling, and may they?

- The Unix socket is root-only (mode 0600) and trusted: its callers are the local administrator (``local:root``).
- HTTPS callers present ``Authorization: Bearer <api key | session token>``; either acts as a user or service account.
- :func:`authorize` asks :func:`minicloud.iam.policy.evaluate` with the bindings the node holds in memory: 404 when
  the caller has no role in the request's project, 403 naming the action when their roles do not allow it.
- Every principal has a token bucket (:func:`rate_limit`); the root socket is exempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from minicloud import errors, ids
from minicloud.api.keys import SESSION_KEY, STORE
from minicloud.iam import apikeys, directory, principals, sessions
from minicloud.iam.directory import Directory
from minicloud.iam.kinds import APIKEY, SESSION, USER
from minicloud.iam.ratelimit import RateLimiter, too_many_requests


@dataclass(frozen=True)
class Principal:
    kind: str  # "local" | "user" | "serviceaccount" | "anonymous"
    name: str
    admin: bool
    key_id: str | None = None
    session_id: str | None = None
    #: The user's or service account's id (``usr-…``); empty for local root and anonymous callers.
    id: str = ""
    #: ``local:root``, ``user:usr-…``, ``serviceaccount:usr-…`` (by id, never by name: a user deleted and another
    #: created under the same name share nothing): what bindings name, what the audit log records and what scopes
    #: idempotency keys (computed once: every request asks for it several times).
    ref: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", f"{self.kind}:{self.id or self.name}")

    @property
    def display(self) -> str:
        """``user:alice (usr-…)``: the reference with the name, for messages."""
        return f"{self.kind}:{self.name} ({self.id})" if self.id else self.ref


PRINCIPAL = web.RequestKey("principal", Principal)
#: The action the route declares (``public`` for public routes): what the audit log records.
ACTION = web.RequestKey("action", str)
#: Set once the request's audit entry has been written (in the same transaction as its change).
AUDITED = web.RequestKey("audited", bool)


DIRECTORY = web.AppKey("directory", Directory)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
LAST_USED = web.AppKey("apikey_last_used", apikeys.LastUsed)


def rate_limit(request: web.Request, principal: Principal | None) -> None:
    """Per-principal token bucket (anonymous callers share one bucket per source address); local root is exempt."""
    if principal is not None and principal.admin:
        return
    key = principal.ref if principal is not None else f"anonymous:{request.remote}"
    allowed, retry_after = request.app[RATE_LIMITER].take(key)
    if not allowed:
        raise too_many_requests(retry_after, f"too many requests from {key}; slow down")


LOCAL_ROOT = Principal(kind="local", name="root", admin=True)


def _unauthenticated(detail: str) -> errors.Unauthenticated:
    return errors.Unauthenticated(
        detail, headers={"WWW-Authenticate": 'Bearer realm="minicloud", error="invalid_token"'}
    )


async def authenticate(request: web.Request, *, unix: bool) -> Principal | None:
    """The caller, None when anonymous. Raises 401 for credentials that are present but wrong.

    On the Unix socket the caller is local root, unless the request carries credentials: then it acts as their
    principal, with only that principal's rights (root trying out what a user may do; and how ``bench/auth_bench.py``
    measures authentication + policy on one transport)."""
    header = request.headers.get("Authorization")
    if header is None:
        return LOCAL_ROOT if unix else None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthenticated("the Authorization header must be 'Bearer <api key>'")
    token = token.strip()
    if request.path == "/metrics":  # the metrics token opens /metrics and nothing else
        from minicloud.api.metrics import scraper_principal  # metrics imports this module

        if (scraper := scraper_principal(request, token)) is not None:
            return scraper
    if token.startswith(SESSION_PREFIX):
        return await _session_principal(request, token)
    store = request.app[STORE]
    verified = request.app[VERIFIED_KEYS]
    hit = verified.get(token)
    if hit is not None:
        # Verified before: still valid while its record is unchanged (a revoked key's record is gone) and unexpired.
        record = await store.get(APIKEY.name, hit.key_id)
        if (
            record is not None
            and record.revision == hit.revision
            and (hit.expires is None or hit.expires > time.time())
            and await store.get(USER.name, hit.principal.id) is not None
        ):
            request.app[LAST_USED].touch(record.id)
            return hit.principal
        del verified[token]
    key_id = apikeys.key_id_of(token)
    record = await store.get(APIKEY.name, key_id) if key_id else None
    if record is None:
        raise _unauthenticated("the API key is not valid (unknown or revoked)")
    # Decoded once per token and key revision: a hit above costs no decoding.
    key = APIKEY.load(record)
    reason = apikeys.verify(key, token)
    if reason:
        raise _unauthenticated(reason)
    user = await principals.user_of_ref(store, key.spec.principal)
    if user is None:  # deleting a user deletes its keys; one made concurrently with the delete is refused here
        raise _unauthenticated("the API key's user no longer exists; ask an administrator for a new key")
    request.app[LAST_USED].touch(record.id)
    principal = Principal(kind=user.spec.type, name=user.name, admin=False, key_id=record.id, id=user.id)
    expires_at = key.spec.expires_at
    if len(verified) >= _MAX_VERIFIED:
        verified.clear()
    verified[token] = _Verified(
        record.id, record.revision, ids.parse_time(expires_at).timestamp() if expires_at else None, principal
    )
    return principal


@dataclass(frozen=True)
class _Verified:
    """An API key token that passed :func:`apikeys.verify`, and what it authenticates as."""

    key_id: str
    revision: int
    expires: float | None
    principal: Principal


_MAX_VERIFIED = 10_000
#: Tokens already verified (the SHA-256 and constant-time comparison are done once per token and key revision).
VERIFIED_KEYS = web.AppKey("verified_api_keys", dict)


SESSION_PREFIX = "mcs1."
#: Sessions decoded before share :data:`VERIFIED_KEYS` under this prefix and their id (no API key token has it).
_SESSION_SLOT = "session\0"


async def _session_principal(request: web.Request, token: str) -> Principal:
    claims = request.app[SESSION_KEY].verify(token)
    store = request.app[STORE]
    record = await store.get(SESSION.name, claims.sid)
    if record is None:  # logged out, or its user deleted: revoked on every node
        raise sessions.SessionRevoked("the session was revoked (logged out); log in again")
    verified = request.app[VERIFIED_KEYS]
    hit = verified.get(_SESSION_SLOT + claims.sid)
    if hit is not None and hit.revision == record.revision:
        # Decoded before at this revision: only check that its user still exists (one cached point read).
        if await store.get(USER.name, hit.principal.id) is not None:
            return hit.principal
        raise sessions.SessionRevoked("the session's user no longer exists")
    # The session record says who it is (by id); the token's subject is only informational.
    user = await principals.user_of_ref(store, SESSION.load(record).spec.principal)
    if user is None:
        raise sessions.SessionRevoked("the session's user no longer exists")
    principal = Principal(kind=user.spec.type, name=user.name, admin=False, session_id=claims.sid, id=user.id)
    if len(verified) >= _MAX_VERIFIED:
        verified.clear()
    verified[_SESSION_SLOT + claims.sid] = _Verified(claims.sid, record.revision, None, principal)
    return principal


async def authorize(
    request: web.Request, principal: Principal, action: str, project: str, *, cluster: bool = False
) -> None:
    """Raise unless ``principal`` may perform ``action``: 404 when the action is inside a project the principal
    cannot see at all (names must not leak), else 403 naming the missing action. Local root may do everything.
    ``cluster=True`` evaluates the action cluster-wide (only cluster-scope grants count)."""
    await directory.authorize(request.app[DIRECTORY], principal, action, project, cluster=cluster)


def principal_of(request: web.Request) -> Principal:
    p = request.get(PRINCIPAL)
    return p if p is not None else Principal(kind="anonymous", name="anonymous", admin=False)
