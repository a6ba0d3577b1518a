"""The HTTP edge: floods of bad credentials, what an audit entry may copy, absurd parameters, anonymous probing of
project names, and the scope of an Idempotency-Key."""

from __future__ import annotations

import math
import time

import msgspec
import pytest

from minicloud.api.keys import STORE
from minicloud.api.middleware import REFUSALS, flush_refusals
from minicloud.iam import audit
from tests.conftest import make_ssh_key
from tests.unit.api.conftest import make_config, start_api
from tests.unit.api.test_conventions import problem

BOGUS = {"Authorization": "Bearer mc_0123456789abcdef.bogus"}


@pytest.fixture
async def strict_api(tmp_path):
    """An API whose sources may fail authentication 10 times, then about never again."""
    a = await start_api(make_config(tmp_path, auth_failure_burst=10, auth_failure_rps=0.001))
    yield a
    await a.client.close()


async def audit_records(api) -> list:
    return await api.app[STORE].list(audit.KIND, limit=10_000)


# -- the audit flood -------------------------------------------------------------------------------------------------


async def test_a_flood_of_bogus_tokens_is_throttled_by_source_and_costs_no_store_write(strict_api):
    api = strict_api
    assert (await api.get("/v1/keypairs")).status == 200  # the admin's key, from the same address, keeps working
    store = api.app[STORE]
    before = store.revision
    started = time.time()
    statuses = []
    for _ in range(50):
        statuses.append((await api.post("/v1/keypairs", headers=BOGUS, json={"name": "x"})).status)
    for _ in range(20):
        statuses.append((await api.get("/v1/keypairs", headers=BOGUS)).status)
    minutes = math.floor(time.time() / 60) - math.floor(started / 60) + 1
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}
    throttled = await api.get("/v1/keypairs", headers=BOGUS)
    p = await problem(throttled, 429)
    assert int(throttled.headers["Retry-After"]) >= 1 and "failed authentications" in p["detail"]
    assert store.revision == before, "refused requests must not write to the store one by one"

    assert await flush_refusals(api.app, everything=True) >= 1
    entries = [r for r in await audit_records(api) if r.spec["status"] in (401, 429)]
    by_status: dict[int, list] = {}
    for r in entries:
        assert r.spec["source"] == "127.0.0.1" and r.spec["principal"] == "anonymous"
        by_status.setdefault(r.spec["status"], []).append(r)
    # One entry per (source, minute, action, status), with the count of requests it stands for. GETs refused with
    # 429 are reads: not audited, as before.
    assert sum(r.spec.get("count", 1) for r in by_status[401]) == 10
    assert sum(r.spec.get("count", 1) for r in by_status[429]) == 40
    assert len(by_status[401]) <= minutes and len(by_status[429]) <= minutes
    listed = (await (await api.get("/v1/audit?result=denied")).json())["items"]
    assert sum(e["count"] for e in listed if e["status"] == 401) == 10


async def test_refusals_are_flushed_once_their_minute_is_over(api):
    refusals = api.app[REFUSALS]
    started = time.time()
    for _ in range(5):
        await problem(await api.get("/v1/keypairs", anon=True), 401)
    groups = len(refusals)
    assert groups in (1, 2)  # 2 only if a minute ended meanwhile
    assert await flush_refusals(api.app, now=started) == 0  # no minute is over yet: all kept in memory
    assert await flush_refusals(api.app, now=time.time() + 60) == groups
    assert len(refusals) == 0
    entries = [r for r in await audit_records(api) if r.spec["status"] == 401]
    assert sum(r.spec.get("count", 1) for r in entries) == 5 and {r.spec["result"] for r in entries} == {"denied"}


def test_the_aggregator_groups_by_source_and_minute_and_bounds_its_memory():
    agg = audit.RefusalAggregator(max_groups=2)
    common = {"principal": "anonymous", "project": "", "action": "a", "method": "GET", "path": "/p",
              "result": "denied", "status": 401, "request_id": "r"}  # fmt: skip
    for t in (0.0, 10.0, 59.9, 60.0):
        agg.note(source="10.0.0.1", at=t, **common)
    agg.note(source="10.0.0.2", at=70.0, **common)  # a third group: over the bound, counted under source "*"
    agg.note(source="10.0.0.3", at=75.0, **common)
    assert [(r.spec["source"], r.spec["count"]) for r in agg.drain(now=119.0)] == [("10.0.0.1", 3)]
    done = agg.drain(now=120.0)
    assert sorted((r.spec["source"], r.spec.get("count", 1)) for r in done) == [("*", 2), ("10.0.0.1", 1)]
    assert len(agg) == 0


async def test_a_throttled_source_still_serves_keys_that_authenticated_before(strict_api):
    api = strict_api
    assert (await api.get("/v1/keypairs")).status == 200  # this key is known good
    for _ in range(10):
        await problem(await api.get("/v1/keypairs", headers=BOGUS), 401)
    await problem(await api.get("/v1/keypairs", headers=BOGUS), 429)
    await problem(await api.get("/v1/keypairs", anon=True), 429)
    assert (await api.get("/v1/keypairs")).status == 200
    # The limit is per source: another address has its own bucket.
    from minicloud.api.middleware import AUTH_FAILURES

    assert api.app[AUTH_FAILURES].wait("127.0.0.1") >= 1 and api.app[AUTH_FAILURES].wait("10.9.9.9") == 0.0


# -- what an audit entry copies --------------------------------------------------------------------------------------


def test_an_entry_for_a_16_kb_path_stays_under_the_bound():
    record = audit.entry(
        principal="user:" + "u" * 5000, project="p", action="compute:keypairs:delete" + "x" * 5000,
        method="DELETE" * 100, path="/v1/keypairs/" + "k" * 16384, target={"name": "n" * 5000, "kind": "keypair"},
        result="failed", status=404, request_id="r" * 500, source="s" * 500,
    )  # fmt: skip
    assert len(msgspec.json.encode(record)) < audit.MAX_ENTRY_BYTES
    assert len(record.spec["path"]) == audit.MAX_PATH and record.spec["path"].endswith("…(truncated)")
    assert record.spec["path"].startswith("/v1/keypairs/kkk")


async def test_a_request_with_a_long_path_writes_a_bounded_audit_entry(api):
    # aiohttp refuses request lines over 8 KiB itself (400, not routed, not audited); the longest it routes:
    resp = await api.delete("/v1/keypairs/" + "k" * 8000)
    assert resp.status in (404, 422)
    [entry] = [r for r in await audit_records(api) if r.spec["method"] == "DELETE"]
    assert len(msgspec.json.encode(entry)) < audit.MAX_ENTRY_BYTES
    assert len(entry.spec["path"]) == audit.MAX_PATH


# -- absurd parameters -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "since", ["800000d", "99999999999999999999999999s", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59"]
)
async def test_an_absurd_audit_since_is_a_problem_naming_the_valid_range(api, since):
    p = await problem(await api.get(f"/v1/audit?since={since}"), 422)
    assert "1970-01-01T00:00:00Z" in p["detail"] and "36500d" in p["detail"]


async def test_a_duration_back_past_1970_lists_the_whole_log(api):
    assert (await api.get("/v1/audit?since=36500d")).status == 200


# -- anonymous probing of project names ------------------------------------------------------------------------------


async def test_public_routes_answer_the_same_whether_a_project_exists_or_not(api):
    assert (await api.post("/v1/projects", json={"name": "real"})).status == 201
    for path in ("/healthz", "/readyz", "/v1/version", "/v1/ca"):
        answers = {(await api.get(f"{path}?project={p}", anon=True)).status for p in ("real", "nope", "../x")}
        assert answers == {200}, path
    # A protected route: the same 401 for an existing and an unknown project.
    for p in ("real", "nope"):
        await problem(await api.get(f"/v1/keypairs?project={p}", anon=True), 401)


# -- Idempotency-Key scope -------------------------------------------------------------------------------------------


async def test_the_same_idempotency_key_in_another_project_is_another_request(api):
    for name in ("a", "b"):
        assert (await api.post("/v1/projects", json={"name": name})).status == 201
    body = {"name": "k", "public_key": make_ssh_key()}
    key = {"Idempotency-Key": "same-key"}
    first = await api.post("/v1/keypairs?project=a", json=body, headers=key)
    assert first.status == 201 and (await first.json())["project"] == "a"
    other = await api.post("/v1/keypairs?project=b", json=body, headers=key)
    assert other.status == 201 and "Idempotent-Replayed" not in other.headers
    assert (await other.json())["project"] == "b"
    assert (await api.get("/v1/keypairs/k?project=b")).status == 200
    again = await api.post("/v1/keypairs?project=a", json=body, headers=key)
    assert (
        again.headers.get("Idempotent-Replayed") == "true" and (await again.json())["id"] == (await first.json())["id"]
    )
