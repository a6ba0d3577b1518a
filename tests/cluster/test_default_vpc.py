"""Real hosts: default VPCs on one node with its own libvirtd (``harness.py``; a real host rather than an agent in
the host's namespace, because a VPC's devices are named by VNI and every test agent's store hands out the same
first VNI). A guest made before ``[network] default_vpc`` sits on the node's default bridge and keeps its address
when the agent restarts with default VPCs on (the migration); a guest made afterwards without ``--nic`` gets an
address of its project's default VPC and reaches the node's bridge gateway through the router's SNAT on ``host``."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
from pathlib import Path

import pytest

from agent.net.default import guest_tap
from minicloud.network import default_vpc
from tests.cluster import harness
from tests.cluster.harness import Cluster, wait_for
from tests.cluster.test_vpc import BOOT_TIMEOUT, booted, delete, launch, ok, probes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
CIDR = "10.213.0.0/24"  # the harness's nodes keep the default network's defaults


def _pinned(node, instance_id: str, ip: str) -> bool:
    """Whether the node's ``bridge minicloud_sg`` pins the guest's tap to ``ip`` (``docs/networking.md``)."""
    table = node.exec("nft", "list", "table", "bridge", "minicloud_sg").stdout
    own = re.escape(ip)  # nft lists a one-element set without braces
    return (
        f'"{guest_tap(instance_id)}" : jump o_' in table
        and re.search(rf"ip saddr != (\{{ {own} \}}|{own}) drop", table) is not None
    )


def _address(node, name: str) -> str:
    def ip() -> str | None:
        addrs = node.json("instance", "show", name)["status"]["addresses"]
        return addrs[0]["ip"] if addrs and addrs[0]["ip"] else None

    return wait_for(ip, timeout=BOOT_TIMEOUT, interval=1, what=f"{name}'s address")


def test_a_legacy_guest_keeps_its_address_and_a_new_one_gets_the_default_vpc(
    real_hosts: None, guest_image: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
):
    with Cluster(tmp_path_factory.mktemp("dvpc"), 1, libvirt=True) as cluster, harness.guest_slot():
        (n1,) = cluster.nodes
        cluster.start_all()
        for f in ("vmlinuz", "initrd.img"):
            shutil.copy(guest_image / f, n1.image_dir / f)
        n1.cli(
            "image", "import", "guest", "--kernel", str(n1.image_dir / "vmlinuz"),
            "--initrd", str(n1.image_dir / "initrd.img"), check=True,
        )  # fmt: skip

        # before: default VPCs off, a guest on the default bridge, pinned to its MAC and fixed address on its tap
        spoof = "ip addr add 10.213.0.77/24 dev eth0; ! ping -c 2 -W 2 -I 10.213.0.77 10.213.0.1; r=$?; ip addr del 10.213.0.77/24 dev eth0; exit $r"  # fmt: skip
        checks = [("gateway", 60, "ping -c 1 -W 2 10.213.0.1"), ("spoofed", 1, spoof)]
        old = launch(n1, "old", "--image", "guest", "--user-data", probes(tmp_path, "old", checks))
        assert old["nics"] == []
        booted(n1, "old")
        before = _address(n1, "old")
        assert n1.cli("network", "show", "host").returncode != 0
        ok(n1, "old", "gateway")
        ok(n1, "old", "spoofed")  # from another address of the bridge, nothing comes back
        assert _pinned(n1, old["id"], before)

        # the migration: the agent restarts with default VPCs on; the guest keeps running and its address
        n1.stop()
        n1.config.write_text(n1.config.read_text() + "\n[network]\ndefault_vpc = true\n")
        n1.start()
        host = n1.json("network", "show", "host")
        assert host["external"] and host["provider"] == "host" and host["cidr"] == CIDR
        assert n1.json("instance", "show", "old")["nics"] == []
        assert _address(n1, "old") == before
        pinned = json.loads((n1.data_dir / "networks" / "default" / "pinned.json").read_text())
        assert default_vpc.in_pool(CIDR, before) == (before in pinned.values())
        assert _pinned(n1, old["id"], before)  # its rules again after the restart

        # after: without --nic, the project's default VPC; out through the router's SNAT to the bridge's gateway
        user_data = probes(tmp_path, "new", [("gateway", 60, "ping -c 1 -W 2 10.213.0.1")])
        new = launch(n1, "new", "--image", "guest", "--user-data", user_data)
        (nic,) = new["nics"]
        assert (nic["network"], nic["subnet"]) == ("default", "default")
        assert ipaddress.IPv4Address(nic["ip"]) in ipaddress.IPv4Network(default_vpc.DEFAULT_SUBNET_CIDR)
        router = n1.json("router", "show", "default")
        assert default_vpc.in_pool(CIDR, router["external_address"])
        ok(n1, "new", "gateway")
        assert _address(n1, "old") == before
        delete(n1, "new", "old")
