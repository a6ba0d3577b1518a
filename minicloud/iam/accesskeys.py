"""S3-style access key pairs for the object store: the services behind ``/v1/accesskeys``.

The access key id is public (``MCAK`` + 16 upper-case characters, like AWS's); the secret is shown once and then
kept only encrypted at rest with the node's key store (AES-256-GCM, the key id as associated data), because the
object store must recompute request signatures with it — unlike API keys, it cannot be a one-way hash.
"""

from __future__ import annotations

import base64
import datetime as _dt
import os
import secrets
from typing import Any

import msgspec

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import Context, Sealer
from minicloud.core.kinds import Obj
from minicloud.core.write import Written, commit
from minicloud.iam import credentials, principals
from minicloud.iam.directory import Directory
from minicloud.iam.kinds import ACCESSKEY, AccessKeySpec
from minicloud.model import AccessKeyCreate, AccessKeySecret
from minicloud.state import Record, Store, Update

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
Key = Obj[AccessKeySpec, Any]
#: The longest lifetime an access key may be given.
MAX_LIFETIME = _dt.timedelta(days=10 * 365)


def _rfc3339(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def expiry_of(body: AccessKeyCreate, now: _dt.datetime | None = None) -> str:
    """The key's ``expires_at`` (RFC 3339 UTC, empty for none) from ``expires_in`` or ``expires_at``; 422 when both
    are given, or the time is not RFC 3339 with an offset, is not in the future, or is more than 10 years away."""
    now = now or _dt.datetime.now(_dt.UTC)
    if body.expires_in is not None and body.expires_at is not None:
        raise errors.ValidationFailed("give expires_in or expires_at, not both")
    if body.expires_in is not None:
        return _rfc3339(now + _dt.timedelta(seconds=body.expires_in))
    if body.expires_at is None:
        return ""
    try:
        moment = _dt.datetime.fromisoformat(body.expires_at.replace("Z", "+00:00"))
    except ValueError:
        raise errors.ValidationFailed(f"expires_at {body.expires_at!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise errors.ValidationFailed("expires_at needs a time zone offset (e.g. Z for UTC)")
    if moment <= now:
        raise errors.ValidationFailed("expires_at is in the past: an access key must expire in the future")
    if moment > now + MAX_LIFETIME:
        raise errors.ValidationFailed("expires_at is more than 10 years away")
    return _rfc3339(moment)


def new_access_key_id() -> str:
    return ACCESSKEY.prefix + "".join(secrets.choice(_ALPHABET) for _ in range(16))


async def create_access_key(
    ctx: Context, store: Store, directory: Directory, sealer: Sealer, body: AccessKeyCreate
) -> Written:
    """Create an access key pair in ``ctx``'s project acting as ``body.user`` (default: the caller); the secret is
    in the answer only (sealed with ``sealer`` in the record)."""
    expires_at = expiry_of(body)
    user, guard = await credentials.owner_of_new(ctx, store, directory, body.user)
    key_id = new_access_key_id()
    secret = base64.b64encode(os.urandom(30)).decode()  # 40 characters, like AWS secret access keys
    spec = AccessKeySpec(
        principal=principals.ref_of(user),
        description=body.description,
        secret=sealer.encrypt(secret.encode(), key_id.encode()),
        expires_at=expires_at,
    )
    key = ACCESSKEY.new(project=ctx.project, name=body.name, spec=spec, id=key_id, stamp=ctx.clock())

    def respond(obj: Key) -> AccessKeySecret:
        return AccessKeySecret(**msgspec.structs.asdict(ACCESSKEY.to_view(obj)), secret_access_key=secret)

    return await crud.create(ctx, store, ACCESSKEY, key, respond=respond, extra=[guard])


async def get_access_key(ctx: Context, store: Store, ref: str) -> Key:
    """The access key ``ref`` names (its id, or its name) in ``ctx``'s project; 404 otherwise."""
    record = await store.get(ACCESSKEY.name, ref) if ref.startswith(ACCESSKEY.prefix) and len(ref) <= 255 else None
    if record is not None and record.project == ctx.project:
        return ACCESSKEY.load(record)
    return await crud.get(ctx, store, ACCESSKEY, ref)


async def delete_access_key(
    ctx: Context, store: Store, directory: Directory, ref: str, *, expect: int | None = None
) -> Written:
    """Delete an access key pair (one of a principal with cluster-wide roles: only that principal or a cluster
    administrator may, else 403)."""
    key = await get_access_key(ctx, store, ref)
    await credentials.may_revoke(ctx, store, directory, key.spec.principal, key.name, "access key")
    return await crud.delete_obj(ctx, store, ACCESSKEY, key, expect=expect)


async def set_access_key_disabled(
    ctx: Context, store: Store, directory: Directory, ref: str, disabled: bool, *, expect: int | None = None
) -> Written:
    """Disable (the object store refuses it) or enable again an access key pair; who may is who may delete it."""
    key = await get_access_key(ctx, store, ref)
    await credentials.may_revoke(ctx, store, directory, key.spec.principal, key.name, "access key")
    updated = key.replace(spec=msgspec.structs.replace(key.spec, disabled=disabled), updated_at=ctx.clock())
    op = Update(ACCESSKEY.dump(updated), expect_revision=expect if expect is not None else key.revision)
    return await commit(
        ctx,
        store,
        [op],
        status=200,
        label=ACCESSKEY.label,
        respond=lambda rev: ACCESSKEY.to_view(updated.replace(revision=rev)),
    )


def secret_of(sealer: Sealer, key: Record | Key) -> str:
    """The secret access key, for the object store's signature checks."""
    obj = ACCESSKEY.load(key) if isinstance(key, Record) else key
    return sealer.decrypt(obj.spec.secret, obj.id.encode()).decode()
