"""The alarms API over HTTP against a real VictoriaMetrics: create checks the PromQL with the TSDB's parser and the
webhook URL with the operator's rule (422s), answers the webhook secret once; list/show/history/delete; alarms are
per project."""

from __future__ import annotations

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.node import attach_node_services
from minicloud.api.app import create_app
from minicloud.api.keys import STORE
from minicloud.api.metrics import QUERY
from minicloud.config import AlarmsConfig
from minicloud.iam import apikeys
from minicloud.observe.query import QueryService
from minicloud.state import Create, Txn
from tests.unit.api.conftest import Api, FakeHost, make_config
from tests.unit.observe.test_metrics_api import _member


@pytest.fixture
async def api(tmp_path, victoria):
    config = make_config(tmp_path)
    config = msgspec.structs.replace(config, alarms=AlarmsConfig(webhook_allow=["127.0.0.1/32"], quota_per_project=3))
    app = attach_node_services(create_app(config, host=FakeHost()))
    app[QUERY] = QueryService(victoria.url, auth=victoria.auth, nocache=True, clock=lambda: victoria.now)
    client = TestClient(TestServer(app))
    await client.start_server()
    record, token = apikeys.new_key("default", "test-admin", "", None, {}, principal="user:usr-admin")
    await app[STORE].commit(Txn([Create(record)]))
    a = Api(client, token)
    for project in ("pa", "pb"):
        assert (await a.post("/v1/projects", json={"name": project})).status == 201
    yield a
    await client.close()


BODY = {
    "name": "cpu",
    "query": "sum(rate(minicloud_instance_cpu_seconds_total[5m]))",
    "comparison": ">",
    "threshold": 1,
}


async def test_create_show_list_history_delete(api):
    r = await api.post(
        "/v1/alarms?project=pa",
        json={**BODY, "evaluation_periods": 3, "period": 60, "actions": [{"url": "http://127.0.0.1:8080/hook"}]},
    )
    assert r.status == 201, await r.text()
    created = await r.json()
    assert created["state"] == "INSUFFICIENT_DATA" and len(created["webhook_secret"]) >= 40
    assert created["datapoints_to_alarm"] == 3 and created["actions"][0]["on"] == ["ALARM", "OK"]
    shown = await (await api.get("/v1/alarms/cpu?project=pa")).json()
    assert "webhook_secret" not in shown and "sealed_secret" not in str(shown)
    assert shown["expression"] == BODY["query"]
    listed = await (await api.get("/v1/alarms?project=pa")).json()
    assert [a["name"] for a in listed["items"]] == ["cpu"]
    assert (await (await api.get("/v1/alarms?project=pb")).json())["items"] == []
    assert (await api.get("/v1/alarms/cpu?project=pb")).status == 404
    history = await api.get("/v1/alarms/cpu/history?project=pa")
    assert history.status == 200 and (await history.json())["items"] == []
    assert (await api.delete("/v1/alarms/cpu?project=pa")).status == 204
    assert (await api.get("/v1/alarms/cpu?project=pa")).status == 404


async def test_a_named_metric_alarm(api):
    r = await api.post(
        "/v1/alarms",
        json={"name": "mem", "metric": "minicloud_instance_memory_unused_bytes", "dimensions": {"name": "vm1"},
              "statistic": "min", "period": 300, "comparison": "<", "threshold": 1e8},
    )  # fmt: skip
    assert r.status == 201, await r.text()
    expected = 'min(min_over_time(minicloud_instance_memory_unused_bytes{name="vm1"}[300s]))'
    assert (await r.json())["expression"] == expected


@pytest.mark.parametrize("promql", ["sum(rate(x[5m]", "x{", "1 +"])
async def test_invalid_promql_is_a_422_with_the_parsers_message(api, promql):
    r = await api.post("/v1/alarms", json={**BODY, "query": promql})
    assert r.status == 422
    problem = await r.json()
    assert problem["detail"].startswith("the query was refused: ")
    assert problem["invalid_params"][0]["name"] == "query" and problem["invalid_params"][0]["reason"]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.2:80/hook", "a loopback address"),  # loopback, but not the allowed 127.0.0.1/32
        ("http://10.1.2.3/hook", "a private or reserved address"),
        ("http://[::1]/hook", "a loopback address"),
        ("http://169.254.169.254/latest", "a link-local address"),
        ("ftp://example.com/hook", "not an http:// or https:// URL"),
        ("http://user:pw@example.com/hook", "not an http:// or https:// URL"),
    ],
)
async def test_webhook_urls_to_refused_addresses_are_422(api, url, words):
    r = await api.post("/v1/alarms", json={**BODY, "actions": [{"url": url}]})
    assert r.status == 422, await r.text()
    problem = await r.json()
    assert words in problem["detail"], problem
    assert problem["invalid_params"][0]["name"] == "actions.url"
    assert (await (await api.get("/v1/alarms")).json())["items"] == []


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"metric": "x"}, "query"),  # both
        ({"query": None}, "query"),  # neither
        ({"dimensions": {"a": "b"}}, "dimensions"),  # dimensions with a query
        ({"evaluation_periods": 2, "datapoints_to_alarm": 3}, "datapoints_to_alarm"),
        ({"period": 86400, "evaluation_periods": 100}, "start"),  # the evaluation window is past the query limits
    ],
)
async def test_bad_definitions_are_422(api, fields, name):
    r = await api.post("/v1/alarms", json={**BODY, **fields})
    assert r.status == 422, await r.text()
    assert (await r.json())["invalid_params"][0]["name"] == name


async def test_the_quota_per_project(api):
    for i in range(3):
        assert (await api.post("/v1/alarms?project=pb", json={**BODY, "name": f"a{i}"})).status == 201
    r = await api.post("/v1/alarms?project=pb", json={**BODY, "name": "a3"})
    assert r.status == 409 and "alarms.quota_per_project" in (await r.json())["detail"]


async def test_viewers_read_alarms_and_members_create_them(api):
    viewer = await _member(api, "vera", "pa", role="viewer")
    member = await _member(api, "max", "pa")
    assert (await api.post("/v1/alarms?project=pa", json=BODY, headers=viewer)).status == 403
    assert (await api.post("/v1/alarms?project=pa", json=BODY, headers=member)).status == 201
    assert (await api.get("/v1/alarms/cpu/history?project=pa", headers=viewer)).status == 200
    assert (await api.get("/v1/alarms?project=pb", headers=member)).status in (403, 404)


async def test_a_host_name_is_judged_by_the_addresses_it_resolves_to():
    from minicloud import errors
    from minicloud.compute.url_policy import UrlPolicy
    from minicloud.observe.alarms import check_webhook_url

    with pytest.raises(errors.ValidationFailed, match="localhost resolves to a loopback address"):
        await check_webhook_url("http://localhost:8080/hook", UrlPolicy.from_config([]))
    await check_webhook_url("http://localhost:8080/hook", UrlPolicy.from_config(["127.0.0.0/8", "::1/128"]))
    await check_webhook_url("http://localhost:8080/hook", UrlPolicy.from_config(["localhost"]))  # by name
