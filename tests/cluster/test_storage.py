"""Ceph on three nodes, for real: each node an agent in its own namespaces with its own libvirtd (``harness.py``).

``storage enable`` on n1 and a 3 GiB file OSD per node; the services leader puts MONs on all three voting nodes, so
``storage show`` is ready with three MONs in quorum, OSDs on three hosts and pools of 3 copies (one per host). A volume
is written by a guest on n1 and read, with the same checksum, by a guest on n2. Then n3 is lost (every process of it
SIGKILLed: agent, etcd, libvirtd, its MON, MGR and OSD): the two other MONs keep quorum, ``storage show`` says what is
wrong in plain words, n3's OSD is marked out after the down-out interval and the data is whole again on two copies,
and a volume made on n3 is attached to the guest on n1 — which writes it — after n3's address was blocklisted.

One cluster for the module and two guests (TCG on two cores is expensive). Guests are watched through their consoles:
each runs a user-data script that, for every volume that appears, writes 4 MiB of random data to it when it is blank
(else leaves it) and prints ``mc-vol SERIAL wrote|read MD5`` (the serial is the volume id, cut to 20 characters by
virtio)."""

from __future__ import annotations

import json
import re
import shutil
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
BOOT_TIMEOUT = 300  # TCG on two shared cores, next to three agents and Ceph
CEPH_TIMEOUT = 420  # bootstrap, two more MONs, three OSDs, PGs clean: on a loaded two-core machine
OSD = "3G"

WATCH_VOLUMES = """#!/bin/sh
(
while true; do
  for d in /sys/block/vd[b-z]; do
    [ -e "$d" ] || continue
    n=${d##*/}
    serial=$(cat "$d/serial" 2>/dev/null)
    [ -e "/run/mc-seen-$n-$serial" ] && continue
    touch "/run/mc-seen-$n-$serial"
    if [ -z "$(head -c 4096 /dev/$n | tr -d '\\000' | head -c 1)" ]; then
      dd if=/dev/urandom of=/dev/$n bs=65536 count=64 conv=fsync 2>/dev/null
      verb=wrote
    else
      verb=read
    fi
    echo "mc-vol $serial $verb $(head -c 4194304 /dev/$n | md5sum | cut -d' ' -f1)" >/dev/console
  done
  for f in /run/mc-seen-*; do
    [ -e "$f" ] || continue
    n=${f#/run/mc-seen-}
    [ -e "/sys/block/${n%%-*}" ] || rm -f "$f"
  done
  sleep 1
done
) &
"""


@pytest.fixture(scope="module")
def rack(real_hosts: None, guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three joined nodes with their own libvirtd; the test guest imported on n1 and n2 (``guest-n1``, ``guest-n2``);
    OSDs that keep their caches small."""
    with Cluster(tmp_path_factory.mktemp("storage"), 3, libvirt=True) as cluster:
        for node in cluster:
            with node.config.open("a") as f:
                f.write("\n[storage]\nceph_osd_memory_target = 536870912\n")
        cluster.start_all().form()
        for node in cluster.nodes[:2]:
            for f in ("vmlinuz", "initrd.img"):
                shutil.copy(guest_image / f, node.image_dir / f)
            node.cli(
                "image", "import", f"guest-{node.node_name}", "--kernel", str(node.image_dir / "vmlinuz"),
                "--initrd", str(node.image_dir / "initrd.img"), check=True,
            )  # fmt: skip
        yield cluster


def ceph_cli(node: AgentNode, *args: str) -> str:
    """``ceph ARGS`` as client.admin inside ``node`` (the MONs listen on the nodes' own addresses only)."""
    root = node.data_dir / "ceph"
    result = node.exec(
        "ceph", "--conf", root / "ceph.conf", "--keyring", root / "client.admin.keyring", "--connect-timeout", "20",
        *args, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, f"ceph {' '.join(args)} on {node.node_name}: {result.stderr}"
    return result.stdout


def storage(node: AgentNode) -> dict:
    return node.json("storage", "show")


def volume(node: AgentNode, name: str) -> dict:
    return node.json("volume", "show", name)


def volume_state(node: AgentNode, name: str, state: str, timeout: float = 300) -> dict:
    def reached() -> dict | None:
        vol = volume(node, name)
        assert vol["status"]["state"] != "error", vol
        return vol if vol["status"]["state"] == state else None

    return wait_for(reached, timeout=timeout, interval=1, what=f"volume {name} {state}")


def launch(via: AgentNode, name: str, image: str, user_data: Path) -> dict:
    """``instance create --wait``; a node that joined moments ago publishes its capacity at its next resync."""

    def create() -> dict | None:
        result = via.cli(
            "-o", "json", "instance", "create", name, "--type", "m1.tiny", "--image", image,
            "--user-data", str(user_data), "--wait", timeout=BOOT_TIMEOUT,
        )  # fmt: skip
        if result.returncode == 0:
            return json.loads(result.stdout)
        assert "has not registered its compute capacity" in result.stderr, result.stderr
        return None

    return wait_for(create, timeout=BOOT_TIMEOUT, interval=1, what=f"instance {name} created")


def console(node: AgentNode, name: str) -> str:
    return node.cli("instance", "console", name, check=True).stdout


def checksum(node: AgentNode, instance: str, vol_id: str, verb: str) -> str:
    """Wait for the guest's ``mc-vol`` line about the volume; its MD5."""
    pattern = re.compile(rf"^mc-vol {re.escape(vol_id[:20])} {verb} ([0-9a-f]{{32}})\s*$", re.MULTILINE)

    def line() -> str | None:
        match = pattern.search(console(node, instance))
        return match.group(1) if match else None

    return wait_for(line, timeout=BOOT_TIMEOUT, interval=1, what=f"{instance} to say it {verb} {vol_id}")


def test_three_nodes_share_ceph_and_survive_losing_one(rack: Cluster, tmp_path: Path):
    n1, n2, n3 = rack.nodes

    # -- three nodes, three MONs, three hosts, three copies ------------------------------------------------------------
    n1.cli("storage", "enable", "--file-size", OSD, check=True)
    for node in (n2, n3):
        n1.cli("storage", "disk", "add", "--node", node.node_name, "--file", OSD, check=True)

    def ready() -> dict | None:
        shown = storage(n1)
        hosts = {o["node"] for o in shown["osds"] if o["up"] and o["in_cluster"]}
        full = shown["state"] == "ready" and len(shown["mons"]) == 3 and hosts == {"n1", "n2", "n3"}
        healthy = shown["summary"].startswith("Healthy: 3 OSDs on 3 nodes")
        return shown if full and healthy and shown["replicas"] == 3 else None

    wait_for(ready, timeout=CEPH_TIMEOUT, interval=2, what="storage ready and healthy on three nodes")
    shown = storage(n1)
    assert shown["mons"] == {n.node_name: n.address for n in rack}
    quorum = json.loads(ceph_cli(n1, "quorum_status", "--format", "json"))
    assert sorted(quorum["quorum_names"]) == ["n1", "n2", "n3"]
    pools = json.loads(ceph_cli(n1, "osd", "pool", "ls", "detail", "--format", "json"))
    assert {p["pool_name"]: (p["size"], p["min_size"]) for p in pools}["minicloud"] == (3, 2)
    # every node's ceph.conf names the three MONs
    for node in rack:
        conf = (node.data_dir / "ceph" / "ceph.conf").read_text()
        assert all(f"v2:{n.address}:3300" in conf for n in rack), node.node_name

    # -- a volume written on n1 reads the same on n2 ---------------------------------------------------------------
    script = tmp_path / "watch.sh"
    script.write_text(WATCH_VOLUMES)
    launch(n1, "g1", "guest-n1", script)
    launch(n1, "g2", "guest-n2", script)
    data = n1.json("volume", "create", "data", "--size", "1")
    volume_state(n1, "data", "available")
    n1.cli("volume", "attach", "data", "--instance", "g1", check=True)
    volume_state(n1, "data", "in-use")
    written = checksum(n1, "g1", data["id"], "wrote")
    n1.cli("volume", "detach", "data", check=True)
    volume_state(n1, "data", "available")
    n1.cli("volume", "attach", "data", "--instance", "g2", check=True)
    assert volume_state(n1, "data", "in-use")["node"] == "n2"
    assert checksum(n2, "g2", data["id"], "read") == written  # a console is read on its node

    # a volume made on n3 (its node until it is attached somewhere)
    spare = n3.json("volume", "create", "spare", "--size", "1")
    assert volume_state(n1, "spare", "available")["node"] == "n3"

    # -- n3 is lost: every process of it dies at once ---------------------------------------------------------------
    n3.crash()

    def says_lost() -> dict | None:
        shown = storage(n1)
        return shown if "Node n3 is lost" in shown["summary"] else None

    shown = wait_for(says_lost, timeout=240, interval=2, what="storage show naming the lost node")
    assert "2 of 3 monitors keep the quorum" in shown["summary"], shown["summary"]
    assert "`minicloud cluster remove n3`" in shown["summary"]
    quorum = json.loads(ceph_cli(n1, "quorum_status", "--format", "json"))
    assert sorted(quorum["quorum_names"]) == ["n1", "n2"]

    # its OSD is marked out after the down-out interval; the data is whole again on the two hosts left
    def recovered() -> dict | None:
        shown = storage(n1)
        n3_osds = [o for o in shown["osds"] if o["node"] == "n3"]
        clean = set(shown["pgs"]) == {"active+clean"}
        out = n3_osds and not any(o["in_cluster"] or o["up"] for o in n3_osds)
        return shown if out and clean and shown["replicas"] == 2 else None

    shown = wait_for(recovered, timeout=300, interval=2, what="n3's OSD out and every PG clean on two copies")
    assert "osd.2" in shown["summary"] or "down and out" in shown["summary"], shown["summary"]

    # volumes still serve: the one on n2 is attached; the one made on n3 attaches on n1 once n3 is fenced
    n1.cli("volume", "attach", "spare", "--instance", "g1", check=True)
    assert volume_state(n1, "spare", "in-use")["node"] == "n1"
    assert checksum(n1, "g1", spare["id"], "wrote")
    fenced = ceph_cli(n1, "osd", "blocklist", "ls")
    assert f"{n3.address}:0/0" in fenced, fenced
    assert volume(n1, "data")["status"]["state"] == "in-use"
