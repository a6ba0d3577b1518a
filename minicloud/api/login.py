"""``/v1/auth/login`` and ``/v1/auth/logout``: short-lived session tokens for users with passwords.

A session is a record (kind ``session``, replicated, so any node accepts the token) plus an Ed25519-signed token that
names it; logging out deletes the record, which revokes the token at once on every node. Logins are throttled per
user and source address (5 failures per 15 minutes, then 429 with ``Retry-After``). Unknown users cost the same time
as known ones, and every refusal says the same thing, so logins do not reveal which users exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import time
from collections import OrderedDict

import msgspec
from aiohttp import web

from minicloud import errors, ids
from minicloud.api.auth import principal_of
from minicloud.api.keys import SESSION_KEY, STORE
from minicloud.api.routing import AUTHENTICATED, PUBLIC, Reply, Routes
from minicloud.iam import passwords, principals, ratelimit, sessions
from minicloud.iam.directory import USER_KIND
from minicloud.model import LoginRequest, Session
from minicloud.state import Check, Create, Delete, Record, Txn, TxnFailed, Update

routes = Routes("auth")
SESSION_KIND = sessions.KIND


class SessionSigner:
    """The node's current session key (replaced when the node joins a cluster, which has its own), and the claims
    of tokens whose signature it has already checked: an Ed25519 verification costs ~110 µs, a dictionary lookup
    nothing. A remembered token is still checked for expiry and revocation on every request."""

    MAX_REMEMBERED = 10_000

    def __init__(self, key: sessions.SessionKey) -> None:
        self._key = key
        self._verified: OrderedDict[str, sessions.Claims] = OrderedDict()

    @property
    def key(self) -> sessions.SessionKey:
        return self._key

    @key.setter
    def key(self, key: sessions.SessionKey) -> None:
        self._key = key
        self._verified.clear()

    def verify(self, token: str) -> sessions.Claims:
        claims = self._verified.get(token)
        if claims is not None and claims.exp > time.time():
            self._verified.move_to_end(token)
            return claims
        self._verified.pop(token, None)
        claims = sessions.verify([self._key.public_key], token, is_revoked=lambda sid: False)
        self._verified[token] = claims
        if len(self._verified) > self.MAX_REMEMBERED:
            self._verified.popitem(last=False)
        return claims


THROTTLE = web.AppKey("login_throttle", ratelimit.LoginThrottle)
_REFUSED = "the user name or password is wrong"


@routes.post("/v1/auth/login", body=LoginRequest, response=Session, status=201, auth=PUBLIC)
async def login(request: web.Request, body: LoginRequest) -> Reply:
    """Exchange a user name and password for a session token."""
    source = request.remote or "unix"
    allowed, retry_after = request.app[THROTTLE].attempt(body.user, source)
    if not allowed:
        raise ratelimit.too_many_requests(retry_after, "too many failed logins; wait and try again")
    user = await request.app[STORE].get_by_name(USER_KIND, "", body.user)
    stored = user.spec.get("password_hash") if user is not None else None
    if stored is None:
        await asyncio.to_thread(passwords.verify_unknown_user, body.password)
        raise errors.Unauthenticated(_REFUSED, headers={"WWW-Authenticate": 'Bearer realm="minicloud"'})
    if not await asyncio.to_thread(passwords.verify_password, body.password, stored):
        raise errors.Unauthenticated(_REFUSED, headers={"WWW-Authenticate": 'Bearer realm="minicloud"'})
    request.app[THROTTLE].succeeded(body.user, source)
    assert user is not None
    if passwords.needs_rehash(stored):
        await _rehash(request, user, body.password)
        user = await request.app[STORE].get(USER_KIND, user.id) or user
    principal = principals.ref_of(user)  # by id: the session dies with the user, and no namesake inherits it
    sid = ids.new_id("ses")
    expires = _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=body.ttl)
    expires_at = expires.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    stamp = ids.now()
    record = Record(
        kind=SESSION_KIND, id=sid, project="", name=sid,
        spec={"principal": principal, "expires_at": expires_at, "source": source}, created_at=stamp, updated_at=stamp,
    )  # fmt: skip
    try:  # the user unchanged since the password check: deleted meanwhile, no session
        await request.app[STORE].commit(
            Txn([Create(record), Check(kind=user.kind, id=user.id, expect_revision=user.revision)])
        )
    except TxnFailed:
        raise errors.Unauthenticated(_REFUSED, headers={"WWW-Authenticate": 'Bearer realm="minicloud"'}) from None
    token = sessions.issue(request.app[SESSION_KEY].key, principal, sid, body.ttl)
    return Reply(Session(token=token, session_id=sid, principal=principal, expires_at=expires_at), 201)


async def _rehash(request: web.Request, user: Record, password: str) -> None:
    """Store the password again with today's scrypt parameters (the login just proved it). Best effort: if the
    user changed meanwhile, the next login does it."""
    new_hash = await asyncio.to_thread(passwords.hash_password, password)
    updated = msgspec.structs.replace(user, spec={**user.spec, "password_hash": new_hash}, updated_at=ids.now())
    with contextlib.suppress(TxnFailed, errors.MinicloudError):
        await request.app[STORE].commit(Txn([Update(updated, expect_revision=user.revision)]))


@routes.post("/v1/auth/logout", status=204, auth=AUTHENTICATED)
async def logout(request: web.Request) -> Reply:
    """Revoke the session whose token this request carries."""
    principal = principal_of(request)
    if principal.session_id is None:
        raise errors.BadRequest("this request does not use a session token; nothing to log out of")
    with contextlib.suppress(TxnFailed):  # already revoked
        await request.app[STORE].commit(Txn([Delete(kind=SESSION_KIND, id=principal.session_id)]))
    return Reply(None, 204)
