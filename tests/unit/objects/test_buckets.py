"""The bucket services without HTTP or RGW: S3's name rules, create (refused without storage), delete of a bucket
RGW never had, ``set``, and the endpoint's client settings; the reconciler's pure decisions."""

from __future__ import annotations

import json

import pytest

from agent.reconcilers.objects import public_read_policy, wanted_mode
from minicloud import errors
from minicloud.core.context import Context, SystemCaller
from minicloud.iam.keystore import KeyStore
from minicloud.iam.kinds import PROJECT, ProjectSpec
from minicloud.model.objects import BucketConfigure, BucketCreate
from minicloud.objects import buckets
from minicloud.objects.kinds import BUCKET, tenant_of
from minicloud.state import Create, SQLiteStore, Txn
from minicloud.storage.kinds import CEPH, CephSpec


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


def _ctx(project: str = "default") -> Context:
    return Context(principal=SystemCaller("tester", admin=True), project=project, action="storage:test")


async def _enable(store) -> None:
    obj = CEPH.new(project="", name="ceph", spec=CephSpec(fsid="f", bootstrap_node="n1", mons={"n1": "127.0.0.1"}))
    await store.commit(Txn([Create(CEPH.dump(obj))]))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("ab", "3 to 63"),
        ("a" * 64, "3 to 63"),
        ("Photos", "upper-case"),
        ("my_bucket", "lower-case letters"),
        ("-abc", "starts and ends"),
        ("abc.", "starts and ends"),
        ("a..b", "'..'"),
        ("a.-b", "'..', '.-'"),
        ("10.1.2.3", "IP address"),
        ("xn--abc", "xn--"),
    ],
)
def test_bucket_names_s3_refuses(name, why):
    problem = buckets.bucket_name_problem(name)
    assert problem is not None and why in problem


@pytest.mark.parametrize("name", ["abc", "my-bucket.2026", "a" * 63, "0logs", "10.1.2.3.4x"])
def test_bucket_names_s3_takes(name):
    assert buckets.bucket_name_problem(name) is None


async def test_create_needs_storage_and_a_good_name(store):
    with pytest.raises(errors.BadRequest, match="not a valid bucket name: a bucket name has no upper-case"):
        await buckets.create_bucket(_ctx(), store, BucketCreate(name="Bad"))
    with pytest.raises(errors.Conflict, match="storage is not enabled"):
        await buckets.create_bucket(_ctx(), store, BucketCreate(name="good-1"))
    await _enable(store)
    written = await buckets.create_bucket(_ctx(), store, BucketCreate(name="good-1", versioning=True, quota_objects=5))
    assert written.status == 201
    view = written.body
    assert view.name == "good-1" and view.versioning and view.quota_objects == 5 and view.status.state == "creating"
    with pytest.raises(errors.Conflict):
        await buckets.create_bucket(_ctx(), store, BucketCreate(name="good-1"))
    # the same name in another project is another bucket (another RGW tenant)
    project = PROJECT.new(project="", name="other", spec=ProjectSpec())
    await store.commit(Txn([Create(PROJECT.dump(project))]))
    other = await buckets.create_bucket(_ctx("other"), store, BucketCreate(name="good-1"))
    assert other.body.project == "other"


async def test_set_and_delete_of_a_bucket_rgw_never_had(store, tmp_path):
    await _enable(store)
    b = (await buckets.create_bucket(_ctx(), store, BucketCreate(name="tmp-1"))).body
    set_ = await buckets.configure_bucket(_ctx(), store, "tmp-1", BucketConfigure(public_read=True, quota_bytes=10))
    assert set_.body.public_read and set_.body.quota_bytes == 10 and not set_.body.versioning
    keys = KeyStore(tmp_path / "keys")
    written = await buckets.delete_bucket(_ctx(), store, keys, b.id, gateway=None)
    assert written.status == 204
    assert await store.get(BUCKET.name, b.id) is None


async def test_the_endpoint_settings(store, tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    ep = await buckets.endpoint(
        _ctx(), store, node="n1", port=8444, domain="example.com", ca_file=ca, ca_fingerprint="sha256:x",
        access_key="MCAKEXAMPLE",
    )  # fmt: skip
    assert ep.url == "https://127.0.0.1:8444" and ep.urls == [ep.url]
    assert ep.virtual_host == "s3.example.com" and ep.ca_bundle.startswith("-----BEGIN")
    assert "aws_access_key_id = MCAKEXAMPLE" in ep.aws_config and "request_checksum_calculation" in ep.aws_config
    assert "access_key_id = MCAKEXAMPLE" in ep.rclone_config and "provider = Ceph" in ep.rclone_config
    assert ep.tenant == ""  # no key or bucket made the tenant yet


def test_the_ca_bundle_is_read_once_per_version_of_the_file(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    ca = tmp_path / "ca.crt"
    ca.write_text("one")
    reads = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or real(self, *a, **k))
    assert [buckets.ca_text(ca) for _ in range(3)] == ["one"] * 3 and len(reads) == 1
    ca.write_text("two")
    os.utime(ca, ns=(1, 1))  # another version of the file (a node that joined a cluster got its CA)
    assert buckets.ca_text(ca) == "two" and len(reads) == 2
    assert buckets.ca_text(tmp_path / "missing.crt") == ""


def test_tenants_are_project_ids_rgw_accepts():
    assert tenant_of("prj-default") == "prj_default"


def test_role_mapping():
    assert wanted_mode(may_write=True, may_read=True) == "rw"
    assert wanted_mode(may_write=False, may_read=True) == "ro"
    assert wanted_mode(may_write=False, may_read=False) is None
    assert wanted_mode(may_write=True, may_read=True, disabled=True) is None
    assert wanted_mode(may_write=True, may_read=True, expired=True) is None


def test_the_public_read_policy_names_the_tenant():
    policy = json.loads(public_read_policy("prj_a", "site"))
    (statement,) = policy["Statement"]
    assert statement["Principal"] == "*" and statement["Action"] == ["s3:GetObject"]
    assert statement["Resource"] == ["arn:aws:s3::prj_a:site/*"]
