"""The SigV4 signer minicloud uses against RGW: AWS's published test vectors, and botocore's S3 signer on the
requests minicloud sends (admin ops with bare and spaced parameters, bodies, unsigned payloads)."""

from __future__ import annotations

import datetime as _dt

import pytest

from minicloud.objects import sigv4

NOW = _dt.datetime(2015, 8, 30, 12, 36, 0, tzinfo=_dt.UTC)
AKID = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def test_aws_suite_get_vanilla():
    # aws-sig-v4-test-suite/get-vanilla
    headers = sigv4.sign(
        "GET", "https://example.amazonaws.com/", access_key=AKID, secret_key=SECRET, service="service", now=NOW
    )
    assert headers["X-Amz-Date"] == "20150830T123600Z"
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )
    assert "X-Amz-Content-SHA256" not in headers


def test_aws_suite_canonical_request_of_get_vanilla_query_order():
    # aws-sig-v4-test-suite/get-vanilla-query-order-key: parameters sorted by key
    creq, signed = sigv4.canonical_request(
        "GET", "/", "Param2=value2&Param1=value1",
        {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"}, sigv4.EMPTY_SHA256,
    )  # fmt: skip
    assert creq.splitlines()[2] == "Param1=value1&Param2=value2"
    assert signed == "host;x-amz-date"


def test_the_signing_key_of_the_aws_documentation():
    # docs.aws.amazon.com "Examples of how to derive a signing key for Signature Version 4"
    key = sigv4.signing_key(SECRET, "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_query_encoding_is_percent_twenty_and_bare_keys_have_an_equals():
    q = sigv4.canonical_query([("uid", "t$u"), ("key", ""), ("display-name", "a b+c/d~")])
    assert q == "display-name=a%20b%2Bc%2Fd~&key=&uid=t%24u"


def _botocore(method, url, body, headers, *, https_unsigned=False):
    """botocore's headers for the request, and ours for the same request at botocore's time and payload mode."""
    pytest.importorskip("botocore")
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    if not https_unsigned:
        req.context["payload_signing_enabled"] = True
    S3SigV4Auth(Credentials(AKID, SECRET), "s3", "us-east-1").add_auth(req)
    theirs = dict(req.headers.items())
    when = _dt.datetime.strptime(theirs["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=_dt.UTC)
    unsigned = theirs["X-Amz-Content-SHA256"] == sigv4.UNSIGNED_PAYLOAD
    ours = sigv4.sign(
        method, url, access_key=AKID, secret_key=SECRET, headers=headers, body=body, now=when, unsigned_payload=unsigned
    )
    return ours, theirs


@pytest.mark.parametrize(
    ("method", "url", "body", "headers"),
    [
        ("GET", "https://10.0.0.1:8444/", b"", {}),
        ("PUT", "https://10.0.0.1:8444/admin/user?key=&uid=prj_x%24project&access-key=MCAKABC", b"", {}),
        ("PUT", "https://s3.example:8444/admin/user?display-name=a%20b&uid=u", b"", {}),
        ("PUT", "https://127.0.0.1:8444/bucket-1/obj%20with%20space", b"hello", {"Content-Type": "text/plain"}),
        ("PUT", "https://127.0.0.1:8444/b?policy=", b'{"Version":"2012-10-17"}', {"Content-MD5": "x"}),
        ("DELETE", "https://127.0.0.1/b", b"", {}),
        ("GET", "http://127.0.0.1:80/b?list-type=2&prefix=a%2Fb&delimiter=%2F", b"", {}),
    ],
)
def test_same_signature_as_botocore(method, url, body, headers):
    ours, theirs = _botocore(method, url, body, headers)
    assert ours["X-Amz-Content-SHA256"] == theirs["X-Amz-Content-SHA256"]
    assert ours["Authorization"] == theirs["Authorization"]


def test_unsigned_payload_like_botocore():
    ours, theirs = _botocore("PUT", "https://127.0.0.1:8444/b/big", b"x" * 10, {}, https_unsigned=True)
    assert ours["X-Amz-Content-SHA256"] == theirs["X-Amz-Content-SHA256"]
    assert ours["Authorization"] == theirs["Authorization"]


def test_a_different_secret_gives_a_different_signature():
    a = sigv4.sign("GET", "https://h/", access_key=AKID, secret_key=SECRET, now=NOW)
    b = sigv4.sign("GET", "https://h/", access_key=AKID, secret_key=SECRET + "x", now=NOW)
    assert a["Authorization"] != b["Authorization"]
