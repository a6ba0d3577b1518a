"""The default guest network on the real host: bridge, dnsmasq and nftables, with a "guest" in a network namespace.

Every test uses its own bridge (``mct`` + 6 hex digits) and a random /24 in 10.200.0.0-10.255.255.0 that no host
interface uses, so xdist workers never collide. Traffic stays on the bridge: the guest talks to the gateway only, and
DNS has no upstream servers. Needs root, dnsmasq, nft and busybox (for ``udhcpc``, ``ping`` and ``nslookup``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.net.default import IP_FORWARD, BridgeNetwork, NetworkConflict, NetworkSpec

BUSYBOX = "/bin/busybox"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not shutil.which("dnsmasq")
    or not shutil.which("nft")
    or not os.access(BUSYBOX, os.X_OK)
    or not os.path.isdir("/proc/sys/net/ipv4"),
    reason="needs root, dnsmasq, nft and /bin/busybox",
)


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def free_cidr() -> ipaddress.IPv4Network:
    """A random 10.2xx.x.0/24 that overlaps no address on this host."""
    used = [
        ipaddress.IPv4Interface(line.split()[3]).network
        for line in sh("ip", "-4", "-o", "addr", "show").stdout.splitlines()
    ]
    for _ in range(100):
        cidr = ipaddress.IPv4Network(f"10.{random.randint(200, 255)}.{random.randint(0, 255)}.0/24")
        if not any(cidr.overlaps(u) for u in used):
            return cidr
    raise RuntimeError("no free /24 found")


def our_dnsmasq_pids(state_dir: Path) -> list[int]:
    """Live processes whose command line names this network's pid file."""
    flag = f"--pid-file={state_dir / 'dnsmasq.pid'}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if flag in argv:
                pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())  # empty for a zombie
    except OSError:
        return False


@pytest.fixture
def restore_ip_forward() -> Iterator[None]:
    """NAT mode turns on ip_forward for the whole host; put the test machine back as it was."""
    before = IP_FORWARD.read_text()
    yield
    IP_FORWARD.write_text(before)


@pytest.fixture
async def network(tmp_path: Path, restore_ip_forward: None) -> AsyncIterator[BridgeNetwork]:
    """A not yet ensured network on a fresh bridge and /24; everything it may have made is removed afterwards."""
    spec = NetworkSpec(name="default", bridge=f"mct{secrets.token_hex(3)}", cidr=free_cidr(), upstream_dns=())
    net = BridgeNetwork(spec, tmp_path / "net")
    try:
        yield net
    finally:
        try:
            await net.teardown()
        finally:  # in case teardown itself is what broke
            for pid in our_dnsmasq_pids(net.state_dir):
                os.kill(pid, signal.SIGKILL)
            sh("ip", "link", "del", spec.bridge, check=False)
            sh("nft", "delete", "table", "ip", spec.table, check=False)
            sh("nft", "delete", "table", "bridge", spec.table, check=False)


class Guest:
    """A network namespace with a veth pair whose host end is a port of the bridge: a stand-in for a VM."""

    def __init__(self, bridge: str, tmp_path: Path, host_prefix: str = "mcg") -> None:
        tag = secrets.token_hex(3)
        self.ns, self.host_if, self.dev = f"mcg{tag}", f"{host_prefix}{tag}h", f"mcg{tag}g"
        self.bridge = bridge
        self.script = tmp_path / f"udhcpc-{tag}.sh"
        self.env_file = tmp_path / f"udhcpc-{tag}.env"

    def __enter__(self) -> Guest:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.dev, "netns", self.ns)
        sh("ip", "link", "set", self.host_if, "master", self.bridge, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "link", "set", self.dev, "up")
        self.script.write_text(
            f"#!{BUSYBOX} sh\n"
            "# udhcpc calls this with deconfig/bound/renew; keep the lease's variables and set the address.\n"
            f'if [ "$1" = bound ] || [ "$1" = renew ]; then\n'
            f'  env > "{self.env_file}"\n'
            f'  {BUSYBOX} ip addr flush dev "$interface"\n'
            f'  {BUSYBOX} ip addr add "$ip/$mask" dev "$interface"\n'
            "fi\n"
        )
        self.script.chmod(0o755)
        return self

    def __exit__(self, *exc: object) -> None:
        sh("ip", "netns", "del", self.ns, check=False)  # takes the veth pair with it
        sh("ip", "link", "del", self.host_if, check=False)

    @property
    def mac(self) -> str:
        return sh("ip", "-n", self.ns, "-br", "link", "show", self.dev).stdout.split()[2].lower()

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *args, check=check, timeout=timeout)

    async def dhcp(self, hostname: str) -> dict[str, str]:
        """Obtain a lease with busybox udhcpc (off the event loop); returns the variables udhcpc passed its script."""
        self.env_file.unlink(missing_ok=True)
        args = (BUSYBOX, "udhcpc", "-f", "-q", "-n", "-t", "10", "-T", "1", "-i", self.dev, "-s", str(self.script))
        await asyncio.to_thread(self.run, *args, "-x", f"hostname:{hostname}", timeout=60)
        return dict(line.split("=", 1) for line in self.env_file.read_text().splitlines() if "=" in line)


def bridge_state(name: str) -> tuple[str, list[str], str]:
    """(MAC, IPv4 addresses with prefix, admin flags) of a link, from iproute2 rather than the code under test."""
    link = sh("ip", "-br", "link", "show", name).stdout.split()
    addrs = sh("ip", "-4", "-br", "addr", "show", name).stdout.split()[2:]
    return link[2], addrs, link[3]


async def test_ensure_builds_bridge_dnsmasq_and_nat_and_is_idempotent(network: BridgeNetwork) -> None:
    spec = network.spec
    await network.ensure()
    pid = network.dnsmasq_pid()
    await network.ensure()

    mac, addrs, flags = bridge_state(spec.bridge)
    assert addrs == [f"{network.gateway}/24"]
    assert mac == spec.bridge_mac
    assert ",UP" in flags or "<UP" in flags
    assert pid is not None and network.dnsmasq_pid() == pid
    assert int(network.pid_file.read_text()) == pid
    assert our_dnsmasq_pids(network.state_dir) == [pid]
    table = sh("nft", "list", "table", "ip", spec.table).stdout
    assert f'ip saddr {spec.cidr} ip daddr != {spec.cidr} oifname != "{spec.bridge}" masquerade' in table
    assert f'oifname "{spec.bridge}" ct state established,related accept' in table
    assert IP_FORWARD.read_text().strip() == "1"
    assert network.leases() == {}


async def test_guest_gets_a_lease_dns_and_reaches_the_gateway(network: BridgeNetwork, tmp_path: Path) -> None:
    await network.ensure()
    spec = network.spec
    with Guest(spec.bridge, tmp_path) as guest:
        lease = await guest.dhcp("guest1")

        ip = ipaddress.IPv4Address(lease["ip"])
        assert spec.dhcp_start <= ip <= spec.dhcp_end
        assert lease["router"] == network.gateway
        assert lease["dns"].split() == [network.gateway]
        assert network.leases() == {guest.mac: str(ip)}
        guest.run(BUSYBOX, "ping", "-c", "1", "-W", "2", network.gateway)
        # dnsmasq answers the guest's DHCP host name itself (no upstream servers are configured).
        answer = guest.run(BUSYBOX, "nslookup", "guest1", network.gateway).stdout
        assert str(ip) in answer

        # The lease outlives dnsmasq: a restarted one keeps it and gives the guest the same address again.
        os.kill(network.dnsmasq_pid() or 0, signal.SIGKILL)
        await network.ensure()
        assert network.leases() == {guest.mac: str(ip)}
        assert (await guest.dhcp("guest1"))["ip"] == str(ip)


async def test_restarted_agent_adopts_dnsmasq_and_restarts_a_killed_one(network: BridgeNetwork) -> None:
    await network.ensure()
    pid = network.dnsmasq_pid()
    assert pid is not None

    # The agent restarts: a new object over the same state directory adopts the running dnsmasq.
    again = BridgeNetwork(network.spec, network.state_dir)
    await again.ensure()
    assert again.dnsmasq_pid() == pid
    assert our_dnsmasq_pids(network.state_dir) == [pid]

    os.kill(pid, signal.SIGKILL)
    await again.ensure()
    new_pid = again.dnsmasq_pid()
    assert new_pid is not None and new_pid != pid and alive(new_pid)
    assert our_dnsmasq_pids(network.state_dir) == [new_pid]


async def test_recreated_bridge_gets_a_fresh_dnsmasq(network: BridgeNetwork) -> None:
    await network.ensure()
    pid = network.dnsmasq_pid()
    sh("ip", "link", "del", network.spec.bridge)

    await network.ensure()

    _, addrs, _ = bridge_state(network.spec.bridge)
    assert addrs == [f"{network.gateway}/24"]
    new_pid = network.dnsmasq_pid()
    assert new_pid is not None and new_pid != pid
    assert our_dnsmasq_pids(network.state_dir) == [new_pid]


async def test_stray_address_on_the_bridge_is_removed(network: BridgeNetwork) -> None:
    await network.ensure()
    stray = network.spec.cidr.network_address + 200
    sh("ip", "addr", "add", f"{stray}/24", "dev", network.spec.bridge)

    await network.ensure()

    assert bridge_state(network.spec.bridge)[1] == [f"{network.gateway}/24"]


async def test_interface_of_another_kind_with_the_bridge_name_is_a_conflict(network: BridgeNetwork) -> None:
    name = network.spec.bridge
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
    try:
        with pytest.raises(NetworkConflict, match="not a bridge"):
            await network.ensure()
        await network.teardown()  # leaves the foreign interface alone
        assert sh("ip", "link", "show", name, check=False).returncode == 0
    finally:
        sh("ip", "link", "del", name, check=False)


async def test_teardown_removes_bridge_table_and_dnsmasq_and_is_idempotent(network: BridgeNetwork) -> None:
    spec = network.spec
    await network.ensure()
    pid = network.dnsmasq_pid()
    assert pid is not None

    await network.teardown()

    assert sh("ip", "link", "show", spec.bridge, check=False).returncode != 0
    assert sh("nft", "list", "table", "ip", spec.table, check=False).returncode != 0
    assert not alive(pid)
    assert our_dnsmasq_pids(network.state_dir) == []
    assert not network.pid_file.exists()
    assert network.leases() == {}
    await network.teardown()


async def test_no_guest_takes_an_address_above_a_shrunk_dhcp_range_by_hand_but_a_pinned_one_and_a_leg_do(
    network: BridgeNetwork, tmp_path: Path
) -> None:
    """With the default VPCs' pool above the DHCP range (``dhcp_end`` below the last address), a guest's tap
    (libvirt's ``vnetN``) may not send from or ARP for a pool address; a pinned guest keeps its own, and a router's
    leg (a veth ``mcp…``) is not a guest."""
    base = network.spec
    net = base.cidr.network_address
    shrunk = dataclasses.replace(base, dhcp_end=net + 191)
    nw = BridgeNetwork(shrunk, network.state_dir)
    await nw.ensure()
    with Guest(base.bridge, tmp_path, "vnet") as guest, Guest(base.bridge, tmp_path, "mcp") as leg:
        pinned = dataclasses.replace(shrunk, static_hosts=((guest.mac, str(net + 201)),))
        for spec in (shrunk, pinned):
            nw = BridgeNetwork(spec, network.state_dir)
            await nw.ensure()

            def reaches(g: Guest, ip: ipaddress.IPv4Address) -> bool:
                g.run("ip", "addr", "flush", "dev", g.dev)
                g.run("ip", "addr", "add", f"{ip}/24", "dev", g.dev)
                return g.run(BUSYBOX, "ping", "-c", "1", "-W", "1", network.gateway, check=False).returncode == 0

            assert reaches(guest, net + 50)  # its own range
            assert reaches(guest, net + 200) is False  # a pool address: dropped on its tap
            assert reaches(guest, net + 201) is (spec is pinned)  # only as its pin
            assert reaches(leg, net + 200)  # a router's leg is no guest
        assert "vnet*" in sh("nft", "list", "table", "bridge", base.table).stdout
        await nw.teardown()
        assert sh("nft", "list", "table", "bridge", base.table, check=False).returncode != 0
