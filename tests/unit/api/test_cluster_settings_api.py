"""``/v1/cluster/settings`` over HTTP on one node with the fake hypervisor: the node-config fallback, a set that the
next instance create's placement follows, ETag/If-Match, problem+json for bad input, unset, and a project member
refused (403: cluster administration, deny by default). The SDK and the CLI go through the same routes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

from aiohttp import web

from minicloud.api.app import create_app
from minicloud.api.keys import CONFIG, STORE
from minicloud.cli.main import main
from minicloud.compute.kinds import HYPERVISOR
from minicloud.iam import apikeys
from minicloud.state import Create, Txn
from tests.unit.api.conftest import FakeHost, make_config


async def _published(api) -> None:
    for _ in range(200):
        if await api.app[STORE].get_by_name(HYPERVISOR.name, "", "n1") is not None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the node never published its capacity")


async def _member(api) -> dict[str, str]:
    mia = await (await api.post("/v1/users", json={"name": "mia"})).json()
    grant = {"role": "owner", "principal": "user:mia", "scope_project": "default"}
    assert (await api.post("/v1/rolebindings", json=grant)).status == 201
    record, token = apikeys.new_key("default", "mia-key", "", None, {}, principal=f"user:{mia['id']}")
    await api.app[STORE].commit(Txn([Create(record)]))
    return {"Authorization": f"Bearer {token}"}


async def test_a_cluster_setting_over_http_changes_placement(api):
    assert api.app[CONFIG].compute.scheduler_weigher == "spread"
    [shown] = await (await api.get("/v1/cluster/settings")).json()
    assert (shown["name"], shown["value"], shown["source"]) == ("scheduler-weigher", "spread", "node-config")
    resp = await api.request("PUT", "/v1/cluster/settings/scheduler-weigher", json={"value": "pack"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert (body["value"], body["source"]) == ("pack", "cluster") and resp.headers["ETag"] == f'"{body["revision"]}"'
    # the next create is weighed by the cluster's setting, not this node's configuration (spread)
    d = api.app[CONFIG].data_path / "import"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vmlinuz").write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    assert (await api.post("/v1/images", json={"name": "guest", "kernel": str(d / "vmlinuz")})).status == 201
    await _published(api)
    resp = await api.post("/v1/instances", json={"name": "vm1", "image": "guest", "type": "m1.tiny"})
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["status"]["placement"].startswith("pack: ")
    # If-Match: a stale revision is refused, the current one accepted
    stale = await api.request(
        "PUT", "/v1/cluster/settings/scheduler-weigher", json={"value": "spread"}, headers={"If-Match": '"1"'}
    )
    assert stale.status == 412 and stale.headers["Content-Type"].startswith("application/problem+json")
    ok = await api.request(
        "PUT",
        "/v1/cluster/settings/scheduler-weigher",
        json={"value": "spread"},
        headers={"If-Match": f'"{body["revision"]}"'},
    )
    assert ok.status == 200 and (await ok.json())["value"] == "spread"
    # bad input
    resp = await api.request("PUT", "/v1/cluster/settings/scheduler-weigher", json={"value": "random"})
    problem = await resp.json()
    assert resp.status == 422 and "must be one of spread, pack" in problem["detail"], problem
    resp = await api.request("PUT", "/v1/cluster/settings/weigher", json={"value": "pack"})
    assert resp.status == 404 and "scheduler-weigher" in (await resp.json())["detail"]
    resp = await api.request("PUT", "/v1/cluster/settings/scheduler-weigher", json={"value": "pack", "x": 1})
    assert resp.status == 422
    # unset: back to this node's configuration
    assert (await api.delete("/v1/cluster/settings/scheduler-weigher")).status == 204
    shown = await (await api.get("/v1/cluster/settings/scheduler-weigher")).json()
    assert (shown["source"], shown["value"]) == ("node-config", "spread")
    assert (await api.delete("/v1/cluster/settings/scheduler-weigher")).status == 204


async def test_a_project_owner_cannot_read_or_change_cluster_settings(api):
    auth = await _member(api)
    assert (await api.client.get("/v1/cluster/settings", headers=auth)).status == 403
    assert (await api.client.get("/v1/cluster/settings/scheduler-weigher", headers=auth)).status == 403
    resp = await api.client.put("/v1/cluster/settings/scheduler-weigher", json={"value": "pack"}, headers=auth)
    assert resp.status == 403 and "cluster:settings:update" in (await resp.json())["detail"]
    assert (await api.client.delete("/v1/cluster/settings/scheduler-weigher", headers=auth)).status == 403
    [shown] = await (await api.get("/v1/cluster/settings")).json()
    assert shown["source"] == "node-config"


async def test_the_docs_cluster_setting_lines_run_through_the_cli_and_sdk(tmp_path):
    """``minicloud cluster set scheduler-weigher pack`` / ``cluster settings`` / ``cluster unset scheduler-weigher``
    exactly as docs/compute.md writes them, on root's Unix socket."""
    app = create_app(make_config(tmp_path), host=FakeHost())
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    try:

        def cli(*argv: str, output: str = "json") -> str:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["--socket", sock, "-o", output, *argv]) == 0
            return out.getvalue()

        shown = json.loads(await asyncio.to_thread(cli, "cluster", "set", "scheduler-weigher", "pack"))
        assert (shown["value"], shown["source"]) == ("pack", "cluster")
        table = await asyncio.to_thread(cli, "cluster", "settings", output="table")
        assert "scheduler-weigher" in table and "pack" in table and "cluster" in table
        said = await asyncio.to_thread(cli, "cluster", "unset", "scheduler-weigher", output="table")
        assert "compute.scheduler_weigher (spread on this one)" in said
        [listed] = json.loads(await asyncio.to_thread(cli, "cluster", "settings"))
        assert listed["source"] == "node-config"
    finally:
        await runner.cleanup()
