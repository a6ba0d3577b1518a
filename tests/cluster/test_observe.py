"""Observability on a real 3-node cluster (agents in their own namespaces, ``harness.py``): every voting node runs a
VictoriaMetrics that scrapes every agent; an alarm's transitions survive the services leader being SIGKILLed during
evaluation with one delivery per transition; and once that node is gone, its history and every query still answer
on the other two.

One cluster for all of it (CI time): a probe series is written into each node's own TSDB by a small pusher inside
the node's namespace (the TSDB listens on the node's loopback only), at a value the test sets in a file; the webhook
receiver runs in a node that is never killed and writes each delivery it gets to a file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from minicloud.observe.alarms import verify
from tests.cluster.harness import AgentNode, Cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RECEIVER_PORT = 18080

#: ``PUSHER DATA_DIR VALUE_FILE``: every 0.25 s, ``alarm_probe{project_id="prj-default"} <value>`` into the node's
#: TSDB (its address and password read from its process, as root can), as if a scrape had collected it.
PUSHER = r"""
import sys, time, urllib.request, base64
from pathlib import Path
data, value_file = Path(sys.argv[1]), Path(sys.argv[2])
url = auth = None
while True:
    try:
        if url is None:
            pid = int((data / "metrics" / "tsdb.pid").read_text().split()[0])
            env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
            args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            listen = next(a.split("=", 1)[1] for a in args if a.startswith("-httpListenAddr="))
            url = f"http://{listen}/api/v1/import/prometheus"
            auth = "Basic " + base64.b64encode(f"minicloud:{env['httpAuth_password']}".encode()).decode()
        value = value_file.read_text().strip()
        line = f'alarm_probe{{project_id="prj-default",project="default"}} {value} {int(time.time() * 1000)}\n'
        req = urllib.request.Request(url, data=line.encode(), method="POST")
        req.add_header("Authorization", auth)
        urllib.request.urlopen(req, timeout=5).close()
    except Exception:
        url = None
    time.sleep(0.25)
"""

#: ``TARGETS DATA_DIR``: the node's TSDB's own view of its scrape targets (``/api/v1/targets``: health, last error).
TARGETS = r"""
import base64, json, sys, urllib.request
from pathlib import Path
data = Path(sys.argv[1])
pid = int((data / "metrics" / "tsdb.pid").read_text().split()[0])
env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
listen = next(a.split("=", 1)[1] for a in args if a.startswith("-httpListenAddr="))
req = urllib.request.Request(f"http://{listen}/api/v1/targets")
req.add_header("Authorization", "Basic " + base64.b64encode(f"minicloud:{env['httpAuth_password']}".encode()).decode())
for t in json.load(urllib.request.urlopen(req, timeout=10))["data"]["activeTargets"]:
    print(t["scrapeUrl"], t["health"], t.get("lastError", ""))
"""

#: ``RECEIVER ADDRESS PORT OUT``: an HTTP server; every POST is a JSON line in OUT (path, headers, body), answered 204.
RECEIVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
address, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(out, "a") as f:
            f.write(json.dumps({"path": self.path, "headers": dict(self.headers), "body": body.decode()}) + "\n")
        self.send_response(204)
        self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer((address, port), Hook).serve_forever()
"""


def _config(cluster: Cluster) -> str:
    allow = ", ".join(f'"{n.address}/32"' for n in cluster.nodes)
    return (
        AgentNode.NO_COMPUTE
        + '[metrics]\ntsdb = "on"\nscrape_interval = 1.0\n'
        + f"[alarms]\ninterval = 1.0\nwebhook_allow = [{allow}]\nwebhook_attempts = 20\n"
        + "webhook_backoff = 0.5\nwebhook_backoff_max = 1.0\n"
    )


def _query(node: AgentNode, promql: str, *extra: str) -> list[dict]:
    out = node.cli("-o", "json", "metrics", "query", promql, "--cluster", *extra, timeout=60)
    return json.loads(out.stdout)["result"] if out.returncode == 0 else []


def _deliveries(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def test_alarms_survive_a_leader_sigkill_and_history_survives_a_lost_voter(make_cluster, tmp_path):
    cluster = make_cluster(3)
    for node in cluster.nodes:
        node.config.write_text(_config(cluster))
    cluster.start_all().form(timeout=120)
    value = tmp_path / "probe-value"
    value.write_text("1\n")
    for node in cluster.nodes:
        node.popen(sys.executable, "-c", PUSHER, str(node.data_dir), str(value))

    # every voting node's TSDB scrapes every agent (up == 1 for the three targets, asked on each node)
    targets = {f"{n.address}:{n.listen_port}" for n in cluster.nodes}

    def all_up(node: AgentNode) -> bool:
        found = _query(node, 'up{job="minicloud"} == 1')
        return {s["metric"]["instance"] for s in found} == targets

    for node in cluster.nodes:
        try:
            wait_for(
                lambda node=node: all_up(node), timeout=180, interval=1, what=f"{node.node_name} scraping all three"
            )
        except TimeoutError as exc:  # say why: what it sees, its scrape configuration and CA copy, its TSDB's log
            metrics = node.data_dir / "metrics"
            seen = node.cli("-o", "json", "metrics", "query", 'up{job="minicloud"}', "--cluster", timeout=60).stdout
            files = {p.name: p.read_text(errors="replace")[-1500:] for p in sorted(metrics.glob("*.yml"))}
            ca_same = [(p.name, p.read_bytes() == (node.data_dir / "pki" / "ca.crt").read_bytes())
                       for p in sorted(metrics.glob("ca-*.crt"))]  # fmt: skip
            tsdb_log = (metrics / "tsdb.log").read_text(errors="replace")[-2000:]
            got = node.exec(sys.executable, "-c", TARGETS, str(node.data_dir), timeout=30)
            tsdb_targets = got.stdout + got.stderr[-1000:]
            raise AssertionError(f"{exc}\nup: {seen[:2000]}\n{files}\nCA copies: {ca_same}\nTSDB log: {tsdb_log}\n"
                                 f"TSDB targets: {tsdb_targets}\n"
                                 f"agent log: {node.log_tail(3000)}") from None  # fmt: skip

    info = cluster.nodes[0].client(timeout=30).call("GET", "/v1/cluster")
    leader = next(n for n in cluster.nodes if n.node_name == info["leader"])
    keeper = next(n for n in cluster.nodes if n is not leader)  # never killed: runs the receiver
    received = tmp_path / "deliveries.jsonl"
    keeper.popen(sys.executable, "-c", RECEIVER, keeper.address, str(RECEIVER_PORT), str(received))
    created = keeper.json(
        "alarm", "create", "probe", "--metric", "alarm_probe", "--statistic", "max", "--period", "3",
        "--comparison", "gt", "--threshold", "50", "--missing-data", "ignore",
        "--webhook", f"http://{keeper.address}:{RECEIVER_PORT}/hook",
    )  # fmt: skip
    secret = created["webhook_secret"].encode()

    def state() -> str:
        return keeper.json("alarm", "show", "probe")["state"]

    wait_for(lambda: state() == "OK", timeout=120, interval=0.5, what="the alarm OK")
    # history from before the loss: the leader's own series, kept by every TSDB
    before = time.time()
    lost_node_series = f'minicloud_node_cpus{{node="{leader.node_name}"}}'
    wait_for(lambda: all(_query(n, lost_node_series) for n in cluster.nodes), timeout=60, what="the leader's series")

    # the leader is SIGKILLed (with its etcd and TSDB: the whole node) while it evaluates the breaching value
    value.write_text("100\n")
    time.sleep(1.5)  # a breach inside an evaluation period; whether the old leader commits it or not, one delivery
    leader.crash()
    wait_for(lambda: state() == "ALARM", timeout=180, interval=0.5, what="ALARM after the failover")
    value.write_text("1\n")
    wait_for(lambda: state() == "OK", timeout=180, interval=0.5, what="OK again")

    def transitions() -> list[str]:
        return [json.loads(d["body"])["to"] for d in _deliveries(received)]

    wait_for(lambda: transitions().count("OK") >= 2 and "ALARM" in transitions(), timeout=60, what="deliveries")
    got = _deliveries(received)
    by_id: dict[str, list[dict]] = {}
    for d in got:
        assert verify(secret, d["body"].encode(), d["headers"]["X-Minicloud-Signature"])
        by_id.setdefault(d["headers"]["X-Minicloud-Delivery"], []).append(d)
    # one delivery per transition: INSUFFICIENT_DATA -> OK, OK -> ALARM, ALARM -> OK, whoever led
    assert [json.loads(ds[0]["body"])["to"] for ds in by_id.values()] == ["OK", "ALARM", "OK"], got
    print(f"deliveries received: {len(got)} for {len(by_id)} transitions")
    history = keeper.json("alarm", "history", "probe")
    assert [h["to_state"] for h in history if h["type"] == "state"] == ["OK", "ALARM", "OK"]

    # the lost node's history and every query still answer on the other two
    survivors = [n for n in cluster.nodes if n is not leader]
    lost_target = f'up{{instance="{leader.address}:{leader.listen_port}"}} == 0'
    window = f"{int(time.time() - before) + 120}s"
    for node in survivors:
        kept = _query(node, f"count_over_time({lost_node_series}[{window}])")
        assert kept and float(kept[0]["value"][1]) > 0, (node.node_name, kept)
        wait_for(lambda node=node: _query(node, lost_target), timeout=60, what=f"{node.node_name}: the lost agent down")
        ranged = node.cli("-o", "json", "metrics", "query", "alarm_probe", "--since", "10m", "--step", "15s",
                          timeout=60)  # fmt: skip
        assert ranged.returncode == 0 and json.loads(ranged.stdout)["result"], ranged.stderr
