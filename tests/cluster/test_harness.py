"""The multi-node harness itself: namespaces, addressing, partitions, crashes and leaving nothing behind."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.cluster import harness
from tests.cluster.harness import RUN_DIR, Cluster, netns_list

pytestmark = pytest.mark.timeout(60)

UNREACHABLE_WAIT = 1.0  # seconds a probe that must fail is given


def _netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_agents_start_in_their_own_namespaces_with_their_own_data(cluster):
    assert [node.node_name for node in cluster] == ["n1", "n2", "n3"]
    assert len({node.netns for node in cluster} | {cluster.switch.netns}) == 4
    inodes = {_netns_inode("self")}
    for k, node in enumerate(cluster, start=1):
        assert node.ip == f"{cluster.subnet}.{k}"
        assert node.running
        assert node.info["pid"] == node.proc.pid
        assert node.info["https"] == f"{node.ip}:{harness.AGENT_PORT}"
        assert node.info["node"] == f"n{k}"
        assert node.exec("ip", "netns", "identify", node.proc.pid).stdout.strip() == node.netns
        inodes.add(_netns_inode(node.proc.pid))
        assert json.loads((node.data_dir / "agent.json").read_text())["pid"] == node.proc.pid
        assert node.client().version().node == f"n{k}"  # the socket works from the host namespace
        addr = node.exec("ip", "-o", "-4", "addr", "show", "dev", "eth0", check=True).stdout
        assert f"inet {node.ip}/24" in addr
    assert len(inodes) == 4, "host + one namespace per agent"
    assert len({node.data_dir for node in cluster}) == 3
    assert len({node.client().version().ca_fingerprint for node in cluster}) == 3, "each its own data dir and CA"
    assert cluster[0].json("node", "show")  # the CLI through the socket


def test_https_between_nodes(cluster):
    n1, n2, _ = cluster.nodes
    result = n1.curl(f"{n2.https_url}/healthz")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok"
    assert n2.reachable(f"{n1.https_url}/healthz")


def test_partition_and_heal(cluster):
    n1, n2, n3 = cluster.nodes
    url3 = f"{n3.https_url}/healthz"
    assert n1.reachable(url3)

    n3.partition()
    assert n3.partitioned
    assert not n1.reachable(url3, timeout=UNREACHABLE_WAIT)
    assert not n3.reachable(f"{n2.https_url}/healthz", timeout=UNREACHABLE_WAIT)
    assert n1.reachable(f"{n2.https_url}/healthz"), "only n3 is cut off"
    assert n3.client().version().node == "n3", "n3's Unix socket still answers"
    assert n3.reachable(url3), "n3 still reaches itself on its own address"

    n3.heal()
    harness.wait_for(lambda: n1.reachable(url3), timeout=10, what="n1 to reach n3 after heal")
    assert n3.reachable(f"{n2.https_url}/healthz")


def test_sigkill_of_one_agent_leaves_the_others_serving(cluster):
    n1, n2, n3 = cluster.nodes
    assert n2.kill() == -9
    assert not n2.running
    assert not n1.reachable(f"{n2.https_url}/healthz", timeout=UNREACHABLE_WAIT)
    assert n1.reachable(f"{n3.https_url}/healthz")
    assert n3.reachable(f"{n1.https_url}/healthz")
    assert n1.client().version().node == "n1"

    n2.restart()
    assert n1.reachable(f"{n2.https_url}/healthz")
    assert n2.client().version().node == "n2"


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_close_leaves_no_namespace_veth_or_process(netns_harness, tmp_path):
    with Cluster(tmp_path, 2, start=True) as cluster:
        names = cluster.netns_names
        helper = cluster[0].popen("sleep", "60")
        assert set(names) <= set(netns_list())
        assert all((RUN_DIR / f"{name}.json").exists() for name in names)
        switch_links = harness.ip("-n", cluster.switch.netns, "-o", "link").stdout
        assert "v1@" in switch_links and "v2@" in switch_links and "br0" in switch_links
        assert not {"v1", "v2", "br0"} & _host_links(), "nothing is created in the host namespace"
    assert all(node.proc.poll() is not None for node in cluster), "agents are killed"
    assert helper.poll() is not None, "processes started in a node are killed"
    assert not set(names) & set(netns_list())
    assert not any((RUN_DIR / f"{name}.json").exists() for name in names)
    assert cluster.switch.ports == []
    assert not {"v1", "v2", "br0"} & _host_links()
    cluster.close()  # idempotent


def test_cleanup_stale_removes_only_dead_owners_namespaces(netns_harness):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"mcs{dead.pid}x9999"
    live = f"mcs{os.getpid()}x9998"
    unrecorded = f"mcs{dead.pid}x9997"
    try:
        harness.create_netns(stale)
        orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
        harness.wait_for(lambda: harness.netns_pids(stale), timeout=5, what="the orphan to start")
        (RUN_DIR / f"{stale}.json").write_text(json.dumps({"pid": dead.pid, "start": "1"}))
        harness.create_netns(live)
        harness.ip("netns", "add", unrecorded)  # ours by name, but no owner record: must be left alone

        removed = harness.cleanup_stale()

        assert stale in removed
        assert orphan.wait(5) == -9, "processes left in a stale namespace are killed"
        names = netns_list()
        assert stale not in names
        assert not (RUN_DIR / f"{stale}.json").exists()
        assert live in names
        assert unrecorded in names
    finally:
        harness.delete_netns(stale)
        harness.delete_netns(live)
        harness.ip("netns", "del", unrecorded, check=False)
    assert not {stale, live, unrecorded} & set(netns_list())
