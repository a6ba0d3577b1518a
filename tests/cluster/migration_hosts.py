"""Two real hosts whose libvirtds talk TLS to each other, for the migration test and ``bench/migrate_bench.py``.

:func:`enable_tls` does what an operator's libvirtd configuration does on a real node: the node's cluster certificate
in libvirt's and QEMU's names (:func:`agent.compute.migrate.write_tls_files`), ``libvirtd.conf``'s TLS listener and
``qemu.conf``'s TLS migration lines, and libvirtd restarted with ``--listen`` (guests and the agent's connection
survive a libvirtd restart; the agent reconnects)."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys

from agent.compute import migrate
from tests.cluster.harness import AgentNode, PublicLan, alive, wait_for

GUEST_FILES = ("vmlinuz", "initrd.img")


def enable_tls(node: AgentNode) -> None:
    """Run ``node``'s libvirtd with the TLS listener and TLS migrations (after the node joined: the cluster CA)."""
    lv = node.libvirt
    assert lv is not None
    directory = migrate.write_tls_files(node.data_dir)
    etc = lv.root / "etc"
    for name, lines in (
        ("libvirtd.conf", migrate.libvirtd_conf(directory)),
        ("qemu.conf", migrate.qemu_conf(directory)),
    ):
        text = (etc / name).read_text() if (etc / name).exists() else ""
        if lines not in text:
            (etc / name).write_text(f"{text}\n# minicloud test node: TLS between the nodes' libvirtds\n{lines}")
    restart_libvirtd(node)


def restart_libvirtd(node: AgentNode, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop ``node``'s libvirtd with ``sig`` (SIGKILL: it dies mid-way through whatever it does) and start it again
    with the TLS listener; its guests' QEMUs run on meanwhile (libvirtd reconnects to them)."""
    lv = node.libvirt
    assert lv is not None
    pid = lv.pid()
    if pid is not None and alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        wait_for(lambda: not alive(pid), timeout=20, what="libvirtd to exit")
    (lv.root / "run" / "libvirtd.pid").unlink(missing_ok=True)
    result = lv.exec("libvirtd", "-d", "--listen", "-p", "/run/libvirt/libvirtd.pid", timeout=60)
    assert result.returncode == 0, f"libvirtd --listen on {node.node_name}: {result.stderr}\n{lv.log_tail()}"
    wait_for(lambda: _listening(node), timeout=60, what=f"{node.node_name}'s libvirtd on port 16514")


def _listening(node: AgentNode) -> bool:
    out = node.exec("ss", "-ltnH", "sport = :16514").stdout
    return "16514" in out


def tcp_listeners(node: AgentNode) -> list[str]:
    """``ss -ltnH`` lines of the node's TCP listeners (what an unauthenticated client could try)."""
    return [line for line in node.exec("ss", "-ltnH").stdout.splitlines() if line.strip()]


#: A small ICMP echo client (no ``ping`` binary is needed on the test machine): ``PINGER IP INTERVAL COUNT TIMEOUT``
#: sends an echo request every INTERVAL seconds (COUNT of them, 0: until killed) and prints ``[UNIX TIME] 64 bytes
#: from IP`` for each reply, like ``ping -D``; exit 0 when a reply came, 1 otherwise.
PINGER = r"""
import os, select, socket, struct, sys, time
ip, interval, count, timeout = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, seq, got = os.getpid() & 0xFFFF, 0, 0
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
nxt = time.monotonic(); end = None
while True:
    now = time.monotonic()
    if end is not None and now >= end:
        break
    if now >= nxt and (count == 0 or seq < count):
        seq += 1
        pkt = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF) + b"minicloud!"
        pkt = pkt[:2] + struct.pack("!H", csum(pkt)) + pkt[4:]
        try:
            s.sendto(pkt, (ip, 0))
        except OSError:
            pass
        nxt += interval
        if count and seq >= count:
            end = now + timeout
    wait = max(0.0, min(nxt, end or nxt) - time.monotonic())
    if select.select([s], [], [], wait)[0]:
        data, addr = s.recvfrom(2048)
        ihl = (data[0] & 15) * 4
        if addr[0] == ip and data[ihl] == 0 and struct.unpack("!H", data[ihl + 4 : ihl + 6])[0] == ident:
            got += 1
            print("[%.6f] 64 bytes from %s" % (time.time(), ip), flush=True)
            if count:
                break
sys.exit(0 if got else 1)
"""


def ping(node: AgentNode, ip: str, timeout: float = 2.0) -> bool:
    """One echo request from inside ``node``; whether it was answered within ``timeout``."""
    return node.exec(sys.executable, "-c", PINGER, ip, "1", "1", str(timeout), timeout=timeout + 20).returncode == 0


def pinger(node: AgentNode, ip: str, interval: float) -> subprocess.Popen[str]:
    """Ping ``ip`` from inside ``node`` every ``interval`` seconds until killed (``ping -D`` lines on stdout)."""
    return node.popen(sys.executable, "-c", PINGER, ip, str(interval), "0", "0", stdout=subprocess.PIPE, text=True)


def lan_ping(lan: PublicLan, ip: str, timeout: float = 2.0) -> bool:
    """One echo request from the public LAN's namespace (the "internet"); whether it was answered."""
    return lan.exec(sys.executable, "-c", PINGER, ip, "1", "1", str(timeout), timeout=timeout + 20).returncode == 0


def lan_pinger(lan: PublicLan, ip: str, interval: float) -> subprocess.Popen[str]:
    """:func:`pinger` from the public LAN's namespace."""
    cmd = ["ip", "netns", "exec", lan.netns, sys.executable, "-c", PINGER, ip, str(interval), "0", "0"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def ping_gap(pingers: list[subprocess.Popen[str]]) -> float:
    """Stop ``pinger`` processes; the longest time without any reply, from either node, between the first and the last reply seen."""
    return ping_window(pingers)[0]


def ping_window(pingers: list[subprocess.Popen[str]]) -> tuple[float, float, float]:
    """:func:`ping_gap` with where it was: (gap, the last reply before it, the first after it), in epoch seconds;
    NaN for all three with fewer than two replies (no gap can be measured)."""
    stamps: list[float] = []
    for proc in pingers:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        stamps += [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.MULTILINE)]
    stamps.sort()
    nan = float("nan")
    return max(((b - a, a, b) for a, b in itertools.pairwise(stamps)), default=(nan, nan, nan))


def libvirt_state(node: AgentNode, uuid: str) -> str | None:
    """The domain's state on the node's own libvirtd (``running``, ``paused``, ``shutoff``…), None if absent."""
    import libvirt

    assert node.libvirt is not None
    states = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
              libvirt.VIR_DOMAIN_SHUTOFF: "shutoff"}  # fmt: skip
    conn = libvirt.open(node.libvirt.uri)
    try:
        try:
            return states.get(conn.lookupByUUIDString(uuid).state()[0], "other")
        except libvirt.libvirtError as exc:  # absent, or undefined between the lookup and the state (a transient
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:  # domain leaving a node after its migration)
                return None
            raise
    finally:
        conn.close()


def virsh(node: AgentNode, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``virsh -c <the node's libvirtd> ARGS`` from inside the node."""
    assert node.libvirt is not None
    return node.exec("virsh", "-c", "qemu:///system", *args, timeout=timeout)
