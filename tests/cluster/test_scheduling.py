"""Scheduling on a real three-node cluster (etcd, three agents in their own namespaces, zones a, a and b): server
groups, zones, cordon and the recorded reason, through the CLI of different nodes.

The nodes run the in-memory ``fake`` hypervisor (nothing boots: this is about placement, which is decided and
committed by the API whatever runs the guests) and each imports its own kernel image, so an instance of
``k-nK`` may only run on ``nK`` (the image filter). Spread among free nodes needs an image on every node (Ceph:
``test_storage.py``'s rack, too heavy to build again here); the weighers are covered by
``tests/unit/compute/test_scheduling.py`` on a real store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tests.cluster.harness import AgentNode, Cluster, wait_for

#: A file the kernel-image check accepts (the bzImage header magic); the fake hypervisor never boots it.
FAKE_KERNEL = b"\0" * 0x202 + b"HdrS" + b"\0" * 64
ZONES = {"n1": "a", "n2": "a", "n3": "b"}


def fake_compute(node: AgentNode) -> str:
    node.image_dir.mkdir(parents=True, exist_ok=True)
    return f'[compute]\ndriver = "fake"\nimage_dirs = ["{node.image_dir}"]\nresync_interval = 5.0\n'


def form_with_zones(cluster: Cluster) -> None:
    first, *others = cluster.nodes
    first.cli("cluster", "enable", "--zone", ZONES[first.node_name], check=True)
    for node in others:
        token = first.json("cluster", "add", node.node_name, "--zone", ZONES[node.node_name])["token"]
        node.cli("join", token, check=True)

    def formed() -> bool:
        members = first.client(timeout=30).call("GET", "/v1/cluster")["members"]
        return len(members) == 3 and all(m["status"] == "online" for m in members)

    wait_for(formed, timeout=90, interval=0.5, what="three online members")


def refused(via: AgentNode, *args: str) -> str:
    result = via.cli(*args)
    assert result.returncode != 0, f"{args} was accepted: {result.stdout}"
    return result.stderr


def test_server_groups_zones_and_cordon_on_three_nodes(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(3)
    for node in cluster.nodes:
        node.config.write_text(fake_compute(node))
    cluster.start_all(timeout=90)
    form_with_zones(cluster)
    n1, n2, n3 = cluster.nodes

    def all_published() -> bool:
        listed = n1.json("node", "list")
        return len(listed) == 3 and all(n["vcpus"] > 0 for n in listed)

    wait_for(all_published, timeout=90, interval=1, what="every node's compute capacity")
    listed = {n["name"]: n for n in n1.json("node", "list")}
    assert {name: n["zone"] for name, n in listed.items()} == ZONES
    for node in cluster.nodes:
        (node.image_dir / "vmlinuz").write_bytes(FAKE_KERNEL)
        node.cli("image", "import", f"k-{node.node_name}", "--kernel", str(node.image_dir / "vmlinuz"), check=True)

    def create(via: AgentNode, name: str, image: str, *args: str) -> dict:
        out = via.cli("-o", "json", "instance", "create", name, "--type", "m1.tiny", "--image", image, *args)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    # Anti-affinity: one member per node; the fourth is refused with the reason, whichever node is asked.
    n1.cli("server-group", "create", "web", "--policy", "anti-affinity", check=True)
    members = [create(via, f"w{k}", f"k-n{k}", "--server-group", "web") for k, via in ((1, n2), (2, n3), (3, n1))]
    assert [m["status"]["node"] for m in members] == ["n1", "n2", "n3"]
    assert all(m["server_group"] and m["status"]["placement"] for m in members)
    why = refused(n3, "instance", "create", "w4", "--type", "m1.tiny", "--image", "k-n1", "--server-group", "web")
    assert "anti-affinity group 'web' already has a member in this node" in why, why
    group = n2.json("server-group", "show", "web")
    assert sorted(group["member_nodes"]) == ["n1", "n2", "n3"]
    assert "has 3 member(s)" in refused(n1, "server-group", "delete", "web")

    # Two creates sent at once to two nodes, for two nodes of zone a, in a group allowing one member per zone: they
    # touch different nodes' placement records, so only the group's compare-and-swap keeps the second one out.
    n1.cli("server-group", "create", "quorum", "--policy", "anti-affinity", "--scope", "zone", check=True)
    with ThreadPoolExecutor(2) as pool:
        args = ("--type", "m1.tiny", "--server-group", "quorum")
        racing = [
            pool.submit(via.cli, "instance", "create", f"q{k}", "--image", f"k-n{k}", *args)
            for k, via in ((1, n1), (2, n2))
        ]
        results = [f.result() for f in racing]
    assert sorted(r.returncode for r in results) == [0, 1], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode)
    assert "anti-affinity group 'quorum' already has a member in zone 'a'" in loser.stderr, loser.stderr
    assert len(n3.json("server-group", "show", "quorum")["members"]) == 1

    # Zones: an instance whose image is in zone a cannot go to zone b; an unknown zone is a 400 naming the zones.
    why = refused(n2, "instance", "create", "z1", "--type", "m1.tiny", "--image", "k-n1", "--zone", "b")
    assert "n1: in zone 'a', not 'b'" in why, why
    assert "there is no zone 'c': the zones are a, b" in refused(
        n1, "instance", "create", "z2", "--type", "m1.tiny", "--image", "k-n3", "--zone", "c"
    )
    assert create(n1, "z3", "k-n3", "--zone", "b")["status"]["node"] == "n3"

    # Cordon: shown in node list, no new placement there (from any node), back after uncordon.
    n3.cli("node", "cordon", "n2", "--reason", "kernel update", check=True)
    listed = {n["name"]: n for n in n1.json("node", "list")}
    assert (listed["n2"]["scheduling"], listed["n2"]["cordon_reason"]) == ("cordoned", "kernel update")
    assert listed["n3"]["instances"] == 2
    table = n1.cli("node", "list", check=True).stdout
    assert "cordoned" in table and "kernel update" in table
    why = refused(n1, "instance", "create", "c1", "--type", "m1.tiny", "--image", "k-n2")
    assert "n2: cordoned" in why, why
    n1.cli("node", "uncordon", "n2", check=True)
    assert create(n3, "c1", "k-n2")["status"]["node"] == "n2"
