"""The storage API through the test client: enable/show/disks for administrators, pools readable by members,
volumes and snapshots end to end (the node's status writes done by hand), problems for bad input, idempotent
creates."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
from collections.abc import Awaitable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from minicloud.api.app import create_app
from minicloud.api.keys import STORE
from minicloud.cli.main import main
from minicloud.compute.kinds import INSTANCE
from minicloud.core.context import Context
from minicloud.iam import apikeys
from minicloud.state import Create, Txn
from minicloud.storage import volumes
from minicloud.storage.kinds import SNAPSHOT, VOLUME
from tests.unit.api.conftest import Api, FakeHost, make_config
from tests.unit.api.test_network_api import _member, _ok, _problem
from tests.unit.storage.conftest import put_instance, set_status


@pytest.fixture
async def api(tmp_path):
    """The API alone: no node services, so no reconciler answers for the node (the tests write the status a node
    would, and `storage enable` bootstraps nothing)."""
    client = TestClient(TestServer(create_app(make_config(tmp_path), host=FakeHost())))
    await client.start_server()
    record, token = apikeys.new_key("default", "test-admin", "", None, {}, principal="user:usr-admin")
    await client.server.app[STORE].commit(Txn([Create(record)]))
    yield Api(client, token)
    await client.close()


async def test_enable_show_and_disks(api):
    shown = await _ok(await api.get("/v1/storage"))
    assert (shown["enabled"], shown["state"]) == (False, "disabled")
    p = await _problem(await api.post("/v1/storage/disks", json={"device": "/dev/vdb"}), 409)
    assert "storage enable" in p["detail"]
    s = await _ok(await api.post("/v1/storage/enable", json={"file_size_bytes": 2 << 30}), 201)
    assert (s["state"], s["bootstrap_node"], s["mons"]) == ("bootstrapping", "n1", {"n1": "127.0.0.1"})
    assert [(p["name"], p["default"]) for p in s["pools"]] == [("ceph", True), ("local", False)]
    await _problem(await api.post("/v1/storage/enable", json={}), 409)
    disk = await _ok(await api.post("/v1/storage/disks", json={"device": "/dev/vdc"}), 201)
    assert [d["name"] for d in await _ok(await api.get("/v1/storage/disks"))] == sorted(
        ["n1-vdc", s["disks"][0]["name"]]
    )
    gone = await _ok(await api.delete(f"/v1/storage/disks/{disk['name']}"))
    assert gone["state"] == "draining"
    await _problem(await api.post("/v1/storage/disks", json={"file_size_bytes": 1 << 20}), 422)  # under 1 GiB
    await _problem(await api.post("/v1/storage/disks", json={"device": "sdb"}), 422)


async def test_members_read_pools_but_do_not_administer_storage(api):
    member = await _member(api)
    await _ok(await api.post("/v1/pools", json={"name": "scratch", "driver": "local"}), 201)
    listed = await _ok(await api.client.get("/v1/pools?project=p1", headers=member))
    assert {p["name"] for p in listed["items"]} == {"local", "scratch"}
    await _problem(await api.client.post("/v1/storage/enable?project=p1", json={}, headers=member), 403)
    await _problem(await api.client.post("/v1/pools?project=p1", json={"name": "x", "driver": "local"},
                                         headers=member), 403)  # fmt: skip
    await _problem(await api.client.delete("/v1/pools/scratch?project=p1", headers=member), 403)
    await _ok(await api.delete("/v1/pools/scratch"), 204)


async def test_volume_and_snapshot_end_to_end(api):
    store = api.app[STORE]
    await put_instance(store, "web")
    v = await _ok(await api.post("/v1/volumes", json={"name": "data", "size_gib": 2, "labels": {"a": "b"}}), 201)
    assert (v["pool"], v["status"]["state"], v["node"]) == ("local", "creating", "n1")
    await set_status(store, VOLUME, v["id"], state="available", size_gib=2)
    a = await _ok(await api.post("/v1/volumes/data/attach", json={"instance": "web"}))
    assert (a["attachment"]["device"], a["attachment"]["instance_name"]) == ("vdb", "web")
    p = await _problem(await api.delete("/v1/volumes/data"), 409)
    assert "attached to instance 'web'" in p["detail"]
    await set_status(store, VOLUME, v["id"], state="in-use")
    grown = await _ok(await api.post("/v1/volumes/data/extend", json={"size_gib": 3}))
    assert grown["size_gib"] == 3
    await _problem(await api.post("/v1/volumes/data/extend", json={"size_gib": 1}), 422)
    p = await _problem(await api.post("/v1/volumes/data/flatten"), 409)
    assert "volume 'data' has no parent snapshot" in p["detail"]
    s = await _ok(await api.post("/v1/snapshots", json={"name": "s1", "volume": "data"}), 201)
    await set_status(store, SNAPSHOT, s["id"], state="available")
    p = await _problem(await api.post("/v1/snapshots/s1/revert"), 409)
    assert "stop the instance" in p["detail"]
    d = await _ok(await api.post("/v1/volumes/data/detach", json={}))
    assert d["attachment"] is None and d["status"]["state"] == "detaching"
    await set_status(store, VOLUME, v["id"], state="available")
    await _ok(await api.post("/v1/snapshots/s1/revert"))
    listed = await _ok(await api.get("/v1/volumes?label=a=b"))
    assert [x["name"] for x in listed["items"]] == ["data"]
    gone = await _ok(await api.delete("/v1/volumes/data"), 202)
    assert gone["status"]["state"] == "deleting"
    assert (await _ok(await api.get("/v1/snapshots/s1")))["status"]["state"] == "deleting"


async def test_bad_volume_input_is_a_problem(api):
    for body in (
        {"name": "v", "size_gib": 0},
        {"name": "v", "size_gib": -1},
        {"name": "v", "size_gib": 65537},
        {"name": "bad name", "size_gib": 1},
        {"name": "v", "size_gib": 1, "description": "x" * 2000},
        {"name": "v", "size_gib": 1, "qos": {"read_iops_sec": -5}},
        {"name": "v", "size_gib": 1, "extra": 1},
    ):
        await _problem(await api.post("/v1/volumes", json=body), 422)
    await _problem(await api.post("/v1/volumes", json={"name": "v", "size_gib": 1, "pool": "nope"}), 404)
    await _problem(await api.post("/v1/volumes/nope/attach", json={"instance": "x"}), 404)
    await _ok(await api.post("/v1/volumes", json={"name": "v", "size_gib": 1}), 201)
    await _problem(await api.post("/v1/volumes/v/attach", json={"instance": "x", "device": "vda"}), 422)
    await _ok(await api.delete("/v1/volumes/v?force=true"), 204)  # an administrator's: the record goes at once


async def test_volume_create_is_idempotent_under_a_key(api):
    key = {"Idempotency-Key": "k-1"}
    first = await _ok(await api.post("/v1/volumes", json={"name": "v", "size_gib": 1}, headers=key), 201)
    again = await api.post("/v1/volumes", json={"name": "v", "size_gib": 1}, headers=key)
    assert again.status == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert (await again.json())["id"] == first["id"]
    assert len((await _ok(await api.get("/v1/volumes")))["items"]) == 1


async def test_the_cli_nouns_through_the_sdk(tmp_path):
    """``storage``, ``storage disk``, ``pool``, ``volume`` and ``snapshot`` through the real CLI parser, the SDK and
    the API on a Unix socket."""
    app = create_app(make_config(tmp_path), host=FakeHost())
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    store = app[STORE]
    try:

        def cli(*argv: str) -> Any:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["--socket", sock, "-o", "json", *argv]) == 0
            return json.loads(out.getvalue()) if out.getvalue().strip() else {}

        def run(*argv: str) -> Awaitable[Any]:
            return asyncio.to_thread(cli, *argv)

        s = await run("storage", "enable", "--file-size", "2G")
        assert s["state"] == "bootstrapping" and s["disks"][0]["size_bytes"] == 2 << 30
        assert (await run("storage", "disk", "add", "--file", "1T"))["size_bytes"] == 1 << 40
        disks = await run("storage", "disk", "list")
        assert len(disks) == 2
        assert (await run("storage", "disk", "remove", disks[0]["name"]))["state"] == "draining"
        assert (await run("storage", "show"))["enabled"] is True
        scratch = await run("pool", "create", "scratch", "--driver", "local", "--write-iops", "300")
        assert scratch["default"] is False and scratch["qos"]["write_iops_sec"] == 300
        assert {p["name"] for p in await run("pool", "list")} == {"ceph", "local", "scratch"}
        vol = await run("volume", "create", "data", "--size", "2", "--pool", "scratch", "--read-iops", "100")
        assert (vol["pool"], vol["qos"]["read_iops_sec"], vol["qos"]["write_iops_sec"]) == ("scratch", 100, 300)
        await set_status(store, VOLUME, vol["id"], state="available")
        await put_instance(store, "web")
        assert (await run("volume", "attach", "data", "--instance", "web"))["attachment"]["device"] == "vdb"
        await set_status(store, VOLUME, vol["id"], state="in-use")
        assert (await run("volume", "extend", "data", "--size", "3"))["size_gib"] == 3
        snap = await run("snapshot", "create", "s1", "--volume", "data")
        assert [x["name"] for x in await run("snapshot", "list")] == ["s1"]
        await run("volume", "detach", "data", "--force")
        await set_status(store, VOLUME, vol["id"], state="available")
        await set_status(store, SNAPSHOT, snap["id"], state="available")
        assert (await run("snapshot", "revert", "s1"))["name"] == "data"
        await run("snapshot", "delete", "s1")
        # a root-disk snapshot: created with --instance, reverted while the instance is stopped (answers the snapshot)
        await put_instance(store, "db", pool="pool-ceph", pool_driver="ceph", power="stopped")
        root = await run("snapshot", "create", "r1", "--instance", "db")
        assert (root["instance"], root["volume"]) == ("db", "")
        await set_status(store, SNAPSHOT, root["id"], state="available")
        await set_status(store, INSTANCE, root["instance_id"], state="stopped")
        assert (await run("snapshot", "revert", "r1"))["instance"] == "db"
        await run("snapshot", "delete", "r1")
        assert (await run("volume", "delete", "data"))["status"]["state"] == "deleting"
        await run("volume", "delete", "data", "--force")
        assert await run("volume", "list") == []
    finally:
        await runner.cleanup()


async def test_flatten_through_the_api_and_the_cli(tmp_path):
    """``volume flatten NAME --wait`` through the real CLI parser, the SDK and the API on a Unix socket (the node's
    part done by hand: the service it calls), then the snapshot deletes; a blank volume is a 409 problem naming
    why."""
    app = create_app(make_config(tmp_path), host=FakeHost())
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    store = app[STORE]

    def cli(*argv: str) -> tuple[int, Any, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["--socket", sock, "-o", "json", *argv])
        return rc, json.loads(out.getvalue()) if out.getvalue().strip() else {}, err.getvalue()

    try:
        _, src, _ = await asyncio.to_thread(cli, "volume", "create", "src", "--size", "1")
        await set_status(store, VOLUME, src["id"], state="available")
        _, snap, _ = await asyncio.to_thread(cli, "snapshot", "create", "s1", "--volume", "src")
        await set_status(store, SNAPSHOT, snap["id"], state="available")
        _, clone, _ = await asyncio.to_thread(cli, "volume", "create", "copy", "--size", "1", "--snapshot", "s1")
        await set_status(store, VOLUME, clone["id"], state="available")
        rc, _, err = await asyncio.to_thread(cli, "volume", "flatten", "src")
        assert rc != 0 and "has no parent snapshot" in err, err
        rc, _, err = await asyncio.to_thread(cli, "snapshot", "delete", "s1")
        assert rc != 0 and "`minicloud volume flatten copy`" in err, err
        waiting = asyncio.create_task(asyncio.to_thread(cli, "volume", "flatten", "copy", "--wait", "--timeout", "60"))
        ctx = Context.system("storage@n1", action="storage:volumes")
        for _ in range(1200):  # the node's step, once the flag is there
            if await volumes.flattened(ctx, store, clone["id"]):
                break
            await asyncio.sleep(0.05)
        rc, flat, _ = await waiting
        assert rc == 0 and (flat["status"]["flattened"], flat["status"]["flattening"]) == (True, False)
        assert (await asyncio.to_thread(cli, "snapshot", "delete", "s1"))[0] == 0
    finally:
        await runner.cleanup()


def test_sizes_parse_in_binary_units():
    from minicloud.cli.storage import parse_size

    assert parse_size("10G") == parse_size("10GiB") == parse_size("10") == 10 << 30
    assert parse_size("500M") == 500 << 20 and parse_size("1t") == 1 << 40
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("ten")
