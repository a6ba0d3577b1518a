"""The S3 endpoint on three nodes, for real: each node an agent in its own namespace (``harness.py``), Ceph on all
three (``storage enable`` on n1, a file OSD per node; pools of three copies, one per host), and a gateway on each.

A revoked access key is refused by every node's gateway (the time each took after the API answered is printed: the
issue asks ~1 s); a volume is backed up into a bucket by its node and the state by n2 (``admin backup --bucket``,
listed from n1); then n3 is lost (every process of it SIGKILLed, its gateway, MON and OSD with it) and the gateways
of n1 and n2 still serve every object and take new ones, and the volume backup restores into a new volume. S3
clients run inside n1's namespace (the nodes' addresses are on the cluster's switch), as a small boto3 script
(:data:`CLIENT`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ceph
from tests.cluster.harness import AgentNode, Cluster, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not ceph.ceph_installed(), reason=ceph.SKIP_REASON),
]
CEPH_TIMEOUT = 420  # bootstrap, two more MONs, three OSDs, PGs clean: on a loaded two-core machine
OSD = "3G"
OBJECTS = 12

#: ``CLIENT URLS_JSON CA MODE``: boto3 against each URL with $KEY/$SECRET. ``put``/``get``: every object of the bucket
#: on every URL (retrying until each answers, 240 s at most), one JSON line per URL; ``revoked``: read ``go`` on stdin,
#: then list the buckets on every URL until each refuses the key, one JSON line with the seconds each took.
CLIENT = r"""
import json, os, sys, time
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

urls, ca, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
n = int(os.environ.get("OBJECTS", "0"))
cfg = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
             response_checksum_validation="when_required", retries={"max_attempts": 1},
             connect_timeout=5, read_timeout=20)
def client(url):
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=os.environ["KEY"],
                        aws_secret_access_key=os.environ["SECRET"], region_name="us-east-1", verify=ca, config=cfg)
def body(i):
    return (f"object {i} " * 1000).encode()
if mode == "revoked":
    clients = {u: client(u) for u in urls}
    for c in clients.values():
        c.list_buckets()
    print("ready", flush=True)
    sys.stdin.readline()
    t0, took = time.monotonic(), {}
    while len(took) < len(urls) and time.monotonic() - t0 < 60:
        for u, c in clients.items():
            if u in took:
                continue
            try:
                c.list_buckets()
            except ClientError as exc:
                if exc.response["Error"]["Code"] == "InvalidAccessKeyId":
                    took[u] = round(time.monotonic() - t0, 3)
        time.sleep(0.02)
    print(json.dumps(took), flush=True)
    sys.exit(0)
for u in urls:
    c, deadline, last = client(u), time.monotonic() + 240, None
    while True:
        try:
            for i in range(n):
                key = f"ha/{mode}-{i}" if mode == "put-new" else f"ha/{i}"
                if mode.startswith("put"):
                    c.put_object(Bucket="ha-1", Key=key, Body=body(i))
                else:
                    assert c.get_object(Bucket="ha-1", Key=key)["Body"].read() == body(i), key
            print(json.dumps({"url": u, "ok": n}), flush=True)
            break
        except (BotoCoreError, ClientError, OSError) as exc:
            last = repr(exc)
            if time.monotonic() > deadline:
                print(json.dumps({"url": u, "error": last}), flush=True)
                break
            time.sleep(1)
"""


@pytest.fixture(scope="module")
def trio(netns_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("s3"), 3) as cluster:
        for node in cluster:
            with node.config.open("a") as f:
                f.write("\n[storage]\nceph_osd_memory_target = 536870912\n")
        cluster.start_all().form()
        yield cluster


def client_run(node: AgentNode, script: Path, urls: list[str], ca: str, mode: str, key: dict) -> list[dict]:
    env = {**node.env, "KEY": key["id"], "SECRET": key["secret_access_key"], "OBJECTS": str(OBJECTS)}
    env.pop("AWS_CA_BUNDLE", None)
    done = node.exec(sys.executable, script, json.dumps(urls), ca, mode, timeout=900, env=env)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_three_gateways_refuse_a_revoked_key_and_survive_losing_a_node(trio: Cluster, tmp_path: Path):
    n1, n2, n3 = trio.nodes
    n1.cli("storage", "enable", "--file-size", OSD, check=True)
    for node in (n2, n3):
        n1.cli("storage", "disk", "add", "--node", node.node_name, "--file", OSD, check=True)

    def ready() -> dict | None:
        shown = n1.json("storage", "show")
        hosts = {o["node"] for o in shown["osds"] if o["up"] and o["in_cluster"]}
        ok = shown["state"] == "ready" and len(shown["mons"]) == 3 and hosts == {"n1", "n2", "n3"}
        return shown if ok and shown["replicas"] == 3 else None

    wait_for(ready, timeout=CEPH_TIMEOUT, interval=2, what="storage ready on three nodes")
    c = n1.client()
    ep = c.call("GET", "/v1/s3/endpoint")
    urls = ep["urls"]
    assert len(urls) == 3 and all(f"{n.address}:" in " ".join(urls) for n in trio), urls
    ca = ep["ca_path"]
    script = tmp_path / "s3client.py"
    script.write_text(CLIENT)
    key = c.call("POST", "/v1/accesskeys", json={"name": "ha"})
    bucket = c.call("POST", "/v1/buckets", json={"name": "ha-1"})
    wait_for(
        lambda: c.call("GET", f"/v1/buckets/{bucket['id']}")["status"]["state"] == "ready",
        timeout=300, interval=1, what="bucket ready",
    )  # fmt: skip

    # every node's gateway takes and serves the objects (each retried until it answers: gateways start with Ceph)
    put = client_run(n1, script, urls[:1], ca, "put", key)
    assert put == [{"url": urls[0], "ok": OBJECTS}], put
    got = client_run(n1, script, urls, ca, "get", key)
    assert all(r.get("ok") == OBJECTS for r in got) and len(got) == 3, got

    # backups on three nodes: a volume into the bucket (by the volume's node), the state from n2, listed from n1
    vol = c.call("POST", "/v1/volumes", json={"name": "ha-vol", "size_gib": 1})
    _stored(c, f"/v1/volumes/{vol['id']}", "volume available")
    backup = c.call("POST", "/v1/volume-backups", json={"volume": "ha-vol", "bucket": "ha-1", "name": "ha-full"})
    _stored(c, f"/v1/volume-backups/{backup['id']}", "volume backup stored")
    made = n2.json("admin", "backup", "--bucket", "ha-1")
    assert made["object"] == f"minicloud-backups/state/{made['name']}"
    assert [b["name"] for b in n1.json("admin", "backup", "list", "--bucket", "ha-1")] == [made["name"]]

    # a revoked key is refused by every gateway
    doomed = c.call("POST", "/v1/accesskeys", json={"name": "revoked"})
    env = {**n1.env, "KEY": doomed["id"], "SECRET": doomed["secret_access_key"]}
    probe = client_run(n1, script, urls, ca, "get", doomed)  # the new key works everywhere first
    assert all(r.get("ok") == OBJECTS for r in probe), probe
    watcher = n1.popen(sys.executable, script, json.dumps(urls), ca, "revoked", env=env, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert watcher.stdout is not None and watcher.stdin is not None
    assert watcher.stdout.readline().strip() == "ready"
    c.raw("DELETE", f"/v1/accesskeys/{doomed['id']}")
    watcher.stdin.write("go\n")
    watcher.stdin.flush()
    took = json.loads(watcher.stdout.readline())
    watcher.wait(30)
    print(f"\nrevoked key refused after (s, from the API's answer): {took}")
    assert sorted(took) == sorted(urls), took

    # n3 is lost: n1's and n2's gateways serve every object and take new ones
    n3.crash()
    left = [u for u in urls if f"//{n3.address}:" not in u]
    assert len(left) == 2
    got = client_run(n1, script, left, ca, "get", key)
    assert all(r.get("ok") == OBJECTS for r in got) and len(got) == 2, got
    put = client_run(n1, script, left, ca, "put-new", key)
    assert all(r.get("ok") == OBJECTS for r in put) and len(put) == 2, put
    # and the backup restores into a new volume (on n1)
    restored = c.call("POST", f"/v1/volume-backups/{backup['id']}/restore", json={"name": "ha-restored"})
    _stored(c, f"/v1/volumes/{restored['id']}", "restore with n3 down")


def _stored(c, path: str, what: str) -> dict:
    """The resource at ``path`` once ``available`` (its reason when it ends in ``error``)."""

    def check() -> dict | None:
        x = c.call("GET", path)
        assert x["status"]["state"] != "error", x["status"].get("reason")
        return x if x["status"]["state"] == "available" else None

    return wait_for(check, timeout=600, interval=1, what=what)
