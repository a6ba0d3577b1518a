"""``/v1/logs`` over HTTP: administrators read every service and the audit log; a project member reads only the
consoles of their project's instances (another project's instance is 404, a service 403); bad patterns are 422;
follow streams; ``/v1/logs/node`` opens to a cluster node's certificate (mutual TLS) or an administrator, and the
merging node asks the other nodes over it and merges their lines by time."""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.node import attach_node_services
from minicloud import ids
from minicloud.api import logs as logs_api
from minicloud.api.app import create_app
from minicloud.api.keys import CONFIG, STORE, TLS
from minicloud.cluster.kinds import NODE, NodeSpec
from minicloud.observe import logs
from minicloud.pki import ensure_node_pki, issue_server_cert, write_private
from minicloud.state import Create, Txn
from tests.unit.api.conftest import FakeHost, make_config, start_api
from tests.unit.api.test_compute_api import _image, _wait_state
from tests.unit.observe.test_metrics_api import _member

T0 = 1767366245.0


def _agent_log(data, node_tag: str, times: list[float]) -> None:
    (data / "logs").mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"time": logs.iso(t), "level": "info", "msg": f"{node_tag} at {t - T0:g}"}) for t in times]
    with (data / "logs" / "agent.log").open("a") as f:
        f.write("\n".join(rows) + "\n")


@pytest.fixture
async def api(tmp_path):
    a = await start_api(make_config(tmp_path))
    yield a
    await a.client.close()


async def _instance(api, name: str, project: str) -> dict:
    if (await api.get(f"/v1/images/img-{project}?project={project}")).status == 404:
        await _image(api, f"img-{project}", project)
    r = await api.post(f"/v1/instances?project={project}", json={"name": name, "image": f"img-{project}", "type": "m1.tiny"})  # fmt: skip
    assert r.status == 201, await r.text()
    inst = await r.json()
    await _wait_state(api, name, "running", project)
    console = api.app[CONFIG].data_path / "instances" / inst["id"] / "console.log"
    console.write_text(f"console of {name} in {project}\n")
    return inst


async def test_an_admin_reads_every_service_and_the_audit_log(api):
    _agent_log(api.app[CONFIG].data_path, "n1", [T0 + 1, T0 + 2])
    r = await api.get("/v1/logs", params={"service": "agent", "grep": "n1 at [0-9]"})
    assert r.status == 200, await r.text()
    body = await r.json()
    assert [ln["line"][-12:] for ln in body["lines"]][:2] == ['"n1 at 1"}', '"n1 at 2"}'] or [
        json.loads(ln["line"])["msg"] for ln in body["lines"]
    ] == ["n1 at 1", "n1 at 2"]
    assert body["nodes"] == [{"node": "n1"}] and body["lines"][0]["service"] == "agent"
    assert (await api.post("/v1/projects", json={"name": "pz"})).status == 201
    r = await api.get("/v1/logs", params={"service": "audit", "since": "1h"})
    audit = (await r.json())["lines"]
    assert any("POST /v1/projects -> 201 allowed" in ln["line"] for ln in audit)
    assert {ln["service"] for ln in audit} == {"audit"}
    # grep looks at every entry, not only the newest `limit`: an older match is found behind newer non-matches
    assert (await api.post("/v1/projects", json={"name": "pz"})).status == 409
    for name in ("q1", "q2", "q3"):
        assert (await api.post("/v1/projects", json={"name": name})).status == 201
    r = await api.get("/v1/logs", params={"service": "audit", "since": "1h", "limit": "1", "grep": "-> 409"})
    found = (await r.json())["lines"]
    assert len(found) == 1 and "POST /v1/projects -> 409" in found[0]["line"], found
    # the newest `limit`, with `truncated` saying more matched
    r = await api.get("/v1/logs", params={"service": "agent", "limit": "1", "grep": "n1 at"})
    body = await r.json()
    assert len(body["lines"]) == 1 and body["truncated"] and "n1 at 2" in body["lines"][0]["line"]


async def test_the_audit_log_is_read_newest_first_under_its_read_cap(api, monkeypatch):
    """The store lists audit entries oldest first; with more entries than one request may read, the answer is still
    the newest ones (read in windows back from now), never the oldest."""
    for i in range(6):
        assert (await api.post("/v1/projects", json={"name": f"cap{i}"})).status == 201
    monkeypatch.setattr(logs_api, "AUDIT_MAX_ENTRIES", 4)
    r = await api.get("/v1/logs", params={"service": "audit", "since": "1h", "limit": "2", "grep": "POST /v1/projects"})
    lines = [ln["line"] for ln in (await r.json())["lines"]]
    assert len(lines) == 2 and all("POST /v1/projects -> 201" in ln for ln in lines), lines
    ids_seen = [ln.split("request=")[1].split()[0] for ln in lines]
    monkeypatch.undo()
    r = await api.get("/v1/logs", params={"service": "audit", "since": "1h", "grep": "POST /v1/projects"})
    every = [ln["line"].split("request=")[1].split()[0] for ln in (await r.json())["lines"]]
    assert len(every) >= 6 and ids_seen == every[-2:]


async def test_a_member_reads_only_their_projects_consoles(api):
    for project in ("pa", "pb"):
        assert (await api.post("/v1/projects", json={"name": project})).status == 201
    a1 = await _instance(api, "a1", "pa")
    await _instance(api, "a2", "pa")
    await _instance(api, "b1", "pb")
    _agent_log(api.app[CONFIG].data_path, "n1", [T0])
    alice = await _member(api, "alice", "pa")
    r = await api.get("/v1/logs", params={"instance": "a1", "project": "pa"}, headers=alice)
    assert r.status == 200, await r.text()
    lines = (await r.json())["lines"]
    assert [(ln["service"], ln["instance"], ln["line"]) for ln in lines] == [
        ("console", a1["id"], "console of a1 in pa")
    ]
    # every console of the project, and nothing else
    r = await api.get("/v1/logs", params={"project": "pa"}, headers=alice)
    assert sorted(ln["line"] for ln in (await r.json())["lines"]) == ["console of a1 in pa", "console of a2 in pa"]
    # another project's instance: 404, by name in her project and by its own project
    assert (await api.get("/v1/logs", params={"instance": "b1", "project": "pa"}, headers=alice)).status == 404
    assert (await api.get("/v1/logs", params={"instance": "b1", "project": "pb"}, headers=alice)).status == 404
    # services are for administrators
    r = await api.get("/v1/logs", params={"service": "agent", "project": "pa"}, headers=alice)
    assert r.status == 403 and "cluster:logs:get" in (await r.json())["detail"]
    r = await api.get("/v1/logs", params={"service": "audit", "project": "pa"}, headers=alice)
    assert r.status == 403
    # a viewer reads nothing here (compute:instances:console is not a read)
    bob = await _member(api, "bob", "pa", role="viewer")
    assert (await api.get("/v1/logs", params={"project": "pa"}, headers=bob)).status == 403
    # the node endpoint is not for members
    assert (await api.get("/v1/logs/node", params={"project": "pa"}, headers=alice)).status == 403
    assert (await api.get("/v1/logs/node", anon=True)).status == 404


async def test_bad_input_is_422(api):
    for params, name in [
        ({"grep": "(a)\\1"}, "grep"),
        ({"grep": "a["}, "grep"),
        ({"service": "nope"}, "service"),
        ({"since": "yesterday"}, "since"),
        ({"instance": "x", "service": "agent"}, "service"),
    ]:
        r = await api.get("/v1/logs", params=params)
        assert r.status in (404, 422), (params, await r.text())
        if r.status == 422:
            assert (await r.json())["invalid_params"][0]["name"] == name
    assert (await api.get("/v1/logs", params={"node": "nowhere"})).status == 404


async def test_follow_streams_the_backlog_then_new_lines(api):
    data = api.app[CONFIG].data_path
    _agent_log(data, "n1", [T0 + 1])
    resp = await api.get("/v1/logs", params={"service": "agent", "follow": "true", "grep": "n1 at"})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
    first = json.loads(await asyncio.wait_for(resp.content.readline(), 30))
    assert "n1 at 1" in first["line"]
    _agent_log(data, "n1", [T0 + 2])
    second = json.loads(await asyncio.wait_for(resp.content.readline(), 30))
    assert "n1 at 2" in second["line"]
    resp.close()


# -- two nodes, mutual TLS ------------------------------------------------------------------------------------------
async def _tls_node(tmp_path, name: str, ca_from=None, prepare=None):
    """A node on HTTPS whose certificate (CN ``name``) is signed by ``ca_from``'s CA (its own when None);
    ``prepare(app)`` runs before the server starts."""
    (tmp_path / name).mkdir()
    cfg = make_config(tmp_path / name)
    cfg = msgspec.structs.replace(cfg, agent=msgspec.structs.replace(cfg.agent, node_name=name))
    pki_dir = cfg.data_path / "pki"
    if ca_from is not None:
        pki_dir.mkdir(parents=True, mode=0o700)
        write_private(pki_dir / "ca.key", (ca_from / "pki" / "ca.key").read_bytes())
        write_private(pki_dir / "ca.crt", (ca_from / "pki" / "ca.crt").read_bytes())
        cert, key = issue_server_cert((ca_from / "pki" / "ca.crt").read_bytes(), (ca_from / "pki" / "ca.key").read_bytes(), name)  # fmt: skip
        write_private(pki_dir / "server.key", key)
        write_private(pki_dir / "server.crt", cert + (ca_from / "pki" / "ca.crt").read_bytes())
    else:
        ensure_node_pki(cfg.data_path, name)
    app = attach_node_services(create_app(cfg, host=FakeHost()))
    if prepare is not None:
        prepare(app)
    server = TestServer(app)
    await server.start_server(ssl=app[TLS])
    return app, server


async def test_the_merging_node_asks_the_others_over_mutual_tls(tmp_path, monkeypatch):
    app1, s1 = await _tls_node(tmp_path, "n1")
    app2, s2 = await _tls_node(tmp_path, "n2", ca_from=app1[CONFIG].data_path)
    stranger_app, s3 = await _tls_node(tmp_path, "n3")  # its own CA: not of this cluster
    try:
        for app, other in ((app1, "n2"), (app2, "n1")):
            obj = NODE.new(project="", name=other, spec=NodeSpec(address="127.0.0.1"), labels={}, stamp=ids.now())
            await app[STORE].commit(Txn([Create(NODE.dump(obj))]))
        _agent_log(app1[CONFIG].data_path, "n1", [T0 + 1, T0 + 3])
        _agent_log(app2[CONFIG].data_path, "n2", [T0 + 2, T0 + 4])
        url2 = str(s2.make_url("")).rstrip("/")
        url3 = str(s3.make_url("")).rstrip("/")

        async def peers(request, only):
            return [("n2", url2)] if only in (None, "n2") else []

        monkeypatch.setattr(logs_api, "_peers", peers)
        client = TestClient(s1)  # n1's own server; its Unix-socket-less caller is admin by its API key below
        from minicloud.iam import apikeys

        record, token = apikeys.new_key("default", "admin-key", "", None, {}, principal="user:usr-admin")
        await app1[STORE].commit(Txn([Create(record)]))
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"{s1.make_url('/v1/logs')}",
                params={"service": "agent", "grep": "at [0-9]"},
                ssl=insecure,
                headers=headers,
            ) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            assert body["nodes"] == [{"node": "n1"}, {"node": "n2"}], body["nodes"]
            assert [(ln["node"], ln["ts"]) for ln in body["lines"]] == [
                ("n1", T0 + 1), ("n2", T0 + 2), ("n1", T0 + 3), ("n2", T0 + 4)
            ]  # fmt: skip
            assert body["nodes"] == [{"node": "n1"}, {"node": "n2"}]
            # n2's node endpoint: no certificate and no credential is 404; n3's certificate (another CA) is refused
            async with http.get(f"{url2}/v1/logs/node", ssl=insecure) as r:
                assert r.status == 404
            foreign = ssl.create_default_context()
            foreign.check_hostname, foreign.verify_mode = False, ssl.CERT_NONE
            pki3 = stranger_app[CONFIG].data_path / "pki"
            foreign.load_cert_chain(pki3 / "server.crt", pki3 / "server.key")
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                async with http.get(f"{url2}/v1/logs/node", ssl=foreign) as r:
                    await r.read()
            # a node that does not answer is named, the others' lines still come
            monkeypatch.setattr(logs_api, "_peers", lambda request, only: _async([("n2", url3)]))
            async with http.get(
                f"{s1.make_url('/v1/logs')}", params={"service": "agent"}, ssl=insecure, headers=headers
            ) as r:
                body = await r.json()
            assert {ln["node"] for ln in body["lines"]} == {"n1"}
            assert body["nodes"][1]["node"] == "n2" and body["nodes"][1]["error"]
        await client.close()
    finally:
        for s in (s1, s2, s3):
            await s.close()


async def _async(value):
    return value


def test_a_follow_keeps_the_newest_new_lines_while_a_slow_node_sends_its_backlog():
    early = logs_api.EarlyLines("n1", cap=3)
    for i in range(10):
        early.line(logs.LogLine(time="t", ts=T0 + i, node="n2", service="agent", line=f"line {i}", source="agent"))
    early.error("n3", "HTTP 502")
    out = [json.loads(chunk) for chunk in early.drain()]
    assert out[0] == {"node": "n3", "error": "HTTP 502"}
    assert out[1] == {"node": "n1", "error": "7 new lines dropped while waiting for a slow node's backlog"}
    assert [o["line"] for o in out[2:]] == ["line 7", "line 8", "line 9"]
