"""Issue #14's command lines run exactly as the issue writes them, through the real CLI parser, the SDK and the API
on a Unix socket (an empty ledger: what is checked is that each line is accepted and answers in its documented
shape)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shlex

from aiohttp import web

from minicloud.api.app import create_app
from minicloud.cli.main import main
from tests.unit.api.conftest import make_config


async def test_the_issue_lines_run_through_the_real_cli(tmp_path):
    runner = web.AppRunner(create_app(make_config(tmp_path)))
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()

    def run(line: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--socket", sock, *shlex.split(line)[1:]])
        return code, out.getvalue()

    try:
        report = await asyncio.to_thread(run, "minicloud cost report --group-by service --since 30d --granularity day")
        focus = await asyncio.to_thread(run, "minicloud cost export --format focus --period 2026-11")
        recs = await asyncio.to_thread(run, "minicloud cost recommendations")
        policy = await asyncio.to_thread(run, "minicloud policy create auto-stop --selector label:env=dev --idle 2h")
        shown = await asyncio.to_thread(run, "minicloud -o json policy list")
    finally:
        await runner.cleanup()
    assert report[0] == 0, report
    assert focus[0] == 0, focus
    header = focus[1].splitlines()[0].split(",")
    assert {"BilledCost", "BillingPeriodStart", "ChargeCategory", "ServiceName"} <= set(header), header
    assert recs[0] == 0, recs
    assert policy[0] == 0, policy
    [made] = json.loads(shown[1])
    assert (made["type"], made["selector"], made["idle"], made["dry_run"]) == ("auto-stop", {"env": "dev"}, 7200, False)
