"""Logins: a user name and password exchanged for a session token, and logout — the services behind
``/v1/auth/login`` and ``/v1/auth/logout``.

A session is a record (kind ``session``, replicated, so any node accepts the token) plus an Ed25519-signed token that
names it (:mod:`minicloud.iam.sessions`); logging out deletes the record, which revokes the token at once on every
node. Logins are throttled per user and source address (:class:`minicloud.iam.ratelimit.LoginThrottle`). Unknown
users cost the same time as known ones, and every refusal says the same thing, so logins do not reveal which users
exist.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt

import msgspec

from minicloud import errors, ids
from minicloud.core.context import Context
from minicloud.core.write import Written, commit
from minicloud.iam import passwords, principals, ratelimit, sessions
from minicloud.iam.kinds import SESSION, USER, SessionSpec
from minicloud.model import LoginRequest, Session
from minicloud.state import Check, Create, Delete, Op, Store, Update

_REFUSED = "the user name or password is wrong"


def _refused() -> errors.Unauthenticated:
    return errors.Unauthenticated(_REFUSED, headers={"WWW-Authenticate": 'Bearer realm="minicloud"'})


async def login(
    ctx: Context, store: Store, throttle: ratelimit.LoginThrottle, key: sessions.SessionKey, body: LoginRequest
) -> Written:
    """Check ``body``'s password (429 once the user and source have failed too often; 401 for a wrong name or
    password alike) and open a session for the user, by id: it dies with the user, and no namesake inherits it.

    The session is committed (with its audit entry) together with a check that the user is unchanged since the
    password was verified, and, when the stored hash uses old scrypt parameters, the user's new hash. Never
    replayed for an ``Idempotency-Key``: each login is a new session."""
    source = ctx.source
    permitted, retry_after = throttle.attempt(body.user, source)
    if not permitted:
        raise ratelimit.too_many_requests(retry_after, "too many failed logins; wait and try again")
    record = await store.get_by_name(USER.name, "", body.user)
    user = USER.load(record) if record is not None else None
    stored = user.spec.password_hash if user is not None else None
    if user is None or stored is None:
        await asyncio.to_thread(passwords.verify_unknown_user, body.password)
        raise _refused()
    if not await asyncio.to_thread(passwords.verify_password, body.password, stored):
        raise _refused()
    throttle.succeeded(body.user, source)
    principal = principals.ref_of(user)
    sid = ids.new_id(SESSION.prefix)
    expires = _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=body.ttl)
    expires_at = expires.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    session = SESSION.new(
        project="", name=sid, id=sid, spec=SessionSpec(principal=principal, expires_at=expires_at, source=source),
        stamp=ctx.clock(),
    )  # fmt: skip
    guard: Op = Check(kind=USER.name, id=user.id, expect_revision=user.revision)
    if passwords.needs_rehash(stored):  # stored again with today's scrypt parameters (the login just proved it)
        new_hash = await asyncio.to_thread(passwords.hash_password, body.password)
        rehashed = user.replace(spec=msgspec.structs.replace(user.spec, password_hash=new_hash))
        guard = Update(USER.dump(rehashed.replace(updated_at=ctx.clock())), expect_revision=user.revision)
    token = sessions.issue(key, principal, sid, body.ttl)
    reply = Session(token=token, session_id=sid, principal=principal, expires_at=expires_at)
    try:  # the user unchanged since the password check: deleted meanwhile, no session
        return await commit(
            dataclasses.replace(ctx, idempotency=None),
            store,
            [Create(SESSION.dump(session)), guard],
            status=201,
            label=SESSION.label,
            respond=lambda _rev: reply,
        )
    except (errors.PreconditionFailed, errors.NotFound, errors.Conflict):
        raise _refused() from None


async def logout(ctx: Context, store: Store, session_id: str | None) -> Written | None:
    """Revoke the session ``session_id`` (the caller's own; 400 when the caller did not use a session token).
    Idempotent: a session already revoked is no error (None: nothing was written)."""
    if session_id is None:
        raise errors.BadRequest("this request does not use a session token; nothing to log out of")
    try:
        return await commit(
            ctx, store, [Delete(kind=SESSION.name, id=session_id)], status=204, respond=lambda _rev: None
        )
    except errors.NotFound:  # already revoked
        return None
