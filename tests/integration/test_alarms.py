"""Alarms end to end: a real agent with its own VictoriaMetrics evaluates an alarm on a series this test pushes into
that TSDB, and sends webhooks to an aiohttp receiver on 127.0.0.1 (allowed by ``alarms.webhook_allow``) that checks
the HMAC and counts deliveries. OK → ALARM → OK gives one signed delivery per transition; a receiver that fails gets
the retries, and then the failure shows in ``alarm show`` and ``alarm history``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from minicloud.observe.alarms import verify
from minicloud.observe.query import basic_auth
from tests.integration.conftest import Agent, wait_until

pytestmark = pytest.mark.slow

CONFIG = """[compute]
driver = "none"
[metrics]
tsdb = "on"
scrape_interval = 1.0
[alarms]
interval = 1.0
webhook_allow = ["127.0.0.1/32"]
webhook_attempts = 3
webhook_backoff = 0.5
webhook_backoff_max = 1.0
"""


class Receiver:
    """An aiohttp server on 127.0.0.1 in its own thread: ``/ok`` answers 204, ``/fail`` 500; every request is kept."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def hook(request: web.Request) -> web.Response:
            self.got.append((request.path, dict(request.headers), await request.read()))
            return web.Response(status=204 if request.path == "/ok" else 500)

        app = web.Application()
        app.router.add_post("/ok", hook)
        app.router.add_post("/fail", hook)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.runner = runner
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def on(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b in list(self.got) if p == path]


class Pusher:
    """Writes ``alarm_probe{project_id="prj-default"} <value>`` into the agent's own TSDB every 0.25 s (as if a
    scrape had collected it). The TSDB's address and password are the agent's: read from its process, as root can."""

    def __init__(self, data_dir: Path) -> None:
        pid = int((data_dir / "metrics" / "tsdb.pid").read_text().split()[0])
        env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
        args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        listen = next(a.split("=", 1)[1] for a in args if a.startswith("-httpListenAddr="))
        self.url = f"http://{listen}/api/v1/import/prometheus"
        self.auth = basic_auth("minicloud", env["httpAuth_password"])
        self.value = 1.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            line = f'alarm_probe{{project_id="prj-default",project="default"}} {self.value} {int(time.time() * 1000)}\n'
            request = urllib.request.Request(self.url, data=line.encode(), method="POST")
            request.add_header("Authorization", self.auth)
            try:
                with urllib.request.urlopen(request, timeout=5):
                    pass
            except OSError:
                pass
            self.stop.wait(0.25)


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "node"
    root.mkdir()
    (root / "minicloud.toml").write_text(CONFIG)
    agent = Agent(root).start()
    wait_until("the agent's TSDB", lambda: (agent.data_dir / "metrics" / "tsdb.pid").exists(), timeout=60)
    receiver = Receiver()
    pusher = Pusher(agent.data_dir)
    yield agent, receiver, pusher
    pusher.stop.set()
    receiver.close()
    agent.stop()


def _alarm(agent: Agent, name: str) -> dict:
    return agent.json("alarm", "show", name)  # type: ignore[return-value]


# The alarms below ignore missing data: a series pushed by hand (not scraped) can have a gap of a second while the
# TSDB makes it searchable, which `missing` would rightly report as INSUFFICIENT_DATA; these tests are about the
# transitions the values make (each treatment has its unit test).


def test_an_alarm_goes_ok_alarm_ok_with_one_signed_webhook_per_transition(setup):
    agent, receiver, pusher = setup
    created = agent.json(
        "alarm", "create", "probe-high", "--metric", "alarm_probe", "--statistic", "max", "--period", "5",
        "--comparison", "gt", "--threshold", "50", "--missing-data", "ignore", "--webhook", f"http://127.0.0.1:{receiver.port}/ok",
    )  # fmt: skip
    assert created["state"] == "INSUFFICIENT_DATA"  # type: ignore[index]
    secret = created["webhook_secret"].encode()  # type: ignore[index]
    wait_until("OK", lambda: _alarm(agent, "probe-high")["state"] == "OK", timeout=90)
    pusher.value = 100.0
    wait_until("ALARM", lambda: _alarm(agent, "probe-high")["state"] == "ALARM", timeout=90)
    pusher.value = 1.0
    wait_until("OK again", lambda: _alarm(agent, "probe-high")["state"] == "OK", timeout=90)
    wait_until("three deliveries", lambda: len(receiver.on("/ok")) >= 3, timeout=30)
    deliveries = receiver.on("/ok")
    assert [json.loads(b)["to"] for _, b in deliveries] == ["OK", "ALARM", "OK"]
    for headers, body in deliveries:
        assert verify(secret, body, headers["X-Minicloud-Signature"])
        assert headers["X-Minicloud-Delivery"] == json.loads(body)["delivery_id"]
    assert len({h["X-Minicloud-Delivery"] for h, _ in deliveries}) == 3
    shown = _alarm(agent, "probe-high")
    assert "webhook_secret" not in shown
    assert [(n["state"], n["attempts"]) for n in shown["notifications"]] == [("delivered", 1)]
    history = agent.json("alarm", "history", "probe-high")
    states = [h["to_state"] for h in history if h["type"] == "state"]  # type: ignore[index, union-attr]
    assert states == ["OK", "ALARM", "OK"]  # newest first
    table = agent.cli("alarm", "history", "probe-high", check=True).stdout
    assert "ALARM -> OK" in table and "delivered to http://127.0.0.1" in table


def test_a_failing_receiver_gets_retries_then_the_failure_is_visible(setup):
    agent, receiver, pusher = setup
    pusher.value = 100.0
    agent.cli(
        "alarm", "create", "probe-fail", "--metric", "alarm_probe", "--statistic", "max", "--period", "5",
        "--comparison", "gt", "--threshold", "50", "--missing-data", "ignore", "--webhook", f"http://127.0.0.1:{receiver.port}/fail",
        "--on", "ALARM", check=True,
    )  # fmt: skip

    def failed() -> dict | None:
        notes = _alarm(agent, "probe-fail")["notifications"]
        return notes[0] if notes and notes[0]["state"] == "failed" else None

    note = wait_until("the notification to fail", failed, timeout=90)
    assert note["attempts"] == 3 and note["last_error"] == "HTTP 500"
    attempts = receiver.on("/fail")
    assert len(attempts) == 3
    assert [h["X-Minicloud-Attempt"] for h, _ in attempts] == ["1", "2", "3"]
    assert len({h["X-Minicloud-Delivery"] for h, _ in attempts}) == 1
    history = agent.json("alarm", "history", "probe-fail")
    outcomes = [h["outcome"] for h in history if h["type"] == "delivery"]  # type: ignore[index, union-attr]
    assert outcomes == ["failed", "retrying", "retrying"]
