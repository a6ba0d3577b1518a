"""The project quota, metering and the administrators' grant without RGW: ``s3 quota set`` keeps the quota in the
project's ``s3tenant`` record (made when missing, audited), the usage read sums the buckets' figures, the usage
log is summed per bucket from the hour it was made, and a cluster-wide role alone opens no project's buckets."""

from __future__ import annotations

import msgspec
import pytest

from agent.reconcilers.objects import fold, metering, oldest_bin, project_granted, usage_cutoff
from minicloud.core.context import Context, SystemCaller
from minicloud.iam import policy
from minicloud.iam.keystore import KeyStore
from minicloud.iam.kinds import PROJECT, ProjectSpec
from minicloud.model.objects import BucketCreate, S3QuotaSet
from minicloud.objects import buckets
from minicloud.objects.kinds import BUCKET, S3TENANT, S3TenantSpec, tenant_record_id
from minicloud.state import Create, SQLiteStore, Txn, list_all
from minicloud.storage.kinds import CEPH, CephSpec


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    obj = CEPH.new(project="", name="ceph", spec=CephSpec(fsid="f", bootstrap_node="n1", mons={"n1": "127.0.0.1"}))
    await s.commit(Txn([Create(CEPH.dump(obj))]))
    project = PROJECT.new(project="", name="team", spec=ProjectSpec())
    await s.commit(Txn([Create(PROJECT.dump(project))]))
    yield s
    await s.close()


def _ctx(project: str = "team") -> Context:
    return Context(principal=SystemCaller("tester", admin=True), project=project, action="cluster:s3quotas:update")


def test_quota_in_force():
    t = S3TenantSpec(project_id="p", tenant="p", uid="p$project", access_key="MCSVX", secret="s")
    assert buckets.quota_in_force(None, 10, 2) == (10, 2, "config")
    assert buckets.quota_in_force(t, 10, 2) == (10, 2, "config")
    assert buckets.quota_in_force(msgspec.structs.replace(t, quota_bytes=0), 10, 2) == (0, 2, "project")
    assert buckets.quota_in_force(msgspec.structs.replace(t, quota_objects=7), 10, 2) == (10, 7, "project")


async def test_quota_set_makes_the_tenant_record_and_is_audited(store, tmp_path):
    keys = KeyStore(tmp_path / "keys")
    usage = await buckets.set_project_quota(
        _ctx(), store, keys, S3QuotaSet(quota_bytes=1 << 20), default_bytes=0, default_objects=0
    )
    assert (usage.quota_bytes, usage.quota_objects, usage.quota_source) == (1 << 20, 0, "project")
    pid = (await store.get_by_name(PROJECT.name, "", "team")).id
    record = await store.get(S3TENANT.name, tenant_record_id(pid))
    t = S3TENANT.load(record).spec
    assert t.quota_bytes == 1 << 20 and t.quota_objects is None and t.uid == f"{t.tenant}$project"
    # the service key's secret is sealed, bound to its id
    assert t.access_key.startswith("MCSV") and keys.decrypt(t.secret, t.access_key.encode())
    from minicloud.iam.audit import AUDIT

    audit = [
        r
        for r in await list_all(store, AUDIT.name, project="team")
        if r.spec.get("action") == "cluster:s3quotas:update"
    ]
    assert len(audit) == 1
    # only the fields given change; null goes back to the configuration's
    usage = await buckets.set_project_quota(
        _ctx(), store, keys, S3QuotaSet(quota_objects=5), default_bytes=0, default_objects=0
    )
    assert (usage.quota_bytes, usage.quota_objects) == (1 << 20, 5)
    usage = await buckets.set_project_quota(
        _ctx(), store, keys, S3QuotaSet(quota_bytes=None, quota_objects=None), default_bytes=9, default_objects=3
    )
    assert (usage.quota_bytes, usage.quota_objects, usage.quota_source) == (9, 3, "config")
    assert S3TENANT.load(await store.get(S3TENANT.name, tenant_record_id(pid))).spec.access_key == t.access_key


async def test_usage_sums_the_buckets(store):
    for name, figures in (("a-1", (10, 1, 4, 100, 7)), ("b-1", (5, 2, 6, 50, 3))):
        b = (await buckets.create_bucket(_ctx(), store, BucketCreate(name=name))).body
        record = await store.get(BUCKET.name, b.id)
        size, objects, requests, out, in_ = figures
        status = {**record.status, "size_bytes": size, "objects": objects, "requests": requests, "bytes_out": out,
                  "bytes_in": in_}  # fmt: skip
        from minicloud.state import Update

        await store.commit(
            Txn([Update(msgspec.structs.replace(record, status=status), expect_revision=record.revision)])
        )
    usage = await buckets.project_usage(_ctx(), store, default_bytes=0, default_objects=100)
    assert (usage.buckets, usage.size_bytes, usage.objects, usage.requests, usage.bytes_out, usage.bytes_in) == (
        2, 15, 3, 10, 150, 10,
    )  # fmt: skip
    assert usage.quota_objects == 100 and usage.quota_source == "config" and usage.tenant == ""
    assert sorted(b.name for b in usage.by_bucket) == ["a-1", "b-1"]


def test_metering_sums_the_usage_log_per_bucket_since_it_was_made():
    def bin_(bucket, epoch, *cats):
        return {"bucket": bucket, "epoch": epoch, "categories": [
            {"category": c, "ops": ops, "successful_ops": ops, "bytes_sent": out, "bytes_received": in_}
            for c, ops, out, in_ in cats
        ]}  # fmt: skip

    usage = {"entries": [{"user": "t$project", "buckets": [
        bin_("photos", 3600, ("get_obj", 3, 300, 0), ("put_obj", 2, 0, 200)),
        bin_("photos", 7200, ("get_obj", 1, 100, 0)),
        bin_("old", 3600, ("get_obj", 9, 900, 0)),  # the hour before "old" was made again
        bin_("old", 7200, ("list_bucket", 1, 50, 0)),
        bin_("", 7200, ("list_buckets", 4, 40, 0)),  # no bucket
        bin_("unknown", 7200, ("get_obj", 1, 1, 0)),
    ]}]}  # fmt: skip
    got = metering(usage, {"photos": 3700.0, "old": 7300.0})
    assert got == {"photos": (6, 400, 200), "old": (1, 50, 0)}
    assert metering({}, {"photos": 0.0}) == {}


def test_trimming_the_usage_log_changes_no_total():
    from minicloud.objects.kinds import BucketObserved

    def bin_(epoch, ops, out):
        return {"bucket": "photos", "epoch": epoch, "categories": [
            {"category": "get_obj", "ops": ops, "bytes_sent": out, "bytes_received": 1}]}  # fmt: skip

    hour = 3600
    log_ = [bin_(10 * hour, 1, 10), bin_(11 * hour, 2, 20), bin_(40 * hour, 4, 40)]
    usage = {"entries": [{"user": "t$project", "buckets": log_}]}
    st = BucketObserved()
    # nothing old enough: nothing folded, the totals are the log's
    got = fold(usage, "photos", 0.0, st, 5 * hour)
    assert got == {"requests": 7, "bytes_out": 70, "bytes_in": 3, "folded": (0, 0, 0), "folded_before": 5 * hour}
    st = BucketObserved(**{**got, "folded": got["folded"]})
    # the two first bins fall out of the kept window: folded, same totals
    got = fold(usage, "photos", 0.0, st, 12 * hour)
    assert got == {"requests": 7, "bytes_out": 70, "bytes_in": 3, "folded": (3, 30, 2), "folded_before": 12 * hour}
    st = BucketObserved(**got)
    assert fold(usage, "photos", 0.0, st, 12 * hour) == got  # a crash before the trim: the next sync counts the same
    trimmed = {"entries": [{"user": "t$project", "buckets": [b for b in log_ if b["epoch"] >= 12 * hour]}]}
    assert fold(trimmed, "photos", 0.0, st, 12 * hour) == got  # after the trim: the same
    more = {"entries": [{"user": "t$project", "buckets": [*trimmed["entries"][0]["buckets"], bin_(41 * hour, 8, 80)]}]}
    assert fold(more, "photos", 0.0, st, 13 * hour)["requests"] == 15
    assert oldest_bin(usage) == 10 * hour and oldest_bin({}) == float("inf")
    assert usage_cutoff(100 * hour + 5, 1) == 76 * hour


def test_a_cluster_role_alone_opens_no_project():
    admin = "user:usr-admin"
    cluster = policy.Binding(principal=admin, role="admin")
    assert not project_granted(admin, "storage:buckets:get", "team", [cluster], {})
    grant = policy.Binding(principal=admin, role="viewer", project="team")
    assert project_granted(admin, "storage:buckets:get", "team", [cluster, grant], {})
    assert not project_granted(admin, "storage:buckets:create", "team", [cluster, grant], {})  # read-only grant
    assert not project_granted(admin, "storage:buckets:get", "other", [cluster, grant], {})


async def test_the_sync_folds_old_bins_into_the_status_then_trims_them_from_rgw(store, tmp_path, monkeypatch):
    from agent.reconcilers import objects as rec
    from tests.unit.api.conftest import make_config

    hour = 3600
    now = 100 * 86400
    monkeypatch.setattr(rec.time, "time", lambda: now)
    t = S3TenantSpec(project_id="p", project="team", tenant="p", uid="p$project", access_key="MCSVX", secret="s")
    bucket = BUCKET.new(project="team", name="pics", spec=buckets.BucketSpec(), stamp="1970-01-01T00:00:00Z")
    await store.commit(Txn([Create(BUCKET.dump(bucket))]))

    def bin_(epoch, ops):
        return {"bucket": "pics", "epoch": epoch, "categories": [{"ops": ops, "bytes_sent": ops, "bytes_received": 0}]}

    log_ = [bin_(now - 40 * 86400, 1), bin_(now - 2 * hour, 2)]  # one bin older than 31 days, one recent
    calls = []

    class Admin:
        async def admin(self, method, resource, params=(), *, ok=()):
            calls.append((method, resource, dict(params)))
            if resource == "bucket":
                return [{"bucket": "pics", "usage": {"rgw.main": {"size": 5, "num_objects": 1}}}]
            if method == "GET":
                return {"entries": [{"user": t.uid, "buckets": list(log_)}]}
            cutoff = int(dict(params)["end"]) + 1
            log_[:] = [b for b in log_ if b["epoch"] >= cutoff]
            return None

    r = rec.ObjectsReconciler.__new__(rec.ObjectsReconciler)
    r.store, r.config, r._admin = store, make_config(tmp_path), Admin()
    await r._sync_buckets(t)
    st = BUCKET.load(await store.get(BUCKET.name, bucket.id)).status
    assert (st.requests, st.folded, st.folded_before) == (3, (1, 1, 0), rec.usage_cutoff(now, 31))
    assert [c[0] for c in calls if c[1] == "usage"] == ["GET", "DELETE"] and len(log_) == 1
    await r._sync_buckets(t)  # trimmed: the same totals, nothing more to trim
    st = BUCKET.load(await store.get(BUCKET.name, bucket.id)).status
    assert st.requests == 3 and st.size_bytes == 5
    assert [c[0] for c in calls if c[1] == "usage"] == ["GET", "DELETE", "GET"]
