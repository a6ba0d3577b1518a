"""Real hosts: routers' data plane on a two-node cluster (each node its own libvirtd, the busybox test guest under TCG,
``harness.py``) whose nodes' ``eth1`` (``[network.providers] lan = "eth1"``) are plugged into the harness's public
LAN. One cluster for the module; guest tests take turns through :func:`harness.guest_slot` (at most two guests).

The public namespace runs a small HTTP server that answers with the address it sees the client come from: a guest
that fetches it through its router's SNAT reads the router's external address."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import harness
from tests.cluster.harness import PUBLIC_CIDR, PUBLIC_GATEWAY, Cluster, wait_for
from tests.cluster.test_vpc import booted, console, delete, launch, links, ok, probes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PROVIDER = "lan"
DIRECT = "flat"  # the provider of NICs straight on the LAN: each node's bridge lanbr
ECHO_PORT = 8000
ECHO = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"from {self.client_address[0]}\\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", PORT), H).serve_forever()
""".replace("PORT", str(ECHO_PORT))


@pytest.fixture(scope="module")
def hosts(real_hosts: None, guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two started, joined nodes ``n1``/``n2`` with the test guest imported as ``guest-n1``/``guest-n2``, their
    ``eth1`` the provider interface ``lan`` and their bridge ``lanbr`` (with ``eth2``, on the same LAN) the provider
    ``flat``; an echo server on the public LAN's gateway address."""
    with Cluster(tmp_path_factory.mktemp("routers"), 2, libvirt=True, public=True) as cluster:
        assert cluster.public is not None
        for node in cluster:
            # eth1 for routers' legs (macvlans); eth2 a port of the Linux bridge lanbr, where NICs plug straight in
            harness.plug_lan_bridge(cluster.public, node)
            node.config.write_text(
                node.config.read_text() + f'\n[network.providers]\n{PROVIDER} = "eth1"\n{DIRECT} = "lanbr"\n'
            )
        cluster.start_all().form()
        for node in cluster:
            for f in ("vmlinuz", "initrd.img"):
                shutil.copy(guest_image / f, node.image_dir / f)
            node.cli(
                "image", "import", f"guest-{node.node_name}", "--kernel", str(node.image_dir / "vmlinuz"),
                "--initrd", str(node.image_dir / "initrd.img"), check=True,
            )  # fmt: skip
        echo = subprocess.Popen(["ip", "netns", "exec", cluster.public.netns, sys.executable, "-c", ECHO])
        try:
            wait_for(
                lambda: cluster.public.exec("ss", "-ltn").stdout.count(f":{ECHO_PORT} ") > 0,  # type: ignore[union-attr]
                timeout=20,
                interval=0.2,
                what="the echo server on the public LAN",
            )
            yield cluster
        finally:
            echo.terminate()
            echo.wait(10)


@pytest.fixture(autouse=True)
def one_guest_test_at_a_time(hosts: Cluster) -> Iterator[None]:
    with harness.guest_slot():
        yield
        n1 = hosts.nodes[0]
        listed = n1.cli("-o", "json", "instance", "list")
        if listed.returncode == 0 and (names := [i["name"] for i in json.loads(listed.stdout)]):
            delete(n1, *names)


@pytest.fixture(scope="module")
def public(hosts: Cluster) -> str:
    """The external network ``public`` on the harness's public LAN (provider ``lan``), pool .100-.199."""
    prefix = PUBLIC_CIDR.rsplit(".", 1)[0]
    hosts.nodes[0].cli(
        "network", "create", "public", "--external", "--provider", PROVIDER, "--cidr", PUBLIC_CIDR,
        "--gateway", PUBLIC_GATEWAY, "--pool", f"{prefix}.100-{prefix}.199", check=True,
    )  # fmt: skip
    return "public"


def test_a_guest_reaches_the_public_lan_through_its_routers_snat_on_its_own_node(
    hosts: Cluster, public: str, tmp_path: Path
):
    n1, n2 = hosts.nodes
    n1.cli("network", "create", "vpc", "--cidr", "10.20.0.0/16", check=True)
    n1.cli("subnet", "create", "web", "--network", "vpc", "--cidr", "10.20.1.0/24", check=True)
    router = json.loads(
        n1.cli("-o", "json", "router", "create", "edge", "--external-network", public, check=True).stdout
    )
    external = router["external_address"]
    assert external and external.startswith(PUBLIC_CIDR.rsplit(".", 1)[0] + ".")
    n1.cli("router", "add-subnet", "edge", "web", check=True)
    vni = json.loads(n1.cli("-o", "json", "network", "show", "vpc", check=True).stdout)["vni"]

    url = f"http://{PUBLIC_GATEWAY}:{ECHO_PORT}/"
    data = probes(tmp_path, "g", [("snat", 240, f"timeout 5 wget -q -O - {url}")])
    g = launch(n1, "g", "--image", "guest-n2", "--nic", "subnet=web", "--user-data", data)
    assert g["status"]["node"] == "n2"
    # The echo server saw the router's external address, not the guest's private one.
    assert ok(n2, "g", "snat").strip() == f"from {external}", console(n2, "g")[-2000:]

    # The egress meter's input: n2 counted what left the router's external leg and reported it into the router
    # (about once a minute; `router show` shows it, docs/billing.md "Router egress").
    def egress() -> dict:
        shown = json.loads(n1.cli("-o", "json", "router", "show", "edge", check=True).stdout)
        return {leg: e for leg, e in shown["egress"].items() if e["bytes"] > 0}

    counted = wait_for(egress, timeout=180, interval=2, what="n2's egress counter in the router")
    assert list(counted) == [f"n2/{vni}"] and counted[f"n2/{vni}"]["since"] > 0, counted

    # Built on n2 only, inside the network's service namespace; the external leg is a macvlan on n2's own eth1.
    name = f"mcs-{vni:06x}"
    inside = ("nsenter", f"--net=/run/netns/{name}")
    assert f"{external}/24" in n2.exec(*inside, "ip", "-4", "-o", "addr", "show", "mce0", check=True).stdout
    assert n2.exec(*inside, "sysctl", "-n", "net.ipv4.ip_forward", check=True).stdout.strip() == "1"
    assert name not in n1.exec("ls", "/run/netns").stdout.split()
    assert not [name for name in links(None) if name.startswith("mce")]  # nothing in the host's namespace
    assert not [name for name in links(n2.netns) if name.startswith("mce")]  # moved into the service namespace

    # Inbound: nothing new from the public LAN is forwarded to the private side, even with a route pointing there.
    assert hosts.public is not None
    hosts.public.exec("ip", "route", "add", "10.20.1.0/24", "via", external, check=True)
    try:
        blocked = hosts.public.exec("ping", "-c", "2", "-W", "1", g["nics"][0]["ip"])
        assert blocked.returncode != 0, blocked.stdout
    finally:
        hosts.public.exec("ip", "route", "del", "10.20.1.0/24")

    # A guest of the same router on n1: n1's leg has an address (and MAC) of its own on the LAN, so each node's
    # SNATed connections come back to that node (one address and MAC on two switch ports would send the replies to
    # whichever node spoke last).
    data = probes(tmp_path, "g1", [("snat", 240, f"timeout 5 wget -q -O - {url}")])
    g1 = launch(n1, "g1", "--image", "guest-n1", "--nic", "subnet=web", "--user-data", data)
    assert g1["status"]["node"] == "n1"
    seen = ok(n1, "g1", "snat").strip()
    shown = json.loads(n1.cli("-o", "json", "router", "show", "edge", check=True).stdout)
    assert shown["external_address"] == external and shown["node_addresses"]["n2"] == external, shown
    other = shown["node_addresses"]["n1"]
    assert seen == f"from {other}" and other != external, (seen, shown)
    assert f"{other}/24" in n1.exec(*inside, "ip", "-4", "-o", "addr", "show", "mce0", check=True).stdout
    macs = {json.loads(node.exec(*inside, "ip", "-j", "link", "show", "mce0", check=True).stdout)[0]["address"]
            for node in (n1, n2)}  # fmt: skip
    assert len(macs) == 2, macs
    delete(n1, "g1")

    delete(n1, "g")
    n1.cli("router", "remove-subnet", "edge", "web", check=True)
    n1.cli("router", "delete", "edge", check=True)
    n1.cli("subnet", "delete", "web", check=True)
    n1.cli("network", "delete", "vpc", check=True)
    wait_for(
        lambda: name not in n2.exec("ls", "/run/netns").stdout.split(), timeout=60, interval=1, what=f"n2's {name} gone"
    )


def test_a_floating_ip_reaches_its_guest_from_the_public_lan_and_follows_it_to_the_other_node(
    hosts: Cluster, public: str, tmp_path: Path
):
    n1, n2 = hosts.nodes
    assert hosts.public is not None
    n1.cli("network", "create", "vpc2", "--cidr", "10.30.0.0/16", check=True)
    n1.cli("subnet", "create", "app", "--network", "vpc2", "--cidr", "10.30.1.0/24", check=True)
    n1.cli("router", "create", "edge2", "--external-network", public, check=True)
    n1.cli("router", "add-subnet", "edge2", "app", check=True)
    add = ("security-group", "rule", "add", "default", "ingress", "--protocol", "tcp", "--port", "80")
    rule = json.loads(n1.cli("-o", "json", *add, check=True).stdout)
    vni = json.loads(n1.cli("-o", "json", "network", "show", "vpc2", check=True).stdout)["vni"]
    fip = json.loads(n1.cli("-o", "json", "floating-ip", "allocate", "--network", public, check=True).stdout)
    address = fip["address"]
    assert fip["instance"] is None and address.startswith(PUBLIC_CIDR.rsplit(".", 1)[0] + ".")

    def serves(name: str) -> bool:
        out = hosts.public.exec("curl", "-sS", "--max-time", "3", f"http://{address}/")  # type: ignore[union-attr]
        return f"<h1>{name}</h1>" in out.stdout

    def legs(node) -> list[str]:
        out = node.exec("nsenter", f"--net=/run/netns/mcs-{vni:06x}", "ip", "-br", "link").stdout
        return [line.split("@")[0] for line in out.splitlines() if line.startswith("mcf-")]

    # f1 (on n1) fetches the floating IP until f2 (on n2) answers it: hairpin across nodes, n1's guest reaching the
    # LAN from n1's own leg address (not the address n2's leg holds)
    cross = probes(tmp_path, "f1", [("cross", 400, f"timeout 5 wget -q -O - http://{address}/ | grep '<h1>f2</h1>'")])
    f1 = launch(n1, "f1", "--image", "guest-n1", "--nic", "subnet=app", "--user-data", cross)
    booted(n1, "f1")
    n1.cli("floating-ip", "associate", address, "f1", check=True)
    wait_for(lambda: serves("f1"), timeout=90, interval=1, what=f"f1 behind {address}")
    assert legs(n1) and legs(n2) == []  # NATed (and ARP answered) on f1's node only

    # f2 fetches the floating IP until f2 answers it: once it is f2's own, hairpin NAT on n2 brings it back to f2
    # (before that, f1 answers it across the nodes)
    data = probes(tmp_path, "f2", [("hairpin", 300, f"timeout 5 wget -q -O - http://{address}/ | grep '<h1>f2</h1>'")])
    launch(n1, "f2", "--image", "guest-n2", "--nic", "subnet=app", "--user-data", data)
    booted(n2, "f2")
    moved = json.loads(n1.cli("-o", "json", "floating-ip", "associate", address, "f2", check=True).stdout)
    assert moved["fixed_address"] not in (None, f1["nics"][0]["ip"])
    wait_for(lambda: serves("f2"), timeout=90, interval=1, what=f"f2 behind {address} after the move")
    assert legs(n2) and legs(n1) == []  # the old node let go (and n2 announced it: the LAN follows at once)
    assert "<h1>f2</h1>" in ok(n2, "f2", "hairpin")  # reached from inside its own network (hairpin NAT)
    assert "<h1>f2</h1>" in ok(n1, "f1", "cross")  # and from its network's guest on the other node

    n1.cli("floating-ip", "disassociate", address, check=True)
    wait_for(lambda: not serves("f2"), timeout=60, interval=1, what=f"{address} disassociated")
    n1.cli("floating-ip", "release", address, check=True)
    delete(n1, "f1", "f2")
    n1.cli("security-group", "rule", "remove", "default", rule["rules"][-1]["id"], check=True)
    n1.cli("router", "remove-subnet", "edge2", "app", check=True)
    n1.cli("router", "delete", "edge2", check=True)
    n1.cli("subnet", "delete", "app", check=True)
    n1.cli("network", "delete", "vpc2", check=True)


def test_east_west_between_two_subnets_of_a_router_is_routed_on_the_source_node_across_nodes(
    hosts: Cluster, tmp_path: Path
):
    n1, n2 = hosts.nodes
    n1.cli("network", "create", "vpc3", "--cidr", "10.40.0.0/16", check=True)
    n1.cli("subnet", "create", "left", "--network", "vpc3", "--cidr", "10.40.1.0/24", check=True)
    n1.cli("subnet", "create", "right", "--network", "vpc3", "--cidr", "10.40.2.0/24", check=True)
    n1.cli("router", "create", "mid", check=True)
    n1.cli("router", "add-subnet", "mid", "left", check=True)
    n1.cli("router", "add-subnet", "mid", "right", check=True)
    vni = json.loads(n1.cli("-o", "json", "network", "show", "vpc3", check=True).stdout)["vni"]
    b = launch(n1, "b", "--image", "guest-n2", "--nic", "subnet=right")
    b_ip = b["nics"][0]["ip"]
    data = probes(tmp_path, "a", [
        ("ping-b", 240, f"ping -c 1 -W 2 {b_ip}"),
        ("http-b", 30, f"timeout 5 wget -q -O - http://{b_ip}/"),
    ])  # fmt: skip
    launch(n1, "a", "--image", "guest-n1", "--nic", "subnet=left", "--user-data", data)
    assert b_ip.startswith("10.40.2.")
    ok(n1, "a", "ping-b")
    assert "<h1>b</h1>" in ok(n1, "a", "http-b")
    table = f"table bridge minicloud_rtr_{vni:06x}"
    for node in (n1, n2):  # each node routes what its guests send, with a source MAC of its own across the VXLAN
        assert table in node.exec("nft", "list", "tables", check=True).stdout

    delete(n1, "a", "b")
    for sub in ("left", "right"):
        n1.cli("router", "remove-subnet", "mid", sub, check=True)
        n1.cli("subnet", "delete", sub, check=True)
    n1.cli("router", "delete", "mid", check=True)
    n1.cli("network", "delete", "vpc3", check=True)
    for node in (n1, n2):
        wait_for(
            lambda node=node: table not in node.exec("nft", "list", "tables").stdout,
            timeout=60,
            interval=1,
            what=f"{node.node_name}'s {table} gone",
        )


def test_east_west_between_two_networks_of_a_router_links_their_namespaces_on_every_node_that_needs_them(
    hosts: Cluster, tmp_path: Path
):
    """One router on subnets of two networks: a guest of `east` on n1 pings and fetches the page of a guest of
    `west` on n2. Each node carries both networks (n1 `west` for its guest's traffic to n2, n2 `east` for the
    replies), their service namespaces joined by a veth; everything goes with the guests."""
    n1, n2 = hosts.nodes
    for net, prefix in (("east", "10.50"), ("west", "10.60")):
        n1.cli("network", "create", net, "--cidr", f"{prefix}.0.0/16", check=True)
        n1.cli("subnet", "create", f"{net}1", "--network", net, "--cidr", f"{prefix}.1.0/24", check=True)
    n1.cli("router", "create", "link", check=True)
    n1.cli("router", "add-subnet", "link", "east1", check=True)
    n1.cli("router", "add-subnet", "link", "west1", check=True)
    east, west = (n1.json("network", "show", net)["vni"] for net in ("east", "west"))
    b = launch(n1, "b", "--image", "guest-n2", "--nic", "subnet=west1")
    b_ip = b["nics"][0]["ip"]
    data = probes(tmp_path, "a", [
        ("ping-b", 240, f"ping -c 1 -W 2 {b_ip}"),
        ("http-b", 30, f"timeout 5 wget -q -O - http://{b_ip}/"),
    ])  # fmt: skip
    launch(n1, "a", "--image", "guest-n1", "--nic", "subnet=east1", "--user-data", data)
    assert b_ip.startswith("10.60.1.")
    ok(n1, "a", "ping-b")
    assert "<h1>b</h1>" in ok(n1, "a", "http-b")
    for node in (n1, n2):  # both networks on both nodes, their namespaces linked
        spaces = node.exec("ls", "/run/netns", check=True).stdout.split()
        assert {f"mcs-{east:06x}", f"mcs-{west:06x}"} <= set(spaces), (node.node_name, spaces)
        inside = ("nsenter", f"--net=/run/netns/mcs-{east:06x}")
        assert f"mcr-{west:06x}" in node.exec(*inside, "ip", "-o", "link", "show", check=True).stdout

    delete(n1, "a", "b")
    for node in (n1, n2):
        wait_for(
            lambda node=node: (
                not {f"mcs-{east:06x}", f"mcs-{west:06x}"} & set(node.exec("ls", "/run/netns").stdout.split())
            ),
            timeout=60,
            interval=1,
            what=f"{node.node_name}'s namespaces of east and west gone with the guests",
        )
    for sub in ("east1", "west1"):
        n1.cli("router", "remove-subnet", "link", sub, check=True)
        n1.cli("subnet", "delete", sub, check=True)
    n1.cli("router", "delete", "link", check=True)
    for net in ("east", "west"):
        n1.cli("network", "delete", net, check=True)


def test_a_nic_straight_on_the_lan_gets_its_ipam_address_by_dhcp_and_its_groups_decide_what_comes_in(
    hosts: Cluster, tmp_path: Path
):
    """The homelab habit: `--nic network=flat` puts the guest on the LAN itself (its tap a port of n2's bridge
    lanbr), with the address IPAM gave its port, served by n2's DHCP port on that bridge; no NAT on the way; its
    security groups and anti-spoofing apply there as on a VPC; the DHCP port goes when the guest does."""
    n1, n2 = hosts.nodes
    assert hosts.public is not None
    prefix = PUBLIC_CIDR.rsplit(".", 1)[0]
    n1.cli(
        "network", "create", "flat", "--external", "--provider", DIRECT, "--cidr", PUBLIC_CIDR,
        "--gateway", PUBLIC_GATEWAY, "--pool", f"{prefix}.200-{prefix}.249", check=True,
    )  # fmt: skip
    flat_id = n1.json("network", "show", "flat")["id"]
    n1.cli("security-group", "create", "lanweb", check=True)  # egress all, no ingress
    url = f"http://{PUBLIC_GATEWAY}:{ECHO_PORT}/"
    data = probes(tmp_path, "d", [("lan", 240, f"timeout 5 wget -q -O - {url}")])
    g = launch(n1, "d", "--image", "guest-n2", "--nic", "network=flat,security-groups=lanweb", "--user-data", data)
    assert g["status"]["node"] == "n2"
    address = g["nics"][0]["ip"]
    assert address.startswith(f"{prefix}.2")
    # DHCP gave the guest IPAM's address, and the LAN sees it as itself (no NAT)
    assert ok(n2, "d", "lan").strip() == f"from {address}", console(n2, "d")[-2000:]

    # n2's DHCP port: a namespace with an address of the pool on a veth in lanbr, dnsmasq serving DHCP only
    [space] = [n for n in n2.exec("ls", "/run/netns", check=True).stdout.split() if n.startswith("mcs-x")]
    inside = n2.exec("nsenter", f"--net=/run/netns/{space}", "ip", "-4", "-o", "addr", "show", "mcs0", check=True)
    dhcp_address = inside.stdout.split("inet ")[1].split("/")[0]
    assert dhcp_address.startswith(f"{prefix}.2") and dhcp_address != address
    veth = [name for name in links(n2.netns) if name.startswith("mcp-")]
    assert len(veth) == 1
    assert f"/{flat_id}/dnsmasq.pid" in n2.exec("ps", "-ww", "-eo", "args", check=True).stdout
    assert "master lanbr" in n2.exec("ip", "-o", "link", "show", veth[0], check=True).stdout
    assert not [n for n in n1.exec("ls", "/run/netns").stdout.split() if n.startswith("mcs-x")]  # n1 has no NIC of it

    # its groups decide what comes in from the LAN: nothing, then tcp/80, then nothing again
    def fetch() -> bool:
        return hosts.public.exec("curl", "-s", "-m", "2", "-o", "/dev/null", f"http://{address}/").returncode == 0  # type: ignore[union-attr]

    assert not fetch(), "the guest answered the LAN before any rule allowed it"
    n1.cli("security-group", "rule", "add", "lanweb", "ingress", "--protocol", "tcp", "--port", "80", check=True)
    wait_for(fetch, timeout=30, interval=0.5, what="the rule to open port 80 of the guest on the LAN")
    [rule] = [r["id"] for r in n1.json("security-group", "show", "lanweb")["rules"] if r.get("port_min") == 80]
    n1.cli("security-group", "rule", "remove", "lanweb", rule, check=True)
    wait_for(lambda: not fetch(), timeout=30, interval=0.5, what="the removed rule to close port 80 again")

    delete(n1, "d")
    wait_for(
        lambda: (
            not [n for n in n2.exec("ls", "/run/netns").stdout.split() if n.startswith("mcs-x")]
            and not [name for name in links(n2.netns) if name.startswith("mcp-")]
        ),
        timeout=60,
        interval=0.5,
        what="n2's DHCP port of flat to go with its last NIC",
    )
    assert (
        f"/{flat_id}/dnsmasq.pid" not in n2.exec("ps", "-ww", "-eo", "args", check=True).stdout
    )  # its dnsmasq is gone
    n1.cli("security-group", "delete", "lanweb", check=True)
    n1.cli("subnet", "delete", "flat", check=True)  # no address of it is held any more (the DHCP port's went too)
    n1.cli("network", "delete", "flat", check=True)
