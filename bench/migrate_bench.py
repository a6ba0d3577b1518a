"""Live-migration bench: ``minicloud instance migrate`` vs ``virsh migrate --live`` between the same two libvirtds.

Two real hosts of the cluster harness (``tests/cluster/harness.py``: each node its own network namespace and its own
libvirtd, TLS between the libvirtds with the cluster CA, ``tests/cluster/migration_hosts.py``), joined. The busybox
test guest (``scripts/build-guest-image``) runs with 256 MiB of memory, 1 vCPU and a 1 GiB local qcow2 root disk:

* **minicloud**: an instance of that shape, moved n1 → n2 → n1 … with ``instance migrate NAME --node N --wait``
  (the whole request: the target's preparation, the migration, the record's update, the operation's end);
* **virsh** (the peer): a plain domain with the same definition (our metadata removed, its own name, MAC and files),
  moved the same way by hand: ``virsh migrate --live --p2p --tls --persistent --undefinesource --copy-storage-inc``
  with the same URIs, from inside the source node.

For each migration: the **total time** (the command's wall time) and the **downtime**, read as the longest gap
between two ping replies, both nodes pinging the guest every 0.1 s (a guest answers on one node at a time). Rounds
alternate minicloud and virsh. Targets: minicloud's total <= 1.10 x virsh's, and no more downtime than virsh's.
Guests run under TCG here, so the absolute figures are slow; the ratio is the point.

Run as root: ``python bench/migrate_bench.py [--quick] [--rounds N]``. Exit status: 0 when every migration
succeeded, 1 when one failed, 2 when the bench could not run here (what is missing is printed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.compute import migrate  # noqa: E402
from tests.cluster import harness  # noqa: E402
from tests.cluster.harness import AgentNode, Cluster, wait_for  # noqa: E402
from tests.cluster.migration_hosts import GUEST_FILES, enable_tls, ping, ping_gap, pinger  # noqa: E402

MEMORY_MIB = 256
PING_INTERVAL = 0.1


def fail(msg: str, code: int = 2) -> None:
    print(f"bench failed: {msg}", file=sys.stderr)
    raise SystemExit(code)


def pingers(nodes: list[AgentNode], ip: str) -> list[subprocess.Popen[str]]:
    return [pinger(n, ip, PING_INTERVAL) for n in nodes]


def guest_ip(console: Path, timeout: float = 300) -> str:
    def found() -> str | None:
        with_text = console.read_text(errors="replace") if console.exists() else ""
        m = re.search(r"minicloud-guest: ip=([0-9.]+)", with_text)
        return m.group(1) if m else None

    return wait_for(found, timeout=timeout, interval=1, what=f"an address in {console}")


def timed(what: str, fn) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    err = fn()
    return time.monotonic() - t0, err


def peer_xml(live: str, name: str, files: Path) -> str:
    """minicloud's guest definition made a plain domain: our metadata gone, its own name, uuid, MAC and files."""
    root = ET.fromstring(live)
    for tag in ("uuid", "metadata"):
        el = root.find(tag)
        if el is not None:
            root.remove(el)
    root.find("name").text = name  # type: ignore[union-attr]
    for disk in root.iterfind("devices/disk"):
        src = disk.find("source")
        if src is not None and src.get("file"):
            src.set("file", str(files / Path(src.get("file", "")).name))
    for tag in ("serial", "console"):
        for el in root.iterfind(f"devices/{tag}/source"):
            el.set("path", str(files / "console.log"))
    for iface in root.iterfind("devices/interface"):
        iface.find("mac").set("address", "52:00:be:4c:00:01")  # type: ignore[union-attr]
        target = iface.find("target")
        if target is not None:
            iface.remove(target)
    return ET.tostring(root, encoding="unicode")


def move(kind: str, src: AgentNode, dst: AgentNode, peer_files: dict[str, Path]) -> str:
    """One migration src -> dst; "" or the error."""
    if kind == "minicloud":
        r = src.cli("instance", "migrate", "mig", "--node", dst.node_name, "--wait", timeout=600)
        return "" if r.returncode == 0 else r.stderr.strip()
    a = dst.address
    r = src.exec(
        "virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p", "--tls", "--persistent", "--undefinesource",
        "--copy-storage-inc", "--migrateuri", f"tcp://{a}", "--listen-address", a, "--disks-uri", f"tcp://{a}",
        "--xml", peer_files[dst.node_name] / "peer.xml", "bench-peer", migrate.dest_uri(a, migrate.tls_dir(src.data_dir)),
        timeout=600,
    )  # fmt: skip
    return "" if r.returncode == 0 else r.stderr.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one migration of each (the test suite runs this)")
    ap.add_argument("--rounds", type=int, default=3, help="migrations of each kind (default 3)")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    reason = harness.unavailable_reason() or harness.libvirt_unavailable_reason()
    if reason:
        fail(reason)
    work = Path(tempfile.mkdtemp(prefix="minicloud-migrate-bench-"))
    image = work / "guest"
    built = subprocess.run([str(ROOT / "scripts" / "build-guest-image"), str(image)], capture_output=True, text=True)
    if built.returncode != 0:
        fail(f"scripts/build-guest-image failed: {built.stderr.strip()[-500:]}")
    errors: list[str] = []
    results: dict[str, list[tuple[float, float]]] = {"minicloud": [], "virsh": []}
    try:
        with Cluster(work / "cluster", 2, libvirt=True) as cluster, harness.guest_slot():
            n1, n2 = cluster.nodes
            cluster.start_all().form()
            for node in cluster:
                enable_tls(node)
                for f in GUEST_FILES:
                    shutil.copy(image / f, node.image_dir / f)
                node.cli("image", "import", f"guest-{node.node_name}", "--kernel", str(node.image_dir / "vmlinuz"),
                         "--initrd", str(node.image_dir / "initrd.img"), check=True)  # fmt: skip
            n1.cli(
                "type", "create", "bench.256", "--vcpus", "1", "--memory", str(MEMORY_MIB), "--disk", "1", check=True
            )

            def create() -> dict | None:
                r = n1.cli("-o", "json", "instance", "create", "mig", "--type", "bench.256", "--image", "guest-n1",
                           "--wait", timeout=300)  # fmt: skip
                return json.loads(r.stdout) if r.returncode == 0 else None

            inst = wait_for(create, timeout=300, interval=1, what="the instance")
            console = n1.data_dir / "instances" / inst["id"] / "console.log"
            ip = guest_ip(console)
            wait_for(lambda: ping(n1, ip), timeout=60, interval=1, what="the instance to answer pings")

            # The peer: the same definition as a plain domain, files of its own on each node.
            dom_name = f"mc-{inst['id']}"
            live = n1.exec("virsh", "-c", "qemu:///system", "dumpxml", "--migratable", dom_name).stdout
            peer_files = {n.node_name: n.root / "peer" for n in cluster}
            for node in cluster:
                d = peer_files[node.node_name]
                d.mkdir()
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "root.qcow2"), "1G"], check=True)
                shutil.copy(n1.data_dir / "instances" / inst["id"] / "seed.iso", d / "seed.iso")
                (d / "peer.xml").write_text(peer_xml(live, "bench-peer", d))
            defined = n1.exec("virsh", "-c", "qemu:///system", "define", peer_files["n1"] / "peer.xml")
            started = n1.exec("virsh", "-c", "qemu:///system", "start", "bench-peer")
            if defined.returncode or started.returncode:
                fail(f"the peer domain: {defined.stderr} {started.stderr}")
            # the definitions a migration sends must name the domain's uuid
            uuid = n1.exec("virsh", "-c", "qemu:///system", "domuuid", "bench-peer").stdout.strip()
            for node in cluster:
                xml_path = peer_files[node.node_name] / "peer.xml"
                xml_path.write_text(
                    xml_path.read_text().replace(
                        "<name>bench-peer</name>", f"<name>bench-peer</name><uuid>{uuid}</uuid>", 1
                    )
                )
            peer_ip = guest_ip(peer_files["n1"] / "console.log")
            wait_for(lambda: ping(n1, peer_ip), timeout=60, interval=1, what="the peer to answer pings")

            where = {"minicloud": n1, "virsh": n1}
            for _ in range(rounds):
                for kind in ("minicloud", "virsh"):
                    src = where[kind]
                    dst = n2 if src is n1 else n1
                    procs = pingers(cluster.nodes, ip if kind == "minicloud" else peer_ip)
                    time.sleep(1)
                    took, err = timed(kind, lambda k=kind, a=src, b=dst: move(k, a, b, peer_files))
                    target_ip = ip if kind == "minicloud" else peer_ip
                    wait_for(
                        lambda d=dst, t=target_ip: ping(d, t),
                        timeout=60,
                        interval=0.5,
                        what=f"{kind}'s guest on {dst.node_name}",
                    )
                    time.sleep(1)
                    g = ping_gap(procs)  # the longest time between two replies (from either node) while the guest moved
                    if err:
                        errors.append(f"{kind} {src.node_name} -> {dst.node_name}: {err}")
                    else:
                        results[kind].append((took, g))
                        where[kind] = dst
                    print(f"{kind:9} {src.node_name} -> {dst.node_name}: total {took:6.2f} s  downtime {g:5.2f} s",
                          flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nlive migration of a {MEMORY_MIB} MiB guest (1 GiB local root disk, TCG), {rounds} round(s)")
    print(f"{'':10} {'total s (median)':>17} {'downtime s (median)':>20}")
    med = {}
    for kind, rows in results.items():
        if rows:
            med[kind] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
            print(f"{kind:10} {med[kind][0]:17.2f} {med[kind][1]:20.2f}")
    if len(med) == 2:
        ratio = med["minicloud"][0] / med["virsh"][0]
        extra = med["minicloud"][1] - med["virsh"][1]
        print(f"total time minicloud / virsh = {ratio:.3f} (target <= 1.10); downtime difference {extra:+.2f} s "
              f"(target <= 0; ping resolution {PING_INTERVAL} s)")  # fmt: skip
    if errors:
        print("\nerrors:\n" + "\n".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
