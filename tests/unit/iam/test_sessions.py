"""Session tokens: signing, verification, expiry, revocation, rotation and hostile input."""

from __future__ import annotations

import base64
import json

import pytest

from minicloud.errors import Unauthenticated
from minicloud.iam.sessions import (
    DEFAULT_LEEWAY,
    MAX_TOKEN_LENGTH,
    BadSessionSignature,
    Claims,
    MalformedSession,
    SessionExpired,
    SessionKey,
    SessionRevoked,
    issue,
    load_public_key,
    verify,
)

NOW = 1_800_000_000
TTL = 3600


def never_revoked(sid: str) -> bool:
    return False


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def signed(key: SessionKey, claims_part: str) -> str:
    """A correctly signed token around arbitrary claims text: what a holder of the key could make."""
    signing_input = f"mcs1.{claims_part}"
    return f"{signing_input}.{b64(key.private_key.sign(signing_input.encode()))}"


@pytest.fixture(scope="module")
def key() -> SessionKey:
    return SessionKey.generate()


@pytest.fixture(scope="module")
def token(key) -> str:
    return issue(key, "user-alice", "ses-1", TTL, now=NOW, project="proj-a")


def test_round_trip_returns_the_claims(key, token):
    claims = verify([key.public_key], token, NOW + 1, is_revoked=never_revoked)
    assert claims == Claims(sub="user-alice", sid="ses-1", iat=NOW, exp=NOW + TTL, prj="proj-a")
    assert token.startswith("mcs1.") and token.count(".") == 2 and len(token) < MAX_TOKEN_LENGTH


def test_project_is_optional(key):
    claims = verify([key.public_key], issue(key, "u", "s", 60, now=NOW), NOW, is_revoked=never_revoked)
    assert claims.prj is None


def test_key_survives_a_pem_round_trip(key, token):
    loaded = SessionKey.load(key.private_pem())
    assert verify([loaded.public_key], token, NOW, is_revoked=never_revoked).sub == "user-alice"
    assert verify([load_public_key(key.public_pem())], token, NOW, is_revoked=never_revoked).sid == "ses-1"


def test_loading_rejects_other_keys_without_echoing_them():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="Ed25519") as e:
        SessionKey.load(ec_pem)
    assert "PRIVATE" not in str(e.value)
    with pytest.raises(ValueError):
        SessionKey.load("not a pem")
    with pytest.raises(ValueError):
        load_public_key(b"not a pem")


def test_every_single_character_change_is_refused(key, token):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for i, ch in enumerate(token):
        for replacement in {alphabet[(alphabet.index(ch) + 1) % len(alphabet)] if ch in alphabet else "A", "!"}:
            tampered = token[:i] + replacement + token[i + 1 :]
            with pytest.raises(Unauthenticated):
                verify([key.public_key], tampered, NOW, is_revoked=never_revoked)


def test_tampered_claims_fail_the_signature(key, token):
    _, claims_part, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(claims_part + "=="))
    claims["exp"] += 10 * TTL  # extend one's own session
    forged = f"mcs1.{b64(json.dumps(claims).encode())}.{sig}"
    with pytest.raises(BadSessionSignature, match="signature"):
        verify([key.public_key], forged, NOW, is_revoked=never_revoked)


def test_token_signed_by_another_key_is_refused(key):
    other = SessionKey.generate()
    with pytest.raises(BadSessionSignature):
        verify([key.public_key], issue(other, "user-alice", "ses-1", TTL, now=NOW), NOW, is_revoked=never_revoked)


def test_rotation_old_key_in_the_list_still_verifies(key, token):
    new = SessionKey.generate()
    fresh = issue(new, "user-bob", "ses-2", TTL, now=NOW)
    keys = [new.public_key, key.public_key]
    assert verify(keys, token, NOW, is_revoked=never_revoked).sub == "user-alice"
    assert verify(keys, fresh, NOW, is_revoked=never_revoked).sub == "user-bob"
    with pytest.raises(BadSessionSignature):  # once the old key is dropped from the list
        verify([new.public_key], token, NOW, is_revoked=never_revoked)


def test_no_trusted_keys_means_nothing_verifies(token):
    with pytest.raises(BadSessionSignature):
        verify([], token, NOW, is_revoked=never_revoked)


def test_expired_token_is_refused_with_the_expiry_time(key, token):
    with pytest.raises(SessionExpired) as e:
        verify([key.public_key], token, NOW + TTL + DEFAULT_LEEWAY, is_revoked=never_revoked)
    assert "2027-01-15T09:00:00Z" in e.value.detail and "log in again" in e.value.detail
    assert token not in e.value.detail and e.value.status == 401


def test_leeway_allows_small_clock_skew_only(key, token):
    assert verify([key.public_key], token, NOW + TTL + DEFAULT_LEEWAY - 1, is_revoked=never_revoked)
    assert verify([key.public_key], token, NOW + TTL + 5, is_revoked=never_revoked, leeway=10)
    with pytest.raises(SessionExpired):
        verify([key.public_key], token, NOW + TTL, is_revoked=never_revoked, leeway=0)


def test_replay_of_an_expired_token_is_refused_every_time(key, token):
    assert verify([key.public_key], token, NOW + 60, is_revoked=never_revoked)  # worked while valid
    for later in (NOW + TTL + DEFAULT_LEEWAY, NOW + TTL + 3600, NOW + 10 * 365 * 86400):
        for _ in range(3):
            with pytest.raises(SessionExpired):
                verify([key.public_key], token, later, is_revoked=never_revoked)


def test_token_issued_in_the_future_is_refused(key):
    future = issue(key, "u", "s", TTL, now=NOW + 3600)
    with pytest.raises(MalformedSession, match="clock"):
        verify([key.public_key], future, NOW, is_revoked=never_revoked)


def test_revoked_session_is_refused(key, token):
    revoked = {"ses-1"}
    asked: list[str] = []

    def is_revoked(sid: str) -> bool:
        asked.append(sid)
        return sid in revoked

    with pytest.raises(SessionRevoked, match="revoked") as e:
        verify([key.public_key], token, NOW, is_revoked=is_revoked)
    assert asked == ["ses-1"] and "ses-1" not in e.value.detail
    other = issue(key, "user-alice", "ses-9", TTL, now=NOW)
    assert verify([key.public_key], other, NOW, is_revoked=is_revoked).sid == "ses-9"


def test_revocation_is_not_consulted_for_invalid_tokens(key, token):
    def explode(sid: str) -> bool:
        raise AssertionError("is_revoked called")

    with pytest.raises(SessionExpired):
        verify([key.public_key], token, NOW + 2 * TTL, is_revoked=explode)
    with pytest.raises(BadSessionSignature):
        verify([SessionKey.generate().public_key], token, NOW, is_revoked=explode)


def test_default_clock_is_the_wall_clock(key):
    fresh = issue(key, "u", "s", 60)
    assert verify([key.public_key], fresh, is_revoked=never_revoked).sub == "u"
    with pytest.raises(SessionExpired):
        verify([key.public_key], issue(key, "u", "s", 60, now=NOW - 3600 * 24 * 365 * 30), is_revoked=never_revoked)


SIG = "A" * 86
MALFORMED = [
    "",
    "...",
    "mcs1..",
    "mcs1...",
    "mcs1.e30",
    f"mcs1.e30.{SIG}.extra",
    f"mcs2.e30.{SIG}",
    f"MCS1.e30.{SIG}",
    f"mcs1.e30.{SIG[:-1]}",
    f"mcs1.e30.{SIG}A",
    f"mcs1.e30=.{SIG}",
    f"mcs1.e3+/.{SIG}",
    f"mcs1.é30.{SIG}",
    f"mcs1.e30.{SIG}\n",
    f" mcs1.e30.{SIG}",
    f"mcs1.{'A' * 5000}.{SIG}",
    "mcs1." + "x" * 10_000_000,
    "Bearer mcs1.e30." + SIG,
    None,
    b"mcs1.e30." + SIG.encode(),
    12,
    ["mcs1", "e30", SIG],
]


@pytest.mark.parametrize("bad", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_tokens_are_unauthenticated(key, bad):
    with pytest.raises(MalformedSession) as e:
        verify([key.public_key], bad, NOW, is_revoked=never_revoked)
    assert "malformed" in e.value.detail and e.value.status == 401


def claims(**overrides) -> bytes:
    base = {"sub": "u", "sid": "s", "iat": NOW, "exp": NOW + 60, "prj": None}
    base.update(overrides)
    return json.dumps({k: v for k, v in base.items() if v != "DROP"}).encode()


SIGNED_BUT_BAD = {
    "not json": b"{not json",
    "empty": b"",
    "json array": b"[1, 2, 3]",
    "json string": b'"mcs1"',
    "json null": b"null",
    "missing sub": claims(sub="DROP"),
    "missing sid": claims(sid="DROP"),
    "missing exp": claims(exp="DROP"),
    "missing prj": claims(prj="DROP"),
    "sub not a string": claims(sub=42),
    "empty sid": claims(sid=""),
    "exp as string": claims(exp=str(NOW + 60)),
    "exp as float": claims(exp=NOW + 60.5),
    "exp as bool": claims(exp=True),
    "iat negative": claims(iat=-1),
    "exp beyond year 9999": claims(exp=10**20),
    "exp before iat": claims(exp=NOW - 1),
    "prj a list": claims(prj=["a"]),
    "unknown claim": claims(admin=True),
    "huge sub": claims(sub="u" * 300),
    "invalid utf-8": b'{"sub": "\xff"}',
}


@pytest.mark.parametrize("payload", list(SIGNED_BUT_BAD.values()), ids=list(SIGNED_BUT_BAD))
def test_signed_tokens_with_bad_claims_are_unauthenticated(key, payload):
    with pytest.raises(MalformedSession):
        verify([key.public_key], signed(key, b64(payload)), NOW, is_revoked=never_revoked)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": 0},
        {"ttl": -5},
        {"ttl": 8 * 86400},
        {"ttl": 1.5},
        {"subject": ""},
        {"session_id": "s" * 257},
        {"project": ""},
    ],
)
def test_issue_refuses_arguments_no_caller_should_pass(key, kwargs):
    args = {"subject": "u", "session_id": "s", "ttl": 60, "now": NOW} | kwargs
    with pytest.raises(ValueError):
        issue(key, **args)
