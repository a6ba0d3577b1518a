"""The metrics API over HTTP: ``/v1/metrics/query[_range]`` answers for ``?project=`` only (a member of pa never
sees pb), cluster scope is for admins, bad input is problem+json; ``/metrics`` needs the metrics token or an admin
credential, and the token opens nothing else."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.node import attach_node_services
from minicloud.api.app import create_app
from minicloud.api.keys import STORE
from minicloud.api.metrics import QUERY, metrics_token
from minicloud.iam import apikeys
from minicloud.observe.query import QueryService
from minicloud.state import Create, Txn
from tests.unit.api.conftest import Api, FakeHost, make_config
from tests.unit.observe.conftest import project_series


@pytest.fixture
async def api(tmp_path, victoria):
    app = attach_node_services(create_app(make_config(tmp_path), host=FakeHost()))
    # the fake hypervisor runs no TSDB: point the query service at the session's VictoriaMetrics
    app[QUERY] = QueryService(victoria.url, auth=victoria.auth, nocache=True, clock=lambda: victoria.now)
    client = TestClient(TestServer(app))
    await client.start_server()
    record, token = apikeys.new_key("default", "test-admin", "", None, {}, principal="user:usr-admin")
    await app[STORE].commit(Txn([Create(record)]))
    a = Api(client, token)
    ids = []
    for project in ("pa", "pb"):
        r = await a.post("/v1/projects", json={"name": project})
        assert r.status == 201
        ids.append((await r.json())["id"])
    # series of these projects (their ids are new each test); the session's data has an older "pa" too
    victoria.import_text(project_series(victoria.now, *ids, node_and_old=False))
    yield a
    await client.close()


async def _member(api, name: str, project: str, role: str = "member") -> dict[str, str]:
    user = await api.post("/v1/users", json={"name": name})
    assert user.status == 201
    grant = {"role": role, "principal": f"user:{name}", "scope_project": project}
    assert (await api.post(f"/v1/rolebindings?project={project}", json=grant)).status == 201
    record, token = apikeys.new_key(project, f"{name}-key", "", None, {}, principal=f"user:{(await user.json())['id']}")
    await api.app[STORE].commit(Txn([Create(record)]))
    return {"Authorization": f"Bearer {token}"}


async def test_a_member_queries_only_their_projects_series(api):
    alice = await _member(api, "alice", "pa")
    r = await api.get(
        "/v1/metrics/query", params={"query": '{project="pb"} or minicloud_instance_cpu_seconds_total', "project": "pa"},
        headers=alice,
    )  # fmt: skip
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["resultType"] == "vector"
    assert sorted(s["metric"]["project"] for s in body["result"]) == ["pa", "pa"]
    # the deleted earlier "pa" (same name, another id) is not this pa: its memory series stays out
    r = await api.get(
        "/v1/metrics/query", params={"query": 'minicloud_instance_memory_bytes{project="pa"}', "project": "pa"},
        headers=alice,
    )  # fmt: skip
    assert (await r.json())["result"] == []
    r = await api.get(
        "/v1/metrics/query_range",
        params={
            "query": 'minicloud_instance_memory_bytes{project="pb"}',
            "start": "-5m",
            "step": "1m",
            "project": "pa",
        },
        headers=alice,
    )
    assert r.status == 200
    body = await r.json()
    assert body["resultType"] == "matrix" and body["result"] == [] and body["step"] == 60
    # pb does not exist for alice at all
    r = await api.get("/v1/metrics/query", params={"query": "up", "project": "pb"}, headers=alice)
    assert r.status == 404


async def test_cluster_scope_is_for_admins(api):
    alice = await _member(api, "alice", "pa", role="owner")
    r = await api.get(
        "/v1/metrics/query",
        params={"query": "minicloud_node_load1", "scope": "cluster", "project": "pa"},
        headers=alice,
    )
    assert r.status == 403
    assert (await r.json())["action"] == "cluster:metrics:get"
    r = await api.get("/v1/metrics/query", params={"query": "minicloud_node_load1", "scope": "cluster"})
    assert r.status == 200
    assert [s["metric"]["node"] for s in (await r.json())["result"]] == ["n1"]
    # without scope=cluster, even an admin sees only the project's series (default project: none here)
    r = await api.get("/v1/metrics/query", params={"query": "minicloud_node_load1"})
    assert (await r.json())["result"] == []


@pytest.mark.parametrize(
    ("path", "params", "field", "words"),
    [
        ("/v1/metrics/query", {"query": "sum(rate(x[5m]"}, "query", "the query was refused"),
        ("/v1/metrics/query_range", {"query": "up", "start": "-30d"}, "start", "query_max_range_days"),
        ("/v1/metrics/query_range", {"query": "up", "step": "0.01"}, "step", "query_min_step"),
        ("/v1/metrics/query_range", {"query": "up", "start": "-14d", "step": "10s"}, "step", "query_max_points"),
        ("/v1/metrics/query", {"query": "up", "time": "yesterday"}, "time", "not a time"),
        ("/v1/metrics/query", {"query": "up", "scope": "everything"}, "scope", "enum"),
    ],
)
async def test_bad_input_is_problem_json(api, path, params, field, words):
    r = await api.get(path, params=params)
    assert r.status == 422, await r.text()
    assert r.content_type == "application/problem+json"
    body = await r.json()
    assert words in body["detail"]
    assert body["invalid_params"][0]["name"] == field


async def test_no_federate_or_raw_tsdb_endpoint_is_exposed(api):
    for path in ("/v1/metrics/federate", "/v1/metrics/api/v1/series", "/federate", "/api/v1/query"):
        assert (await api.get(path)).status == 404, path


async def test_metrics_needs_the_token_or_an_admin(api):
    assert (await api.get("/metrics", anon=True)).status == 401
    bad = await api.get("/metrics", headers={"Authorization": "Bearer mcm_0000"}, anon=True)
    assert bad.status == 401
    token = {"Authorization": f"Bearer {metrics_token(api.app)}"}
    ok = await api.get("/metrics", headers=token, anon=True)
    assert ok.status == 200
    assert ok.content_type == "text/plain"
    text = await ok.text()
    assert 'minicloud_api_requests_total{method="GET",node="n1",route="/metrics",status="401"}' in text
    assert "minicloud_reconcile_total" in text or "minicloud_reconcile_duration_seconds" in text
    assert "minicloud_store_commit_duration_seconds_bucket{" in text and "minicloud_store_revision{" in text
    assert (await api.get("/metrics")).status == 200  # an admin key
    alice = await _member(api, "alice", "pa", role="owner")
    assert (await api.get("/metrics", headers=alice)).status == 403
    # the metrics token opens /metrics and nothing else
    assert (await api.get("/v1/whoami", headers=token, anon=True)).status == 401
    assert (await api.get("/v1/metrics/query", params={"query": "up"}, headers=token, anon=True)).status == 401


async def test_api_requests_are_counted_by_route_template(api):
    await api.get("/v1/instances/nope")
    text = await (await api.get("/metrics")).text()
    assert 'route="/v1/instances/{ref}",status="404"' in text or 'status="404"' in text
    assert "/v1/instances/nope" not in text


async def test_a_node_without_a_tsdb_forwards_queries_to_a_voting_node(tmp_path, victoria, monkeypatch):
    """A learner (no TSDB) decides its caller's scope, then asks a voter over mutual TLS: a member of pa gets pa's
    series only, an invalid query is the voter's 422, a voter that does not answer is skipped, none answering is a
    503; the voter's node endpoint answers no one but a cluster node."""
    import ssl

    import aiohttp

    from minicloud import ids
    from minicloud.api import metrics as metrics_api
    from minicloud.api.keys import CONFIG
    from minicloud.cluster.kinds import NODE, NodeSpec
    from tests.unit.api.test_logs_api import _tls_node

    learner, s1 = await _tls_node(tmp_path, "n1")

    def tsdb(app) -> None:
        app[QUERY] = QueryService(victoria.url, auth=victoria.auth, nocache=True, clock=lambda: victoria.now)

    voter, s2 = await _tls_node(tmp_path, "n2", ca_from=learner[CONFIG].data_path, prepare=tsdb)
    try:
        assert QUERY not in learner
        obj = NODE.new(project="", name="n1", spec=NodeSpec(address="127.0.0.1", role="learner"), labels={},
                       stamp=ids.now())  # fmt: skip
        await voter[STORE].commit(Txn([Create(NODE.dump(obj))]))
        url2 = str(s2.make_url("")).rstrip("/")
        dead = "https://127.0.0.1:9"
        monkeypatch.setattr(metrics_api, "_voters", lambda request: _async([("n3", dead), ("n2", url2)]))
        record, token = apikeys.new_key("default", "admin-key", "", None, {}, principal="user:usr-admin")
        await learner[STORE].commit(Txn([Create(record)]))
        a = Api(TestClient(s1, connector=aiohttp.TCPConnector(ssl=False)), token)
        r = await a.post("/v1/projects", json={"name": "pa"})
        pa_id = (await r.json())["id"]
        victoria.import_text(project_series(victoria.now, pa_id, "prj-other-b", node_and_old=False))
        alice = await _member(a, "alice", "pa")
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        async with aiohttp.ClientSession() as http:

            async def ask(path: str, **params: str) -> tuple[int, dict]:
                async with http.get(f"{s1.make_url(path)}", params=params, ssl=insecure, headers=alice) as resp:
                    return resp.status, await resp.json()

            for _ in range(4):  # whichever voter is tried first, the answer comes from n2
                status, body = await ask(
                    "/v1/metrics/query", query="minicloud_instance_cpu_seconds_total", project="pa"
                )
                assert status == 200, body
                assert {s["metric"]["project_id"] for s in body["result"]} == {pa_id}
                assert {s["value"][1] for s in body["result"]} == {"1", "2"}
            status, body = await ask("/v1/metrics/query_range", query='{project="pb"}', start="-5m", project="pa")
            assert status == 200 and body["result"] == [], body
            status, body = await ask("/v1/metrics/query", query="sum(", project="pa")
            assert status == 422 and "query" in body["invalid_params"][0]["name"], body
            # the voter's node endpoint: no certificate is 404, even with a user's credential
            async with http.get(f"{url2}/v1/metrics/node/query", params={"query": "up"}, ssl=insecure) as r:
                assert r.status == 404
            monkeypatch.setattr(metrics_api, "_voters", lambda request: _async([("n3", dead)]))
            status, body = await ask("/v1/metrics/query", query="up", project="pa")
            assert status == 503 and "n3" in body["detail"], body
        await a.client.close()
    finally:
        for s in (s1, s2):
            await s.close()


async def _async(value):
    return value
