"""Metrics of a real guest end to end: a real agent (libvirt, TCG) whose own VictoriaMetrics scrapes it every second;
a running guest's CPU series rises, ``metrics show instance`` and ``top`` print it, and once the guest is stopped its usage
series stop (only its state is reported, as shut off)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import Agent, compute_config, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def metrics_agent(tmp_path, guest_image: Path):
    root = tmp_path / "node"
    root.mkdir()
    (root / "minicloud.toml").write_text(compute_config(root) + "[metrics]\nscrape_interval = 1.0\n")
    agent = Agent(root, compute=True)
    (root / "guest").mkdir()
    for f in ("vmlinuz", "initrd.img"):
        shutil.copy(guest_image / f, root / "guest" / f)
    agent.start()
    agent.cli(
        "image", "import", "guest", "--kernel", str(root / "guest/vmlinuz"), "--initrd", str(root / "guest/initrd.img"),
        check=True,
    )  # fmt: skip
    yield agent
    if agent.proc and agent.proc.poll() is None:
        agent.stop()
    agent.teardown_compute()


def _query(agent: Agent, promql: str) -> list[dict]:
    out = agent.cli("-o", "json", "metrics", "query", promql)
    return json.loads(out.stdout)["result"] if out.returncode == 0 else []


def test_a_running_guests_cpu_series_rises_and_a_stopped_guests_series_stop(metrics_agent: Agent):
    a = metrics_agent
    inst = a.json("instance", "create", "busy", "--image", "guest", "--type", "m1.tiny", "--wait")
    selector = f'{{instance_id="{inst["id"]}"}}'

    def cpu() -> float | None:
        found = _query(a, f"minicloud_instance_cpu_seconds_total{selector}")
        return float(found[0]["value"][1]) if found else None

    first = wait_until("the guest's CPU series", cpu, timeout=120)
    wait_until("the guest's CPU time to rise", lambda: (cpu() or 0) > first, timeout=120)
    series = _query(a, f"minicloud_instance_cpu_seconds_total{selector}")[0]["metric"]
    assert (series["name"], series["project"], series["project_id"]) == ("busy", "default", "prj-default")
    assert series["node"] == a.info["node"]

    def table() -> str | None:
        shown = a.cli("metrics", "show", "instance", "busy", "--since", "5m", check=True).stdout
        return shown if shown.startswith("TIME") else None  # a rate needs two scrapes inside a row's window

    shown = wait_until("a row in `metrics show instance`", table, timeout=120)
    assert "CPU %" in shown.splitlines()[0]

    def top() -> dict | None:  # `minicloud top`: the guest's row, once its CPU rate has two scrapes in the window
        rows = json.loads(a.cli("-o", "json", "top", "--window", "30s", check=True).stdout)
        row = next((r for r in rows if r["instance_id"] == inst["id"]), None)
        return row if row is not None and "cpu %" in row else None

    row = wait_until("the guest's row in `minicloud top`", top, timeout=120)
    assert (row["name"], row["state"], row["node"]) == ("busy", "running", a.info["node"])
    assert row["cpu %"] >= 0 and row["mem MiB"] > 0
    assert "busy" in a.cli("top", "--once", check=True).stdout

    a.cli("instance", "stop", "busy", "--wait", check=True)
    wait_until(
        "the state series to say shut off",
        lambda: _query(a, f'minicloud_instance_state{{instance_id="{inst["id"]}",state="shutoff"}} == 1'),
        timeout=120,
    )
    wait_until(
        "the CPU series to stop", lambda: not _query(a, f"minicloud_instance_cpu_seconds_total{selector}"), timeout=120
    )
