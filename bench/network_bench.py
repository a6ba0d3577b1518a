"""Overlay data plane bench: throughput across minicloud's VXLAN overlay vs a hand-built VXLAN path and plain veth,
and the time to set up N networks on one node.

Everything happens in network namespaces this bench creates (``mcnb<tag>…``) and deletes at the end: two "node"
namespaces joined by a veth underlay (MTU 1500), and "guest" endpoint namespaces plugged into the nodes' bridges by a
veth, like a guest's tap. Paths measured between two endpoints on the two nodes, in interleaved rounds:

* ``minicloud overlay``: the bridge + VXLAN device built by ``agent.net.overlay.LinuxOverlay`` (VNI 100);
* ``hand-built VXLAN``: the same shape built with ``ip``/``bridge`` commands (VNI 200) between the same namespaces;
* ``plain veth``: the two endpoints joined directly by one veth (information only).

Then, on one node namespace with real devices and nftables (the node-side part; the store watch and the reconciler's
record reads that precede it are not in these figures):

* **port plumbing** per NIC: its tap created and plugged into the network's bridge (``ip tuntap``, master, up: what
  libvirt does for a guest's NIC) and the node's security-group ruleset rebuilt with the new port and its delta (the
  port's chains, map and set elements) applied in one ``nft`` transaction (what the network reconciler does), for N
  NICs one after the other: p50/p99, target p99 <= 100 ms;
* **rule change**: with G groups of R rules and N NICs on the node, one rule added to a group, the ruleset rebuilt
  and its delta (that group's chain) applied (enforced when ``nft`` returns): p50/p99, target p99 <= 1 s at 1,000
  rules / 100 groups / 200 NICs; and the whole ruleset replaced (what start-up and drift repair do), for information.

Throughput is measured with iperf3 (one TCP stream) when it is installed, else with a small Python TCP sender and
receiver. All endpoints use MTU 1450 (underlay 1500 - 50). Target: overlay / hand-built >= 0.95.
Run as root. Exit status: 0 when every scenario ran, 1 when one had errors, 2 when the bench could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.net.firewall import NftFirewall  # noqa: E402
from agent.net.overlay import LinuxOverlay, OverlaySpec, bridge_name  # noqa: E402
from minicloud.network import secgroup_compile as sgc  # noqa: E402

UNDERLAY = ("10.253.0.1", "10.253.0.2")
MTU = 1450
TARGET_RATIO = 0.95
TARGET_PLUMB_P99_MS = 100.0
TARGET_RULE_P99_MS = 1000.0

_RECEIVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.close()
"""
_SENDER = """
import socket, sys, time, json
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
buf, n, end = b"x" * (1 << 18), 0, time.monotonic() + float(sys.argv[3])
t0 = time.monotonic()
while time.monotonic() < end:
    n += c.send(buf)
c.close()
print(json.dumps({"bits_per_second": n * 8 / (time.monotonic() - t0)}))
"""


def sh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def ns_argv(ns: str, *args: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *args]


class Lab:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def netns(self, suffix: str) -> str:
        name = f"mcnb{self.tag}{suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh(*ns_argv(name, "ip", "link", "set", "lo", "up"))
        return name

    def endpoint(self, node: str, bridge: str, ip: str, suffix: str) -> str:
        ep = self.netns(suffix)
        port = f"p{self.tag}{suffix}"
        sh("ip", "-n", node, "link", "add", port, "mtu", str(MTU), "type", "veth", "peer", "name", "eth0", "netns", ep)
        sh(*ns_argv(node, "ip", "link", "set", port, "master", bridge, "up"))
        sh(*ns_argv(ep, "ip", "link", "set", "eth0", "mtu", str(MTU), "up"))
        sh(*ns_argv(ep, "ip", "addr", "add", f"{ip}/24", "dev", "eth0"))
        return ep

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)


def hand_built_vxlan(node: str, vni: int, local: str, remote: str) -> str:
    """The reference path: bridge + VXLAN device made with iproute2 alone, like the overlay's."""
    br, vx = f"hb{vni}", f"hv{vni}"
    for cmd in (
        ("ip", "link", "add", br, "mtu", str(MTU), "type", "bridge"),
        ("ip", "link", "add", vx, "mtu", str(MTU), "type", "vxlan", "id", str(vni), "local", local, "dstport", "4789",
         "nolearning"),
        ("ip", "link", "set", vx, "master", br, "up"),
        ("ip", "link", "set", br, "up"),
        ("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", vx, "dst", remote),
    ):  # fmt: skip
        sh(*ns_argv(node, *cmd))
    return br


def start_receiver(lab: Lab, ns: str, ip: str, port: int, iperf: str | None) -> None:
    if iperf:
        argv = ns_argv(ns, iperf, "-s", "-B", ip, "-p", str(port))
    else:
        argv = ns_argv(ns, sys.executable, "-c", _RECEIVER, ip, str(port))
    lab.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def measure(ns: str, ip: str, port: int, seconds: float, iperf: str | None) -> float:
    """Gbit/s of one TCP stream from ``ns`` to ``ip:port``; retried while the receiver starts."""
    last = ""
    for _ in range(50):
        if iperf:
            done = sh(*ns_argv(ns, iperf, "-c", ip, "-p", str(port), "-t", str(seconds), "-J"), check=False)
            try:
                doc = json.loads(done.stdout or "{}")
            except ValueError:
                doc = {}
            received = doc.get("end", {}).get("sum_received")
            if done.returncode == 0 and received:
                return received["bits_per_second"] / 1e9
            last = doc.get("error") or done.stderr.strip()  # e.g. "the server is busy running a test": retry
        else:
            done = sh(*ns_argv(ns, sys.executable, "-c", _SENDER, ip, str(port), str(seconds)), check=False)
            if done.returncode == 0:
                return json.loads(done.stdout)["bits_per_second"] / 1e9
            last = done.stderr.strip()
        time.sleep(0.2)
    raise RuntimeError(f"no throughput from {ns} to {ip}:{port}: {last[-300:]}")


async def build(lab: Lab) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """The three paths: (path name -> (sender namespace, receiver address), receiver address -> its namespace)."""
    a, b = lab.netns("na"), lab.netns("nb")
    sh("ip", "-n", a, "link", "add", "under", "type", "veth", "peer", "name", "under", "netns", b)
    for ns, addr in zip((a, b), UNDERLAY, strict=True):
        sh(*ns_argv(ns, "ip", "addr", "add", f"{addr}/24", "dev", "under"))
        sh(*ns_argv(ns, "ip", "link", "set", "under", "up"))
    for ns, local, remote in ((a, UNDERLAY[0], UNDERLAY[1]), (b, UNDERLAY[1], UNDERLAY[0])):
        driver = LinuxOverlay(netns=ns)
        try:
            await driver.ensure_network(OverlaySpec(vni=100, local=local, mtu=MTU))
            await driver.set_peers(100, [remote])
        finally:
            await driver.close()
        hand_built_vxlan(ns, 200, local, remote)
    paths: dict[str, tuple[str, str]] = {}
    paths["minicloud overlay"] = (lab.endpoint(a, bridge_name(100), "10.31.0.1", "oa"), "10.31.0.2")
    lab.endpoint(b, bridge_name(100), "10.31.0.2", "ob")
    paths["hand-built VXLAN (ip)"] = (lab.endpoint(a, "hb200", "10.32.0.1", "ha"), "10.32.0.2")
    lab.endpoint(b, "hb200", "10.32.0.2", "hb")
    va, vb = lab.netns("va"), lab.netns("vb")
    sh("ip", "-n", va, "link", "add", "eth0", "mtu", str(MTU), "type", "veth", "peer", "name", "eth0", "netns", vb)
    for ns, addr in ((va, "10.33.0.1"), (vb, "10.33.0.2")):
        sh(*ns_argv(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0"))
        sh(*ns_argv(ns, "ip", "link", "set", "eth0", "up"))
    paths["plain veth"] = (va, "10.33.0.2")
    receivers = {"10.31.0.2": f"mcnb{lab.tag}ob", "10.32.0.2": f"mcnb{lab.tag}hb", "10.33.0.2": vb}
    return paths, receivers


async def setup_time(lab: Lab, count: int) -> dict[str, float]:
    """Time to ensure ``count`` networks (+ one flooding peer each) on a fresh node namespace, then to remove them."""
    node = lab.netns("ns")
    sh(*ns_argv(node, "ip", "addr", "add", "10.252.0.1/32", "dev", "lo"))
    driver = LinuxOverlay(netns=node)
    per: list[float] = []
    try:
        await driver.list_networks()  # opens the socket outside the timed part
        t0 = time.perf_counter()
        for vni in range(1000, 1000 + count):
            t = time.perf_counter()
            await driver.ensure_network(OverlaySpec(vni=vni, local="10.252.0.1", mtu=MTU))
            await driver.set_peers(vni, ["10.252.0.2"])
            per.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        t = time.perf_counter()
        again = [await driver.ensure_network(OverlaySpec(vni=v, local="10.252.0.1", mtu=MTU)) for v in (1000,)]
        re_ensure = time.perf_counter() - t
        assert again and len(await driver.list_networks()) == count
        t = time.perf_counter()
        for vni in range(1000, 1000 + count):
            await driver.remove_network(vni)
        removal = time.perf_counter() - t
        if await driver.list_networks():
            raise RuntimeError("networks left after removal")
    finally:
        await driver.close()
    per.sort()
    return {
        "count": count,
        "total_s": total,
        "p50_ms": per[len(per) // 2] * 1000,
        "p99_ms": per[min(len(per) - 1, int(len(per) * 0.99))] * 1000,
        "re_ensure_ms": re_ensure * 1000,
        "removal_s": removal,
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _groups(count: int, rules: int, ports: list[sgc.Port], extra: dict[int, list[sgc.Rule]]) -> list[sgc.Group]:
    """``count`` groups of ``rules`` rules each (tcp port ranges from CIDRs, some from another group), members = the
    addresses of the ports in them."""
    groups = []
    for g in range(count):
        body = [sgc.Rule(direction="egress")]
        for r in range(rules - 1):
            if r % 3 == 0:
                body.append(sgc.Rule(direction="ingress", protocol="tcp", port_min=1000 + r, port_max=1000 + r,
                                     remote_group=f"sg{(g + 1) % count:03d}"))  # fmt: skip
            else:
                body.append(sgc.Rule(direction="ingress", protocol="tcp", port_min=2000 + r, port_max=2010 + r,
                                     remote_cidr=f"10.{100 + r % 50}.{g % 250}.0/24"))  # fmt: skip
        body += extra.get(g, [])
        gid = f"sg{g:03d}"
        members = tuple((p.bridge, ip) for p in ports if gid in p.groups for ip in p.ips)
        groups.append(sgc.Group(id=gid, rules=tuple(body), members=members))
    return groups


async def plumbing(lab: Lab, nics: int, group_count: int, rules: int, changes: int) -> dict[str, float]:
    """Port plumbing and rule-change times on one node namespace (see the module docstring)."""
    node = lab.netns("pp")
    overlay = LinuxOverlay(netns=node)
    try:
        await overlay.ensure_network(OverlaySpec(vni=300, local="10.251.0.1", mtu=MTU))
    finally:
        await overlay.close()
    bridge = bridge_name(300)
    firewall = NftFirewall(netns=node)
    ports: list[sgc.Port] = []
    plumb: list[float] = []
    applied: sgc.Ruleset | None = None
    for i in range(nics):
        tap = f"mct-b{i:05d}"
        port = sgc.Port(
            id=f"port{i:05d}", device=tap, mac=f"52:54:01:00:{i >> 8:02x}:{i & 255:02x}",
            ips=(f"10.40.{i >> 8}.{(i & 255) + 1 if (i & 255) < 254 else 1}",),
            groups=(f"sg{i % group_count:03d}", f"sg{(i + 1) % group_count:03d}"), bridge=bridge,
            zone=sgc.conntrack_zone(300),  # the network's conntrack zone, as the node compiles it
        )  # fmt: skip
        t = time.perf_counter()
        batch = f"tuntap add dev {tap} mode tap\nlink set {tap} master {bridge} up\n"  # one `ip` for both steps
        proc = await asyncio.create_subprocess_exec(
            "ip", "-n", node, "-b", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )  # fmt: skip
        _, err = await proc.communicate(batch.encode())
        if proc.returncode != 0:
            raise RuntimeError(f"plugging {tap}: {err.decode().strip()}")
        ports.append(port)
        new = sgc.build(_groups(group_count, rules, ports, {}), ports)
        # the reconciler's way: the whole ruleset once (start-up), then only what changed, in one transaction
        await firewall.apply(sgc.full_script(new) if applied is None else sgc.delta_script(applied, new))
        applied = new
        plumb.append(time.perf_counter() - t)
    changed: list[float] = []
    compiled: list[float] = []  # the pure part of a change (the rest is nft loading the ruleset)
    extra: dict[int, list[sgc.Rule]] = {}
    delta_bytes = 0
    for c in range(changes):
        g = (c * 37) % group_count
        extra.setdefault(g, []).append(sgc.Rule(direction="ingress", protocol="tcp", port_min=30000 + c,
                                                port_max=30000 + c))  # fmt: skip
        t = time.perf_counter()
        new = sgc.build(_groups(group_count, rules, ports, extra), ports)
        script = sgc.delta_script(applied, new) if applied is not None else sgc.full_script(new)
        compiled.append(time.perf_counter() - t)
        await firewall.apply(script)
        changed.append(time.perf_counter() - t)
        applied, delta_bytes = new, len(script)
    full: list[float] = []  # the whole ruleset replaced (adoption at start-up, drift repair), for information
    for _ in range(3):
        t = time.perf_counter()
        await firewall.apply(sgc.full_script(applied) if applied is not None else "")
        full.append(time.perf_counter() - t)
    listed = sh(*ns_argv(node, "nft", "list", "table", "inet", sgc.TABLE)).stdout
    if changes and str(30000 + changes - 1) not in listed:
        raise RuntimeError("the last rule change is not in the kernel's ruleset")
    return {
        "nics": nics,
        "groups": group_count,
        "rules": group_count * rules,
        "plumb_p50_ms": _pct(plumb, 0.5) * 1000,
        "plumb_p99_ms": _pct(plumb, 0.99) * 1000,
        "plumb_last_ms": plumb[-1] * 1000,
        "changes": changes,
        "rule_p50_ms": _pct(changed, 0.5) * 1000,
        "rule_p99_ms": _pct(changed, 0.99) * 1000,
        "compile_p50_ms": _pct(compiled, 0.5) * 1000 if compiled else 0.0,
        "ruleset_bytes": len(listed),
        "delta_bytes": delta_bytes,
        "full_ms": statistics.median(full) * 1000,
    }


def run(args: argparse.Namespace) -> int:
    iperf = shutil.which("iperf3")
    tool = "iperf3" if iperf else "python TCP sender"
    lab = Lab()
    errors: list[str] = []
    results: dict[str, list[float]] = {}
    setup: dict[str, float] = {}
    plumb: dict[str, float] = {}
    try:
        paths, receivers = asyncio.run(build(lab))
        ports = {ip: port for port, ip in enumerate(receivers, start=5201)}
        for ip, ns in receivers.items():
            start_receiver(lab, ns, ip, ports[ip], iperf)
        for r in range(args.rounds):
            order = list(paths.items())
            for name, (src, ip) in order if r % 2 == 0 else order[::-1]:  # alternate: no path is always first
                try:
                    results.setdefault(name, []).append(measure(src, ip, ports[ip], args.seconds, iperf))
                except Exception as e:
                    errors.append(f"{name}: {e}")
        try:
            setup = asyncio.run(setup_time(lab, args.networks))
        except Exception as e:
            errors.append(f"setup of {args.networks} networks: {e}")
        try:
            plumb = asyncio.run(plumbing(lab, args.nics, args.groups, args.rules_per_group, args.changes))
        except Exception as e:
            errors.append(f"port plumbing / rule changes: {e}")
    finally:
        lab.close()

    print(f"network_bench: one TCP stream ({tool}), {args.rounds} interleaved rounds x {args.seconds:g} s, MTU {MTU}")
    print(f"{'path':28} {'Gbit/s median':>14}  rounds")
    med = {name: statistics.median(v) for name, v in results.items() if v}
    for name, v in results.items():
        print(f"{name:28} {med[name]:14.2f}  {' '.join(f'{x:.2f}' for x in v)}")
    summary: dict[str, object] = {"throughput_gbps": med, "setup": setup, "tool": tool}
    ov, hb, ve = (med.get(k) for k in ("minicloud overlay", "hand-built VXLAN (ip)", "plain veth"))
    if ov and hb:
        # Each round measures the paths back to back: the median of the per-round ratios cancels the load drift of
        # a shared machine better than a ratio of medians (both are printed).
        pairs = zip(results["minicloud overlay"], results["hand-built VXLAN (ip)"], strict=False)
        ratio = statistics.median(o / h for o, h in pairs)
        summary["ratio_overlay_hand_built"] = ratio
        verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
        print(
            f"ratio overlay / hand-built VXLAN: {ratio:.3f} median of per-round ratios, {ov / hb:.3f} of medians  "
            f"(target >= {TARGET_RATIO}) {verdict}"
        )
    if ov and ve:
        summary["ratio_overlay_veth"] = ov / ve
        print(f"ratio overlay / plain veth:       {ov / ve:.3f}  (information)")
    if setup:
        print(
            f"setup of {setup['count']:.0f} networks on one node (ensure + 1 peer each): total {setup['total_s']:.2f} s, "
            f"per network p50 {setup['p50_ms']:.1f} ms p99 {setup['p99_ms']:.1f} ms; "
            f"re-ensure of one {setup['re_ensure_ms']:.1f} ms; removal of all {setup['removal_s']:.2f} s"
        )
    if plumb:
        summary["plumbing"] = plumb
        verdict = "PASS" if plumb["plumb_p99_ms"] <= TARGET_PLUMB_P99_MS else "MISS"
        print(
            f"port plumbing ({plumb['nics']:.0f} NICs one by one: tap on the bridge + the ruleset's delta applied): "
            f"p50 {plumb['plumb_p50_ms']:.1f} ms p99 {plumb['plumb_p99_ms']:.1f} ms, the last one "
            f"{plumb['plumb_last_ms']:.1f} ms (target p99 <= {TARGET_PLUMB_P99_MS:.0f} ms) {verdict}"
        )
        verdict = "PASS" if plumb["rule_p99_ms"] <= TARGET_RULE_P99_MS else "MISS"
        print(
            f"rule change ({plumb['rules']:.0f} rules, {plumb['groups']:.0f} groups, {plumb['nics']:.0f} NICs; "
            f"{plumb['changes']:.0f} changes): p50 {plumb['rule_p50_ms']:.1f} ms p99 {plumb['rule_p99_ms']:.1f} ms "
            f"(target p99 <= {TARGET_RULE_P99_MS:.0f} ms) {verdict}; of which compiling p50 "
            f"{plumb['compile_p50_ms']:.1f} ms, the rest nft applying the change ({plumb['delta_bytes']:.0f} bytes)"
        )
        print(
            f"whole ruleset replaced (start-up adoption, drift repair; {plumb['ruleset_bytes'] / 1024:.0f} KiB listed): "
            f"{plumb['full_ms']:.1f} ms (information)"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bench process (driver) max RSS: {rss:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if errors:
        print("errors:")
        for e in errors:
            print(f"  {e}")
        return 1
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round x 1 s, 20 networks (checks the bench runs)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds per path (default 5)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement (default 5)")
    p.add_argument("--networks", type=int, default=200, help="networks set up on one node (default 200)")
    p.add_argument("--nics", type=int, default=200, help="NICs plumbed on one node (default 200)")
    p.add_argument("--groups", type=int, default=100, help="security groups (default 100)")
    p.add_argument("--rules-per-group", type=int, default=10, help="rules per group (default 10: 1,000 in all)")
    p.add_argument("--changes", type=int, default=50, help="rule changes timed (default 50)")
    p.add_argument("--json", help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.networks = 1, 1.0, 20
        args.nics, args.groups, args.rules_per_group, args.changes = 10, 5, 4, 3
    if os.geteuid() != 0 or shutil.which("nsenter") is None:
        print("network_bench needs root, ip netns and nsenter", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
