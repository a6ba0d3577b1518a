"""Real hosts: a two-node cluster whose nodes each run their own libvirtd (see ``harness.py``), with the busybox test
guest booted under TCG. One cluster for the whole module; at most two guests at once (2 CPU cores in CI).

Guests are observed through their consoles: each VPC guest runs a user-data script of *probes* (a shell command
retried once a second until it succeeds or its tries run out) in the background, and each probe prints one line,
``probe NAME ok: OUTPUT`` or ``probe NAME failed: OUTPUT``. A guest's peers' addresses are known before it boots
(IPAM assigns them when the instance record is committed), so the scripts can name them."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.cluster import harness
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
        BASELINE.update({node.node_name: node_state(node) for node in cluster})
        yield cluster


def scope(project: str | None) -> tuple[str, ...]:
    return ("--project", project) if project else ()


def launch(via: AgentNode, name: str, *args: str, project: str | None = None) -> dict:
    """``instance create NAME ARGS --wait`` through ``via``'s API; a node that joined the cluster moments ago
    publishes its capacity into the cluster's store at its next resync (a few seconds), so that refusal is retried."""

    def create() -> dict | None:
        result = via.cli(
            *scope(project), "-o", "json", "instance", "create", name, "--type", "m1.tiny", *args, "--wait",
            timeout=BOOT_TIMEOUT,
        )  # fmt: skip
        if result.returncode == 0:
            return json.loads(result.stdout)
        assert "has not registered its compute capacity" in result.stderr, result.stderr
        return None

    return wait_for(create, timeout=BOOT_TIMEOUT, interval=1, what=f"instance {name} created")


#: Each node's devices, named namespaces, nft tables and processes once the cluster is up, before any VPC.
BASELINE: dict[str, dict[str, list[str]]] = {}


def node_state(node: AgentNode) -> dict[str, list[str]]:
    """What a node holds that networking could leave behind: links of its namespace, named network namespaces, nft
    tables, the programs running in it, and the network reconciler's state directory."""
    procs = []
    for pid in harness.netns_pids(node.netns):
        with contextlib.suppress(OSError):
            procs.append(Path(f"/proc/{pid}/comm").read_text().strip())
    vpc_dir = node.data_dir / "vpc"
    return {
        "links": sorted(links(node.netns)),
        "netns": sorted(node.exec("ls", "/run/netns").stdout.split()),
        "nft": sorted(node.exec("nft", "list", "tables").stdout.splitlines()),
        "processes": sorted(p for p in procs if p not in ("nft", "ip", "nsenter")),  # short-lived helpers
        "files": sorted(p.name for p in vpc_dir.iterdir()) if vpc_dir.is_dir() else [],
    }


def console(node: AgentNode, name: str, project: str | None = None) -> str:
    return node.cli(*scope(project), "instance", "console", name, check=True).stdout


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


# -- VPC guests -----------------------------------------------------------------------------------------------------

PROBE_HEAD = """#!/bin/sh
probe() {
    name=$1; tries=$2; shift 2
    i=0
    while :; do
        if out=$(eval "$*" 2>&1); then
            echo "probe $name ok: $(echo "$out" | tr '\\n' ' ' | cut -c1-300)"
            return 0
        fi
        i=$((i + 1))
        [ "$i" -ge "$tries" ] && break
        sleep 1
    done
    echo "probe $name failed: $(echo "$out" | tr '\\n' ' ' | cut -c1-300)"
    return 1
}
"""
METADATA = "http://169.254.169.254/latest/meta-data"
# (Debian's static busybox wget segfaults with -T: timeouts come from `timeout`.)


def probes(tmp: Path, name: str, checks: list[tuple[str, int, str]]) -> str:
    """Write a user-data file running ``checks`` (``(probe name, tries, shell command)``, in order) in the background
    of the guest's boot; return its path."""
    body = "".join(f"probe {pname} {tries} {json.dumps(cmd)}\n" for pname, tries, cmd in checks)
    path = tmp / f"{name}.user-data"
    path.write_text(PROBE_HEAD + "(\n" + body + ") &\n")
    return str(path)


def probe_result(
    node: AgentNode, instance: str, probe: str, *, project: str | None = None, timeout: float = BOOT_TIMEOUT
) -> tuple[bool, str]:
    """Wait for the guest's line about ``probe``; return (succeeded, its output)."""
    pattern = re.compile(rf"^probe {re.escape(probe)} (ok|failed): ?(.*)$", re.MULTILINE)

    def line() -> re.Match[str] | None:
        return pattern.search(console(node, instance, project))

    match = wait_for(line, timeout=timeout, interval=1, what=f"{instance}'s probe {probe}")
    return match.group(1) == "ok", match.group(2)


def ok(node: AgentNode, instance: str, probe: str, *, project: str | None = None) -> str:
    succeeded, output = probe_result(node, instance, probe, project=project)
    tail = console(node, instance, project)[-3000:]
    assert succeeded, f"{instance}: probe {probe} failed: {output}\n--- console:\n{tail}"
    return output


def delete(node: AgentNode, *names: str, project: str | None = None) -> None:
    for name in names:
        node.cli(*scope(project), "instance", "delete", name, check=True)
    for name in names:
        wait_for(
            lambda name=name: node.cli(*scope(project), "instance", "show", name).returncode != 0,
            timeout=120,
            interval=1,
            what=f"{name} deleted",
        )


@pytest.fixture(autouse=True)
def no_guests_left(hosts: Cluster) -> Iterator[None]:
    """One guest test at a time on this host (xdist workers take turns), and whatever a test leaves (it failed half
    way) is deleted before the next one starts: at most two guests run at once."""
    with harness.guest_slot():
        yield
        n1 = hosts.nodes[0]
        for project in (None, "other"):
            listed = n1.cli(*scope(project), "-o", "json", "instance", "list")
            if listed.returncode == 0:
                names = [i["name"] for i in json.loads(listed.stdout)]
                if names:
                    delete(n1, *names, project=project)


@pytest.fixture(scope="module")
def vpc(hosts: Cluster) -> str:
    """Network ``vpc`` 10.10.0.0/16 with subnet ``web`` 10.10.1.0/24 in the default project; returns the subnet."""
    n1 = hosts.nodes[0]
    n1.cli("network", "create", "vpc", "--cidr", "10.10.0.0/16", check=True)
    n1.cli("subnet", "create", "web", "--network", "vpc", "--cidr", "10.10.1.0/24", check=True)
    return "web"


def test_two_guests_on_two_nodes_in_one_network_talk_resolve_each_other_and_get_only_their_own_metadata(
    hosts: Cluster, vpc: str, tmp_path: Path
):
    n1, n2 = hosts.nodes
    # b first: its address is then known to a's script; b finds a by name.
    b_data = probes(tmp_path, "b", [
        ("ping-a", 240, "ping -c 1 -W 2 a.vpc.internal"),
        ("http-a", 30, "timeout 5 wget -q -O - http://a.vpc.internal/"),
        ("done", 1, "echo done > /www/done"),  # a waits for this before it breaks its own network
    ])  # fmt: skip
    b = launch(n1, "b", "--image", "guest-n2", "--nic", "subnet=web", "--user-data", b_data)
    b_ip = b["nics"][0]["ip"]
    a_data = probes(tmp_path, "a", [
        ("ping-b", 240, f"ping -c 1 -W 2 {b_ip}"),
        ("http-b", 30, f"timeout 5 wget -q -O - http://{b_ip}/"),
        ("dns-b", 30, "nslookup b.vpc.internal"),
        ("metadata-id", 30, f"timeout 5 wget -q -O - {METADATA}/instance-id"),
        ("metadata-ip", 30, f"timeout 5 wget -q -O - {METADATA}/local-ipv4"),
        ("metadata-hostname", 30, f"timeout 5 wget -q -O - {METADATA}/hostname"),
        # Last, as it breaks a's network (so once b is done with a): a takes b's address and asks as b.
        ("b-done", 240, f"timeout 5 wget -q -O - http://{b_ip}/done"),
        ("metadata-as-b", 3, f"ip addr flush dev eth0; ip addr add {b_ip}/24 dev eth0; "
                             f"ip route add default via 10.10.1.1; timeout 5 wget -q -O - {METADATA}/instance-id"),
    ])  # fmt: skip
    a = launch(n1, "a", "--image", "guest-n1", "--nic", "subnet=web", "--user-data", a_data)
    a_ip = a["nics"][0]["ip"]
    assert a["status"]["node"] == "n1" and b["status"]["node"] == "n2" and a_ip != b_ip

    # DHCP (each node's dnsmasq serves its own guests) hands out exactly what IPAM assigned.
    for node, name, ip in ((n1, "a", a_ip), (n2, "b", b_ip)):
        marker = f"minicloud-guest: ip={ip}"
        wait_for(
            lambda node=node, name=name, marker=marker: marker in console(node, name),
            timeout=BOOT_TIMEOUT,
            interval=1,
            what=f"{name}'s DHCP lease",
        )
        assert re.findall(r"minicloud-guest: ip=(\S+)", console(node, name)) == [ip]

    # Across the VXLAN between the nodes, both ways: ICMP and HTTP.
    ok(n1, "a", "ping-b")
    assert "<h1>b</h1>" in ok(n1, "a", "http-b")
    ok(n2, "b", "ping-a")  # by name: DNS of the network answers on n2 for a guest on n1
    assert "<h1>a</h1>" in ok(n2, "b", "http-a")
    # DNS: NAME.NETWORK.internal for every port of the network, wherever it runs.
    assert b_ip in ok(n1, "a", "dns-b")
    # The metadata service answers a with a's own data.
    assert ok(n1, "a", "metadata-id").strip() == a["id"]
    assert ok(n1, "a", "metadata-ip").strip() == a_ip
    assert ok(n1, "a", "metadata-hostname").strip().split(".")[0] == "a"
    # ... and nobody else's: from b's address (a's MAC, anti-spoofing on a's tap), no answer at all.
    ok(n1, "a", "b-done")
    answered, output = probe_result(n1, "a", "metadata-as-b")
    assert not answered and b["id"] not in output, output

    delete(n1, "a", "b")


def test_two_projects_with_the_same_cidr_cannot_reach_each_other(hosts: Cluster, vpc: str, tmp_path: Path):
    n1, n2 = hosts.nodes
    n1.cli("project", "create", "other", check=True)
    p2 = ("--project", "other")
    n1.cli(*p2, "network", "create", "vpc", "--cidr", "10.10.0.0/16", check=True)
    n1.cli(*p2, "subnet", "create", "web", "--network", "vpc", "--cidr", "10.10.1.0/24", check=True)
    n1.cli(
        *p2, "image", "import", "guest-n1", "--kernel", str(n1.image_dir / "vmlinuz"),
        "--initrd", str(n1.image_dir / "initrd.img"), check=True,
    )  # fmt: skip
    mine_data = probes(tmp_path, "mine", [
        ("gateway", 240, "ping -c 1 -W 2 10.10.1.1"),
        ("theirs", 10, "ping -c 1 -W 1 10.10.1.30"),
    ])  # fmt: skip
    theirs_data = probes(tmp_path, "theirs", [
        ("gateway", 240, "ping -c 1 -W 2 10.10.1.1"),
        ("metadata-id", 30, f"timeout 5 wget -q -O - {METADATA}/instance-id"),
        ("mine-ping", 10, "ping -c 1 -W 1 10.10.1.20"),
        ("mine-http", 5, "timeout 3 wget -q -O - http://10.10.1.20/"),
        ("mine-dns", 3, "nslookup mine.vpc.internal"),
    ])  # fmt: skip
    mine = launch(n1, "mine", "--image", "guest-n2", "--nic", "subnet=web,ip=10.10.1.20", "--user-data", mine_data)
    theirs = launch(
        n1, "theirs", "--image", "guest-n1", "--nic", "subnet=web,ip=10.10.1.30", "--user-data", theirs_data,
        project="other",
    )  # fmt: skip
    assert mine["status"]["node"] == "n2" and theirs["status"]["node"] == "n1"
    # Both networks work (each guest reaches its own gateway; the other project's guest gets its own metadata) ...
    ok(n2, "mine", "gateway")
    ok(n1, "theirs", "gateway", project="other")
    assert ok(n1, "theirs", "metadata-id", project="other").strip() == theirs["id"]
    # ... and neither reaches the other, though both use 10.10.1.0/24 on the same two nodes' underlay.
    assert probe_result(n2, "mine", "theirs")[0] is False
    for probe in ("mine-ping", "mine-http", "mine-dns"):
        assert probe_result(n1, "theirs", probe, project="other")[0] is False, probe

    delete(n1, "mine")
    delete(n1, "theirs", project="other")


def poller(tmp: Path, name: str, command: str, interval: float = 1) -> str:
    """A user-data file that runs ``command`` over and over in the background, printing ``poll N ok|fail``; returns
    its path."""
    path = tmp / f"{name}.user-data"
    path.write_text(
        "#!/bin/sh\n(\nn=0\nwhile :; do\n    n=$((n + 1))\n"
        f"    if {command} >/dev/null 2>&1; then r=ok; else r=fail; fi\n"
        f'    echo "poll $n $r"\n    sleep {interval:g}\ndone\n) &\n'
    )
    return str(path)


def polls(node: AgentNode, instance: str, text: str | None = None) -> list[bool]:
    """The poller's attempts so far, in order (True: it worked), from its console (or ``text``)."""
    text = console(node, instance) if text is None else text
    return [r == "ok" for r in re.findall(r"^poll \d+ (ok|fail)\r?$", text, re.MULTILINE)]


def next_poll(node: AgentNode, instance: str, want: bool, what: str) -> None:
    """Wait until an attempt that starts after now gives ``want`` (earlier ones may still be in flight)."""
    seen = len(polls(node, instance)) + 1  # the one in flight now may have started before the change

    def reached() -> bool:
        return want in polls(node, instance)[seen:]

    wait_for(reached, timeout=BOOT_TIMEOUT, interval=1, what=what)


def test_a_security_group_rule_opens_and_closes_a_port_on_a_running_guest(hosts: Cluster, vpc: str, tmp_path: Path):
    n1, n2 = hosts.nodes
    n1.cli("security-group", "create", "web", check=True)  # egress all, no ingress
    server = launch(n1, "server", "--image", "guest-n2", "--nic", f"subnet={vpc},security-groups=web")
    data = poller(tmp_path, "client", f"timeout 3 wget -q -O - http://{server['nics'][0]['ip']}/")
    launch(n1, "client", "--image", "guest-n1", "--nic", f"subnet={vpc}", "--user-data", data)
    booted(n2, "server")
    booted(n1, "client")
    # The client (group default) may not open connections to the server (group web: no ingress rule) ...
    wait_for(lambda: len(polls(n1, "client")) >= 3, timeout=BOOT_TIMEOUT, interval=1, what="the client's polls")
    assert not any(polls(n1, "client")), "the server answered before any rule allowed it"
    # ... until a rule opens tcp/80, on the running guest ...
    before = {r["id"] for r in n1.json("security-group", "show", "web")["rules"]}
    n1.cli("security-group", "rule", "add", "web", "ingress", "--protocol", "tcp", "--port", "80", check=True)
    [rule] = [r["id"] for r in n1.json("security-group", "show", "web")["rules"] if r["id"] not in before]
    next_poll(n1, "client", True, "the rule to open port 80")
    # ... and removing the rule closes it again for new connections.
    n1.cli("security-group", "rule", "remove", "web", rule, check=True)
    next_poll(n1, "client", False, "the removed rule to close port 80")
    count = len(polls(n1, "client"))
    wait_for(lambda: len(polls(n1, "client")) >= count + 2, timeout=60, interval=1, what="more polls")
    assert polls(n1, "client")[-2:] == [False, False]

    delete(n1, "client", "server")
    n1.cli("security-group", "delete", "web", check=True)


def overlay_devices(node: AgentNode) -> dict[str, int]:
    """``{name: ifindex}`` of the node's networking devices (bridges, VXLAN, service veths, taps)."""
    out = subprocess.run(["ip", "-n", node.netns, "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {link["ifname"]: link["ifindex"] for link in json.loads(out.stdout) if link["ifname"].startswith("mc")}


def test_an_agent_sigkilled_under_guest_traffic_loses_few_packets_and_recreates_no_device(
    hosts: Cluster, vpc: str, tmp_path: Path
):
    n1, n2 = hosts.nodes
    target = launch(n1, "target", "--image", "guest-n1", "--nic", f"subnet={vpc}")
    data = poller(tmp_path, "pinger", f"ping -c 1 -W 1 {target['nics'][0]['ip']}", interval=0.5)
    pinger = launch(n1, "pinger", "--image", "guest-n2", "--nic", f"subnet={vpc}", "--user-data", data)
    log = n2.data_dir / "instances" / pinger["id"] / "console.log"  # read directly: n2's API is down for a while

    def pings() -> list[bool]:
        return polls(n2, "pinger", log.read_text(errors="replace"))

    wait_for(lambda: pings()[-3:] == [True] * 3, timeout=BOOT_TIMEOUT, interval=1, what="the pings to get through")
    devices = overlay_devices(n2)
    assert any(name.startswith("mcv-") for name in devices) and any(name.startswith("mct-") for name in devices)

    n2.kill()  # SIGKILL: no clean shutdown
    start = len(pings())
    wait_for(lambda: len(pings()) >= start + 4, timeout=60, interval=0.5, what="pings while the agent is down")
    n2.start()
    restarted = len(pings())
    wait_for(lambda: len(pings()) >= restarted + 10, timeout=120, interval=1, what="pings after the restart")
    lost = pings()[start:].count(False)
    assert lost <= 3, f"{lost} pings lost around the agent's SIGKILL and restart: {pings()[start:]}"
    # The restarted agent adopted the bridge, VXLAN device, service veth and taps: same devices, same ifindexes.
    assert overlay_devices(n2) == devices

    delete(n1, "pinger", "target")


def test_deleting_everything_returns_every_node_to_its_starting_devices_rules_and_processes(hosts: Cluster, vpc: str):
    n1 = hosts.nodes[0]
    for project in (None, "other"):
        for kind in ("subnet", "network"):
            listed = n1.cli(*scope(project), "-o", "json", kind, "list")
            if listed.returncode == 0:
                for item in json.loads(listed.stdout):
                    n1.cli(*scope(project), kind, "delete", item["name"], check=True)

    for node in hosts:

        def clean(node: AgentNode = node) -> bool:
            return node_state(node) == BASELINE[node.node_name]

        try:
            wait_for(clean, timeout=60, interval=1, what=f"{node.node_name} back to its starting state")
        except TimeoutError:
            assert node_state(node) == BASELINE[node.node_name]  # shows the difference


def test_cleanup_stale_removes_a_crashed_runs_real_hosts_with_their_libvirtd(real_hosts: None, tmp_path: Path):
    """A test process SIGKILLed with a real host up (its libvirtd, holder, public LAN): the next run's
    ``cleanup_stale`` removes the namespaces and everything running in them."""
    code = (
        "import os, signal\n"
        "from tests.cluster.harness import Cluster\n"
        f"c = Cluster({str(tmp_path / 'crashed')!r}, 1, libvirt=True, public=True)\n"
        "print(c.id, c.nodes[0].libvirt.pid(), c.nodes[0].libvirt.holder_pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=harness.REPO)
    assert proc.returncode == -9, proc.stderr
    cluster_id, libvirtd, holder = proc.stdout.split()
    names = [f"mcs{cluster_id}", f"mcp{cluster_id}", f"mcn{cluster_id}n1"]
    assert set(names) <= set(harness.netns_list())
    assert harness.alive(int(libvirtd)) and harness.alive(int(holder))

    removed = harness.cleanup_stale()
    assert set(names) <= set(removed)
    assert not set(names) & set(harness.netns_list())
    assert not harness.alive(int(libvirtd)) and not harness.alive(int(holder))
