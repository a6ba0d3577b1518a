"""Live migration between two real hosts (each its own libvirtd, TLS between them with the cluster CA).

One module cluster and one guest (TCG on two cores is expensive): the busybox test guest, imported on both nodes
(the same files: a kernel image lives in node-local files, so the target needs its own copy), started on n1 with a
user-data script that prints a tick a second on its console. Then:

* bad input first (409 with the reason): to its own node, to a node that is no member, ``--cold``;
* ``instance migrate --node n2 --wait`` while n1 and n2 ping the guest: the record says n2, only n2's libvirtd has the
  guest, running; the ticks go on from where they were (the same guest, not a reboot); it answers pings on n2;
* the libvirtds listen on TLS only (no plain TCP listener), and a client without a cluster certificate is refused;
* back to n1, with n2's agent (the source) SIGKILLed as soon as the migration is ``migrating``: once n2's agent is
  back, exactly one copy runs and the record says where it is; the same with the target's agent SIGKILLed, and with
  the source's libvirtd SIGKILLed (and started again);
* stopped, it migrates cold to the other node (its disk copied, still stopped there), and starts there;
* ``node drain`` of that node cordons it and moves the instance back, live;
* a guest with a VPC NIC (a subnet behind a router with a floating IP on the public LAN, ICMP allowed by its
  security group) migrates live while the LAN pings its floating IP: it answers there from the other node, its
  network leaves the source, and its security group is enforced there (a removed rule stops the pings);
* a guest with a NIC straight on the LAN (each node's bridge ``lanbr``) migrates live while the LAN pings it: it
  answers from the other node, whose DHCP port serves it now; the source's DHCP port goes.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import harness
from tests.cluster.harness import PUBLIC_CIDR, PUBLIC_GATEWAY, AgentNode, Cluster, wait_for
from tests.cluster.migration_hosts import (
    GUEST_FILES,
    enable_tls,
    lan_ping,
    lan_pinger,
    libvirt_state,
    ping,
    ping_gap,
    ping_window,
    pinger,
    restart_libvirtd,
    tcp_listeners,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
BOOT_TIMEOUT = 300  # TCG on two shared cores next to two agents
MIGRATE_TIMEOUT = 300
PROVIDER = "lan"
DIRECT = "flat"
TICKS = '#!/bin/sh\n(i=0; while true; do echo "mc-tick $i" >/dev/console; i=$((i+1)); sleep 1; done) &\n'


@pytest.fixture(scope="module")
def hosts(real_hosts: None, guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """n1 and n2 joined, TLS between their libvirtds, the test guest imported on both (``guest-n1``, ``guest-n2``)."""
    with Cluster(tmp_path_factory.mktemp("migration"), 2, libvirt=True, public=True) as cluster, harness.guest_slot():
        assert cluster.public is not None
        for node in cluster:  # the public LAN: eth1 for the VPC guest's floating IP, lanbr for a NIC straight on it
            harness.plug_lan_bridge(cluster.public, node)
            node.config.write_text(
                node.config.read_text() + f'\n[network.providers]\n{PROVIDER} = "eth1"\n{DIRECT} = "lanbr"\n'
            )
        cluster.start_all().form()
        for node in cluster:
            enable_tls(node)
            for f in GUEST_FILES:
                shutil.copy(guest_image / f, node.image_dir / f)
            node.cli(
                "image", "import", f"guest-{node.node_name}", "--kernel", str(node.image_dir / "vmlinuz"),
                "--initrd", str(node.image_dir / "initrd.img"), check=True,
            )  # fmt: skip
        yield cluster


def show(node: AgentNode, name: str) -> dict:
    return node.json("instance", "show", name)


def ticks(node: AgentNode, name: str) -> list[int]:
    out = node.cli("instance", "console", name, check=True).stdout
    return [int(n) for n in re.findall(r"^mc-tick (\d+)\s*$", out, re.MULTILINE)]


def launch(via: AgentNode, name: str, image: str, user_data: Path, *more: str) -> dict:
    def create() -> dict | None:
        result = via.cli(
            "-o", "json", "instance", "create", name, "--type", "m1.tiny", "--image", image,
            "--user-data", str(user_data), *more, "--wait", timeout=BOOT_TIMEOUT,
        )  # fmt: skip
        if result.returncode == 0:
            return json.loads(result.stdout)
        assert "has not registered its compute capacity" in result.stderr, result.stderr
        return None

    return wait_for(create, timeout=BOOT_TIMEOUT, interval=1, what=f"instance {name} created")


def operation(node: AgentNode, op_id: str) -> dict:
    return node.json("operation", "show", op_id)


def test_live_migration_keeps_the_guest_running_and_survives_a_killed_source_agent(hosts: Cluster, tmp_path: Path):
    n1, n2 = hosts.nodes
    user_data = tmp_path / "ticks.sh"
    user_data.write_text(TICKS)
    inst = launch(n1, "mover", "guest-n1", user_data)
    assert inst["status"]["node"] == "n1"
    wait_for(lambda: len(ticks(n1, "mover")) >= 3, timeout=BOOT_TIMEOUT, interval=1, what="the guest's ticks")
    ip = wait_for(
        lambda: next((a["ip"] for a in show(n1, "mover")["status"]["addresses"] if a.get("ip")), None),
        timeout=BOOT_TIMEOUT, interval=1, what="the guest's DHCP lease",
    )  # fmt: skip
    assert wait_for(lambda: ping(n1, ip), timeout=60, interval=1, what="the guest to answer pings on n1")
    domain_uuid = _domain_uuid(n1)

    # -- bad input: 409 with the reason, nothing changes ---------------------------------------------------------
    for args, reason in (
        (("--node", "n1"), "already runs on node n1"),
        (("--node", "n9"), "has not registered compute capacity"),
        (("--node", "n2", "--cold"), "stop it first"),
    ):
        result = n1.cli("instance", "migrate", "mover", *args)
        assert result.returncode != 0 and reason in result.stderr, (args, result.stderr)
    assert show(n1, "mover")["status"]["node"] == "n1"

    # -- the libvirtds: TLS only ---------------------------------------------------------------------------------
    for node in hosts:
        listeners = tcp_listeners(node)
        assert any(":16514 " in line for line in listeners), listeners
        assert not any(":16509 " in line for line in listeners), listeners  # libvirtd's plain TCP port
        # a client with no certificate of the cluster CA is refused
        bare = tmp_path / f"bare-{node.node_name}"
        bare.mkdir()
        other = hosts.nodes[1] if node is hosts.nodes[0] else hosts.nodes[0]
        refused = other.exec("virsh", "-c", f"qemu+tls://{node.address}/system?pkipath={bare}", "list", timeout=60)
        assert refused.returncode != 0 and "certificate" in refused.stderr.lower(), refused.stderr

    # -- live migration n1 -> n2 while both ping it ----------------------------------------------------------------
    before = max(ticks(n1, "mover"))
    pingers = [pinger(node, ip, 0.2) for node in hosts]
    started = time.monotonic()
    result = n1.cli("-o", "json", "instance", "migrate", "mover", "--node", "n2", "--wait", timeout=MIGRATE_TIMEOUT)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr + n1.log_tail() + n2.log_tail()
    op = json.loads(result.stdout)
    assert op["state"] == "succeeded" and op["result"]["node"] == "n2", op
    assert show(n1, "mover")["status"]["node"] == "n2"
    assert libvirt_state(n2, domain_uuid) == "running" and libvirt_state(n1, domain_uuid) is None
    wait_for(lambda: ticks(n2, "mover") and min(ticks(n2, "mover")) > before, timeout=120, interval=1,
             what="ticks on n2")  # fmt: skip
    reach(n2, ip)
    gap = ping_gap(pingers)
    print(f"live migration n1 -> n2: {took:.1f} s in all, ping gap {gap:.2f} s")
    wait_for(lambda: show(n2, "mover")["status"]["state"] == "running", timeout=60, what="running on n2")
    assert not (n1.data_dir / "instances" / show(n1, "mover")["id"]).exists()  # the source's leftovers are gone

    # -- back to n1, the source's agent SIGKILLed mid-way -------------------------------------------------------
    started_op = json.loads(n1.cli("-o", "json", "instance", "migrate", "mover", "--node", "n1", check=True).stdout)

    def migrating() -> bool:
        op = operation(n1, started_op["id"])
        assert op["state"] != "failed", op
        return "migrating" in (op.get("progress") or {}).get("message", "") or op["state"] == "succeeded"

    wait_for(migrating, timeout=MIGRATE_TIMEOUT, interval=0.1, what="the migration to start moving the guest")
    n2.kill()
    n2.start(timeout=60)

    def settled() -> str | None:
        record = show(n1, "mover")
        states = (libvirt_state(n1, domain_uuid), libvirt_state(n2, domain_uuid))
        assert states.count("running") <= 1, states  # never two running copies
        where = {"n1": states[0], "n2": states[1]}
        return (
            record["status"]["node"]
            if where.get(record["status"]["node"]) == "running" and states.count("running") == 1
            else None
        )

    node = wait_for(
        settled, timeout=MIGRATE_TIMEOUT, interval=0.5, what="one running copy, and the record saying where"
    )
    other = n2 if node == "n1" else n1
    assert libvirt_state(other, domain_uuid) in (None, "shutoff")
    final = wait_for(
        lambda: (op := operation(n1, started_op["id"]))["state"] != "running" and op, timeout=120, interval=0.5,
        what="the operation to end",
    )  # fmt: skip
    assert (final["state"] == "succeeded") == (node == "n1"), (final, node)
    serving = hosts.nodes[int(node[1]) - 1]
    reach(serving, ip)

    # -- the target's agent, then the source's libvirtd, SIGKILLed mid-way: one running copy, the record says where
    for victim in ("the target's agent", "the source's libvirtd"):
        source = serving
        target = n2 if source is n1 else n1
        started_op = json.loads(
            n1.cli("-o", "json", "instance", "migrate", "mover", "--node", target.node_name, check=True).stdout
        )
        wait_for(migrating, timeout=MIGRATE_TIMEOUT, interval=0.1, what="the migration to start moving the guest")
        if victim == "the target's agent":
            target.kill()
            target.start(timeout=60)
        else:
            restart_libvirtd(source, signal.SIGKILL)
        node = wait_for(settled, timeout=MIGRATE_TIMEOUT, interval=0.5, what=f"one running copy after {victim} died")
        final = wait_for(
            lambda op_id=started_op["id"]: (op := operation(n1, op_id))["state"] != "running" and op, timeout=120,
            interval=0.5, what="the operation to end",
        )  # fmt: skip
        assert (final["state"] == "succeeded") == (node == target.node_name), (victim, final, node)
        print(f"{victim} SIGKILLed mid-migration {source.node_name} -> {target.node_name}: the guest runs on {node}")
        serving = hosts.nodes[int(node[1]) - 1]
        reach(serving, ip)
        wait_for(lambda: show(n1, "mover")["status"]["state"] == "running", timeout=120, what="mover running")

    # -- cold: a stopped instance moves with its disk and stays stopped there ------------------------------------
    n1.cli("instance", "stop", "mover", "--force", "--wait", check=True, timeout=120)
    there = "n2" if node == "n1" else "n1"
    target, source = hosts.nodes[int(there[1]) - 1], serving
    result = n1.cli("-o", "json", "instance", "migrate", "mover", "--node", there, "--wait", timeout=MIGRATE_TIMEOUT)
    assert result.returncode == 0, result.stderr + source.log_tail() + target.log_tail()
    assert json.loads(result.stdout)["result"]["node"] == there
    moved = show(n1, "mover")
    assert moved["status"]["node"] == there and moved["status"]["state"] == "stopped", moved["status"]
    assert libvirt_state(target, domain_uuid) == "shutoff" and libvirt_state(source, domain_uuid) is None
    n1.cli("instance", "start", "mover", "--wait", check=True, timeout=BOOT_TIMEOUT)
    assert libvirt_state(target, domain_uuid) == "running" and libvirt_state(source, domain_uuid) is None

    # -- node drain: cordoned, and its running instance moved live to the other node ------------------------------
    result = n1.cli("-o", "json", "node", "drain", there, "--wait", timeout=MIGRATE_TIMEOUT)
    assert result.returncode == 0, result.stderr + target.log_tail() + source.log_tail()
    drained = json.loads(result.stdout)["result"]
    assert drained["moved"] == [{"instance": "mover", "id": moved["id"], "node": source.node_name}], drained
    assert drained["stayed"] == []
    assert show(n1, "mover")["status"]["node"] == source.node_name
    assert libvirt_state(source, domain_uuid) == "running" and libvirt_state(target, domain_uuid) is None
    nodes = {n["name"]: n for n in n1.json("node", "list")}
    assert nodes[there]["cordon_reason"] == "draining", nodes[there]

    # -- a VPC NIC follows its guest, with its security group and floating IP -------------------------------------
    n1.cli("node", "uncordon", there, check=True)
    n1.cli("instance", "delete", "mover", check=True)  # one guest at a time on two cores
    wait_for(lambda: n1.cli("instance", "show", "mover").returncode != 0, timeout=120, what="mover deleted")
    vpc_nic_follows(hosts, user_data)
    lan_nic_follows(hosts, user_data)


def vpc_nic_follows(hosts: Cluster, user_data: Path) -> None:
    n1, n2 = hosts.nodes
    lan = hosts.public
    assert lan is not None
    prefix = PUBLIC_CIDR.rsplit(".", 1)[0]
    n1.cli(
        "network", "create", "public", "--external", "--provider", PROVIDER, "--cidr", PUBLIC_CIDR,
        "--gateway", PUBLIC_GATEWAY, "--pool", f"{prefix}.100-{prefix}.199", check=True,
    )  # fmt: skip
    n1.cli("network", "create", "vpc", "--cidr", "10.50.0.0/16", check=True)
    n1.cli("subnet", "create", "app", "--network", "vpc", "--cidr", "10.50.1.0/24", check=True)
    n1.cli("router", "create", "edge", "--external-network", "public", check=True)
    n1.cli("router", "add-subnet", "edge", "app", check=True)
    add = ("security-group", "rule", "add", "default", "ingress", "--protocol", "icmp")
    rule = json.loads(n1.cli("-o", "json", *add, check=True).stdout)["rules"][-1]["id"]
    fip = json.loads(n1.cli("-o", "json", "floating-ip", "allocate", "--network", "public", check=True).stdout)
    address = fip["address"]
    vni = n1.json("network", "show", "vpc")["vni"]
    service_ns = f"mcs-{vni:06x}"

    def built(node: AgentNode) -> bool:
        return service_ns in node.exec("ls", "/run/netns").stdout.split()

    inst = launch(n1, "vmover", "guest-n1", user_data, "--nic", "subnet=app")
    assert inst["status"]["node"] == "n1"
    wait_for(lambda: len(ticks(n1, "vmover")) >= 3, timeout=BOOT_TIMEOUT, interval=1, what="vmover's ticks")
    n1.cli("floating-ip", "associate", address, "vmover", check=True)
    wait_for(lambda: lan_ping(lan, address), timeout=BOOT_TIMEOUT, interval=1, what=f"vmover behind {address}")
    assert built(n1) and not built(n2)
    domain_uuid = _domain_uuid(n1)

    before = max(ticks(n1, "vmover"))
    pingers = [lan_pinger(lan, address, 0.2)]
    started, started_epoch = time.monotonic(), time.time()
    result = n1.cli("-o", "json", "instance", "migrate", "vmover", "--node", "n2", "--wait", timeout=MIGRATE_TIMEOUT)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr + n1.log_tail() + n2.log_tail()
    assert json.loads(result.stdout)["result"]["node"] == "n2"
    assert libvirt_state(n2, domain_uuid) == "running" and libvirt_state(n1, domain_uuid) is None
    try:
        wait_for(lambda: ticks(n2, "vmover") and min(ticks(n2, "vmover")) > before, timeout=120, interval=1,
                 what="vmover's ticks on n2")  # fmt: skip
    except TimeoutError as exc:  # say why: where libvirt has it, what its consoles say, the agents' lines on it
        vid = show(n1, "vmover")["id"]
        consoles = {n.node_name: n.cli("instance", "console", "vmover").stdout[-1500:] for n in (n1, n2)}
        logs = "\n".join(
            f"{n.node_name}: {ln}" for n in (n1, n2) for ln in n.log_tail(300_000).splitlines() if vid in ln
        )
        raise AssertionError(
            f"{exc} (ticks before: {before}); libvirt: n1 {libvirt_state(n1, domain_uuid)}, n2 "
            f"{libvirt_state(n2, domain_uuid)}\nconsoles: {consoles}\nagents' lines:\n{logs[-4000:]}"
        ) from None
    # the floating IP reaches it on n2 (NATed there now), and the source let go of the network
    wait_for(lambda: lan_ping(lan, address), timeout=60, interval=1, what=f"vmover behind {address} on n2")
    gap, gap_from, gap_to = ping_window(pingers)
    print(f"live migration of a VPC guest n1 -> n2: {took:.1f} s in all, floating-IP ping gap {gap:.2f} s (from "
          f"+{gap_from - started_epoch:.1f} to +{gap_to - started_epoch:.1f} s after the start)")  # fmt: skip
    wait_for(lambda: not built(n1), timeout=60, interval=1, what=f"n1's {service_ns} gone")
    assert built(n2)
    shown = show(n1, "vmover")
    assert shown["nics"][0]["ip"] == inst["nics"][0]["ip"] and shown["nics"][0]["mac"] == inst["nics"][0]["mac"]
    # its security group is enforced on n2: without the ICMP rule, the pings stop
    n1.cli("security-group", "rule", "remove", "default", rule, check=True)
    wait_for(lambda: not lan_ping(lan, address), timeout=60, interval=1, what="the pings refused on n2")

    # everything goes, and with it the network's namespace and dnsmasq on n2 (not left to the harness's teardown)
    n1.cli("instance", "delete", "vmover", check=True)
    wait_for(lambda: n1.cli("instance", "show", "vmover").returncode != 0, timeout=120, what="vmover deleted")
    n1.cli("floating-ip", "release", address, check=True)
    n1.cli("router", "remove-subnet", "edge", "app", check=True)
    n1.cli("router", "delete", "edge", check=True)
    n1.cli("subnet", "delete", "app", check=True)
    n1.cli("network", "delete", "vpc", check=True)
    wait_for(lambda: not built(n2), timeout=60, interval=1, what=f"n2's {service_ns} gone")


def lan_nic_follows(hosts: Cluster, user_data: Path) -> None:
    """A NIC straight on the LAN (provider bridge lanbr on each node) moves live with its guest: the target's DHCP
    port serves it, its security group is enforced there, the source's DHCP port goes."""
    n1, n2 = hosts.nodes
    lan = hosts.public
    assert lan is not None
    prefix = PUBLIC_CIDR.rsplit(".", 1)[0]
    n1.cli(
        "network", "create", "flat", "--external", "--provider", DIRECT, "--cidr", PUBLIC_CIDR,
        "--gateway", PUBLIC_GATEWAY, "--pool", f"{prefix}.200-{prefix}.249", check=True,
    )  # fmt: skip
    n1.cli("security-group", "create", "lanping", check=True)
    n1.cli("security-group", "rule", "add", "lanping", "ingress", "--protocol", "icmp", check=True)

    def dhcp_port(node: AgentNode) -> bool:
        return any(n.startswith("mcs-x") for n in node.exec("ls", "/run/netns").stdout.split())

    inst = launch(n1, "lmover", "guest-n1", user_data, "--nic", "network=flat,security-groups=lanping")
    address = inst["nics"][0]["ip"]
    assert inst["status"]["node"] == "n1" and address.startswith(f"{prefix}.2")
    wait_for(lambda: lan_ping(lan, address), timeout=BOOT_TIMEOUT, interval=1, what=f"lmover at {address} on n1")
    assert dhcp_port(n1) and not dhcp_port(n2)
    before = max(ticks(n1, "lmover"))
    pingers = [lan_pinger(lan, address, 0.2)]
    started = time.monotonic()
    result = n1.cli("-o", "json", "instance", "migrate", "lmover", "--node", "n2", "--wait", timeout=MIGRATE_TIMEOUT)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr + n1.log_tail() + n2.log_tail()
    wait_for(lambda: ticks(n2, "lmover") and min(ticks(n2, "lmover")) > before, timeout=120, interval=1,
             what="lmover's ticks on n2")  # fmt: skip
    wait_for(lambda: lan_ping(lan, address), timeout=60, interval=1, what=f"lmover at {address} on n2")
    gap = ping_gap(pingers)
    print(f"live migration of a guest straight on the LAN n1 -> n2: {took:.1f} s in all, ping gap {gap:.2f} s")
    wait_for(lambda: not dhcp_port(n1), timeout=60, interval=1, what="n1's DHCP port of flat gone")
    assert dhcp_port(n2) and show(n1, "lmover")["nics"][0]["ip"] == address
    n1.cli("instance", "delete", "lmover", check=True)
    wait_for(lambda: n1.cli("instance", "show", "lmover").returncode != 0, timeout=120, what="lmover deleted")
    wait_for(lambda: not dhcp_port(n2), timeout=60, interval=1, what="n2's DHCP port of flat gone")
    n1.cli("security-group", "delete", "lanping", check=True)
    n1.cli("subnet", "delete", "flat", check=True)
    n1.cli("network", "delete", "flat", check=True)


def reach(node: AgentNode, ip: str, timeout: float = 60) -> None:
    """Wait until the guest answers pings from ``node``; fail with what the node's network looks like otherwise."""
    try:
        wait_for(
            lambda: ping(node, ip), timeout=timeout, interval=1, what=f"the guest to answer pings on {node.node_name}"
        )
    except TimeoutError:
        diag = [node.exec(*cmd).stdout for cmd in (("ip", "neigh"), ("bridge", "link"), ("ip", "-br", "addr"),
                                                   ("nft", "list", "ruleset"))]  # fmt: skip
        raise AssertionError("\n".join(diag)) from None


def _domain_uuid(node: AgentNode) -> str:
    import libvirt

    assert node.libvirt is not None
    conn = libvirt.open(node.libvirt.uri)
    try:
        (dom,) = conn.listAllDomains(0)
        return dom.UUIDString()
    finally:
        conn.close()
