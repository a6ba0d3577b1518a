"""User passwords: scrypt hashes in a self-describing string, and the password policy.

Stored form (one ASCII string, safe to keep in a record's spec)::

    scrypt$n=16384$r=8$p=1$<salt, base64>$<hash, base64>

base64 is the standard alphabet without padding; the salt is 16 random bytes and the hash 32 bytes. The parameters
travel with the hash, so raising them later needs no migration: :func:`needs_rehash` tells the login path to store a
fresh hash after the next successful login.

**Cost.** ``n=2**14, r=8, p=1`` uses 16 MiB and took 36-48 ms per hash on the 2-core test machine (``n=2**15`` took
≈ 100 ms, ``n=2**16`` ≈ 195 ms). That keeps a login well under a tenth of a second while an offline attacker pays the
same per guess; logins are also throttled (:mod:`minicloud.iam.ratelimit`). Hashing blocks for that long, so the API
layer must run :func:`hash_password` and :func:`verify_password` in an executor, never on the event loop.

**Policy** (:func:`check_password_policy`) follows NIST SP 800-63B §5.1.1: at least 12 characters (after
normalisation) and at most 1024 (as given; the bound that :func:`verify_password` also applies), not only whitespace,
and no composition rules (no "one digit, one symbol"), which push people to predictable passwords. Any Unicode text
is allowed except NUL (scrypt's HMAC would treat ``pw`` and ``pw\\0`` alike); passwords are NFKC-normalised before
hashing so the same password typed on different keyboards or input methods matches.

Nothing here logs, and no exception message contains a password or a hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import unicodedata

from minicloud.errors import ValidationFailed

SCHEME = "scrypt"
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024

# Bounds on what a stored string may ask for, so a corrupt or hostile record cannot make a login allocate gigabytes.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_MAX_MEMORY = 256 * 1024 * 1024
_B64 = re.compile(r"[A-Za-z0-9+/]+")
_PARAM = re.compile(r"([nrp])=([1-9][0-9]{0,7})")

# A hash of a random password, to spend the same time when the user does not exist (see verify_unknown_user).
_DUMMY_SALT = os.urandom(SALT_BYTES)


def _normalise(password: str) -> bytes:
    """The bytes that get hashed. Raises UnicodeError for strings that are not valid Unicode text (lone surrogates)
    and ValueError for NUL characters: scrypt's HMAC pads short keys with zero bytes, so ``pw`` and ``pw\\0`` would
    hash alike."""
    if "\0" in password:
        raise ValueError("NUL in password")
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes | None:
    if not _B64.fullmatch(text):
        return None
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if _b64(data) == text else None  # canonical encodings only


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEMORY + 1024 * 1024, dklen=dklen)


class _Parsed:
    __slots__ = ("digest", "n", "p", "r", "salt")

    def __init__(self, n: int, r: int, p: int, salt: bytes, digest: bytes) -> None:
        self.n, self.r, self.p, self.salt, self.digest = n, r, p, salt, digest


def _parse(stored: object) -> _Parsed | None:
    """The parts of a stored hash, or None when it is not one we can (safely) check against."""
    if not isinstance(stored, str) or len(stored) > 512:
        return None
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return None
    params: dict[str, int] = {}
    for part, name in zip(parts[1:4], "nrp", strict=True):
        m = _PARAM.fullmatch(part)
        if not m or m.group(1) != name:
            return None
        params[name] = int(m.group(2))
    n, r, p = params["n"], params["r"], params["p"]
    if n < 2 or n > _MAX_N or n & (n - 1) or r > _MAX_R or p > _MAX_P or 128 * n * r * p > _MAX_MEMORY:
        return None
    salt, digest = _unb64(parts[4]), _unb64(parts[5])
    if salt is None or digest is None or not 8 <= len(salt) <= 64 or not 16 <= len(digest) <= 64:
        return None
    return _Parsed(n, r, p, salt, digest)


def check_password_policy(password: str) -> None:
    """Raise :class:`ValidationFailed` (naming the ``password`` field, never its value) unless ``password`` is
    acceptable: valid Unicode text without NUL, of at most 1024 characters (code points, as given), at least 12 after
    NFKC normalisation, and not only whitespace. No composition rules, per NIST SP 800-63B."""

    def refuse(reason: str) -> ValidationFailed:
        return ValidationFailed(
            f"The password {reason}.", invalid_params=[{"name": "password", "reason": f"the password {reason}"}]
        )

    if not isinstance(password, str):
        raise refuse("must be a string")
    if "\0" in password:
        raise refuse("must not contain the NUL character")
    try:
        normalised = unicodedata.normalize("NFKC", password)
        normalised.encode("utf-8")
    except UnicodeError:
        raise refuse("contains characters that are not valid Unicode text") from None
    if len(password) > MAX_PASSWORD_LENGTH:
        raise refuse(f"is too long: use at most {MAX_PASSWORD_LENGTH} characters")
    if len(normalised) < MIN_PASSWORD_LENGTH:
        raise refuse(f"is too short: use at least {MIN_PASSWORD_LENGTH} characters (a passphrase of a few words works)")
    if not normalised.strip():
        raise refuse("must not be only whitespace")


def hash_password(password: str) -> str:
    """The stored form of ``password`` with a fresh 16-byte salt and the current parameters (~40 ms of CPU).

    Does not apply the policy (call :func:`check_password_policy` first when a user chooses a password), but refuses
    with :class:`ValidationFailed` what could never verify: non-strings, invalid Unicode, NUL characters and passwords
    over 1024 characters."""
    try:
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
            raise ValueError
        data = _normalise(password)
    except ValueError:
        raise ValidationFailed(
            "The password cannot be used: it must be valid Unicode text without NUL, of at most 1024 characters.",
            invalid_params=[
                {"name": "password", "reason": "not valid Unicode text without NUL of at most 1024 characters"}
            ],
        ) from None
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(data, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return f"{SCHEME}$n={SCRYPT_N}$r={SCRYPT_R}$p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the stored hash, compared in constant time.

    Never raises: a malformed or unsupported ``stored`` value, a non-string or over-long password, invalid Unicode or a
    NUL character all give False. Costs one scrypt run at the stored parameters whenever ``stored`` is well formed."""
    parsed = _parse(stored)
    if parsed is None:
        return False
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        data = _normalise(password)
    except ValueError:  # UnicodeError is one
        return False
    try:
        candidate = _scrypt(data, parsed.salt, parsed.n, parsed.r, parsed.p, len(parsed.digest))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, parsed.digest)


def verify_unknown_user(password: str) -> bool:
    """Spend the time of one :func:`verify_password` at the current parameters and return False.

    Call it when the login names no existing user, so response times do not reveal which user names exist."""
    try:
        data = _normalise(password[:MAX_PASSWORD_LENGTH]) if isinstance(password, str) else b""
    except ValueError:
        data = b""
    _scrypt(data, _DUMMY_SALT, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return False


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` should be replaced by a fresh :func:`hash_password` after the next successful login:
    it is malformed, or its parameters, salt or hash length differ from the current ones."""
    parsed = _parse(stored)
    if parsed is None:
        return True
    return (parsed.n, parsed.r, parsed.p, len(parsed.salt), len(parsed.digest)) != (
        SCRYPT_N,
        SCRYPT_R,
        SCRYPT_P,
        SALT_BYTES,
        HASH_BYTES,
    )
