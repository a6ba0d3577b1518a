"""The S3 endpoint in a real agent on its own small Ceph (``storage enable``, one file OSD), tied to IAM: an access
key works with boto3 (buckets, put/get, multipart, ranged GET, prefix/delimiter listing, presigned GET), the AWS CLI
and rclone when installed; a viewer's key reads only; a revoked or disabled key is refused; project B's key cannot
read project A's bucket; a bucket quota ends in ``QuotaExceeded``; bad bucket names and non-empty deletes are refused
clearly.
Compatibility people will try: anonymous GET of a public-read bucket (``TENANT:BUCKET``), presigned PUT, a bucket
policy that denies a principal (and one that opens a bucket to another project), lifecycle expiration, 100 MiB
multipart uploads (AWS CLI and boto3), versioned listing, restic. Administrators' keys need a grant outside the
default project; a project quota set by an administrator ends in ``QuotaExceeded``; requests and bytes out are
metered per bucket and project. Virtual-hosted-style requests (``BUCKET.s3.DOMAIN``, ``[objects] domain``) reach
the same objects as path-style ones.

One module-scoped agent, like ``test_storage_node``: the cluster and its gateway are its own, on free ports, torn
down with it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import urllib.request

import pytest

from minicloud.client import ApiError
from tests import ceph
from tests.integration.ceph_agent import ceph_agent
from tests.integration.ceph_agent import wait as _wait

pytestmark = pytest.mark.skipif(not ceph.ceph_installed() or not shutil.which("radosgw"), reason=ceph.SKIP_REASON)
boto3 = pytest.importorskip("boto3")
from botocore.config import Config as BotoConfig  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

OSD_BYTES = 3 << 30


#: ``[objects] domain``: virtual-hosted-style addressing as BUCKET.s3.DOMAIN (requests sent to the gateway's address
#: with that Host header: the name needs no DNS here).
DOMAIN = "test.minicloud"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    # a lifecycle "day" of 10 s; the usage log flushed at once (metering shows in the next sync)
    options = "rgw_lc_debug_interval=10,rgw_usage_log_tick_interval=1,rgw_usage_log_flush_threshold=1"
    yield from ceph_agent(tmp_path_factory.mktemp("s3-node"), OSD_BYTES, {"MINICLOUD_RGW_OPTIONS": options},
                          objects=f'domain = "{DOMAIN}"\n')  # fmt: skip


@pytest.fixture(scope="module")
def endpoint(agent):
    c = agent.client()
    ep = c.call("GET", "/v1/s3/endpoint")
    ctx = ssl.create_default_context(cafile=ep["ca_path"])
    ctx.check_hostname = False

    def answers():
        try:
            urllib.request.urlopen(ep["url"] + "/", context=ctx, timeout=5).read()
        except urllib.error.HTTPError:
            return True
        return True

    _wait("the S3 gateway answers", answers, agent=agent)
    return ep


def _s3(endpoint, key, secret):
    return boto3.client(
        "s3", endpoint_url=endpoint["url"], aws_access_key_id=key, aws_secret_access_key=secret,
        region_name="us-east-1", verify=endpoint["ca_path"],
        config=BotoConfig(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required", retries={"max_attempts": 1},
        ),
    )  # fmt: skip


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _key(agent, name: str, project: str = "default", user: str | None = None) -> dict:
    body = {"name": name} | ({"user": user} if user else {})
    return agent.client().call("POST", f"/v1/accesskeys?project={project}", json=body)


def _member_key(agent, name: str, project: str, user: str) -> dict:
    """A key of a member of ``project`` (an administrator's own key there needs a grant: see the admin test)."""
    c = agent.client()
    c.call("POST", "/v1/users", json={"name": user})
    c.call("POST", "/v1/rolebindings", json={"role": "member", "principal": f"user:{user}", "scope_project": project})
    return _key(agent, name, project=project, user=user)


def _usable(endpoint, key) -> object:
    s3 = _s3(endpoint, key["id"], key["secret_access_key"])
    _wait("the key reaches RGW", lambda: s3.list_buckets() is not None, timeout=60)
    return s3


def _bucket(agent, name: str, project: str = "default", **fields) -> dict:
    c = agent.client()
    b = c.call("POST", f"/v1/buckets?project={project}", json={"name": name, **fields})
    return _wait(
        f"bucket {name} ready",
        lambda: (lambda x: x if x["status"]["state"] == "ready" else None)(
            c.call("GET", f"/v1/buckets/{b['id']}?project={project}")
        ),
        agent=agent,
    )


def test_a_key_works_with_boto3(agent, endpoint):
    key = _key(agent, "k1")
    s3 = _usable(endpoint, key)
    _bucket(agent, "data-1", versioning=True)
    s3.put_object(Bucket="data-1", Key="a/one.txt", Body=b"hello world")
    s3.put_object(Bucket="data-1", Key="a/b/two.txt", Body=b"2")
    s3.put_object(Bucket="data-1", Key="c.txt", Body=b"3")
    assert s3.get_object(Bucket="data-1", Key="a/one.txt")["Body"].read() == b"hello world"
    ranged = s3.get_object(Bucket="data-1", Key="a/one.txt", Range="bytes=6-10")
    assert ranged["Body"].read() == b"world" and ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    listed = s3.list_objects_v2(Bucket="data-1", Prefix="a/", Delimiter="/")
    assert [o["Key"] for o in listed.get("Contents", [])] == ["a/one.txt"]
    assert [p["Prefix"] for p in listed.get("CommonPrefixes", [])] == ["a/b/"]
    page = s3.list_objects_v2(Bucket="data-1", MaxKeys=2)
    assert page["IsTruncated"] and len(page["Contents"]) == 2
    rest = s3.list_objects_v2(Bucket="data-1", ContinuationToken=page["NextContinuationToken"])
    assert len(rest["Contents"]) == 1
    # multipart: 3 parts of 5 MiB + 1 MiB
    part = os.urandom(5 << 20)
    up = s3.create_multipart_upload(Bucket="data-1", Key="big.bin")
    parts = []
    for n, body in enumerate([part, part, part, b"z" * (1 << 20)], start=1):
        r = s3.upload_part(Bucket="data-1", Key="big.bin", UploadId=up["UploadId"], PartNumber=n, Body=body)
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
    s3.complete_multipart_upload(
        Bucket="data-1", Key="big.bin", UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert s3.head_object(Bucket="data-1", Key="big.bin")["ContentLength"] == 3 * (5 << 20) + (1 << 20)
    tail = s3.get_object(Bucket="data-1", Key="big.bin", Range=f"bytes={(5 << 20) - 4}-{(5 << 20) + 3}")["Body"]
    assert tail.read() == part[-4:] + part[:4]
    # presigned GET, with no credentials on the request
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "data-1", "Key": "c.txt"}, ExpiresIn=300)
    ctx = ssl.create_default_context(cafile=endpoint["ca_path"])
    ctx.check_hostname = False
    assert urllib.request.urlopen(url, context=ctx, timeout=10).read() == b"3"
    # versioning was applied
    assert s3.get_bucket_versioning(Bucket="data-1")["Status"] == "Enabled"


@pytest.mark.timeout(900)  # six CLI processes, each seconds to start on a loaded machine
def test_the_aws_cli_and_rclone(agent, endpoint):
    key = _key(agent, "k-tools")
    _usable(endpoint, key)
    _bucket(agent, "tools-1")
    env = {
        **os.environ, "AWS_ACCESS_KEY_ID": key["id"], "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }  # fmt: skip
    # an AWS_CA_BUNDLE in the environment would win over --ca-bundle's siblings (rclone fails on it outright)
    env.pop("AWS_CA_BUNDLE", None)
    src = agent.root / "upload.txt"
    src.write_text("from the cli\n")
    ran = 0
    if shutil.which("aws"):
        base = ["aws", "--endpoint-url", endpoint["url"], "--ca-bundle", endpoint["ca_path"]]
        cp = subprocess.run([*base, "s3", "cp", str(src), "s3://tools-1/cli.txt"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
        assert cp.returncode == 0, cp.stderr
        ls = subprocess.run([*base, "s3", "ls", "s3://tools-1/"], env=env, capture_output=True, text=True, timeout=120)
        assert ls.returncode == 0 and "cli.txt" in ls.stdout, ls.stderr
        tree = agent.root / "tree"
        (tree / "sub").mkdir(parents=True, exist_ok=True)
        (tree / "a.txt").write_text("a\n")
        (tree / "sub" / "b.txt").write_text("b\n")
        sync = subprocess.run([*base, "s3", "sync", str(tree), "s3://tools-1/tree/"], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert sync.returncode == 0, sync.stderr
        api = subprocess.run([*base, "s3api", "list-objects-v2", "--bucket", "tools-1", "--prefix", "tree/"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert api.returncode == 0, api.stderr
        assert sorted(o["Key"] for o in json.loads(api.stdout)["Contents"]) == ["tree/a.txt", "tree/sub/b.txt"]
        ran += 1
    if shutil.which("rclone"):
        renv = {
            **env, "RCLONE_CONFIG_MC_TYPE": "s3", "RCLONE_CONFIG_MC_PROVIDER": "Ceph",
            "RCLONE_CONFIG_MC_ACCESS_KEY_ID": key["id"], "RCLONE_CONFIG_MC_SECRET_ACCESS_KEY": key["secret_access_key"],
            "RCLONE_CONFIG_MC_ENDPOINT": endpoint["url"], "RCLONE_CONFIG": "/dev/null",
        }  # fmt: skip
        cp = subprocess.run(["rclone", "--ca-cert", endpoint["ca_path"], "copyto", str(src), "mc:tools-1/rclone.txt"],
                            env=renv, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert cp.returncode == 0, cp.stderr
        ls = subprocess.run(["rclone", "--ca-cert", endpoint["ca_path"], "lsf", "mc:tools-1"], env=renv,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
        assert ls.returncode == 0 and "rclone.txt" in ls.stdout.split(), ls.stderr
        ran += 1
    if not ran:
        pytest.skip("neither the AWS CLI nor rclone is installed (Debian packages awscli, rclone)")


def test_a_revoked_key_is_refused(agent, endpoint):
    key = _key(agent, "k-revoke")
    s3 = _usable(endpoint, key)
    agent.client().call("POST", f"/v1/accesskeys/{key['id']}/disable")  # disabled: refused until enabled
    _wait("the disabled key is refused", _refused(s3), timeout=30)
    agent.client().call("POST", f"/v1/accesskeys/{key['id']}/enable")
    _wait("the enabled key works again", lambda: s3.list_buckets() is not None, timeout=30)
    agent.client().call("DELETE", f"/v1/accesskeys/{key['id']}")

    def refused():
        try:
            s3.list_buckets()
        except ClientError as exc:
            return _code(exc) == "InvalidAccessKeyId"
        return False

    _wait("the revoked key is refused", refused, timeout=30)


def test_a_wrong_secret_is_refused(agent, endpoint):
    key = _key(agent, "k-wrong")
    _usable(endpoint, key)
    with pytest.raises(ClientError) as exc:
        _s3(endpoint, key["id"], key["secret_access_key"][:-2] + "xx").list_buckets()
    assert _code(exc.value) == "SignatureDoesNotMatch"


def test_project_b_cannot_read_project_a(agent, endpoint):
    c = agent.client()
    c.call("POST", "/v1/projects", json={"name": "proj-b"})
    a = _usable(endpoint, _key(agent, "k-a"))
    _bucket(agent, "private-a")
    a.put_object(Bucket="private-a", Key="secret.txt", Body=b"a's")
    key_b = _member_key(agent, "k-b", "proj-b", "bob")
    b = _usable(endpoint, key_b)
    with pytest.raises(ClientError) as exc:  # path style resolves in B's own tenant
        b.get_object(Bucket="private-a", Key="secret.txt")
    assert _code(exc.value) in ("NoSuchBucket", "AccessDenied")
    tenant_a = c.call("GET", "/v1/s3/endpoint")["tenant"]
    assert tenant_a
    # naming A's tenant explicitly (boto3 refuses such a name: our own signer sends it)
    from minicloud.objects.rgwclient import RgwClient, S3Error, ssl_context

    async def cross_tenant() -> S3Error:
        async with RgwClient(endpoint["url"], key_b["id"], key_b["secret_access_key"],
                             ssl_ctx=ssl_context(endpoint["ca_path"])) as client:  # fmt: skip
            with pytest.raises(S3Error) as exc:
                await client.request("GET", f"/{tenant_a}:private-a/secret.txt")
            return exc.value

    assert asyncio.run(cross_tenant()).code == "AccessDenied"
    assert "private-a" not in [x["Name"] for x in b.list_buckets()["Buckets"]]


def test_a_viewer_key_reads_only(agent, endpoint):
    c = agent.client()
    c.call("POST", "/v1/users", json={"name": "vera"})
    c.call("POST", "/v1/rolebindings", json={"role": "viewer", "principal": "user:vera", "scope_project": "default"})
    writer = _usable(endpoint, _key(agent, "k-w"))
    _bucket(agent, "shared-1")
    writer.put_object(Bucket="shared-1", Key="doc.txt", Body=b"read me")
    viewer = _usable(endpoint, _key(agent, "k-viewer", user="vera"))
    assert viewer.get_object(Bucket="shared-1", Key="doc.txt")["Body"].read() == b"read me"
    with pytest.raises(ClientError) as exc:
        viewer.put_object(Bucket="shared-1", Key="doc.txt", Body=b"overwritten")
    assert _code(exc.value) == "AccessDenied"


def test_a_bucket_quota_is_quota_exceeded(agent, endpoint):
    s3 = _usable(endpoint, _key(agent, "k-quota"))
    _bucket(agent, "small-1", quota_objects=2)
    s3.put_object(Bucket="small-1", Key="1", Body=b"1")
    s3.put_object(Bucket="small-1", Key="2", Body=b"2")
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket="small-1", Key="3", Body=b"3")
    assert _code(exc.value) == "QuotaExceeded"
    with pytest.raises(ClientError):
        s3.head_object(Bucket="small-1", Key="3")  # nothing half-written


def test_bad_names_and_non_empty_deletes(agent, endpoint):
    c = agent.client()
    for bad, words in (("Upper", "upper-case"), ("ab", "3 to 63"), ("a_b_c", "lower-case letters"),
                       ("192.168.1.1", "IP address"), ("-dash", "starts and ends")):  # fmt: skip
        with pytest.raises(ApiError) as exc:
            c.call("POST", "/v1/buckets", json={"name": bad})
        assert exc.value.status == 400 and words in str(exc.value), str(exc.value)
    s3 = _usable(endpoint, _key(agent, "k-del"))
    b = _bucket(agent, "full-1")
    s3.put_object(Bucket="full-1", Key="x", Body=b"x")
    with pytest.raises(ApiError) as exc:
        c.call("DELETE", f"/v1/buckets/{b['id']}")
    assert exc.value.status == 409 and "not empty" in str(exc.value)
    assert c.call("GET", f"/v1/buckets/{b['id']}")["status"]["state"] == "ready"  # still there, usable
    s3.delete_object(Bucket="full-1", Key="x")
    assert c.raw("DELETE", f"/v1/buckets/{b['id']}").status == 204
    with pytest.raises(ClientError) as exc:
        s3.head_bucket(Bucket="full-1")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_usage_is_reported_and_s3_buckets_are_adopted(agent, endpoint):
    s3 = _usable(endpoint, _key(agent, "k-usage"))
    s3.create_bucket(Bucket="made-by-s3")
    s3.put_object(Bucket="made-by-s3", Key="x", Body=b"12345")
    c = agent.client()

    def adopted():
        items = c.call("GET", "/v1/buckets?name=made-by-s3")["items"]
        return items[0] if items and items[0]["status"]["objects"] == 1 else None

    b = _wait("the S3-made bucket is listed with its usage", adopted, timeout=120, agent=agent)
    assert b["status"]["size_bytes"] == 5
    out = agent.cli("s3", "endpoint", "--key", "MCAKEXAMPLE", check=True).stdout
    assert endpoint["url"] in out and "aws_access_key_id = MCAKEXAMPLE" in out


def _ssl(endpoint) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=endpoint["ca_path"])
    ctx.check_hostname = False
    return ctx


def _http(endpoint, method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, context=_ssl(endpoint), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _tenant(agent, project: str = "default") -> str:
    return agent.client().call("GET", f"/v1/s3/endpoint?project={project}")["tenant"]


def _signed(endpoint, key: dict, method: str, path: str, body: bytes = b""):
    """One request with our own signer (boto3 refuses ``TENANT:BUCKET`` names); ``(status, body)`` or S3Error."""
    from minicloud.objects.rgwclient import RgwClient, ssl_context

    async def go():
        async with RgwClient(endpoint["url"], key["id"], key["secret_access_key"],
                             ssl_ctx=ssl_context(endpoint["ca_path"])) as client:  # fmt: skip
            status, _, data = await client.request(method, path, body=body)
            return status, data

    return asyncio.run(go())


def _refused(s3, code: str = "InvalidAccessKeyId"):
    def check():
        try:
            s3.list_buckets()
        except ClientError as exc:
            return _code(exc) == code
        return False

    return check


def test_public_read_is_anonymous_get_by_tenant(agent, endpoint):
    s3 = _usable(endpoint, _key(agent, "k-public"))
    _bucket(agent, "site-1", public_read=True)
    s3.put_object(Bucket="site-1", Key="index.html", Body=b"<h1>hi</h1>")
    tenant = _tenant(agent)
    status, body = _http(endpoint, "GET", f"{endpoint['url']}/{tenant}:site-1/index.html")
    assert (status, body) == (200, b"<h1>hi</h1>")
    status, body = _http(endpoint, "GET", f"{endpoint['url']}/{tenant}:site-1")  # listing stays private
    assert status == 403 and b"AccessDenied" in body
    _bucket(agent, "closed-1")
    s3.put_object(Bucket="closed-1", Key="x", Body=b"x")
    assert _http(endpoint, "GET", f"{endpoint['url']}/{tenant}:closed-1/x")[0] == 403


@pytest.mark.timeout(600)  # a dozen CLI processes, each seconds to start on a loaded machine (and, alone, the Ceph)
def test_the_bucket_cli(agent, endpoint):
    """``minicloud bucket create|list|show|delete`` with ``--versioning`` and ``--public-read``, as a user types them,
    and S3 sees what they set (the API behind them is tested in depth above)."""
    s3 = _usable(endpoint, _key(agent, "k-cli"))
    versioned, public = "cli-versioned-1", "cli-public-1"
    c = agent.client()

    def details(out: str) -> dict[str, str]:  # `show`'s "key: value" lines, the top level
        return {k: v.strip() for k, _, v in (x.partition(":") for x in out.splitlines() if not x.startswith(" "))}

    def rows() -> dict[str, dict[str, str]]:  # `list`'s table by name
        header, *lines = agent.cli("bucket", "list", check=True).stdout.splitlines()
        return {r["name"]: r for r in (dict(zip(header.lower().split(), x.split(), strict=True)) for x in lines)}

    made = details(agent.cli("bucket", "create", versioned, "--versioning", check=True).stdout)
    assert (made["name"], made["versioning"], made["public_read"]) == (versioned, "True", "False"), made
    made = details(agent.cli("bucket", "create", public, "--public-read", check=True).stdout)
    assert (made["name"], made["versioning"], made["public_read"]) == (public, "False", "True"), made
    for name in (versioned, public):
        _wait(f"bucket {name} ready", lambda n=name: c.call("GET", f"/v1/buckets/{n}")["status"]["state"] == "ready",
              agent=agent)  # fmt: skip
    listed = rows()
    got = {n: (listed[n]["state"], listed[n]["versioning"], listed[n]["public"]) for n in (versioned, public)}
    assert got == {versioned: ("ready", "True", "False"), public: ("ready", "False", "True")}, listed
    shown = details(agent.cli("bucket", "show", versioned, check=True).stdout)
    assert (shown["name"], shown["versioning"], shown["public_read"]) == (versioned, "True", "False"), shown
    assert shown["id"] == listed[versioned]["id"] and "state=ready" in shown["status"], shown
    # what S3 sees: versioning on the one, anonymous GET (by TENANT:BUCKET) on the other
    assert s3.get_bucket_versioning(Bucket=versioned).get("Status") == "Enabled"
    s3.put_object(Bucket=public, Key="hello.txt", Body=b"for anyone")
    assert _http(endpoint, "GET", f"{endpoint['url']}/{_tenant(agent)}:{public}/hello.txt") == (200, b"for anyone")
    s3.delete_object(Bucket=public, Key="hello.txt")  # empty again: `bucket delete` takes empty buckets only
    for name in (public, versioned):
        out = agent.cli("bucket", "delete", name, check=True).stdout.strip()
        assert out in (f"Deleted bucket {name}", f"Deleting bucket {name}"), out
    _wait("the deleted buckets leave `bucket list`", lambda: not {versioned, public} & set(rows()), agent=agent)
    gone = agent.cli("bucket", "show", public)
    assert gone.returncode == 1 and f"Error: no bucket with the name or id '{public}'" in gone.stderr, gone


def test_presigned_put(agent, endpoint):
    key = _key(agent, "k-presign")
    s3 = _usable(endpoint, key)
    _bucket(agent, "drop-1")
    # SigV4 query signing (boto3's default for presigning is SigV2, whose signature covers the Content-Type header
    # the uploader sends: a PUT from a client that adds one, as urllib does, is then SignatureDoesNotMatch)
    v4 = boto3.client(
        "s3", endpoint_url=endpoint["url"], aws_access_key_id=key["id"], aws_secret_access_key=key["secret_access_key"],
        region_name="us-east-1", verify=endpoint["ca_path"],
        config=BotoConfig(signature_version="s3v4", s3={"addressing_style": "path"}),
    )  # fmt: skip
    url = v4.generate_presigned_url("put_object", Params={"Bucket": "drop-1", "Key": "in/upload.bin"}, ExpiresIn=300)
    assert "X-Amz-Signature=" in url
    payload = os.urandom(4096)
    status, body = _http(endpoint, "PUT", url, payload)
    assert status == 200, (url, body)
    assert s3.get_object(Bucket="drop-1", Key="in/upload.bin")["Body"].read() == payload
    # the signature covers the key: another key with the same URL's query is refused
    status, body = _http(endpoint, "PUT", url.replace("in/upload.bin", "in/other.bin"), b"x")
    assert status == 403 and b"SignatureDoesNotMatch" in body


def test_a_bucket_policy_opens_a_bucket_to_another_project_and_denies_a_principal(agent, endpoint):
    c = agent.client()
    c.call("POST", "/v1/projects", json={"name": "proj-pol"})
    owner = _usable(endpoint, _key(agent, "k-pol-owner"))
    other_key = _member_key(agent, "k-pol-other", "proj-pol", "polly")
    _usable(endpoint, other_key)
    tenant, other_tenant = _tenant(agent), _tenant(agent, "proj-pol")
    _bucket(agent, "shared-pol")
    for key in ("pub/a.txt", "secret/b.txt"):
        owner.put_object(Bucket="shared-pol", Key=key, Body=key.encode())
    with pytest.raises(Exception) as exc:  # no policy yet: another project's key is refused
        _signed(endpoint, other_key, "GET", f"/{tenant}:shared-pol/pub/a.txt")
    assert getattr(exc.value, "code", "") == "AccessDenied"
    other = f"arn:aws:iam::{other_tenant}:user/project"
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": [other]}, "Action": ["s3:GetObject"],
             "Resource": [f"arn:aws:s3::{tenant}:shared-pol/*"]},
            {"Effect": "Deny", "Principal": {"AWS": [other]}, "Action": ["s3:GetObject"],
             "Resource": [f"arn:aws:s3::{tenant}:shared-pol/secret/*"]},
        ],
    }  # fmt: skip
    import json

    owner.put_bucket_policy(Bucket="shared-pol", Policy=json.dumps(policy))
    assert _signed(endpoint, other_key, "GET", f"/{tenant}:shared-pol/pub/a.txt") == (200, b"pub/a.txt")
    with pytest.raises(Exception) as exc:
        _signed(endpoint, other_key, "GET", f"/{tenant}:shared-pol/secret/b.txt")
    assert getattr(exc.value, "code", "") == "AccessDenied"
    with pytest.raises(Exception) as exc:  # GetObject only: no writes
        _signed(endpoint, other_key, "PUT", f"/{tenant}:shared-pol/pub/new.txt", b"x")
    assert getattr(exc.value, "code", "") == "AccessDenied"
    assert owner.get_object(Bucket="shared-pol", Key="secret/b.txt")["Body"].read() == b"secret/b.txt"


def test_lifecycle_expiration(agent, endpoint):
    s3 = _usable(endpoint, _key(agent, "k-lc"))
    _bucket(agent, "lc-1")
    rules = [{"ID": "tmp-1d", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 1}}]
    s3.put_bucket_lifecycle_configuration(Bucket="lc-1", LifecycleConfiguration={"Rules": rules})
    got = s3.get_bucket_lifecycle_configuration(Bucket="lc-1")["Rules"]
    assert [(r["ID"], r["Expiration"]["Days"]) for r in got] == [("tmp-1d", 1)]
    s3.put_object(Bucket="lc-1", Key="tmp/scratch", Body=b"old")
    s3.put_object(Bucket="lc-1", Key="keep/this", Body=b"kept")

    def expired():
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lc-1").get("Contents", [])]
        return keys == ["keep/this"]

    # rgw_lc_debug_interval=10: a lifecycle day is 10 s, and the lifecycle thread looks every 10 s
    _wait("the lifecycle rule expires tmp/", expired, timeout=300, agent=agent)


def test_100_mib_multipart_with_the_aws_cli_and_boto3(agent, endpoint, tmp_path):
    import hashlib

    from boto3.s3.transfer import TransferConfig

    key = _key(agent, "k-big")
    s3 = _usable(endpoint, key)
    _bucket(agent, "big-1")
    src = tmp_path / "100mib.bin"
    digest = hashlib.sha256()
    with src.open("wb") as f:
        block = os.urandom(1 << 20)
        for i in range(100):
            chunk = block[:-4] + i.to_bytes(4, "big")
            digest.update(chunk)
            f.write(chunk)
    s3.upload_file(str(src), "big-1", "boto3.bin", Config=TransferConfig(multipart_threshold=8 << 20))
    names = ["boto3.bin"]
    if shutil.which("aws"):
        env = {
            **os.environ, "AWS_ACCESS_KEY_ID": key["id"], "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }  # fmt: skip
        env.pop("AWS_CA_BUNDLE", None)
        cp = subprocess.run(
            ["aws", "--endpoint-url", endpoint["url"], "--ca-bundle", endpoint["ca_path"], "s3", "cp", str(src),
             "s3://big-1/cli.bin"], env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert cp.returncode == 0, cp.stderr
        names.append("cli.bin")
    for name in names:
        head = s3.head_object(Bucket="big-1", Key=name)
        assert head["ContentLength"] == 100 << 20
        assert "-" in head["ETag"], head["ETag"]  # a multipart upload's ETag: "<md5 of md5s>-<parts>"
    out = tmp_path / "back.bin"
    s3.download_file("big-1", names[-1], str(out))
    back = hashlib.sha256()
    with out.open("rb") as f:
        while chunk := f.read(1 << 20):
            back.update(chunk)
    assert back.hexdigest() == digest.hexdigest()


def test_versioned_listing(agent, endpoint):
    s3 = _usable(endpoint, _key(agent, "k-versions"))
    _bucket(agent, "versions-1", versioning=True)
    v1 = s3.put_object(Bucket="versions-1", Key="doc.txt", Body=b"one")["VersionId"]
    v2 = s3.put_object(Bucket="versions-1", Key="doc.txt", Body=b"two")["VersionId"]
    s3.delete_object(Bucket="versions-1", Key="doc.txt")
    listed = s3.list_object_versions(Bucket="versions-1", Prefix="doc.txt")
    assert {v["VersionId"] for v in listed["Versions"]} == {v1, v2}
    assert [m["IsLatest"] for m in listed["DeleteMarkers"]] == [True]
    assert s3.get_object(Bucket="versions-1", Key="doc.txt", VersionId=v1)["Body"].read() == b"one"
    with pytest.raises(ClientError):
        s3.get_object(Bucket="versions-1", Key="doc.txt")  # deleted: a delete marker on top


@pytest.mark.skipif(not shutil.which("restic"), reason="restic is not installed (Debian package restic)")
def test_restic_backup_and_restore(agent, endpoint, tmp_path):
    key = _key(agent, "k-restic")
    _usable(endpoint, key)
    _bucket(agent, "restic-1")
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    files = {"etc/a.conf": b"a = 1\n", "etc/b.bin": os.urandom(300_000), "top.txt": b"top"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    env = {
        **os.environ, "AWS_ACCESS_KEY_ID": key["id"], "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
        "RESTIC_PASSWORD": "correct horse", "RESTIC_REPOSITORY": f"s3:{endpoint['url']}/restic-1",
        "RESTIC_CACHE_DIR": str(tmp_path / "cache"),
    }  # fmt: skip
    env.pop("AWS_CA_BUNDLE", None)

    def restic(*args: str) -> str:
        r = subprocess.run(["restic", "--cacert", endpoint["ca_path"], *args], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, f"restic {args[0]}: {r.stderr}"
        return r.stdout

    restic("init")
    restic("backup", str(src))
    restic("restore", "latest", "--target", str(tmp_path / "out"))
    for name, data in files.items():
        assert (tmp_path / "out" / str(src).lstrip("/") / name).read_bytes() == data


def test_an_admin_key_reads_another_project_only_when_granted(agent, endpoint):
    c = agent.client()
    c.call("POST", "/v1/projects", json={"name": "proj-c"})
    admin = _s3(endpoint, **_pair(_key(agent, "k-admin-c", project="proj-c")))
    carol = _usable(endpoint, _member_key(agent, "k-carol", "proj-c", "carol"))
    _bucket(agent, "grant-c", project="proj-c")
    carol.put_object(Bucket="grant-c", Key="report.txt", Body=b"carol's")
    # the admin's key was made before carol's, which works: the admin's is refused (no grant on proj-c)
    with pytest.raises(ClientError) as exc:
        admin.get_object(Bucket="grant-c", Key="report.txt")
    assert _code(exc.value) == "InvalidAccessKeyId"
    # the grant: a role binding on the project
    grant = c.call(
        "POST", "/v1/rolebindings", json={"role": "viewer", "principal": "user:admin", "scope_project": "proj-c"}
    )
    _wait("the granted admin key reads", lambda: admin.get_object(Bucket="grant-c", Key="report.txt"), timeout=60)
    assert admin.get_object(Bucket="grant-c", Key="report.txt")["Body"].read() == b"carol's"
    with pytest.raises(ClientError) as exc:  # viewer: read-only
        admin.put_object(Bucket="grant-c", Key="report.txt", Body=b"admin's")
    assert _code(exc.value) == "AccessDenied"
    c.raw("DELETE", f"/v1/rolebindings/{grant['id']}")
    _wait("the admin key is refused once the grant is gone", _refused(admin), timeout=30)


def _pair(key: dict) -> dict:
    return {"key": key["id"], "secret": key["secret_access_key"]}


def test_a_project_quota_set_by_an_admin_is_quota_exceeded(agent, endpoint):
    c = agent.client()
    c.call("POST", "/v1/projects", json={"name": "proj-q"})
    s3 = _usable(endpoint, _member_key(agent, "k-quinn", "proj-q", "quinn"))
    _bucket(agent, "quota-q", project="proj-q")
    out = agent.cli("--project", "proj-q", "s3", "quota", "set", "--max-bytes", str(1 << 20), check=True).stdout
    assert "Quota:     1.0 MiB (from the project)" in out, out
    usage = c.call("GET", "/v1/s3/usage?project=proj-q")
    assert (usage["quota_bytes"], usage["quota_source"]) == (1 << 20, "project")
    big = os.urandom(2 << 20)
    tries = iter(range(1000))

    def quota_exceeded():
        name = f"big-{next(tries)}"
        try:
            s3.put_object(Bucket="quota-q", Key=name, Body=big)
        except ClientError as exc:
            return name if _code(exc) == "QuotaExceeded" else None
        return None

    refused = _wait("a 2 MiB PUT over a 1 MiB project quota is QuotaExceeded", quota_exceeded, timeout=60)
    with pytest.raises(ClientError):
        s3.head_object(Bucket="quota-q", Key=refused)  # nothing half-written
    c.call("POST", "/v1/s3/quota?project=proj-q", json={"quota_bytes": None, "quota_objects": None})

    def accepted():
        try:
            s3.put_object(Bucket="quota-q", Key="after", Body=big)
        except ClientError:
            return False
        return True

    _wait("the quota is lifted", accepted, timeout=60)


def test_requests_and_bytes_out_are_metered(agent, endpoint):
    s3 = _usable(endpoint, _key(agent, "k-meter"))
    _bucket(agent, "meter-1")
    body = os.urandom(10_000)
    for i in range(3):
        s3.put_object(Bucket="meter-1", Key=f"o{i}", Body=body)
    for _ in range(2):
        for i in range(3):
            assert s3.get_object(Bucket="meter-1", Key=f"o{i}")["Body"].read() == body
    c = agent.client()

    def metered():
        b = c.call("GET", "/v1/buckets?name=meter-1")["items"][0]["status"]
        return b if b["requests"] >= 9 and b["bytes_out"] >= 60_000 and b["bytes_in"] >= 30_000 else None

    status = _wait("the usage log reaches the bucket's status", metered, timeout=180, agent=agent)
    usage = c.call("GET", "/v1/s3/usage")
    row = next(b for b in usage["by_bucket"] if b["name"] == "meter-1")
    assert row["requests"] >= status["requests"] and usage["bytes_out"] >= row["bytes_out"] >= 60_000
    out = agent.cli("s3", "usage", check=True).stdout
    assert "Metering:" in out and "meter-1" in out, out


def test_virtual_hosted_style_requests_reach_the_same_objects(agent, endpoint):
    import hashlib
    import http.client
    import socket
    from urllib.parse import urlsplit

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    assert endpoint["virtual_host"] == f"s3.{DOMAIN}"
    key = _key(agent, "k-vhost")
    s3 = _usable(endpoint, key)
    _bucket(agent, "vhost-1")
    where = urlsplit(endpoint["url"])
    vhost = f"vhost-1.s3.{DOMAIN}"
    ctx = ssl.create_default_context(cafile=endpoint["ca_path"])  # the host name is verified: the gateway's
    creds = Credentials(key["id"], key["secret_access_key"])  # certificate names *.s3.DOMAIN

    class ToGateway(http.client.HTTPSConnection):
        """Connects to the gateway's address; TLS (SNI, verification) and Host as ``vhost`` (no DNS needed)."""

        def connect(self) -> None:
            raw = socket.create_connection((where.hostname, where.port), timeout=30)
            self.sock = ctx.wrap_socket(raw, server_hostname=vhost)

    def send(method: str, path: str, body: bytes = b"", secret_ok: bool = True) -> tuple[int, bytes]:
        host = f"{vhost}:{where.port}"
        req = AWSRequest(method=method, url=f"https://{host}{path}", data=body,
                         headers={"Host": host, "x-amz-content-sha256": hashlib.sha256(body).hexdigest()})  # fmt: skip
        signer = creds if secret_ok else Credentials(key["id"], "not-the-secret")
        SigV4Auth(signer, "s3", "us-east-1").add_auth(req)
        conn = ToGateway(vhost, where.port, context=ctx, timeout=30)
        try:
            conn.request(method, path, body=body, headers=dict(req.headers.items()))
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    put = send("PUT", "/hello.txt", b"virtual")
    assert put[0] == 200, put
    assert send("GET", "/hello.txt") == (200, b"virtual")
    status, listing = send("GET", "/?list-type=2")
    assert status == 200 and b"<Key>hello.txt</Key>" in listing
    assert s3.get_object(Bucket="vhost-1", Key="hello.txt")["Body"].read() == b"virtual"  # path style: the same
    status, body = send("GET", "/hello.txt", secret_ok=False)
    assert status == 403 and b"SignatureDoesNotMatch" in body


def test_rgw_takes_the_usage_trim_the_reconciler_sends(agent, endpoint):
    """The retention of the usage log (``[objects] usage_keep_days``) ends in ``DELETE /admin/usage?uid=&end=EPOCH``
    signed as the admin ops user: RGW takes that form and removes the bins before ``end`` (here: all of them)."""
    import time

    from minicloud.objects.rgwclient import RgwClient, ssl_context

    s3 = _usable(endpoint, _key(agent, "k-trim"))
    _bucket(agent, "trim-1")
    s3.put_object(Bucket="trim-1", Key="o", Body=b"x")
    root = agent.data_dir / "ceph"
    info = json.loads(subprocess.run(
        ["radosgw-admin", "--conf", str(root / "ceph.conf"), "--name", "client.admin", "--keyring",
         str(root / "client.admin.keyring"), "user", "info", "--uid=minicloud-admin"],
        capture_output=True, text=True, check=True, timeout=60).stdout)  # fmt: skip
    access, secret = info["keys"][0]["access_key"], info["keys"][0]["secret_key"]
    uid = f"{agent.client().call('GET', '/v1/s3/endpoint')['tenant']}$project"  # the tenant exists by now

    async def usage(trim_before: int | None = None) -> list:
        async with RgwClient(endpoint["url"], access, secret, ssl_ctx=ssl_context(endpoint["ca_path"])) as admin:
            if trim_before is not None:
                await admin.admin("DELETE", "usage", {"uid": uid, "end": str(trim_before)}, ok=(404,))
            got = await admin.admin("GET", "usage", {"uid": uid, "show-entries": "true", "show-summary": "false"})
        return [b for u in (got or {}).get("entries") or [] for b in u.get("buckets") or []]

    _wait("the usage log has bins", lambda: asyncio.run(usage()), timeout=60, agent=agent)
    assert asyncio.run(usage(trim_before=int(time.time()) + 3600)) == []
