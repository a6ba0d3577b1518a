"""API keys: bearer tokens shown once at creation and stored only as a SHA-256 hash.

A token reads ``mc_<key-id-suffix>.<secret>``: the key id locates the record in one indexed read; the secret (32
random bytes) is compared in constant time against the stored hash. A fast hash is right here because the secret is
random and long, unlike a password. Deleting the key revokes it at once.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import os
import secrets as _secrets
import time

from minicloud import errors, ids
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.iam import credentials, principals
from minicloud.iam.directory import Directory
from minicloud.iam.kinds import ADMIN_REF, APIKEY, ApiKeySpec, ApiKeyStatus
from minicloud.model import ApiKey, ApiKeyCreate, ApiKeySecret
from minicloud.state import Record, Store, Txn, TxnFailed, Update

KIND = APIKEY.name
PREFIX = APIKEY.prefix
TOKEN_PREFIX = "mc_"
Key = Obj[ApiKeySpec, ApiKeyStatus]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_obj(
    project: str,
    name: str,
    description: str,
    expires_in: int | None,
    labels: dict[str, str],
    principal: str = ADMIN_REF,
    *,
    stamp: str | None = None,
) -> tuple[Key, str]:
    """A new key object (not yet stored) and the one-time token for it. ``principal`` is the id reference of the
    user the key acts as (``user:usr-…``)."""
    key_id = ids.new_id(PREFIX)
    secret = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    token = f"{TOKEN_PREFIX}{key_id.removeprefix(PREFIX + '-')}.{secret}"
    expires_at = None
    if expires_in is not None:
        expires_at = (
            (_dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=expires_in))
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
    spec = ApiKeySpec(
        hash=_hash(secret), prefix=token[:12], description=description, expires_at=expires_at, principal=principal
    )
    obj = APIKEY.new(project=project, name=name, spec=spec, labels=labels, id=key_id, stamp=stamp)
    return obj, token


def new_key(
    project: str,
    name: str,
    description: str,
    expires_in: int | None,
    labels: dict[str, str],
    principal: str = ADMIN_REF,
) -> tuple[Record, str]:
    """:func:`new_key_obj` in its stored form (what tests and the bootstrap write directly)."""
    obj, token = new_key_obj(project, name, description, expires_in, labels, principal)
    return APIKEY.dump(obj), token


def key_id_of(token: str) -> str | None:
    """The key id a token claims, or None if it is not shaped like one of ours."""
    if not token.startswith(TOKEN_PREFIX) or "." not in token or len(token) > 200:
        return None
    suffix = token[len(TOKEN_PREFIX) :].split(".", 1)[0]
    return f"{PREFIX}-{suffix}" if suffix.isalnum() else None


def verify(key: Key, token: str, now: _dt.datetime | None = None) -> str | None:
    """None when ``token`` is valid for ``key``, else the reason it is not (never the secret)."""
    secret = token.split(".", 1)[1]
    if not hmac.compare_digest(_hash(secret), key.spec.hash):
        return "the API key is not valid"
    expires_at = key.spec.expires_at
    if expires_at and ids.parse_time(expires_at) <= (now or _dt.datetime.now(_dt.UTC)):
        return f"the API key expired at {expires_at}; create a new one"
    return None


def view(key: Key) -> ApiKey:
    return APIKEY.to_view(key)


def view_with_secret(key: Key, token: str) -> ApiKeySecret:
    v = view(key)
    return ApiKeySecret(**{f: getattr(v, f) for f in v.__struct_fields__}, secret=token)


# -- services ------------------------------------------------------------------------------------------------------
async def create_apikey(ctx: Context, store: Store, directory: Directory, body: ApiKeyCreate) -> Written:
    """Create an API key in ``ctx``'s project acting as ``body.user`` (default: the caller; for someone else it takes
    user administration). The answer holds the one-time secret (sealed if stored for an ``Idempotency-Key``).
    Without a name the key is named ``<user>-<random>``. Fails (404/409) if the user is deleted meanwhile."""
    user, guard = await credentials.owner_of_new(ctx, store, directory, body.user)
    name = body.name or f"{user.name[:55]}-{_secrets.token_hex(3)}"
    key, token = new_key_obj(
        ctx.project, name, body.description, body.expires_in, body.labels, principals.ref_of(user), stamp=ctx.clock()
    )
    return await crud.create(ctx, store, APIKEY, key, respond=lambda obj: view_with_secret(obj, token), extra=[guard])


async def delete_apikey(
    ctx: Context, store: Store, directory: Directory, ref: str, *, expect: int | None = None
) -> Written:
    """Revoke (delete) an API key; a key of a principal with cluster-wide roles only by that principal or a cluster
    administrator (403)."""
    key = await crud.get(ctx, store, APIKEY, ref)
    await credentials.may_revoke(ctx, store, directory, key.spec.principal, key.name, "API key")
    return await crud.delete_obj(ctx, store, APIKEY, key, expect=expect)


class LastUsed:
    """Remembers when each API key was last used, and writes it to the key's record at most once per ``interval``.

    Authentication only notes the time in memory (no store write on the request path); :meth:`flush` — run every
    ``interval`` seconds by the agent and at shutdown — writes ``status.last_used_at`` for keys whose stored value is
    older than ``interval``. So a key's last use is known to within a minute on every node, at the cost of at most
    one replicated write per key per minute, however busy the key is.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._seen: dict[str, str | float] = {}

    def touch(self, key_id: str, when: str | None = None) -> None:
        """Note a use now (or at ``when``, an ISO time). Cheap: the time is formatted only when written."""
        self._seen[key_id] = when if when is not None else time.time()

    async def flush(self, store: Store) -> int:
        """Write the noted times that are due; returns how many records were written. Never raises for a key that
        was deleted or changed meanwhile (it is simply skipped or retried at the next flush)."""
        seen, self._seen = self._seen, {}
        written = 0
        for key_id, at in seen.items():
            when = at if isinstance(at, str) else ids.format_time(at)
            record = await store.get(KIND, key_id)
            if record is None:
                continue
            key = APIKEY.load(record)
            last = key.status.last_used_at
            if last is not None and (ids.parse_time(when) - ids.parse_time(last)).total_seconds() < self.interval:
                continue
            # Bookkeeping of this node (like a reconciler's status write): not audited, at most once a minute.
            updated = key.replace(status=ApiKeyStatus(last_used_at=when))
            try:
                await store.commit(Txn([Update(APIKEY.dump(updated), expect_revision=record.revision)]))
                written += 1
            except (TxnFailed, errors.MinicloudError):
                self._seen.setdefault(key_id, when)  # changed meanwhile, or no quorum: try again next time
        return written
