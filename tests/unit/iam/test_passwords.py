"""Password hashing (scrypt, self-describing strings) and the NIST-style password policy."""

from __future__ import annotations

import base64
import hashlib
import time
import unicodedata

import pytest

from minicloud.errors import ValidationFailed
from minicloud.iam.passwords import (
    HASH_BYTES,
    SALT_BYTES,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    check_password_policy,
    hash_password,
    needs_rehash,
    verify_password,
    verify_unknown_user,
)

PASSWORD = "correct horse battery staple"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def scrypt_string(password: str, n: int, r: int = 8, p: int = 1, salt: bytes = b"s" * 16, dklen: int = 32) -> str:
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen)
    return f"scrypt$n={n}$r={r}$p={p}${b64(salt)}${b64(digest)}"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(PASSWORD)


def test_right_password_verifies(stored):
    assert verify_password(PASSWORD, stored) is True


@pytest.mark.parametrize(
    "attempt",
    ["", "correct horse battery stapl", "Correct horse battery staple", PASSWORD + " ", PASSWORD + "\x00"],
)
def test_wrong_password_is_refused(stored, attempt):
    assert verify_password(attempt, stored) is False


def test_hash_is_self_describing_with_a_16_byte_salt(stored):
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", f"n={SCRYPT_N}", f"r={SCRYPT_R}", f"p={SCRYPT_P}")
    assert len(unb64(salt)) == SALT_BYTES == 16
    assert len(unb64(digest)) == HASH_BYTES
    assert stored.isascii() and not needs_rehash(stored)


def test_the_same_password_hashes_differently_each_time(stored):
    again = hash_password(PASSWORD)
    assert again != stored and verify_password(PASSWORD, again)


def test_the_clear_password_never_appears_in_the_hash():
    password = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    stored = hash_password(password)
    encodings = [password, b64(password.encode()), password.encode().hex(), password[:12]]
    assert not any(e in stored for e in encodings)


@pytest.mark.parametrize(
    "password", ["pässwörd-ñandú-κωδικός", "日本語のパスワードです", "🔑🔒 emoji passphrase 🐍", "  spaces  inside  "]
)
def test_unicode_passwords_round_trip(password):
    stored = hash_password(password)
    assert verify_password(password, stored)
    assert not verify_password(password[:-1], stored)


def test_composed_and_decomposed_forms_of_a_password_match():
    composed = unicodedata.normalize("NFC", "crème brûlée à la café")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert verify_password(decomposed, hash_password(composed))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "scrypt",
        "plain-text-password",
        "bcrypt$n=16384$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaA",
        "scrypt$n=16384$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA",  # no hash
        "scrypt$n=16384$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA$extra",
        "scrypt$n=1000$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # n not a power of two
        "scrypt$n=1073741824$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # would need 128 GiB
        "scrypt$n=16384$r=0$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$n=16384$r=8$p=-1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$n=016384$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$r=8$n=16384$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # parameters out of order
        "scrypt$n=16384$r=8$p=1$not*base64!$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$n=16384$r=8$p=1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # 4-byte salt
        "scrypt$n=16384$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA==$aGFzaGhhc2hoYXNoaGFzaA",  # padding is not our encoding
        "scrypt$n=16384$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaA",  # 4-byte hash
        "scrypt$n=\uff11\uff16\uff13\uff18\uff14$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # non-ASCII digits
        "x" * 100_000,
        None,
        12345,
        b"scrypt$n=16384$r=8$p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
    ],
)
def test_malformed_stored_values_verify_false_and_need_rehash(bad):
    assert verify_password(PASSWORD, bad) is False
    assert needs_rehash(bad) is True


@pytest.mark.parametrize("attempt", [None, 123, b"bytes", "\ud800 lone surrogate", "x" * 5000])
def test_odd_password_inputs_verify_false_without_raising(stored, attempt):
    assert verify_password(attempt, stored) is False


def test_weaker_parameters_still_verify_but_need_rehash():
    old = scrypt_string(PASSWORD, n=2**10)
    assert verify_password(PASSWORD, old)
    assert needs_rehash(old)
    assert needs_rehash(scrypt_string(PASSWORD, n=SCRYPT_N, salt=b"s" * 8))
    assert needs_rehash(scrypt_string(PASSWORD, n=SCRYPT_N, dklen=16))
    assert not needs_rehash(scrypt_string(PASSWORD, n=SCRYPT_N))


def test_hashing_costs_real_work():
    start = time.perf_counter()
    hash_password(PASSWORD)
    assert time.perf_counter() - start > 0.005  # ~40 ms on the 2-core test machine; never a fast hash


def test_trailing_nul_cannot_alias_a_password(stored):
    # HMAC pads short keys with zeros, so scrypt alone would accept these: refusing NUL closes that.
    assert hashlib.scrypt(b"pw", salt=b"s", n=2, r=1, p=1) == hashlib.scrypt(b"pw\0", salt=b"s", n=2, r=1, p=1)
    assert verify_password(PASSWORD + "\0", stored) is False
    assert verify_password(PASSWORD + "\0\0\0", stored) is False


def test_unknown_user_check_is_always_false():
    assert verify_unknown_user(PASSWORD) is False
    assert verify_unknown_user(None) is False  # type: ignore[arg-type]


@pytest.mark.parametrize("password", ["\ud800 is not text!!", "x" * 1025, None, "twelve chars\0"])
def test_hash_password_refuses_what_could_never_verify(password):
    with pytest.raises(ValidationFailed) as e:
        hash_password(password)
    assert "x" * 20 not in e.value.detail


@pytest.mark.parametrize(
    "password",
    ["twelve chars", "aaaaaaaaaaaa", "x" * 1024, "passphrase with spaces", "ÄÖÜ-äöü-ß-日本", " leading space ok"],
)
def test_policy_accepts_long_enough_passwords_without_composition_rules(password):
    check_password_policy(password)


@pytest.mark.parametrize(
    ("password", "words"),
    [
        ("", "at least 12"),
        ("short-pw123", "at least 12"),
        ("x" * 1025, "at most 1024"),
        (" " * 20, "whitespace"),
        ("\t\n \u3000" * 5, "whitespace"),
        ("valid prefix \ud800", "Unicode"),
        ("a NUL \0 inside the password", "NUL"),
        (None, "string"),
    ],
)
def test_policy_refuses_with_a_clear_message_that_omits_the_password(password, words):
    with pytest.raises(ValidationFailed) as e:
        check_password_policy(password)
    assert words in e.value.detail
    assert e.value.invalid_params[0]["name"] == "password"
    if password and password.strip():
        assert password not in e.value.detail
