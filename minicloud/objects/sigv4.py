"""AWS Signature Version 4 for requests minicloud itself sends to the object store (RGW's S3 API and its admin ops
API), so the server needs no boto3.

:func:`sign` returns the headers to send; the request must go out with exactly the path and query it signed, so
:func:`canonical_query` is also the query string to put on the wire (``%20`` for a space, never ``+``: RGW
recomputes the signature from the raw query). Tested against AWS's published test vectors and botocore's signer.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The derived key of one day, region and service (``date`` is ``YYYYMMDD``)."""
    k = _hmac(f"AWS4{secret_key}".encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def uri_encode(text: str, *, slash: bool = True) -> str:
    """RFC 3986 encoding as SigV4 wants it: everything but ``A-Za-z0-9-_.~`` (and ``/`` when ``slash``)."""
    return quote(text, safe="/-_.~" if slash else "-_.~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """``k=v&…`` sorted by encoded key then value; a parameter without a value is ``k=``."""
    pairs = sorted((uri_encode(k, slash=False), uri_encode(v, slash=False)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _parse_query(query: str) -> list[tuple[str, str]]:
    """The raw query's parameters, percent-decoded (``+`` stays a plus: S3 treats it literally)."""
    from urllib.parse import unquote

    out: list[tuple[str, str]] = []
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.append((unquote(k), unquote(v)))
    return out


def _canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    norm: dict[str, str] = {}
    for name, value in headers.items():
        key = name.strip().lower()
        val = " ".join(str(value).strip().split())
        norm[key] = f"{norm[key]},{val}" if key in norm else val
    names = sorted(norm)
    return "".join(f"{n}:{norm[n]}\n" for n in names), ";".join(names)


def canonical_request(
    method: str, path: str, query: str, headers: Mapping[str, str], payload_hash: str, *, normalize_path: bool = False
) -> tuple[str, str]:
    """``(canonical request, signed headers)``. ``path`` is the raw (already encoded) path; S3 signs it as is,
    other services normalise it (``normalize_path``: ``.``/``..`` segments and repeated slashes removed, then
    encoded once more)."""
    path = path or "/"
    if normalize_path:
        segments: list[str] = []
        for seg in path.split("/"):
            if seg in ("", "."):
                continue
            if seg == "..":
                if segments:
                    segments.pop()
                continue
            segments.append(seg)
        norm = "/" + "/".join(segments)
        if path.endswith("/") and norm != "/":
            norm += "/"
        path = uri_encode(norm)
    canon_headers, signed = _canonical_headers(headers)
    text = "\n".join([method.upper(), path, canonical_query(_parse_query(query)), canon_headers, signed, payload_hash])
    return text, signed


def sign(
    method: str,
    url: str,
    *,
    access_key: str,
    secret_key: str,
    region: str = "us-east-1",
    service: str = "s3",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    now: _dt.datetime | None = None,
    unsigned_payload: bool = False,
    content_sha256_header: bool | None = None,
) -> dict[str, str]:
    """The headers to send with the request: the caller's ``headers`` plus ``Host``, ``X-Amz-Date``,
    ``X-Amz-Content-SHA256`` (S3 only, unless ``content_sha256_header`` says) and ``Authorization``.

    ``url`` carries the path and query exactly as they will be sent (see :func:`canonical_query`)."""
    parts = urlsplit(url)
    now = (now or _dt.datetime.now(_dt.UTC)).astimezone(_dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload_hash = UNSIGNED_PAYLOAD if unsigned_payload else hashlib.sha256(body).hexdigest()
    out = {k: v for k, v in (headers or {}).items()}
    lower = {k.lower() for k in out}
    if "host" not in lower:
        default_port = {"https": 443, "http": 80}.get(parts.scheme)
        out["Host"] = parts.hostname if parts.port in (None, default_port) else parts.netloc.rsplit("@", 1)[-1]
        if parts.hostname and ":" in parts.hostname and parts.port in (None, default_port):
            out["Host"] = f"[{parts.hostname}]"
    out["X-Amz-Date"] = amz_date
    if content_sha256_header if content_sha256_header is not None else service == "s3":
        out["X-Amz-Content-SHA256"] = payload_hash
    to_sign = {k: v for k, v in out.items() if k.lower() != "authorization"}
    creq, signed = canonical_request(method, parts.path, parts.query, to_sign, payload_hash,
                                     normalize_path=service != "s3")  # fmt: skip
    scope = f"{day}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
    signature = hmac.new(signing_key(secret_key, day, region, service), string_to_sign.encode(), hashlib.sha256)
    out["Authorization"] = (
        f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature.hexdigest()}"
    )
    return out


__all__ = ["canonical_query", "canonical_request", "sign", "signing_key", "uri_encode"]
