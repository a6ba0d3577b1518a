"""Join tokens and node certificates: format, refusals with clear errors, and certificates usable for mutual TLS."""

from __future__ import annotations

import base64
import datetime as _dt
import ipaddress
import json
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from minicloud import ids, pki
from minicloud.cluster.join import (
    MAX_TOKEN_BYTES,
    CAMismatch,
    ClockSkew,
    JoinToken,
    JoinTokenExpired,
    JoinTokenInvalid,
    JoinTokenRecord,
    JoinTokenWrongNode,
    NodeCertInvalid,
    check_ca,
    encode_token,
    hash_secret,
    issue_token,
    make_node_key_and_csr,
    parse_token,
    sign_node_csr,
    split_address,
    verify_node_cert,
    verify_token,
)
from minicloud.errors import Conflict, Forbidden, Gone, Unauthenticated, ValidationFailed

T0 = _dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=_dt.UTC)
ADDRESSES = ["192.0.2.10:8443", "[2001:db8::10]:8443", "n1.example.net:8443"]


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.create_ca()


@pytest.fixture(scope="module")
def other_ca() -> tuple[bytes, bytes]:
    return pki.create_ca("someone else's CA")


@pytest.fixture
def issued(ca: tuple[bytes, bytes]) -> tuple[str, JoinTokenRecord]:
    return issue_token(ADDRESSES, pki.fingerprint(ca[0]), "n2", 600, now=T0)


def verify(token: JoinToken, record: JoinTokenRecord | None, at: _dt.datetime = T0, **kw: Any) -> str:
    client_now = kw.pop("client_now", at)
    return verify_token(token, record, server_now=at, client_now=client_now, **kw)


def raw_token(payload: Any) -> str:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return "mcjoin1." + base64.urlsafe_b64encode(data).decode().rstrip("=")


def payload_of(text: str) -> dict[str, Any]:
    return msgspec.to_builtins(parse_token(text))


# ----------------------------------------------------------------------------------------------- token format


def test_round_trip(issued: tuple[str, JoinTokenRecord], ca: tuple[bytes, bytes]) -> None:
    text, record = issued
    assert text.startswith("mcjoin1.")
    assert len(text) <= MAX_TOKEN_BYTES
    token = parse_token(f"  {text}\n")  # pasted with whitespace around it
    assert token.addresses == ADDRESSES
    assert token.ca_fingerprint == pki.fingerprint(ca[0])
    assert token.node == "n2"
    assert token.issued_at == "2026-03-01T12:00:00.000Z"
    assert token.expires_at == "2026-03-01T12:10:00.000Z"
    assert len(base64.urlsafe_b64decode(token.secret + "=")) == 32
    assert encode_token(token) == text

    assert record.token_id == token.token_id
    assert record.node == "n2"
    assert (record.issued_at, record.expires_at) == (token.issued_at, token.expires_at)
    assert record.secret_sha256 == hash_secret(token.secret)
    assert token.secret not in msgspec.json.encode(record).decode()  # the cluster never stores the secret

    assert verify(token, record) == "n2"
    assert verify(token, record, node_name="n2", at=T0 + _dt.timedelta(seconds=599)) == "n2"


def test_every_token_is_different(ca: tuple[bytes, bytes]) -> None:
    fp = pki.fingerprint(ca[0])
    tokens = [parse_token(issue_token(ADDRESSES, fp, "n2", 60)[0]) for _ in range(5)]
    assert len({t.secret for t in tokens}) == len({t.token_id for t in tokens}) == 5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"addresses": []}, "at least one"),
        ({"addresses": ["192.0.2.1"]}, "has no port"),
        ({"addresses": ["192.0.2.1:0"]}, "1 to 65535"),
        ({"addresses": ["bad host:1"]}, "neither an IP address nor a DNS name"),
        ({"ca_fingerprint": "sha1:abcd"}, "sha256:"),
        ({"node_name": "../etc"}, "not valid"),
        ({"ttl_seconds": 0}, "lifetime"),
        ({"ttl_seconds": 8 * 24 * 3600}, "lifetime"),
        ({"addresses": [f"host-{i:04d}.{'x' * 60}.{'y' * 60}.example:8443" for i in range(32)]}, "list fewer"),
    ],
)
def test_issue_refuses_bad_input(ca: tuple[bytes, bytes], kwargs: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {
        "addresses": ADDRESSES,
        "ca_fingerprint": pki.fingerprint(ca[0]),
        "node_name": "n2",
        "ttl_seconds": 600,
    }
    args.update(kwargs)
    with pytest.raises(ValidationFailed, match=needle) as e:
        issue_token(**args)
    assert e.value.status == 422


def _good_payload(ca_pem: bytes) -> dict[str, Any]:
    text, _ = issue_token(ADDRESSES, pki.fingerprint(ca_pem), "n2", 600, now=T0)
    return payload_of(text)


def _with(ca_pem: bytes, **changes: Any) -> str:
    payload = _good_payload(ca_pem)
    for key, value in changes.items():
        if value is ...:
            del payload[key]
        else:
            payload[key] = value
    return raw_token(payload)


MALFORMED: list[tuple[str, Any, str]] = [
    ("empty", lambda ca: "", "does not start with 'mcjoin1.'"),
    ("wrong prefix", lambda ca: "mc_abc.def", "does not start with 'mcjoin1.'"),
    ("api key pasted", lambda ca: "mcjoin1" + _with(ca)[8:], "does not start with 'mcjoin1.'"),
    ("no body", lambda ca: "mcjoin1.", "not base64url"),
    ("bad base64 characters", lambda ca: "mcjoin1.eyJ+/=", "not base64url"),
    ("impossible base64 length", lambda ca: "mcjoin1.eyJhY", "not base64url"),
    ("not JSON", lambda ca: raw_token(b'{"addresses": ['), "not JSON"),
    ("not UTF-8", lambda ca: raw_token(b"\xff\xfe\x00"), "not JSON"),
    ("JSON array", lambda ca: raw_token([1, 2]), "Expected 'object'"),
    ("missing secret", lambda ca: _with(ca, secret=...), "missing required field 'secret'"),
    ("missing node", lambda ca: _with(ca, node=...), "missing required field 'node'"),
    ("unknown field", lambda ca: _with(ca, admin=True), "unknown field 'admin'"),
    ("wrong type", lambda ca: _with(ca, addresses="192.0.2.1:8443"), "Expected 'array'"),
    ("no addresses", lambda ca: _with(ca, addresses=[]), "at least one"),
    ("address without port", lambda ca: _with(ca, addresses=["192.0.2.1"]), "has no port"),
    ("uppercase fingerprint", lambda ca: _with(ca, ca_fingerprint="sha256:" + "A" * 64), "ca_fingerprint"),
    ("short fingerprint", lambda ca: _with(ca, ca_fingerprint="sha256:abcd"), "ca_fingerprint"),
    ("md5 fingerprint", lambda ca: _with(ca, ca_fingerprint="md5:" + "a" * 32), "ca_fingerprint"),
    ("bare hex fingerprint", lambda ca: _with(ca, ca_fingerprint="a" * 64), "ca_fingerprint"),
    ("bad token id", lambda ca: _with(ca, token_id="x; drop table"), "token_id"),
    ("short secret", lambda ca: _with(ca, secret="abc"), "secret"),
    ("bad node", lambda ca: _with(ca, node="-n2"), "node"),
    ("non-UTC time", lambda ca: _with(ca, expires_at="2026-03-01T12:10:00+01:00"), "expires_at"),
    ("impossible time", lambda ca: _with(ca, issued_at="2026-02-30T12:00:00.000Z"), "issued_at"),
    ("expires before issued", lambda ca: _with(ca, expires_at="2026-03-01T11:00:00.000Z"), "not after"),
    ("too large", lambda ca: "mcjoin1." + "A" * MAX_TOKEN_BYTES, "at most 4096"),
]


@pytest.mark.parametrize(("case", "make", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_parse_refuses_malformed_tokens(ca: tuple[bytes, bytes], case: str, make: Any, needle: str) -> None:
    with pytest.raises(ValidationFailed) as e:
        parse_token(make(ca[0]))
    assert e.value.status == 422
    assert needle in e.value.detail, e.value.detail
    assert "minicloud cluster add" in e.value.detail  # tells the user what to do
    assert e.value.invalid_params[0]["name"] == "token"


def test_parse_names_an_unsupported_version() -> None:
    with pytest.raises(ValidationFailed, match="format version 2, but this minicloud understands only version 1"):
        parse_token("mcjoin2.eyJ9")


def test_parse_refuses_non_text() -> None:
    with pytest.raises(ValidationFailed, match="not text"):
        parse_token(b"mcjoin1.abc")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- verify_token


def test_reused_or_unknown_token_is_refused(issued: tuple[str, JoinTokenRecord]) -> None:
    token = parse_token(issued[0])
    with pytest.raises(JoinTokenInvalid) as e:
        verify(token, None)  # the record was deleted by the first, successful join
    assert isinstance(e.value, Unauthenticated) and e.value.status == 401
    assert "unknown or already used" in e.value.detail
    assert "minicloud cluster add n2" in e.value.detail


def test_wrong_secret_looks_exactly_like_an_unknown_token(issued: tuple[str, JoinTokenRecord]) -> None:
    text, record = issued
    token = parse_token(text)
    forged = msgspec.structs.replace(token, secret=base64.urlsafe_b64encode(b"\0" * 32).decode().rstrip("="))
    with pytest.raises(JoinTokenInvalid) as wrong:
        verify(forged, record)
    with pytest.raises(JoinTokenInvalid) as unknown:
        verify(forged, None)
    assert wrong.value.detail == unknown.value.detail
    assert wrong.value.to_problem() == unknown.value.to_problem()


def test_token_id_must_match_the_record(issued: tuple[str, JoinTokenRecord]) -> None:
    text, record = issued
    with pytest.raises(JoinTokenInvalid, match="unknown or already used"):
        verify(parse_token(text), msgspec.structs.replace(record, token_id=ids.new_id("jt")))


def test_expired_token_is_refused_by_the_server_clock(issued: tuple[str, JoinTokenRecord]) -> None:
    text, record = issued
    token = parse_token(text)
    for late in (_dt.timedelta(seconds=600), _dt.timedelta(days=3)):
        at = T0 + late
        with pytest.raises(JoinTokenExpired) as e:
            verify(token, record, at=at)
        assert isinstance(e.value, Gone) and e.value.status == 410
        assert "expired at 2026-03-01T12:10:00.000Z" in e.value.detail
        assert "`minicloud cluster add n2`" in e.value.detail
        assert e.value.to_problem()["type"].endswith("/join-token-expired")


def test_expiry_comes_from_the_record_not_the_token(issued: tuple[str, JoinTokenRecord]) -> None:
    text, record = issued
    stretched = msgspec.structs.replace(parse_token(text), expires_at="2099-01-01T00:00:00.000Z")
    with pytest.raises(JoinTokenExpired):
        verify(stretched, record, at=T0 + _dt.timedelta(hours=1))


def test_token_for_another_node_is_refused_naming_both(issued: tuple[str, JoinTokenRecord]) -> None:
    text, record = issued
    token = parse_token(text)
    with pytest.raises(JoinTokenWrongNode) as e:
        verify(token, record, node_name="n3")
    assert isinstance(e.value, Forbidden) and e.value.status == 403
    assert "'n2'" in e.value.detail and "'n3'" in e.value.detail
    assert "minicloud cluster add n3" in e.value.detail
    # an edited token (node changed, secret kept) fares no better
    with pytest.raises(JoinTokenWrongNode, match="issued for node 'n2', but the joining node is 'n9'"):
        verify(msgspec.structs.replace(token, node="n9"), record)


@pytest.mark.parametrize("sign", [1, -1], ids=["client ahead", "client behind"])
def test_clock_skew_just_under_and_at_the_limit_is_accepted(issued: tuple[str, JoinTokenRecord], sign: int) -> None:
    text, record = issued
    token = parse_token(text)
    for seconds in (29.9, 30.0):
        assert verify(token, record, client_now=T0 + sign * _dt.timedelta(seconds=seconds)) == "n2"


@pytest.mark.parametrize(("sign", "word"), [(1, "ahead of"), (-1, "behind")], ids=["client ahead", "client behind"])
def test_clock_skew_over_the_limit_is_refused(issued: tuple[str, JoinTokenRecord], sign: int, word: str) -> None:
    text, record = issued
    token = parse_token(text)
    with pytest.raises(ClockSkew) as e:
        verify(token, record, client_now=T0 + sign * _dt.timedelta(seconds=30.5))
    assert isinstance(e.value, Conflict) and e.value.status == 409
    assert "differ by 30.5 s" in e.value.detail
    assert f"the joining node is {word} the cluster" in e.value.detail
    assert "synchronise them (NTP/chrony)" in e.value.detail and "retry" in e.value.detail
    assert e.value.to_problem()["skew_seconds"] == sign * 30.5
    with pytest.raises(ClockSkew, match=r"differ by 3600\.0 s"):
        verify(token, record, client_now=T0 + sign * _dt.timedelta(hours=1))
    assert verify(token, record, client_now=T0 + sign * _dt.timedelta(seconds=30.5), max_skew_seconds=60) == "n2"


def test_naive_times_are_refused(issued: tuple[str, JoinTokenRecord]) -> None:
    text, record = issued
    with pytest.raises(ValidationFailed, match="client_now has no time zone"):
        verify_token(parse_token(text), record, server_now=T0, client_now=T0.replace(tzinfo=None))


# ----------------------------------------------------------------------------------------------- check_ca


def test_check_ca_accepts_the_cluster_ca(issued: tuple[str, JoinTokenRecord], ca: tuple[bytes, bytes]) -> None:
    token = parse_token(issued[0])
    check_ca(token, ca[0])
    check_ca(token, ca[0].decode())


def test_check_ca_refuses_another_ca(
    issued: tuple[str, JoinTokenRecord], ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    token = parse_token(issued[0])
    with pytest.raises(CAMismatch) as e:
        check_ca(token, other_ca[0])
    assert "possible interception; nothing was sent" in e.value.detail
    assert pki.fingerprint(other_ca[0]) in e.value.detail and pki.fingerprint(ca[0]) in e.value.detail
    with pytest.raises(CAMismatch, match="nothing was sent"):
        check_ca(token, b"not a certificate")


# ----------------------------------------------------------------------------------------------- certificates


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def test_split_address() -> None:
    assert split_address("192.0.2.1:8443") == ("192.0.2.1", 8443)
    assert split_address("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert split_address("2001:db8::1") == ("2001:db8::1", None)
    assert split_address("n1.example") == ("n1.example", None)
    for bad in ("[n1]:80", "n1:http", "n1:70000", "a b", "[::1", "[::1]x"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_csr_is_signed_and_verified(ca: tuple[bytes, bytes]) -> None:
    key_pem, csr_pem = make_node_key_and_csr("n2", ["192.0.2.20:8443", "[2001:db8::20]:8443", "n2.example.net"])
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid

    cert_pem = sign_node_csr(ca[0], ca[1], csr_pem, "n2")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    assert verify_node_cert(ca[0], cert_pem) == "n2"

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n2"
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    dns, ips = _sans(cert)
    assert dns == {"n2", "localhost", "n2.example.net"}
    assert ips == {"127.0.0.1", "::1", "192.0.2.20", "2001:db8::20"}
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert _dt.timedelta(days=397) <= life <= _dt.timedelta(days=397, minutes=6)
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    # the short form the daemon may ask for
    short = x509.load_pem_x509_certificate(sign_node_csr(ca[0], ca[1], csr_pem, "n2", days=1))
    assert short.not_valid_after_utc - short.not_valid_before_utc < _dt.timedelta(days=1, minutes=6)


def test_csr_with_a_wrong_cn_is_refused(ca: tuple[bytes, bytes]) -> None:
    _, csr_pem = make_node_key_and_csr("n3", ["192.0.2.20:8443"])
    with pytest.raises(JoinTokenWrongNode) as e:
        sign_node_csr(ca[0], ca[1], csr_pem, "n2")
    assert e.value.status == 403
    assert "for node 'n3', but the join token is for node 'n2'" in e.value.detail


def test_csr_with_a_forged_signature_is_refused(ca: tuple[bytes, bytes]) -> None:
    _, csr_pem = make_node_key_and_csr("n3", ["192.0.2.20:8443"])
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    # the subject edited to claim n2 while keeping n3's signature
    forged_der = der.replace(b"\x0c\x02n3", b"\x0c\x02n2", 1)
    assert forged_der != der
    forged = x509.load_der_x509_csr(forged_der)
    assert forged.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n2"
    with pytest.raises(ValidationFailed, match="signature does not verify") as e:
        sign_node_csr(ca[0], ca[1], forged.public_bytes(serialization.Encoding.PEM), "n2")
    assert e.value.status == 422
    # and a flipped bit in the signature itself
    broken = der[:-1] + bytes([der[-1] ^ 1])
    with pytest.raises(ValidationFailed, match="signature does not verify"):
        sign_node_csr(ca[0], ca[1], x509.load_der_x509_csr(broken).public_bytes(serialization.Encoding.PEM), "n2")


def _csr(
    sans: list[x509.GeneralName] | None,
    *,
    key: Any = None,
    subject: x509.Name | None = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n2")])
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: _csr([x509.UniformResourceIdentifier("spiffe://cluster/admin")]), "UniformResourceIdentifier"),
        (lambda: _csr([x509.RFC822Name("root@example.net")]), "RFC822Name"),
        (lambda: _csr([x509.DNSName("*.example.net")]), "wildcard"),
        (lambda: _csr([x509.DNSName("bad name")]), "not a valid DNS name"),
        (lambda: _csr([x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))]), "not an address"),
        (lambda: _csr(None, subject=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")])), "common name"),
        (lambda: _csr(None, key=rsa.generate_private_key(65537, 1024)), "too short"),
        (lambda: _csr(None, key=ec.generate_private_key(ec.SECP256K1())), "secp256k1"),
        (lambda: _csr(None, key=ed25519.Ed25519PrivateKey.generate()), "not accepted"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
        (lambda: b"hello", "not a PEM"),
    ],
    ids=[
        "uri",
        "email",
        "wildcard",
        "bad dns",
        "ip network",
        "no cn",
        "rsa-1024",
        "secp256k1",
        "ed25519",
        "junk",
        "text",
    ],
)
def test_csr_with_unacceptable_content_is_refused(ca: tuple[bytes, bytes], make: Any, needle: str) -> None:
    with pytest.raises(ValidationFailed) as e:
        sign_node_csr(ca[0], ca[1], make(), "n2")
    assert needle in e.value.detail, e.value.detail
    assert e.value.status == 422


def test_csr_without_sans_still_gets_the_node_name(ca: tuple[bytes, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(sign_node_csr(ca[0], ca[1], _csr(None), "n2"))
    assert _sans(cert) == ({"n2"}, set())


def test_rsa_csr_is_accepted(ca: tuple[bytes, bytes]) -> None:
    cert_pem = sign_node_csr(ca[0], ca[1], _csr(None, key=rsa.generate_private_key(65537, 2048)), "n2")
    assert verify_node_cert(ca[0], cert_pem) == "n2"


def test_allowed_addresses_limit_the_sans(ca: tuple[bytes, bytes]) -> None:
    _, csr_pem = make_node_key_and_csr("n2", ["192.0.2.20:8443", "N2.Example.Net"])
    sign_node_csr(ca[0], ca[1], csr_pem, "n2", allowed_addresses=["192.0.2.20", "n2.example.net.:8443"])
    with pytest.raises(JoinTokenWrongNode, match=r"names 192\.0\.2\.20, which are not addresses of node 'n2'"):
        sign_node_csr(ca[0], ca[1], csr_pem, "n2", allowed_addresses=["192.0.2.21", "n2.example.net"])


def test_mismatched_ca_files_are_reported(ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]) -> None:
    _, csr_pem = make_node_key_and_csr("n2", [])
    with pytest.raises(Exception, match="does not belong to the CA certificate"):
        sign_node_csr(ca[0], other_ca[1], csr_pem, "n2")


def test_cert_from_another_ca_is_refused(ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]) -> None:
    _, csr_pem = make_node_key_and_csr("n2", ["192.0.2.20:8443"])
    foreign = sign_node_csr(other_ca[0], other_ca[1], csr_pem, "n2")
    with pytest.raises(NodeCertInvalid, match="was not issued by this cluster's CA") as e:
        verify_node_cert(ca[0], foreign)
    assert e.value.status == 401
    # same subject name as our CA, different key: the signature check catches it, not just the issuer name
    impostor_cert, impostor_key = pki.create_ca()
    assert x509.load_pem_x509_certificate(impostor_cert).subject == x509.load_pem_x509_certificate(ca[0]).subject
    with pytest.raises(NodeCertInvalid, match="was not issued by this cluster's CA"):
        verify_node_cert(ca[0], sign_node_csr(impostor_cert, impostor_key, csr_pem, "n2"))


def test_cert_outside_its_validity_is_refused(ca: tuple[bytes, bytes]) -> None:
    _, csr_pem = make_node_key_and_csr("n2", [])
    cert_pem = sign_node_csr(ca[0], ca[1], csr_pem, "n2", days=1)
    now = _dt.datetime.now(_dt.UTC)
    assert verify_node_cert(ca[0], cert_pem, now=now) == "n2"
    with pytest.raises(NodeCertInvalid, match="expired at"):
        verify_node_cert(ca[0], cert_pem, now=now + _dt.timedelta(days=2))
    with pytest.raises(NodeCertInvalid, match="valid only from"):
        verify_node_cert(ca[0], cert_pem, now=now - _dt.timedelta(hours=1))


def _cert_from_ca(ca: tuple[bytes, bytes], *, eku: list[x509.ObjectIdentifier], is_ca: bool = False) -> bytes:
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    ca_key = serialization.load_pem_private_key(ca[1], password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n2")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=1))
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_cert_without_both_ekus_or_with_ca_flag_is_refused(ca: tuple[bytes, bytes]) -> None:
    with pytest.raises(NodeCertInvalid, match="serverAuth and clientAuth"):
        verify_node_cert(ca[0], _cert_from_ca(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH]))
    with pytest.raises(NodeCertInvalid, match="serverAuth and clientAuth"):
        verify_node_cert(ca[0], _cert_from_ca(ca, eku=[]))
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert verify_node_cert(ca[0], _cert_from_ca(ca, eku=both)) == "n2"
    with pytest.raises(NodeCertInvalid, match="is a CA certificate"):
        verify_node_cert(ca[0], _cert_from_ca(ca, eku=both, is_ca=True))
    with pytest.raises(NodeCertInvalid, match="is a CA certificate"):
        verify_node_cert(ca[0], ca[0])
    with pytest.raises(ValidationFailed, match="not a PEM certificate"):
        verify_node_cert(ca[0], b"junk")


def test_the_agents_own_server_cert_is_a_valid_node_cert(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = pki.issue_server_cert(ca[0], ca[1], "n1")
    assert verify_node_cert(ca[0], cert_pem) == "n1"


# ----------------------------------------------------------------------------------------------- mutual TLS


def _node_files(tmp_path: Path, ca: tuple[bytes, bytes], name: str, address: str) -> tuple[Path, Path]:
    key_pem, csr_pem = make_node_key_and_csr(name, [address])
    cert_pem = sign_node_csr(ca[0], ca[1], csr_pem, name)
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


def _context(purpose: int, ca_pem: bytes, cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED  # the server demands a client certificate from our CA
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.load_cert_chain(*cert)
    return ctx


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> dict[str, Any]:
    """Run one TLS exchange over a socketpair; returns what each side saw (peer certificate, reply, error)."""
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                seen["client_cert"] = tls.getpeercert(binary_form=True)
                tls.sendall(tls.recv(5).upper())
        except (ssl.SSLError, OSError) as e:
            seen["server_error"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_hostname=server_hostname) as tls:
            seen["server_cert"] = tls.getpeercert(binary_form=True)
            tls.sendall(b"hello")
            seen["reply"] = tls.recv(5)
    except (ssl.SSLError, OSError) as e:
        seen["client_error"] = e
    finally:
        thread.join(10)
        left.close()
        right.close()
    assert not thread.is_alive()
    return seen


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def test_issued_certs_work_for_mutual_tls(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    n1 = _node_files(tmp_path, ca, "n1", "192.0.2.10:8443")
    n2 = _node_files(tmp_path, ca, "n2", "192.0.2.20:8443")
    server = _context(ssl.PROTOCOL_TLS_SERVER, ca[0], n1)
    for hostname in ("n1", "192.0.2.10", "localhost"):  # host name checking passes on every SAN
        client = _context(ssl.PROTOCOL_TLS_CLIENT, ca[0], n2)
        seen = _handshake(server, client, hostname)
        assert "client_error" not in seen and "server_error" not in seen, seen
        assert seen["reply"] == b"HELLO"
        # each side identifies the other by its node certificate
        assert verify_node_cert(ca[0], _pem(seen["client_cert"])) == "n2"
        assert verify_node_cert(ca[0], _pem(seen["server_cert"])) == "n1"


def test_mutual_tls_refuses_a_client_from_another_ca(
    tmp_path: Path, ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    n1 = _node_files(tmp_path, ca, "n1", "192.0.2.10:8443")
    intruder = _node_files(tmp_path, other_ca, "n2", "192.0.2.20:8443")
    server = _context(ssl.PROTOCOL_TLS_SERVER, ca[0], n1)
    client = _context(ssl.PROTOCOL_TLS_CLIENT, ca[0], intruder)  # trusts our CA but presents a foreign cert
    seen = _handshake(server, client, "n1")
    assert isinstance(seen.get("server_error"), ssl.SSLCertVerificationError), seen
    assert "client_cert" not in seen and "reply" not in seen


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    n1 = _node_files(tmp_path, ca, "n1", "192.0.2.10:8443")
    server = _context(ssl.PROTOCOL_TLS_SERVER, ca[0], n1)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=ca[0].decode())
    seen = _handshake(server, client, "n1")
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(seen.get("server_error")), seen
    assert "reply" not in seen
