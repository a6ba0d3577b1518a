"""Anti-spoofing on the node's default bridge, for real, in network namespaces: a "node" namespace holds the bridge
(with the gateway address) and the network reconciler's nftables tables; two "guest" namespaces are plugged into it
by veth pairs whose node end is named as the compute side names a default-bridge guest's tap (``guest_tap``).

- each guest has a fixed address from the default network's driver (``BridgeNetwork.assign``), which dnsmasq (run
  in the node namespace on the driver's command line and hosts file) hands out: guest ``a``, given another address
  while dnsmasq runs (hosts file re-read on SIGHUP; its rules follow), gets exactly that one by DHCP (discovery from
  0.0.0.0 passes its tap);
- from ``a``, a packet with another source address (``b``'s, or any) and one with another source MAC never reach
  ``b``, while its real ones do (counted by ``b``'s ``Ip: InReceives``);
- stopped guests lose their rules: ``a``'s spoofed packets then pass (nothing pins it any more), and with no guest
  left the tables go.

Namespaces are named ``mcq`` + a random tag; everything is deleted afterwards, and no packet leaves them. Needs
root, iproute2, nsenter, nft, dnsmasq and busybox (udhcpc, ping).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from agent.compute.design import mac_for
from agent.net.default import BridgeNetwork, NetworkSpec, dnsmasq_argv, guest_tap
from agent.net.firewall import NftFirewall
from agent.net.nodenetworks import NodeNetworks
from agent.net.overlay import FakeOverlay
from agent.net.service import FakeServiceNamespaces
from agent.reconcile import update_record
from agent.reconcilers.network import NODE_KEY, NetworkReconciler
from minicloud.compute.kinds import INSTANCE, InstanceSpec
from minicloud.state import Create, Record, Txn
from minicloud.state.sqlite import SQLiteStore

BUSYBOX = "/bin/busybox"
BRIDGE = "mcbr0"  # in the node namespace only
CIDR = ipaddress.IPv4Network("10.213.0.0/24")
GATEWAY = "10.213.0.1"


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def ns_run(ns: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net=/run/netns/{ns}", "--", *args, check=check, timeout=timeout)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    for tool in ("ip", "nsenter", "nft", "dnsmasq"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, util-linux, nftables, dnsmasq-base)"
    if not os.access(BUSYBOX, os.X_OK):
        return "needs /bin/busybox (busybox-static) for udhcpc and ping"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@dataclass
class World:
    node: str
    guests: dict[str, str]  # instance id -> namespace
    store: SQLiteStore
    net: BridgeNetwork
    nn: NodeNetworks
    reconciler: NetworkReconciler
    tmp: Path
    created: list[str] = field(default_factory=list)

    async def converge(self) -> None:
        await self.reconciler.reconcile(NODE_KEY)

    def received(self, iid: str) -> int:
        """IPv4 packets guest ``iid``'s namespace has received (``Ip: InReceives``)."""
        head, values = [line.split() for line in ns_run(self.guests[iid], "cat", "/proc/net/snmp").stdout.splitlines()[:2]]  # fmt: skip
        return int(values[head.index("InReceives")])

    def send(self, src: str, dst: str, *, ip: str, mac: str) -> bool:
        """Whether guest ``dst`` receives pings that guest ``src`` sends from address ``ip`` and MAC ``mac`` (its
        neighbour entry for ``dst`` is static, so no ARP is needed and only the IPv4 packets are tested)."""
        ns, dst_ip = self.guests[src], self.net.assignments()[mac_for(dst, 0)]
        ns_run(ns, "ip", "link", "set", "eth0", "address", mac)
        ns_run(ns, "ip", "addr", "flush", "dev", "eth0")
        ns_run(ns, "ip", "addr", "add", f"{ip}/{CIDR.prefixlen}", "dev", "eth0")
        ns_run(ns, "ip", "neigh", "replace", dst_ip, "lladdr", mac_for(dst, 0), "dev", "eth0", "nud", "permanent")
        before = self.received(dst)
        ns_run(ns, BUSYBOX, "ping", "-c", "3", "-i", "0.2", "-W", "1", dst_ip, check=False)
        return self.received(dst) >= before + 3

    def claim(self, iid: str, ip: str) -> str:
        """Guest ``iid`` announces ``ip`` as its own (gratuitous ARP replies); returns the MAC the node's neighbour
        entry for ``ip`` has afterwards."""
        ns = self.guests[iid]
        ns_run(ns, "ip", "link", "set", "eth0", "address", mac_for(iid, 0))
        ns_run(ns, "ip", "addr", "flush", "dev", "eth0")
        ns_run(ns, "ip", "addr", "add", f"{ip}/{CIDR.prefixlen}", "dev", "eth0")
        ns_run(ns, BUSYBOX, "arping", "-A", "-c", "3", "-w", "3", "-I", "eth0", ip, check=False)
        out = ns_run(self.node, "ip", "neigh", "show", ip, "dev", BRIDGE).stdout.split()
        return out[out.index("lladdr") + 1] if "lladdr" in out else ""

    def spoof_map(self) -> str:
        return ns_run(self.node, "nft", "list", "map", "bridge", "minicloud_sg", "spoof", check=False).stdout

    async def stop(self, iid: str) -> None:
        def mutate(record: Record) -> Record:
            inst = INSTANCE.load(record)
            return INSTANCE.dump(
                inst.replace(
                    spec=msgspec.structs.replace(inst.spec, power="stopped"),
                    status=msgspec.structs.replace(inst.status, state="stopped"),
                )
            )

        await update_record(self.store, INSTANCE.name, iid, mutate)
        await self.converge()


def _plug(node: str, guest: str, iid: str) -> None:
    """A guest stand-in: eth0 with the instance's MAC, a veth into the bridge named as the compute side names it."""
    tap = guest_tap(iid)
    sh("ip", "-n", node, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", guest)
    ns_run(node, "ip", "link", "set", tap, "master", BRIDGE, "up")
    ns_run(guest, "ip", "link", "set", "lo", "up")
    ns_run(guest, "ip", "link", "set", "eth0", "address", mac_for(iid, 0), "up")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    tag = secrets.token_hex(2)
    node = f"mcq{tag}n"
    guests = {"i-a": f"mcq{tag}a", "i-b": f"mcq{tag}b"}
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    spec = NetworkSpec(name="default", bridge=BRIDGE, cidr=CIDR, dns=False)
    net = BridgeNetwork(spec, tmp_path / "default")
    nn = NodeNetworks()
    nn.use_default_bridge(BRIDGE, net.assignments)
    reconciler = NetworkReconciler(
        store=store,
        node="n1",
        underlay_address="",
        overlay=FakeOverlay(),
        services=FakeServiceNamespaces(),
        firewall=NftFirewall(node),
        node_networks=nn,
        state_dir=tmp_path / "vpc",
    )
    w = World(node, guests, store, net, nn, reconciler, tmp_path)
    try:
        for ns in (node, *guests.values()):
            sh("ip", "netns", "add", ns)
            w.created.append(ns)
        ns_run(node, "ip", "link", "set", "lo", "up")
        ns_run(node, "ip", "link", "add", BRIDGE, "type", "bridge")
        ns_run(node, "ip", "addr", "add", f"{GATEWAY}/{CIDR.prefixlen}", "dev", BRIDGE)
        ns_run(node, "ip", "link", "set", BRIDGE, "up")
        await reconciler.start(lambda key: None)
        for iid in guests:
            ispec = InstanceSpec(uuid=iid, image_id="img", image_name="img", type="t", vcpus=1, memory_mib=64, disk_gib=1, node="n1")  # fmt: skip
            await store.commit(Txn([Create(INSTANCE.dump(INSTANCE.new(project="p", name=iid, id=iid, spec=ispec)))]))
            await net.assign(mac_for(iid, 0))  # what the compute side does before it starts the guest
        nn.guests_changed()
        await w.converge()
        # dnsmasq as the driver runs it, in the node namespace (the driver itself runs in the agent's namespace)
        (tmp_path / "default").mkdir(exist_ok=True)
        await asyncio.to_thread(net._write_hosts)
        ns_run(node, *dnsmasq_argv(spec, net.state_dir, shutil.which("dnsmasq") or "dnsmasq"))
        for iid, ns in guests.items():
            _plug(node, ns, iid)
        yield w
    finally:
        try:
            pid = int((net.state_dir / "dnsmasq.pid").read_text())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        await reconciler.close()
        await store.close()
        for ns in w.created:
            sh("ip", "netns", "del", ns, check=False)


async def test_a_guest_sends_only_from_its_own_mac_and_fixed_address_until_it_stops(world: World) -> None:
    w = world
    ip_a, ip_b = (w.net.assignments()[mac_for(i, 0)] for i in ("i-a", "i-b"))
    mac_a, mac_b = mac_for("i-a", 0), mac_for("i-b", 0)
    assert w.nn.guarded(guest_tap("i-a"), ip_a) and w.nn.guarded(guest_tap("i-b"), ip_b)
    assert guest_tap("i-a") in w.spoof_map() and guest_tap("i-b") in w.spoof_map()

    # a's address changes (released, given another): dnsmasq re-reads its hosts file, the rules follow
    await w.net.release(mac_a)
    ip_a = await w.net.assign(mac_a, ["10.213.0.50"])
    w.nn.guests_changed()
    await w.converge()
    assert ip_a == "10.213.0.50" and w.nn.guarded(guest_tap("i-a"), ip_a)
    # DHCP discovery from 0.0.0.0 passes a's tap, and dnsmasq hands out exactly its fixed address
    script = w.tmp / "udhcpc.sh"
    script.write_text(f'#!{BUSYBOX} sh\n[ "$1" = bound ] && echo "$ip" > "{w.tmp / "lease"}"\nexit 0\n')
    script.chmod(0o755)
    ns_run(w.guests["i-a"], BUSYBOX, "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0", "-s", str(script), timeout=60)  # fmt: skip
    assert (w.tmp / "lease").read_text().strip() == ip_a

    ns_run(w.guests["i-b"], "ip", "addr", "add", f"{ip_b}/{CIDR.prefixlen}", "dev", "eth0")
    ns_run(w.guests["i-b"], "ip", "neigh", "replace", ip_a, "lladdr", mac_a, "dev", "eth0", "nud", "permanent")
    assert w.send("i-a", "i-b", ip=ip_a, mac=mac_a)  # its own: passes
    assert not w.send("i-a", "i-b", ip=ip_b, mac=mac_a)  # b's address: dropped on a's tap
    assert not w.send("i-a", "i-b", ip="10.213.0.99", mac=mac_a)  # any other address
    assert not w.send("i-a", "i-b", ip=ip_a, mac="52:54:00:de:ad:01")  # another MAC
    assert not w.send("i-a", "i-b", ip=ip_a, mac=mac_b)  # b's MAC
    assert w.send("i-a", "i-b", ip=ip_a, mac=mac_a)  # and its own again
    # ARP only for its own MAC and address: a claiming b's address does not change the node's neighbour entry
    ns_run(w.node, BUSYBOX, "ping", "-c", "1", "-W", "1", ip_b)
    assert w.claim("i-a", ip_b) == mac_b

    # stopped: its rules go, so the same spoofed packets now pass (nothing pins it any more)
    await w.stop("i-a")
    assert guest_tap("i-a") not in w.spoof_map() and guest_tap("i-b") in w.spoof_map()
    assert not w.nn.guarded(guest_tap("i-a"), ip_a)
    assert w.send("i-a", "i-b", ip="10.213.0.99", mac="52:54:00:de:ad:01")
    assert w.claim("i-a", ip_b) == mac_a  # and its ARP is heard
    await w.stop("i-b")
    assert "minicloud_sg" not in ns_run(w.node, "nft", "list", "tables").stdout
