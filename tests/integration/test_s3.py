"""The S3 endpoint in a real agent on its own small Ceph (``storage enable``, one file OSD), tied to IAM: an access
key works with boto3 (buckets, put/get, multipart, ranged GET, prefix/delimiter listing, presigned GET), the AWS CLI
and rclone when installed; a viewer's key reads only; a revoked key is refused; project B's key cannot read project
A's bucket; a bucket quota ends in ``QuotaExceeded``; bad bucket names and non-empty deletes are refused clearly.

One module-scoped agent, like ``test_storage_node``: the cluster and its gateway are its own, on free ports, torn
down with it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from minicloud.client import ApiError
from tests import ceph
from tests.integration.conftest import Agent

pytestmark = pytest.mark.skipif(not ceph.ceph_installed() or not shutil.which("radosgw"), reason=ceph.SKIP_REASON)
boto3 = pytest.importorskip("boto3")
from botocore.config import Config as BotoConfig  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

OSD_BYTES = 3 << 30


def _wait(what: str, check, timeout: float = 180.0, agent: Agent | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the last error is reported
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    log = agent.log.read_text()[-4000:] if agent is not None else ""
    raise AssertionError(f"{what}: not after {timeout:.0f} s (last: {last!r})\n{log}")


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-node")
    (root / "minicloud.toml").write_text(
        '[compute]\ndriver = "none"\n'
        f"[storage]\nceph_mon_port = {ceph.free_port()}\nceph_mon_port_v1 = {ceph.free_port()}\n"
        f"ceph_prometheus_port = {ceph.free_port()}\n"
        f"[objects]\nport = {ceph.free_port()}\n"
    )
    a = Agent(root).start()
    try:
        c = a.client()
        c.call("POST", "/v1/storage/enable", json={"file_size_bytes": OSD_BYTES})
        _wait("storage ready", lambda: c.call("GET", "/v1/storage")["state"] == "ready", agent=a)
        yield a
    finally:
        if a.proc is not None:
            a.proc.terminate()
            a.proc.wait(timeout=30)
        _teardown(a)


def _teardown(a: Agent) -> None:
    from agent.storage.ceph import CephEngine, CephSettings

    root = a.data_dir / "ceph"
    conf = (root / "ceph.conf").read_text() if (root / "ceph.conf").exists() else ""
    fsid = next((ln.split("=", 1)[1].strip() for ln in conf.splitlines() if ln.startswith("fsid")), "")
    # the gateway first (a radosgw naming this cluster's conf), then the cluster's daemons
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace")
            if str(root) in argv and int(entry.name) != os.getpid():
                os.kill(int(entry.name), 9)
    if fsid:
        import socket

        engine = CephEngine(CephSettings(root=root, fsid=fsid, node=socket.gethostname(), address="127.0.0.1"))
        asyncio.run(engine.destroy())


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
    key_b = _key(agent, "k-b", project="proj-b")
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
