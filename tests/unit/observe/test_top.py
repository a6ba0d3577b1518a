"""``minicloud top`` through the real CLI parser, the SDK and the API on a Unix socket, answered by a real
VictoriaMetrics: one row per instance of the caller's project (another project's never shows), the figures from
one instant query per column, ``--node`` keeps one node's instances, ``--sort`` orders them, ``--cluster`` (an
administrator) sees every project; and the pure row builder."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from typing import Any

from aiohttp import web

from agent.node import attach_node_services
from minicloud.api.app import create_app
from minicloud.api.metrics import QUERY
from minicloud.cli.main import main
from minicloud.cli.metrics import top_rows
from minicloud.observe.query import QueryService
from tests.unit.api.conftest import FakeHost, make_config


def _series(now: float, project: str, project_id: str, prefix: str = "i-t") -> str:
    lines = []
    for ago, k in ((120, 0), (60, 1), (0, 2)):
        ms = int((now - ago) * 1000)
        for iid, name, node, cpu, rx in ((f"{prefix}1", "web", "n1", 30.0, 1000), (f"{prefix}2", "db", "n2", 90.0, 10)):
            lab = f'instance_id="{iid}",name="{name}",project="{project}",project_id="{project_id}",node="{node}"'
            lines += [
                f'minicloud_instance_state{{{lab},state="running"}} 1 {ms}',
                f"minicloud_instance_cpu_seconds_total{{{lab}}} {cpu * 0.6 * k} {ms}",
                f"minicloud_instance_memory_bytes{{{lab}}} {512 * 1048576} {ms}",
                f'minicloud_instance_network_receive_bytes_total{{{lab},interface="tap0"}} {rx * 60 * k} {ms}',
            ]
    return "\n".join(lines) + "\n"


async def test_top_shows_the_projects_instances_with_their_usage(tmp_path, victoria):
    app = attach_node_services(create_app(make_config(tmp_path), host=FakeHost()))
    app[QUERY] = QueryService(victoria.url, auth=victoria.auth, nocache=True, clock=lambda: victoria.now)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    try:

        def cli(*argv: str) -> Any:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["--socket", sock, *argv]) == 0
            return out.getvalue()

        async def run(*argv: str) -> Any:
            return json.loads(await asyncio.to_thread(cli, "-o", "json", *argv))

        created = json.loads(await asyncio.to_thread(cli, "-o", "json", "project", "create", "topp"))
        victoria.import_text(_series(victoria.now, "topp", created["id"]))
        victoria.import_text(_series(victoria.now, "othr", "prj-othr", prefix="i-o"))

        rows = await run("--project", "topp", "top", "--window", "2m")
        assert [r["name"] for r in rows] == ["db", "web"]  # busiest first
        db = rows[0]
        assert (db["node"], db["state"], db["project"]) == ("n2", "running", "topp")
        assert round(db["cpu %"]) == 90 and db["mem MiB"] == 512 and round(db["net rx B/s"]) == 10
        assert "rss MiB" not in db  # no figure: shown as "-"
        assert [r["name"] for r in await run("--project", "topp", "top", "--sort", "net")] == ["web", "db"]
        assert [r["name"] for r in await run("--project", "topp", "top", "--node", "n1")] == ["web"]
        assert [r["name"] for r in await run("--project", "topp", "top", "--sort", "name", "--limit", "1")] == ["db"]
        # the project scope: another project's instances never show here, and do with --cluster (an administrator)
        assert {r["project"] for r in rows} == {"topp"}
        everyone = await run("top", "--cluster", "--sort", "name")
        assert {"topp", "othr"} <= {r["project"] for r in everyone}
        shown = await asyncio.to_thread(cli, "--project", "topp", "top", "--once")
        head = shown.splitlines()[0].split()
        assert head[:4] == ["NAME", "NODE", "STATE", "CPU"] and "db" in shown.splitlines()[1]
    finally:
        await runner.cleanup()


def test_rows_join_columns_on_the_instance_and_sort_largest_first():
    def s(iid: str, v: str, **labels: str) -> dict:
        return {"metric": {"instance_id": iid, **labels}, "value": [0, v]}

    state = [s("i-1", "1", name="a", project="p", node="n1", state="running"), s("i-2", "1", name="b", project="p")]
    columns = {"cpu %": [s("i-1", "5"), s("i-2", "50"), s("i-gone", "99")], "mem MiB": [s("i-1", "NaN?")]}
    rows = top_rows(state, columns, "cpu")
    assert [r["instance_id"] for r in rows] == ["i-2", "i-1"]  # a series of no named instance is left out
    assert rows[1]["cpu %"] == 5.0 and "mem MiB" not in rows[1]
    assert [r["name"] for r in top_rows(state, columns, "name")] == ["a", "b"]
