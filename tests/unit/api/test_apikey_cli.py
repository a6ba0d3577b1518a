"""``minicloud -o json apikey create --user U`` without a name (issue 9 §3): through the real CLI parser, the SDK
and the API served on a Unix socket (root's transport)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

from aiohttp import web

from minicloud.api.app import create_app
from minicloud.cli.main import main
from tests.unit.api.conftest import FakeHost, make_config


async def test_apikey_create_without_a_name_prints_json_with_the_one_time_secret(tmp_path):
    app = create_app(make_config(tmp_path), host=FakeHost())
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    try:

        def cli(*argv: str) -> dict:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["--socket", sock, "-o", "json", *argv]) == 0
            return json.loads(out.getvalue())

        bob = await asyncio.to_thread(cli, "user", "create", "bob", "--service")
        key = await asyncio.to_thread(cli, "apikey", "create", "--user", "bob")
        assert key["secret"].startswith("mc_") and key["principal"] == f"serviceaccount:{bob['id']}"
        assert key["name"].startswith("bob-") and len(key["name"]) > len("bob-")
        named = await asyncio.to_thread(cli, "apikey", "create", "ci", "--user", "bob")
        assert named["name"] == "ci" and named["secret"].startswith("mc_")
    finally:
        await runner.cleanup()
