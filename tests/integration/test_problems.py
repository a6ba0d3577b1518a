"""Bad input over the real transports (Unix socket and TLS): always a problem+json 4xx, never a 500, nothing created."""

from __future__ import annotations

import pytest

from tests.conftest import make_ssh_key

KEY = make_ssh_key()
JSON = {"Content-Type": "application/json"}

CASES = [
    # (id, method, path, body, headers, status)
    ("10 MB body", "POST", "/v1/keypairs", b'{"name":"a","public_key":"' + b"A" * 10_000_000 + b'"}', JSON, 413),
    ("invalid utf-8", "POST", "/v1/keypairs", b'{"name":"\xc3\x28","public_key":"k"}', JSON, 400),
    ("deep nesting", "POST", "/v1/keypairs", b'{"labels":' + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON, 422),
    (
        "sql metacharacters",
        "POST",
        "/v1/keypairs",
        f'{{"name":"x\'); DROP TABLE records;--","public_key":"{KEY}"}}'.encode(),
        JSON,
        422,
    ),
    (
        "path traversal name",
        "POST",
        "/v1/keypairs",
        f'{{"name":"../../../etc/shadow","public_key":"{KEY}"}}'.encode(),
        JSON,
        422,
    ),
    ("path traversal ref", "GET", "/v1/keypairs/..%2F..%2Fstate.db", None, {}, 404),
    ("malformed json", "POST", "/v1/keypairs", b'{"name": ', JSON, 400),
    ("unknown field", "POST", "/v1/keypairs", f'{{"name":"a","public_key":"{KEY}","admin":true}}'.encode(), JSON, 422),
    ("wrong type", "POST", "/v1/keypairs", b'{"name":["a"],"public_key":"k"}', JSON, 422),
    ("wrong content type", "POST", "/v1/keypairs", b"name=a", {"Content-Type": "text/plain"}, 415),
    ("unknown endpoint", "GET", "/v1/../../etc/passwd", None, {}, 404),
    ("bad limit", "GET", "/v1/keypairs?limit=-1", None, {}, 422),
    ("bad cursor", "GET", "/v1/keypairs?cursor=bm90IGpzb24", None, {}, 422),
    ("huge wait", "GET", "/v1/operations/op-x?wait=1e9", None, {}, 422),
    ("bad If-Match", "DELETE", "/v1/keypairs/problems-target", None, {"If-Match": "'; DROP"}, 400),
]


@pytest.fixture(scope="module")
def https_token(agent):
    # The target of the If-Match case: it must exist (and survive), or the case would only prove a 404.
    agent.client().keypairs.create(name="problems-target", public_key=KEY)
    return agent.client().apikeys.create(name="problems-test").secret


@pytest.mark.parametrize("transport", ["unix", "https"])
@pytest.mark.parametrize(("case", "method", "path", "body", "headers", "status"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_problem(agent, https_token, transport, case, method, path, body, headers, status):
    client = agent.client() if transport == "unix" else agent.https_client(https_token)
    before = client.raw("GET", "/v1/keypairs?limit=1000").json()["items"]
    resp = client.raw(method, path, body=body, headers=headers)
    assert resp.status == status, resp.body[:300]
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["status"] == status and problem["detail"] and problem["type"].startswith("https://")
    assert b"Traceback" not in resp.body
    assert client.raw("GET", "/v1/keypairs?limit=1000").json()["items"] == before
    client.close()


def test_https_without_credentials_is_401(agent):
    resp = agent.https_client(None).raw("GET", "/v1/keypairs")
    assert resp.status == 401 and resp.headers["www-authenticate"].startswith("Bearer")


def test_https_uses_real_tls_signed_by_the_node_ca(agent):
    import socket
    import ssl

    host, port = agent.info["https"].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(agent.data_dir / "pki" / "ca.crt"))
    with socket.create_connection((host, int(port))) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        names = [v for k, v in tls.getpeercert()["subjectAltName"]]
        assert "localhost" in names and "127.0.0.1" in names
    untrusting = ssl.create_default_context()
    with socket.create_connection((host, int(port))) as raw, pytest.raises(ssl.SSLCertVerificationError):
        untrusting.wrap_socket(raw, server_hostname="localhost")
