"""Real hosts: a two-node cluster whose nodes each run their own libvirtd (see ``harness.py``), with the busybox test
guest booted under TCG. One cluster for the whole module; at most two guests at once (2 CPU cores in CI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.cluster.harness import AgentNode, Cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BOOT_TIMEOUT = 240  # TCG on two shared cores


@pytest.fixture(scope="module")
def hosts(real_hosts: None, guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two started, joined nodes ``n1`` and ``n2``, each with its own libvirtd and the test guest imported as
    ``guest-n1``/``guest-n2`` (an instance is placed on its image's node); a public LAN joins their ``eth1``."""
    with Cluster(tmp_path_factory.mktemp("vpc"), 2, libvirt=True, public=True) as cluster:
        cluster.start_all().form()
        for node in cluster:
            for f in ("vmlinuz", "initrd.img"):
                shutil.copy(guest_image / f, node.image_dir / f)
            node.cli(
                "image", "import", f"guest-{node.node_name}", "--kernel", str(node.image_dir / "vmlinuz"),
                "--initrd", str(node.image_dir / "initrd.img"), check=True,
            )  # fmt: skip
        yield cluster


def launch(via: AgentNode, name: str, *args: str) -> dict:
    """``instance create NAME ARGS --wait`` through ``via``'s API; a node that joined the cluster moments ago
    publishes its capacity into the cluster's store at its next resync (a few seconds), so that refusal is retried."""

    def create() -> dict | None:
        result = via.cli("-o", "json", "instance", "create", name, "--type", "m1.tiny", *args, "--wait")
        if result.returncode == 0:
            return json.loads(result.stdout)
        assert "has not registered its compute capacity" in result.stderr, result.stderr
        return None

    return wait_for(create, timeout=60, interval=1, what=f"instance {name} created")


def console(node: AgentNode, name: str) -> str:
    return node.cli("instance", "console", name, check=True).stdout


def booted(node: AgentNode, name: str) -> str:
    """Wait for the guest's ready marker on its console; return the console."""

    def ready() -> str | None:
        text = console(node, name)
        return text if "minicloud-guest: ready" in text else None

    return wait_for(
        ready,
        timeout=BOOT_TIMEOUT,
        interval=1,
        what=f"{name}'s ready marker",
    )


def taps(node: AgentNode, domain: str) -> list[tuple[str, str]]:
    """``(tap device, guest MAC)`` of each NIC of a running domain of the node's libvirtd."""
    assert node.libvirt is not None
    conn = libvirt.open(node.libvirt.uri)
    try:
        root = ET.fromstring(conn.lookupByName(domain).XMLDesc(0))
    finally:
        conn.close()
    return [
        (iface.find("target").get("dev"), iface.find("mac").get("address"))  # type: ignore[union-attr]
        for iface in root.iter("interface")
    ]


def links(netns: str | None) -> dict[str, str]:
    """``{name: MAC}`` of every link in a namespace (None: the host's, read only)."""
    cmd = ["ip", "-j", "link", "show"] if netns is None else ["ip", "-n", netns, "-j", "link", "show"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {link["ifname"]: link.get("address", "") for link in json.loads(out)}


def test_an_instance_boots_on_its_nodes_own_libvirtd_with_its_tap_in_that_nodes_namespace_only(hosts: Cluster):
    n1, n2 = hosts.nodes
    assert n1.libvirt is not None and n2.libvirt is not None
    inst = launch(n1, "smoke", "--image", "guest-n2")
    assert inst["status"]["state"] == "running" and inst["status"]["node"] == "n2"
    domain = f"mc-{inst['id']}"
    assert "minicloud-guest: hostname=smoke" in booted(n2, "smoke")
    assert n2.libvirt.domains() == [domain] and n1.libvirt.domains() == []

    [(tap, mac)] = taps(n2, domain)
    tap_mac = "fe" + mac[2:]  # libvirt gives the tap the guest's MAC with fe: in front
    assert links(n2.netns)[tap] == tap_mac
    assert tap_mac not in links(n1.netns).values()
    assert tap_mac not in links(None).values()  # nothing of the guest in the host's namespace

    # The public LAN: every node's provider interface eth1 is plugged into the upstream namespace.
    assert hosts.public is not None and all("eth1" in links(node.netns) for node in hosts)
    assert len([p for p in links(hosts.public.netns) if p.startswith("p")]) == 2

    n1.cli("instance", "delete", "smoke", "--wait", check=True)
    assert n2.libvirt.domains() == []
    assert tap not in links(n2.netns)
