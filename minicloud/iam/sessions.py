"""Session tokens: short-lived, Ed25519-signed, revocable by session id.

``POST /v1/auth/login`` answers with a token of the form::

    mcs1.<base64url(claims JSON)>.<base64url(64-byte Ed25519 signature)>

(base64url without padding). The signature covers the ASCII text ``mcs1.<claims part>``, so changing any character
of the token, the version included, makes it invalid. Claims: ``sub`` (the user id), ``sid`` (the session id, what
revocation names), ``iat`` and ``exp`` (Unix seconds), ``prj`` (the project the session is scoped to, or null).

**Verification** (:func:`verify`) is a pure function of the token, the public keys, the time and a revocation
lookup. Checks run cheapest-first and the claims are parsed only once the signature holds: length and shape, then the
signature against each key in turn (a list, so a rotated-out key keeps verifying the tokens it signed until they
expire), then the claims' types, then expiry (with a small leeway for clock skew between nodes; an expired token
stays refused however often it is replayed), then ``is_revoked(sid)``. Every refusal is an
:class:`~minicloud.errors.Unauthenticated` subclass whose message says what to do and never contains the token.

**Keys**: the API layer keeps the current :class:`SessionKey` (its private PEM) where the node keeps other private
keys and passes ``[current.public_key, *retired_public_keys]`` to :func:`verify`. In a cluster every node needs the
same keys, like the CA key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from minicloud.errors import Unauthenticated
from minicloud.iam.kinds import SESSION

#: The record kind of a login session (its id is the token's ``sid``; deleting it revokes the token everywhere).
KIND = SESSION.name
VERSION = "mcs1"
MAX_TOKEN_LENGTH = 2048
MAX_TTL = 7 * 24 * 3600
DEFAULT_LEEWAY = 10
_MAX_ID_LENGTH = 256
_MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z
_TOKEN = re.compile(r"mcs1\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{86})")

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_ID_LENGTH)]
_Time = Annotated[int, msgspec.Meta(ge=0, le=_MAX_TIME)]


class Claims(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a verified token says. All fields are required in a token (``prj`` may be null)."""

    sub: _Id
    sid: _Id
    iat: _Time
    exp: _Time
    prj: _Id | None


class MalformedSession(Unauthenticated):
    slug = "session-invalid"
    title = "The session token is not valid"


class BadSessionSignature(MalformedSession):
    """The token is well formed but no trusted key signed it: altered, forged, or signed by a retired key."""


class SessionExpired(Unauthenticated):
    slug = "session-expired"
    title = "The session expired"


class SessionRevoked(Unauthenticated):
    slug = "session-revoked"
    title = "The session was revoked"


@dataclass(frozen=True)
class SessionKey:
    """An Ed25519 signing key for session tokens."""

    private_key: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SessionKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, pem: bytes | str) -> SessionKey:
        """Load an unencrypted PKCS#8 PEM as written by :meth:`private_pem`. Raises ValueError (without the key
        material in the message) when it is not an Ed25519 private key."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("not an unencrypted PEM private key") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("the session signing key must be an Ed25519 key")
        return cls(key)

    def private_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM: store it like the CA key (0600, in the node's private directory)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.private_key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes | str) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key from SubjectPublicKeyInfo PEM (as :meth:`SessionKey.public_pem` writes). ValueError
    otherwise."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("session keys must be Ed25519 keys")
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes | None:
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64(data) == text else None  # one encoding per value: no malleable trailing bits


def _rfc3339(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat().replace("+00:00", "Z")


def issue(
    key: SessionKey,
    subject: str,
    session_id: str,
    ttl: int,
    now: float | None = None,
    project: str | None = None,
) -> str:
    """A signed token for ``subject`` in session ``session_id``, valid for ``ttl`` seconds from ``now``
    (default: the wall clock).

    Raises ValueError for arguments no caller should pass (empty or over-long ids, ``ttl`` outside 1 s to 7 days)."""
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be an integer from 1 to {MAX_TTL} seconds")
    for name, value in (("subject", subject), ("session_id", session_id), ("project", project)):
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= _MAX_ID_LENGTH):
            raise ValueError(f"{name} must be a string of 1 to {_MAX_ID_LENGTH} characters")
    iat = int(time.time() if now is None else now)
    claims = Claims(sub=subject, sid=session_id, iat=iat, exp=iat + ttl, prj=project)
    signing_input = f"{VERSION}.{_b64(msgspec.json.encode(claims))}"
    token = f"{signing_input}.{_b64(key.private_key.sign(signing_input.encode('ascii')))}"
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError("the claims are too long for a session token")
    return token


def verify(
    public_keys: Sequence[ed25519.Ed25519PublicKey],
    token: str,
    now: float | None = None,
    *,
    is_revoked: Callable[[str], bool],
    leeway: int = DEFAULT_LEEWAY,
) -> Claims:
    """The claims of ``token`` if one of ``public_keys`` signed it, it has not expired at ``now`` (default: the wall
    clock; a token is accepted until ``exp + leeway``) and ``is_revoked(sid)`` is false.

    Raises :class:`MalformedSession` (not a token of ours), :class:`BadSessionSignature` (altered, or signed by a key
    not in the list), :class:`SessionExpired` or :class:`SessionRevoked`, and nothing else for any ``token`` value.
    ``is_revoked`` is called only for authentic, unexpired tokens; whatever it raises propagates."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise MalformedSession("The session token is malformed; log in again.")
    m = _TOKEN.fullmatch(token)
    claims_bytes = _unb64(m.group(1)) if m else None
    signature = _unb64(m.group(2)) if m else None
    if m is None or claims_bytes is None or signature is None:
        raise MalformedSession("The session token is malformed; log in again.")
    signing_input = token[: m.end(1)].encode("ascii")
    for public_key in public_keys:
        try:
            public_key.verify(signature, signing_input)
            break
        except InvalidSignature:
            continue
    else:
        raise BadSessionSignature(
            "The session token's signature is not valid (it was altered or signed by a key this cluster no longer "
            "trusts); log in again."
        )
    try:
        claims = msgspec.json.decode(claims_bytes, type=Claims, strict=True)
    except (msgspec.DecodeError, ValueError):  # ValueError: invalid UTF-8
        raise MalformedSession("The session token's claims are malformed; log in again.") from None
    if claims.exp <= claims.iat:
        raise MalformedSession("The session token's claims are malformed; log in again.")
    current = time.time() if now is None else now
    if current >= claims.exp + leeway:
        raise SessionExpired(f"The session expired at {_rfc3339(claims.exp)}; log in again.")
    if claims.iat > current + leeway:
        raise MalformedSession(
            "The session token was issued in the future; check that this node's clock is synchronised, then log in "
            "again."
        )
    if is_revoked(claims.sid):
        raise SessionRevoked("The session was revoked (logged out or disabled); log in again.")
    return claims


def expired(record: Any, now: _dt.datetime, leeway: int = DEFAULT_LEEWAY) -> bool:
    """Pure: True if the ``session`` record can no longer authenticate anything at ``now`` (its ``expires_at`` plus
    the verification leeway has passed), so the retention loop may delete it. A record without a readable
    ``expires_at`` is kept (never guess that a credential's record is garbage)."""
    try:
        expires_at = SESSION.load(record).spec.expires_at
    except msgspec.ValidationError:
        return False
    if not expires_at:
        return False
    try:
        moment = _dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return False
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return moment + _dt.timedelta(seconds=leeway) <= now
