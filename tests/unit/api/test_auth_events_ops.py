"""Authentication, the events stream, operations, the OpenAPI document and route declarations."""

from __future__ import annotations

import asyncio
import datetime as dt

import msgspec
import pytest
from aiohttp import WSMsgType, web

from minicloud.api.app import create_app
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.openapi import app_specs
from minicloud.api.routing import AUTHENTICATED, PUBLIC, Action, Routes, undeclared_routes
from minicloud.compute.kinds import KEYPAIR, KeyPairSpec
from minicloud.core.context import Context
from minicloud.iam import apikeys
from minicloud.state import Create, Txn, Update
from tests.conftest import make_ssh_key
from tests.unit.api.conftest import FakeHost, make_config, start_api
from tests.unit.api.test_conventions import problem

# -- authentication ------------------------------------------------------------------------------------------------


async def test_anonymous_requests_to_protected_routes_get_401_with_a_challenge(api):
    resp = await api.get("/v1/keypairs", anon=True)
    p = await problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in p["detail"]


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer nonsense", "Bearer mc_abc.def"])
async def test_malformed_or_unknown_credentials_get_401(api, header):
    await problem(await api.get("/v1/keypairs", headers={"Authorization": header}), 401)


async def test_public_routes_need_no_credentials(api):
    for path in ("/healthz", "/readyz", "/v1/version", "/v1/ca", "/v1/openapi.json"):
        assert (await api.get(path, anon=True)).status == 200, path


async def test_a_tampered_key_is_refused(api):
    tampered = api.token[:-2] + ("AA" if not api.token.endswith("AA") else "BB")
    await problem(await api.get("/v1/keypairs", headers={"Authorization": f"Bearer {tampered}"}), 401)


async def test_expired_and_revoked_keys_are_refused(api):
    store = api.app[STORE]
    record, token = apikeys.new_key("default", "short", "", 60, {})
    await store.commit(Txn([Create(record)]))
    auth = {"Authorization": f"Bearer {token}"}
    assert (await api.get("/v1/keypairs", headers=auth)).status == 200
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    current = await store.get("apikey", record.id)
    await store.commit(Txn([Update(msgspec.structs.replace(current, spec={**current.spec, "expires_at": past}))]))
    p = await problem(await api.get("/v1/keypairs", headers=auth), 401)
    assert "expired" in p["detail"]
    assert (await api.delete(f"/v1/apikeys/{record.id}")).status == 204
    p = await problem(await api.get("/v1/keypairs", headers=auth), 401)
    assert "revoked" in p["detail"]


async def test_api_key_secrets_are_shown_once_and_never_listed(api):
    created = await (await api.post("/v1/apikeys", json={"name": "ci"})).json()
    assert created["secret"].startswith("mc_")
    shown = await (await api.get("/v1/apikeys/ci")).text()
    listed = await (await api.get("/v1/apikeys")).text()
    secret_part = created["secret"].split(".", 1)[1]
    assert secret_part not in shown and secret_part not in listed and "hash" not in listed
    assert (await api.get("/v1/keypairs", headers={"Authorization": f"Bearer {created['secret']}"})).status == 200


# -- route declarations and OpenAPI -------------------------------------------------------------------------------


async def test_every_route_declares_its_authorisation(api):
    assert undeclared_routes(api.app) == []
    for spec in app_specs(api.app):
        assert spec.auth in (PUBLIC, AUTHENTICATED) or (
            isinstance(spec.auth, Action) and spec.auth.name.count(":") >= 1
        )


async def test_a_route_added_without_a_declaration_is_detected(tmp_path):
    app = create_app(make_config(tmp_path), host=FakeHost())

    async def sneaky(request):
        return web.Response()

    app.router.add_get("/v1/sneaky", sneaky)
    assert undeclared_routes(app) == ["GET /v1/sneaky"]


async def test_openapi_document_lists_every_route_with_its_schemas(api):
    doc = await (await api.get("/v1/openapi.json", anon=True)).json()
    assert doc["openapi"].startswith("3.1")
    for spec in app_specs(api.app):
        op = doc["paths"][spec.path][spec.method.lower()]
        assert op["summary"]
        if isinstance(spec.auth, Action):
            assert op["x-minicloud-action"] == spec.auth.name
    create = doc["paths"]["/v1/keypairs"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    schema = doc["components"]["schemas"][ref]
    assert set(schema["required"]) == {"name", "public_key"}
    assert schema["properties"]["name"]["pattern"]
    params = {p["name"] for p in doc["paths"]["/v1/keypairs"]["get"]["parameters"]}
    assert {"limit", "cursor", "name", "label", "project"} <= params


async def test_unexpected_errors_are_500_problems_without_internals(tmp_path, caplog):
    boom = Routes("test")

    @boom.get("/v1/boom", auth=PUBLIC)
    async def explode(request):
        """Fail."""
        raise ZeroDivisionError("secret internals")

    a = await start_api(make_config(tmp_path), extra_routes=[boom])
    try:
        resp = await a.get("/v1/boom")
        p = await problem(resp, 500)
        assert "secret internals" not in await resp.text()
        assert p["request_id"] in p["detail"]
        assert any(getattr(r, "request_id", None) == p["request_id"] for r in caplog.records)
    finally:
        await a.client.close()


# -- events --------------------------------------------------------------------------------------------------------


async def _next_event(ws, seconds=5):
    msg = await asyncio.wait_for(ws.receive(), seconds)
    assert msg.type == WSMsgType.TEXT, msg
    return msg.json()


async def test_events_stream_live_changes(api):
    ws = await api.ws("/v1/events?kind=keypair")
    await api.post("/v1/keypairs", json={"name": "live", "public_key": make_ssh_key()})
    await api.delete("/v1/keypairs/live")
    created, deleted = await _next_event(ws), await _next_event(ws)
    assert (created["type"], created["kind"], created["object"]["name"]) == ("created", "keypair", "live")
    assert deleted["type"] == "deleted" and deleted["revision"] > created["revision"]
    await ws.close()


async def test_events_resume_from_a_revision_without_gaps_or_duplicates(api):
    for i in range(5):
        await api.post("/v1/keypairs", json={"name": f"e{i}", "public_key": make_ssh_key()})
    ws = await api.ws("/v1/events?since=0&kind=keypair")
    replayed = [await _next_event(ws) for _ in range(5)]
    await api.post("/v1/keypairs", json={"name": "after", "public_key": make_ssh_key()})
    live = await _next_event(ws)
    revisions = [e["revision"] for e in replayed] + [live["revision"]]
    assert revisions == sorted(set(revisions))
    assert [e["object"]["name"] for e in replayed] == [f"e{i}" for i in range(5)]
    assert live["object"]["name"] == "after"
    await ws.close()


async def test_every_change_of_a_live_multi_record_transaction_is_streamed(api):
    # One transaction writes several records with one revision: a live watcher gets each of them, not the first only.
    ws = await api.ws("/v1/events?kind=keypair")
    store = api.app[STORE]
    ctx = Context.system("test")
    objs = [
        KEYPAIR.new(
            project="default",
            name=f"txn{i}",
            spec=KeyPairSpec(type="ssh-ed25519", fingerprint=f"SHA256:{i}", public_key="ssh-ed25519 AAAA"),
            stamp=ctx.clock(),
        )
        for i in range(3)
    ]
    await store.commit(Txn([Create(KEYPAIR.dump(o)) for o in objs]))
    seen = [await _next_event(ws) for _ in range(3)]
    assert sorted(e["object"]["name"] for e in seen) == ["txn0", "txn1", "txn2"]
    assert len({e["revision"] for e in seen}) == 1
    await ws.close()


async def test_events_never_carry_internal_records(api):
    ws = await api.ws("/v1/events?since=0")
    await api.post("/v1/apikeys", json={"name": "hidden"}, headers={"Idempotency-Key": "x"})
    seen = []
    while not seen or seen[-1]["object"].get("name") != "hidden":
        seen.append(await _next_event(ws))
    # The store also wrote audit entries and an idempotency record: neither kind is ever streamed.
    assert {e["kind"] for e in seen} <= {"user", "rolebinding", "apikey"}
    assert all("hash" not in str(e) and "secret" not in e["object"] for e in seen)
    await ws.close()


async def test_events_from_compacted_history_say_so(tmp_path):
    a = await start_api(make_config(tmp_path, retain_changes=1000))
    try:
        store = a.app[STORE]
        store.local.retain_changes = 2
        for i in range(6):
            await a.post("/v1/keypairs", json={"name": f"c{i}", "public_key": make_ssh_key()})
        await store.compact()
        ws = await a.ws("/v1/events?since=1")
        msg = await _next_event(ws)
        assert msg["type"] == "error" and msg["problem"]["status"] == 410
        closing = await ws.receive()
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED) and ws.close_code == 4410
    finally:
        await a.client.close()


async def test_every_public_kind_is_streamed_rendered_and_internal_kinds_never(api):
    """One change of each kind the API exposes shows up in the stream, rendered by its view (declared kinds through
    :mod:`minicloud.core.kinds`); internal kinds (audit, idempotency, node, jointoken) never do."""
    from minicloud.api import resources as res
    from minicloud.cluster.kinds import JOINTOKEN, NODE, JoinTokenSpec, NodeSpec
    from minicloud.core.kinds import public_kinds

    ws = await api.ws("/v1/events?since=0")
    store = api.app[STORE]
    node = NODE.new(project="", name="n9", spec=NodeSpec(address="10.0.0.9"))
    token = JOINTOKEN.new(
        project="",
        id="jt-x",
        name="jt-x",
        spec=JoinTokenSpec(token_id="jt-x", node="n9", secret_sha256="0" * 64, issued_at="t", expires_at="t"),
    )
    await store.commit(Txn([Create(NODE.dump(node)), Create(JOINTOKEN.dump(token))]))
    kernel = api.app[CONFIG].data_path / "import" / "vmlinuz"
    kernel.parent.mkdir(parents=True, exist_ok=True)
    kernel.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    steps = [
        ("POST", "/v1/keypairs", {"name": "k", "public_key": make_ssh_key()}),
        ("POST", "/v1/instance-types", {"name": "t1", "vcpus": 1, "memory_mib": 128, "disk_gib": 1}),
        ("POST", "/v1/users", {"name": "eve"}),
        ("POST", "/v1/rolebindings", {"role": "member", "principal": "user:eve", "scope_project": "default"}),
        ("POST", "/v1/apikeys", {"name": "k", "user": "eve"}),
        ("POST", "/v1/accesskeys", {"name": "s3", "user": "eve"}),
        ("POST", "/v1/projects", {"name": "p9"}),
        ("POST", "/v1/images", {"name": "guest", "kernel": str(kernel)}),
        ("POST", "/v1/server-groups", {"name": "apart", "policy": "anti-affinity"}),
        ("POST", "/v1/instances", {"name": "vm", "image": "guest", "type": "m1.tiny", "server_group": "apart"}),
        ("POST", "/v1/networks", {"name": "vpc", "cidr": "10.0.0.0/16"}),  # + the default security group
        ("POST", "/v1/subnets", {"name": "sn", "network": "vpc", "cidr": "10.0.1.0/24"}),
        ("POST", "/v1/routers", {"name": "r"}),
        (
            "POST",
            "/v1/networks",
            {"name": "lan", "cidr": "192.0.2.0/24", "external": True, "provider": "lan", "gateway": "192.0.2.1"},
        ),
        ("POST", "/v1/floating-ips", {"network": "lan"}),
        ("POST", "/v1/admin/backups", None),  # an operation
        ("POST", "/v1/storage/enable", {"node": "n9", "no_disk": True}),  # + the ceph pool
        ("POST", "/v1/storage/disks", {"node": "n9", "device": "/dev/vdb"}),
        ("POST", "/v1/volumes", {"name": "vol", "size_gib": 1}),
        ("POST", "/v1/buckets", {"name": "bkt"}),
    ]
    for i, (method, path, body) in enumerate(steps):
        resp = await api.request(method, path, json=body, headers={"Idempotency-Key": f"{path}#{i}"})
        assert resp.status in (201, 202), (path, await resp.text())
    resp = await api.request("PUT", "/v1/cluster/settings/scheduler-weigher", json={"value": "pack"})
    assert resp.status == 200, await resp.text()  # a cluster setting (streamed to cluster administrators)
    # A snapshot through the API needs its volume made by the node first: the record alone is enough here.
    from minicloud.storage.kinds import SNAPSHOT, SnapshotSpec

    snap = SNAPSHOT.new(project="default", name="snap", spec=SnapshotSpec(volume="vol-x", deleted=True))
    await store.commit(Txn([Create(SNAPSHOT.dump(snap))]))
    # An alarm's create checks its query with the TSDB, which this API has none of: the record alone is enough here.
    from minicloud.observe.kinds import ALARM, AlarmSpec

    alarm = ALARM.new(project="default", name="hot", spec=AlarmSpec(comparison=">", threshold=1.0, query="up"))
    await store.commit(Txn([Create(ALARM.dump(alarm))]))
    # Backups, their targets and schedules are made by nodes and checked against S3: the records alone are enough.
    from minicloud.storage.backup_kinds import (
        BACKUP_SCHEDULE,
        BACKUP_TARGET,
        VOLUME_BACKUP,
        BackupScheduleSpec,
        BackupTargetSpec,
        VolumeBackupSpec,
    )

    backup_objs = [
        VOLUME_BACKUP.new(project="default", name="b1", spec=VolumeBackupSpec(volume="vol-x", bucket="bkt")),
        BACKUP_TARGET.new(
            project="default",
            name="site2",
            spec=BackupTargetSpec(endpoint="https://s3.example.org", access_key="AK", secret="v1.sealed"),
        ),
        BACKUP_SCHEDULE.new(
            project="default",
            name="nightly",
            spec=BackupScheduleSpec(volume="vol-x", bucket="bkt", every_seconds=86400, keep=7),
        ),
    ]
    await store.commit(
        Txn(
            [
                Create(k.dump(o))
                for k, o in zip((VOLUME_BACKUP, BACKUP_TARGET, BACKUP_SCHEDULE), backup_objs, strict=True)
            ]
        )
    )
    # A node publishes its GPUs itself: through the service it calls.
    from minicloud.gpu import service as gpu_service
    from minicloud.gpu.kinds import GpuSpec

    await gpu_service.publish(
        store, "n9", [GpuSpec(node="n9", pci_address="0000:3b:00.0", pci_id="10de:2330", model="H100")]
    )
    # Every kind the API exposes: declared public kinds, and any still registered only the old way (none should be).
    exposed = set(public_kinds()) | set(getattr(res, "KINDS", {}))
    seen: dict[str, dict] = {}
    while missing := exposed - seen.keys():
        try:
            e = await _next_event(ws, 10)
        except TimeoutError:
            raise AssertionError(f"no change of {sorted(missing)} was streamed") from None
        seen.setdefault(e["kind"], e["object"])
    assert {"audit", "idempotency", "node", "jointoken", "session"}.isdisjoint(seen)
    for kind, obj in seen.items():
        assert obj.get("id") or obj.get("name"), (kind, obj)  # rendered by the kind's view, not a raw record
        assert "spec" not in obj and "hash" not in str(obj) and "secret" not in obj, (kind, obj)
    await ws.close()


async def test_events_reject_unknown_kinds(api):
    p = await problem(await api.get("/v1/events?kind=nope"), 422)
    assert "keypair" in p["detail"]


# -- operations ----------------------------------------------------------------------------------------------------


async def test_backup_runs_as_an_operation_that_can_be_waited_on(api):
    resp = await api.post("/v1/admin/backups")
    assert resp.status == 202
    op = await resp.json()
    assert op["state"] in ("running", "succeeded") and resp.headers["Location"] == f"/v1/operations/{op['id']}"
    done = await (await api.get(f"/v1/operations/{op['id']}?wait=10")).json()
    assert done["state"] == "succeeded", done
    assert done["result"]["sha256"] and done["result"]["revision"] >= 1
    file = await api.get(f"/v1/admin/backups/{done['result']['name']}")
    assert file.status == 200 and (await file.read()).startswith(b"SQLite format 3")
    await problem(await api.get("/v1/admin/backups/..%2Fstate.db"), 404)
    listed = await (await api.get("/v1/operations?state=succeeded")).json()
    assert [o["id"] for o in listed["items"]] == [op["id"]]
    assert (await api.delete(f"/v1/operations/{op['id']}")).status == 204


async def test_operation_wait_is_bounded(api):
    p = await problem(await api.get("/v1/operations/op-x?wait=100000"), 422)
    assert p["invalid_params"][0]["name"] == "wait"


async def test_cluster_administrators_see_cluster_level_changes(api):
    ws = await api.ws("/v1/events?kind=user,project")
    await api.post("/v1/users", json={"name": "newbie"})
    await api.post("/v1/projects", json={"name": "newproj"})
    first, second = await _next_event(ws), await _next_event(ws)
    assert (first["kind"], first["object"]["name"]) == ("user", "newbie")
    assert (second["kind"], second["object"]["name"]) == ("project", "newproj")
    assert "password_hash" not in str(first)
    await ws.close()
