"""Joining a node to the cluster: one-time join tokens and node certificates signed by the cluster CA.

The flow (the API and CLI layers call these pure functions; nothing here touches the network or the store):

1. ``minicloud cluster add NODE`` on a member calls :func:`issue_token`, stores the returned
   :class:`JoinTokenRecord` (the secret only as its SHA-256) and prints the token once.
2. ``minicloud join TOKEN`` on the new node calls :func:`parse_token`, connects to one of the token's addresses,
   and before sending anything calls :func:`check_ca` on the CA the cluster presents: a mismatch means someone
   else answered, and the token and CSR are never sent. It then makes a key and CSR with
   :func:`make_node_key_and_csr` (the key never leaves the node) and sends token, CSR and its clock.
3. The member looks the record up by ``token_id``, calls :func:`verify_token`, signs with :func:`sign_node_csr`
   and deletes the record **in the same transaction** that records the new node, so a token works exactly once.
4. Nodes authenticate each other (node-to-node HTTPS, etcd peer and client ports) with mutual TLS; a presented
   certificate is checked with :func:`verify_node_cert`.

Errors and their HTTP statuses (each is a subclass of a class in :mod:`minicloud.errors`, with its own problem type):

=========================  ======  ===========================================================================
class                      status  when
=========================  ======  ===========================================================================
``ValidationFailed``       422     malformed token, CSR or certificate; a CSR asking for a name we never sign
``JoinTokenInvalid``       401     unknown, already used or wrong-secret token (one message: nothing leaks)
``JoinTokenWrongNode``     403     the token was issued for another node name; a CSR for another name/address
``JoinTokenExpired``       410     the token's expiry (by the member's clock) has passed
``ClockSkew``              409     the two nodes' clocks differ by more than ``max_skew_seconds``
``CAMismatch``             401     client side: the cluster's CA is not the one the token names
``NodeCertInvalid``        401     a presented node certificate does not chain to our CA, is expired, ...
=========================  ======  ===========================================================================

Only ``JoinTokenInvalid`` and ``JoinTokenExpired`` mean the token is useless; after ``ClockSkew`` or
``JoinTokenWrongNode`` the record is untouched and the same token can be retried once the cause is fixed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from minicloud import ids
from minicloud.errors import Conflict, Forbidden, Gone, MinicloudError, Unauthenticated, ValidationFailed
from minicloud.model import NAME_PATTERN
from minicloud.pki import SERVER_DAYS, fingerprint, node_certificate

__all__ = [
    "DEFAULT_MAX_SKEW_SECONDS",
    "DEFAULT_TTL_SECONDS",
    "MAX_TOKEN_BYTES",
    "MAX_TTL_SECONDS",
    "TOKEN_PREFIX",
    "CAMismatch",
    "ClockSkew",
    "JoinToken",
    "JoinTokenExpired",
    "JoinTokenInvalid",
    "JoinTokenRecord",
    "JoinTokenWrongNode",
    "NodeCertInvalid",
    "check_ca",
    "encode_token",
    "hash_secret",
    "issue_token",
    "make_node_key_and_csr",
    "parse_token",
    "sign_node_csr",
    "split_address",
    "verify_node_cert",
    "verify_token",
]

TOKEN_VERSION = 1
TOKEN_PREFIX = f"mcjoin{TOKEN_VERSION}."
#: Upper bound on a whole token; anything longer is refused before decoding.
MAX_TOKEN_BYTES = 4096
MAX_ADDRESSES = 32
DEFAULT_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_SKEW_SECONDS = 30
TOKEN_ID_PREFIX = "jt"
SECRET_BYTES = 32

_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TOKEN_ID_RE = re.compile(rf"^{TOKEN_ID_PREFIX}-[a-z2-7]{{20}}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 bytes, base64url without padding
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
_NAME_RE = re.compile(NAME_PATTERN)
_DNS_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*\.?$")
_VERSION_PREFIX_RE = re.compile(r"^mcjoin(\d+)\.")
_LOOPBACK_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
_ADD_HINT = "create a new one with `minicloud cluster add {node}` on a cluster member"

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


# --------------------------------------------------------------------------------------------------------- errors


class JoinTokenInvalid(Unauthenticated):
    """The token is unknown, was already used, or its secret is wrong (deliberately indistinguishable)."""

    slug = "join-token-invalid"
    title = "The join token is not valid"


class JoinTokenExpired(Gone):
    """The token was valid but its expiry has passed; only a new token helps."""

    slug = "join-token-expired"
    title = "The join token has expired"


class JoinTokenWrongNode(Forbidden):
    """The token (or CSR) is for another node name or address than the one asked for."""

    slug = "join-token-wrong-node"
    title = "The join token is for another node"


class ClockSkew(Conflict):
    """The joining node's clock and the member's differ too much; certificates and leases would misbehave."""

    slug = "clock-skew"
    title = "The clocks of the two nodes differ too much"


class CAMismatch(Unauthenticated):
    """Client side: the cluster presented a CA other than the one the token names (possible interception)."""

    slug = "ca-mismatch"
    title = "The cluster's CA does not match the join token"


class NodeCertInvalid(Unauthenticated):
    """A presented node certificate is not one our CA issued for node-to-node use, or is outside its validity."""

    slug = "node-cert-invalid"
    title = "The node certificate is not valid"


# --------------------------------------------------------------------------------------------------------- types


class JoinToken(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a join token carries, as decoded by :func:`parse_token` (every field already validated).

    The token is not signed: only ``secret`` (checked against the stored hash) is trusted by the member, and only
    ``ca_fingerprint`` is trusted by the joining node (it came out of band, from the operator). The member takes
    ``node`` and ``expires_at`` from its own :class:`JoinTokenRecord`, never from the token.
    """

    addresses: list[str]
    ca_fingerprint: str
    token_id: str
    secret: str
    node: str
    expires_at: str
    issued_at: str


class JoinTokenRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the cluster stores for an outstanding token: never the secret, only its SHA-256 (hex)."""

    token_id: str
    node: str
    secret_sha256: str
    issued_at: str
    expires_at: str


# --------------------------------------------------------------------------------------------------------- helpers


def _rfc3339(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _aware(moment: _dt.datetime, what: str) -> _dt.datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationFailed(
            f"{what} has no time zone; send it as RFC 3339 UTC, e.g. 2026-01-02T03:04:05.678Z",
            invalid_params=[{"name": what, "reason": "time zone missing"}],
        )
    return moment


def _bad_token(reason: str) -> ValidationFailed:
    return ValidationFailed(
        f"the join token is malformed: {reason}. Copy the whole token printed by `minicloud cluster add NODE` "
        "(one line starting with 'mcjoin1.'), or create a new one",
        invalid_params=[{"name": "token", "reason": reason}],
    )


def hash_secret(secret: str) -> str:
    """The hex SHA-256 of a token secret: what :class:`JoinTokenRecord` stores (fast hash: the secret is random)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_address(address: str) -> tuple[str, int | None]:
    """``(host, port)`` from ``host``, ``host:port``, ``[v6]:port``, ``[v6]`` or a bare IPv6 address.

    Raises ValueError (with the reason) when the host is neither an IP address nor a plausible DNS name, or the
    port is not 1-65535.
    """
    port_text: str | None = None
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ValueError(f"{address!r} has '[' without ']'")
        host, rest = address[1:close], address[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{address!r}: expected ':port' after ']'")
            port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r}: only IPv6 addresses go inside [...]") from None
    elif address.count(":") > 1:
        host = address  # bare IPv6, no port
    elif ":" in address:
        host, port_text = address.rsplit(":", 1)
    else:
        host = address
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{address!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    if _host_ip(host) is None and not (len(host) <= 253 and _DNS_RE.match(host)):
        raise ValueError(f"{address!r}: {host!r} is neither an IP address nor a DNS name")
    return host, port


def _host_ip(host: str) -> _IP | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check_addresses(addresses: Sequence[str], *, need_port: bool) -> list[str]:
    if not addresses:
        raise ValueError("no addresses: at least one cluster member's host:port is needed")
    if len(addresses) > MAX_ADDRESSES:
        raise ValueError(f"{len(addresses)} addresses; at most {MAX_ADDRESSES} are allowed")
    for address in addresses:
        if not isinstance(address, str):
            raise ValueError(f"{address!r} is not a string")
        _, port = split_address(address)
        if need_port and port is None:
            raise ValueError(f"{address!r} has no port; write host:port (e.g. 192.0.2.10:8443)")
    return list(addresses)


def _check_node_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValidationFailed(
            f"node name {name!r} is not valid: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit",
            invalid_params=[{"name": "node", "reason": "invalid name"}],
        )


# --------------------------------------------------------------------------------------------------------- tokens


def encode_token(token: JoinToken) -> str:
    """The printable form of ``token``: ``mcjoin1.`` + unpadded base64url of its JSON."""
    body = base64.urlsafe_b64encode(msgspec.json.encode(token)).decode().rstrip("=")
    return TOKEN_PREFIX + body


def issue_token(
    addresses: Sequence[str],
    ca_fingerprint: str,
    node_name: str,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
    now: _dt.datetime | None = None,
) -> tuple[str, JoinTokenRecord]:
    """A new one-time join token for ``node_name`` and the record the cluster must store for it.

    ``addresses`` are the members' HTTPS ``host:port`` addresses the joining node may try; ``ca_fingerprint`` is
    :func:`minicloud.pki.fingerprint` of the cluster CA. The token text is shown once and never stored; the record
    holds only the secret's SHA-256. Raises ValidationFailed for a bad address, fingerprint, node name or TTL
    (1 s to 7 days), or when the token would exceed :data:`MAX_TOKEN_BYTES`.
    """
    _check_node_name(node_name)
    try:
        addresses = _check_addresses(addresses, need_port=True)
    except ValueError as e:
        raise ValidationFailed(
            f"cannot issue a join token: {e}", invalid_params=[{"name": "addresses", "reason": str(e)}]
        ) from None
    if not isinstance(ca_fingerprint, str) or not _FINGERPRINT_RE.match(ca_fingerprint):
        raise ValidationFailed(
            f"the CA fingerprint {ca_fingerprint!r} is not 'sha256:' followed by 64 lowercase hex digits",
            invalid_params=[{"name": "ca_fingerprint", "reason": "malformed"}],
        )
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ValidationFailed(
            f"the token lifetime must be 1 to {MAX_TTL_SECONDS} seconds (7 days), not {ttl_seconds!r}",
            invalid_params=[{"name": "ttl_seconds", "reason": "out of range"}],
        )
    issued = _aware(now, "now") if now is not None else _dt.datetime.now(_dt.UTC)
    secret = base64.urlsafe_b64encode(os.urandom(SECRET_BYTES)).decode().rstrip("=")
    token = JoinToken(
        addresses=addresses,
        ca_fingerprint=ca_fingerprint,
        token_id=ids.new_id(TOKEN_ID_PREFIX),
        secret=secret,
        node=node_name,
        expires_at=_rfc3339(issued + _dt.timedelta(seconds=ttl_seconds)),
        issued_at=_rfc3339(issued),
    )
    text = encode_token(token)
    if len(text) > MAX_TOKEN_BYTES:
        raise ValidationFailed(
            f"the join token would be {len(text)} bytes (limit {MAX_TOKEN_BYTES}); list fewer or shorter addresses",
            invalid_params=[{"name": "addresses", "reason": "too long"}],
        )
    record = JoinTokenRecord(
        token_id=token.token_id,
        node=node_name,
        secret_sha256=hash_secret(secret),
        issued_at=token.issued_at,
        expires_at=token.expires_at,
    )
    return text, record


def parse_token(text: str) -> JoinToken:
    """Decode and validate a join token; surrounding whitespace is ignored.

    Raises ValidationFailed, saying what is wrong and what to do, when the token is longer than
    :data:`MAX_TOKEN_BYTES`, has another prefix or format version, is not valid base64url or JSON, lacks or adds a
    field, or holds a malformed address, fingerprint, id, secret, node name or time. Says nothing about whether the
    token is known, unused or unexpired: that is :func:`verify_token`'s job on the member.
    """
    if not isinstance(text, str):
        raise _bad_token("it is not text")
    text = text.strip()
    if len(text) > MAX_TOKEN_BYTES:
        raise _bad_token(f"it is {len(text)} characters long; a join token is at most {MAX_TOKEN_BYTES}")
    if not text.startswith(TOKEN_PREFIX):
        m = _VERSION_PREFIX_RE.match(text)
        if m:
            raise ValidationFailed(
                f"this join token has format version {m.group(1)}, but this minicloud understands only version "
                f"{TOKEN_VERSION}; run the same minicloud version on both nodes, or create the token with this one",
                invalid_params=[{"name": "token", "reason": "unsupported version"}],
            )
        raise _bad_token("it does not start with 'mcjoin1.'")
    body = text[len(TOKEN_PREFIX) :]
    if not body or not _B64URL_RE.match(body) or len(body) % 4 == 1:
        raise _bad_token("the part after 'mcjoin1.' is not base64url (was it cut off or wrapped?)")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise _bad_token("the part after 'mcjoin1.' is not base64url (was it cut off or wrapped?)") from None
    try:
        token = msgspec.json.decode(raw, type=JoinToken, strict=True)
    except msgspec.ValidationError as e:  # valid JSON, wrong shape (a subclass of DecodeError: catch it first)
        raise _bad_token(str(e).replace("`", "'")) from None
    except msgspec.DecodeError:
        raise _bad_token("its content is not JSON (was it cut off?)") from None
    try:
        _check_addresses(token.addresses, need_port=True)
    except ValueError as e:
        raise _bad_token(f"bad address: {e}") from None
    if not _FINGERPRINT_RE.match(token.ca_fingerprint):
        raise _bad_token("ca_fingerprint is not 'sha256:' followed by 64 lowercase hex digits")
    if not _TOKEN_ID_RE.match(token.token_id):
        raise _bad_token("token_id is malformed")
    if not _SECRET_RE.match(token.secret):
        raise _bad_token("secret is not 32 bytes of base64url")
    if not _NAME_RE.match(token.node):
        raise _bad_token("node is not a valid node name")
    times: dict[str, _dt.datetime] = {}
    for field in ("issued_at", "expires_at"):
        value = getattr(token, field)
        if not _TIME_RE.match(value):
            raise _bad_token(f"{field} is not an RFC 3339 UTC time like 2026-01-02T03:04:05.678Z")
        try:
            times[field] = ids.parse_time(value)
        except ValueError:
            raise _bad_token(f"{field} is not a valid time") from None
    if times["expires_at"] <= times["issued_at"]:
        raise _bad_token("expires_at is not after issued_at")
    return token


def verify_token(
    token: JoinToken,
    record: JoinTokenRecord | None,
    *,
    server_now: _dt.datetime,
    client_now: _dt.datetime,
    max_skew_seconds: float = DEFAULT_MAX_SKEW_SECONDS,
    node_name: str | None = None,
) -> str:
    """Member side: decide whether ``token`` may join; returns the node name to issue the certificate for.

    ``record`` is what the store holds for ``token.token_id`` (None if nothing). ``server_now`` is this member's
    clock, ``client_now`` the joining node's clock as it reported it, ``node_name`` the name the joining node asks
    for (its configured name / CSR CN), if any. Checks, in this order:

    1. record missing, id or secret mismatch (constant time) → :class:`JoinTokenInvalid` (401), one message for all,
       so a caller without the secret learns nothing;
    2. token or request for another node than the record's → :class:`JoinTokenWrongNode` (403) naming both;
    3. expired by ``server_now`` (the record's expiry is authoritative, the token's is not trusted) →
       :class:`JoinTokenExpired` (410);
    4. ``|server_now - client_now| > max_skew_seconds`` → :class:`ClockSkew` (409).

    Tokens are one-time: on success the caller must delete the record in the same transaction that admits the node
    (a concurrent second use then fails its condition). On failure the record is left alone.
    """
    server_now = _aware(server_now, "server_now")
    client_now = _aware(client_now, "client_now")
    presented = hash_secret(token.secret)
    expected = record.secret_sha256 if record is not None else hash_secret("")
    secret_ok = hmac.compare_digest(presented.encode(), expected.encode())
    if record is None or not secret_ok or not hmac.compare_digest(token.token_id.encode(), record.token_id.encode()):
        raise JoinTokenInvalid(
            "the join token is unknown or already used (tokens work once); create a new one with "
            f"`minicloud cluster add {token.node}` on a cluster member"
        )
    for claimed in (token.node, node_name):
        if claimed is not None and claimed != record.node:
            raise JoinTokenWrongNode(
                f"this join token was issued for node {record.node!r}, but the joining node is {claimed!r}; "
                f"join as {record.node!r}, or create a token for {claimed!r} with `minicloud cluster add {claimed}`",
                token_node=record.node,
                joining_node=claimed,
            )
    expires_at = ids.parse_time(record.expires_at)
    if server_now >= expires_at:
        raise JoinTokenExpired(
            f"the join token expired at {record.expires_at} (it is now {_rfc3339(server_now)} on the cluster); "
            + _ADD_HINT.format(node=record.node),
            expires_at=record.expires_at,
        )
    skew = (client_now - server_now).total_seconds()
    if abs(skew) > max_skew_seconds:
        ahead = "ahead of" if skew > 0 else "behind"
        raise ClockSkew(
            f"the clocks of this node and the joining node differ by {abs(skew):.1f} s (the joining node is {ahead} "
            f"the cluster; at most {max_skew_seconds:g} s is allowed, because certificates and leases depend on "
            "time); synchronise them (NTP/chrony) and retry (e.g. `chronyc makestep` on the node that is off); the "
            f"token stays valid until {record.expires_at}",
            skew_seconds=round(skew, 3),
            max_skew_seconds=max_skew_seconds,
        )
    return record.node


def check_ca(token: JoinToken, presented_ca_pem: bytes | str) -> None:
    """Joining-node side: raise :class:`CAMismatch` unless the CA the cluster presented is the token's CA.

    Call it after the TLS handshake with the cluster address and before sending the token, CSR or anything else.
    ``presented_ca_pem`` is the CA certificate (the first PEM certificate in it is used).
    """
    pem = presented_ca_pem.encode() if isinstance(presented_ca_pem, str) else presented_ca_pem
    try:
        presented = fingerprint(pem)
    except ValueError:
        raise CAMismatch(
            "the cluster did not present a readable CA certificate, so it cannot be checked against the join token; "
            "possible interception; nothing was sent. Check the address in the token and retry"
        ) from None
    if not hmac.compare_digest(presented.encode(), token.ca_fingerprint.lower().encode()):
        raise CAMismatch(
            f"the cluster's CA is {presented}, but the join token expects {token.ca_fingerprint}: possible "
            "interception; nothing was sent. Check that the token's addresses "
            f"({', '.join(token.addresses)}) reach your cluster, and that the token came from it",
            presented=presented,
            expected=token.ca_fingerprint,
        )


# --------------------------------------------------------------------------------------------------------- certificates


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    seen: set[str] = set()
    out: list[x509.GeneralName] = []
    for name in names:
        ip = _host_ip(name)
        key = str(ip) if ip is not None else name.lower().rstrip(".")
        if key in seen:
            continue
        seen.add(key)
        out.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(key))
    return out


def make_node_key_and_csr(node_name: str, addresses: Sequence[str]) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a CSR for it: ``(key_pem, csr_pem)``; the key stays on this node (write it 0600).

    Subject CN is ``node_name``; SANs are DNS ``node_name`` and ``localhost``, IPs 127.0.0.1 and ::1, and every
    host of ``addresses`` (``host``, ``host:port`` or ``[v6]:port``: IPs as IP SANs, names as DNS SANs).
    Raises ValidationFailed for a bad node name or address.
    """
    _check_node_name(node_name)
    hosts: list[str] = []
    for address in addresses:
        try:
            hosts.append(split_address(address)[0])
        except ValueError as e:
            raise ValidationFailed(
                f"cannot make a certificate request: {e}", invalid_params=[{"name": "addresses", "reason": str(e)}]
            ) from None
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "minicloud"),
                    x509.NameAttribute(NameOID.COMMON_NAME, node_name),
                ]
            )
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries([node_name, *_LOOPBACK_NAMES, *hosts])), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        return None
    return attrs[0].value


def _bad_csr(reason: str) -> ValidationFailed:
    return ValidationFailed(
        f"the certificate request is not acceptable: {reason}. Let `minicloud join` make the request",
        invalid_params=[{"name": "csr", "reason": reason}],
    )


def _load_ca_cert(ca_cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as e:
        raise MinicloudError(f"the cluster CA certificate is unreadable ({e}); check <data_dir>/pki/ca.crt") from e


def _load_ca_key(ca_key_pem: bytes, ca_cert: x509.Certificate) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise MinicloudError(f"the cluster CA key is unreadable ({e}); check <data_dir>/pki/ca.key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise MinicloudError(f"the cluster CA key is a {type(key).__name__}; expected an EC or RSA key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        raise MinicloudError("the cluster CA key does not belong to the CA certificate; check <data_dir>/pki")
    return key


def sign_node_csr(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    csr_pem: bytes,
    node_name: str,
    allowed_addresses: Sequence[str] | None = None,
    days: int = SERVER_DAYS,
) -> bytes:
    """Member side: a node certificate (PEM) for ``csr_pem``, signed by the cluster CA.

    Requires a valid CSR signature (ValidationFailed), a single CN equal to ``node_name`` (JoinTokenWrongNode, 403),
    an EC P-256/P-384 or RSA >= 2048 key, and SANs that are only DNS names (no wildcards) and IP addresses
    (ValidationFailed otherwise). If ``allowed_addresses`` is given, every SAN other than ``node_name``, localhost,
    127.0.0.1 and ::1 must be one of its hosts (JoinTokenWrongNode). The certificate gets subject
    ``O=minicloud, CN=node_name``, DNS ``node_name`` as a SAN even if the CSR left it out, BasicConstraints CA=false,
    KeyUsage digitalSignature, EKU serverAuth + clientAuth (HTTPS, node-to-node mTLS, etcd peer and client TLS),
    SKI/AKI, and a validity of ``days`` from five minutes ago, never beyond the CA's own expiry. Nothing from the
    CSR but the public key and the checked SANs is copied.
    """
    _check_node_name(node_name)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
        raise ValidationFailed(f"days must be 1 to 3650, not {days!r}")
    ca_cert = _load_ca_cert(ca_cert_pem)
    ca_key = _load_ca_key(ca_key_pem, ca_cert)
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
    except ValueError:
        raise _bad_csr("it is not a PEM certificate signing request") from None
    try:
        signature_ok = csr.is_signature_valid
    except Exception:  # unsupported algorithm and the like
        signature_ok = False
    if not signature_ok:
        raise _bad_csr("its signature does not verify (it was altered or not signed by its own key)")
    public_key = csr.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise _bad_csr(f"EC curve {public_key.curve.name} is not accepted; use P-256 or P-384")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise _bad_csr(f"a {public_key.key_size}-bit RSA key is too short; use at least 2048 bits")
    else:
        raise _bad_csr(f"{type(public_key).__name__} keys are not accepted; use EC P-256")
    cn = _common_name(csr.subject)
    if cn is None:
        raise _bad_csr("its subject must have exactly one common name (CN), the node name")
    if cn != node_name:
        raise JoinTokenWrongNode(
            f"the certificate request is for node {cn!r}, but the join token is for node {node_name!r}; "
            f"join as {node_name!r}, or create a token for {cn!r} with `minicloud cluster add {cn}`",
            token_node=node_name,
            joining_node=cn,
        )
    try:
        san_ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        requested: list[x509.GeneralName] = list(san_ext.value)
    except x509.ExtensionNotFound:
        requested = []
    except ValueError:
        raise _bad_csr("its extensions cannot be parsed") from None
    names: list[str] = [node_name]
    for entry in requested:
        if isinstance(entry, x509.IPAddress):
            if not isinstance(entry.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise _bad_csr(f"IP network {entry.value} is not an address")
            names.append(str(entry.value))
        elif isinstance(entry, x509.DNSName):
            dns = entry.value
            if "*" in dns:
                raise _bad_csr(f"wildcard name {dns!r} is not allowed; list each name")
            if len(dns) > 253 or not _DNS_RE.match(dns):
                raise _bad_csr(f"{dns!r} is not a valid DNS name")
            names.append(dns)
        else:
            raise _bad_csr(f"{type(entry).__name__} subject alternative names are not allowed; only DNS names and IPs")
    if allowed_addresses is not None:
        allowed = {_normal_host(h) for h in (node_name, *_LOOPBACK_NAMES)}
        for address in allowed_addresses:
            try:
                allowed.add(_normal_host(split_address(address)[0]))
            except ValueError as e:
                raise ValidationFailed(f"allowed address {address!r} is malformed: {e}") from None
        extra = sorted({n for n in names if _normal_host(n) not in allowed})
        if extra:
            raise JoinTokenWrongNode(
                f"the certificate request names {', '.join(extra)}, which are not addresses of node {node_name!r}; "
                "remove them from the node's configured addresses or ask the cluster admin to allow them"
            )
    cert = node_certificate(ca_cert, ca_key, public_key, node_name, _san_entries(names), days=days)
    return cert.public_bytes(serialization.Encoding.PEM)


def _normal_host(host: str) -> str:
    ip = _host_ip(host)
    return str(ip) if ip is not None else host.lower().rstrip(".")


def verify_node_cert(ca_cert_pem: bytes, cert_pem: bytes, *, now: _dt.datetime | None = None) -> str:
    """The node name (CN) of ``cert_pem`` if it is a node certificate issued by our CA; else raise.

    Checks that the CA signed it (issuer name and signature with the CA's public key), that ``now`` (default: the
    current time) lies in its validity window, that it is not a CA certificate and that its EKU allows both
    serverAuth and clientAuth. Raises ValidationFailed if ``cert_pem`` is not a PEM certificate and
    :class:`NodeCertInvalid` (401) for everything else. Only the first certificate of ``cert_pem`` is checked.
    """
    ca_cert = _load_ca_cert(ca_cert_pem)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    except ValueError:
        raise ValidationFailed(
            "the node certificate is not a PEM certificate", invalid_params=[{"name": "certificate", "reason": "bad"}]
        ) from None
    subject = cert.subject.rfc4514_string()
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise NodeCertInvalid(
            f"the certificate of {subject!r} was not issued by this cluster's CA ({fingerprint(ca_cert_pem)}); "
            "the node must join this cluster with `minicloud join TOKEN`"
        ) from None
    moment = _aware(now, "now") if now is not None else _dt.datetime.now(_dt.UTC)
    if moment < cert.not_valid_before_utc:
        raise NodeCertInvalid(
            f"the certificate of {subject!r} is valid only from {_rfc3339(cert.not_valid_before_utc)}; check that "
            "the nodes' clocks agree (NTP/chrony)"
        )
    if moment > cert.not_valid_after_utc:
        raise NodeCertInvalid(
            f"the certificate of {subject!r} expired at {_rfc3339(cert.not_valid_after_utc)}; renew it by restarting "
            "that node's agent, or re-join it"
        )
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = basic.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise NodeCertInvalid(f"{subject!r} is a CA certificate, not a node certificate")
    try:
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = set()
    if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= eku:
        raise NodeCertInvalid(
            f"the certificate of {subject!r} is not for node-to-node TLS (it needs extended key usages serverAuth "
            "and clientAuth); re-join the node to get a node certificate"
        )
    cn = _common_name(cert.subject)
    if cn is None or not _NAME_RE.match(cn):
        raise NodeCertInvalid(f"the certificate of {subject!r} does not name a node (one CN, a valid node name)")
    return cn
