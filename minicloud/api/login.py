"""``/v1/auth/login`` and ``/v1/auth/logout``: short-lived session tokens for users with passwords (services:
:mod:`minicloud.iam.logins`).

A session is a record (kind ``session``, replicated, so any node accepts the token) plus an Ed25519-signed token that
names it; logging out deletes the record, which revokes the token at once on every node. Logins are throttled per
user and source address (5 failures per 15 minutes, then 429 with ``Retry-After``). Unknown users cost the same time
as known ones, and every refusal says the same thing, so logins do not reveal which users exist.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.auth import principal_of
from minicloud.api.keys import SESSION_KEY, STORE
from minicloud.api.routing import AUTHENTICATED, PUBLIC, Reply, Routes
from minicloud.iam import logins, ratelimit, sessions
from minicloud.iam.kinds import SESSION
from minicloud.model import LoginRequest, Session

routes = Routes("auth")
SESSION_KIND = SESSION.name
__all__ = ["SESSION_KEY", "SESSION_KIND"]


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


@routes.post("/v1/auth/login", body=LoginRequest, response=Session, status=201, auth=PUBLIC)
async def login(request: web.Request, body: LoginRequest) -> Reply:
    """Exchange a user name and password for a session token."""
    ctx = await res.context_of(request)
    app = request.app
    return res.reply(request, await logins.login(ctx, app[STORE], app[THROTTLE], app[SESSION_KEY].key, body))


@routes.post("/v1/auth/logout", status=204, auth=AUTHENTICATED)
async def logout(request: web.Request) -> Reply:
    """Revoke the session whose token this request carries."""
    ctx = await res.context_of(request)
    written = await logins.logout(ctx, request.app[STORE], principal_of(request).session_id)
    return res.reply(request, written) if written is not None else Reply(None, 204)
