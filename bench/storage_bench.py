"""Storage bench: instance create on Ceph with a big image vs a tiny one, I/O through a libvirt domain against the pool
directly, volume attach to the guest seeing it, and what the Ceph daemons cost.

Usage::

    .venv/bin/python bench/storage_bench.py [--runs 5] [--attach-runs 7] [--json FILE] [--keep]
    .venv/bin/python bench/storage_bench.py --quick   # a 512 MiB "big" image, one create per row, 2 attaches, 64 MiB I/O

Needs root, a running libvirtd (``scripts/start-libvirtd``) and Ceph (Debian packages ceph-mon ceph-osd ceph-mgr
ceph-common, qemu-block-extra). It starts the real agent in a temporary directory (libvirt driver, ``virt_type =
"auto"``: KVM where the hardware has it, TCG otherwise; networking off; Ceph ports picked free) and, through the API,
``storage enable`` with one sparse file OSD: the agent bootstraps its own private cluster (MON, MGR, one OSD), which
is destroyed at the end. Everything below goes through the API (SDK over the Unix socket) unless it says otherwise.

1. Create to running. Two disk images are made and imported into the ``ceph`` pool and into the ``local`` pool: a
   tiny one (16 MiB raw, 1 MiB written) and a big one (2 GiB raw with 384 MiB of random data spread over it; 512 MiB
   with 64 MiB written in --quick). Instances of each (``disk_gib`` = the big image's size for both, so only the
   image differs) are created in turn, alternating tiny and big, and timed from just before ``POST /v1/instances``
   until the API says ``running`` (polled every 25 ms), then deleted until the record is gone. The images carry data,
   not a boot loader: "running" is libvirt's domain started, not a guest that booted (the guest's boot reads what it
   needs whatever the image's size; the launch path is what a copy of the image would make grow). On Ceph the root
   disk is an RBD clone of the image's protected snapshot, so the ratio big/tiny should be ~1 (target <= 1.1);
   the local qcow2 pool is shown for information.
2. Attach to visible. A guest (the busybox test guest, ``scripts/build-guest-image``, root disk on Ceph) runs a
   user-data loop that prints ``mc-disk add vdb`` / ``mc-disk del vdb`` on its serial console within 50 ms of the
   kernel adding or removing the disk (``/sys/block``). A 1 GiB Ceph volume is attached and detached ``--attach-runs``
   times; each attach is timed from just before ``POST /v1/volumes/{id}/attach`` to the guest's line (console log
   tailed every 10 ms), with the moments libvirt's live XML names the volume and the API says ``in-use`` alongside.
3. I/O. A second volume is attached; the guest finds it by its virtio serial (the volume id) and runs, on its own,
   ``dd bs=4M oflag=direct`` (sequential write, queue depth 1) then ``dd bs=4M iflag=direct`` over what it wrote,
   printing ``/sys/block/<dev>/stat`` around each: the whole path minicloud builds (the domain's disk definition:
   raw, ``cache='none'``, ``discard='unmap'``, no iotune; virtio-blk; librbd in libvirt's QEMU), and how many
   requests of what size the guest's block layer really sent. The floor is ``qemu-img bench`` on a scratch RBD image
   in the same pool, the same amount (written, then read back), once as dd asks (4 MiB, depth 1) and once as the
   guest sends (its mean request size, as many in flight as make up 4 MiB), each with QEMU's defaults (``-t
   writeback``) and with the domain's cache mode (``-t none``). The check "overhead < 10 %" (guest >= 0.9x floor)
   is against the guest's request stream with QEMU's defaults: the cache mode is part of what minicloud adds.
   Random 4 KiB I/O is measured with ``rbd bench`` on the pool (librbd defaults) and with ``rbd_cache=false`` (what
   the domain's ``cache='none'`` makes QEMU set): a busybox guest has no random I/O tool (a ``dd`` per request would
   measure process creation), so random I/O inside a guest is not measured; the ratio of the two rows is what the
   disk definition costs there.
4. Ceph daemons: RSS and CPU of each (read from /proc: every ``ceph-*`` and ``radosgw`` process whose command line
   names the cluster's directory) over a quiet window with no instance (after the creates), and over the I/O part
   (peak RSS, CPU % of one core).

Under TCG (no KVM) the guest's CPU is emulated: the guest's ``dd`` pays for it per request, which the floor does not
(the output says which virtualisation ran). The exit status is 0 when the bench ran, whatever the figures (a missed
target is printed as MISS); 1 when something it measured failed (an instance or a volume went to ``error``); other
values when it could not run. Ctrl-C, SIGTERM or an error destroy the domains, stop the agent and its Ceph daemons and
remove the temporary directory (``--keep`` keeps it: the agent's stderr is in ``agent.stderr``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import psutil

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from api_bench import Child, json_clean, mark, stop_children, wait_ready  # noqa: E402

from minicloud.client import ApiError, Client  # noqa: E402

LIBVIRT_URI = "qemu:///system"
MIB, GIB = 1 << 20, 1 << 30
TARGET_CREATE_RATIO = 1.1  # big/tiny on Ceph
TARGET_IO_RATIO = 0.9  # guest throughput / floor: overhead < 10 %
INSTANCE_TYPE = "m1.tiny"
POLL_S = 0.025
TAIL_S = 0.01
STATE_TIMEOUT_S = 180.0
GUEST_TIMEOUT_S = 300.0
IO_BLOCK = 4 * MIB

# The guest's user-data: a watcher printing disk arrivals/removals (vdb, vdc) within 50 ms, and the I/O run on the
# disk whose virtio serial is the I/O volume's id (the guest names disks in the order they arrive, whatever the
# target libvirt was given): COUNT blocks of 4 MiB, direct I/O, queue depth 1.
GUEST_SCRIPT = r"""#!/bin/sh
(
  pb=0; pc=0
  while :; do
    for d in b c; do
      if [ -e /sys/block/vd$d ]; then now=1; else now=0; fi
      eval prev=\$p$d
      if [ "$now" != "$prev" ]; then
        if [ "$now" = 1 ]; then echo "mc-disk add vd$d" >/dev/console; else echo "mc-disk del vd$d" >/dev/console; fi
        eval p$d=$now
      fi
    done
    sleep 0.05
  done
) &
(
  dev=""
  while [ -z "$dev" ]; do
    for f in /sys/block/vd*/serial; do
      [ -e "$f" ] || continue
      read -r ser <"$f"
      case "@SERIAL@" in "$ser"*) [ -n "$ser" ] && dev=${f#/sys/block/} && dev=${dev%/serial} ;; esac
    done
    [ -n "$dev" ] || sleep 0.1
  done
  sleep 1
  echo "mc-io stat0 $(cat /sys/block/$dev/stat)" >/dev/console
  echo "mc-io seqwrite start $dev" >/dev/console
  dd if=/dev/zero of=/dev/$dev bs=4M count=@COUNT@ oflag=direct 2>/dev/null
  echo "mc-io seqwrite end" >/dev/console
  echo "mc-io stat1 $(cat /sys/block/$dev/stat)" >/dev/console
  echo "mc-io seqread start" >/dev/console
  dd if=/dev/$dev of=/dev/null bs=4M count=@COUNT@ iflag=direct 2>/dev/null
  echo "mc-io seqread end" >/dev/console
  echo "mc-io stat2 $(cat /sys/block/$dev/stat)" >/dev/console
) &
"""


class BenchFailure(Exception):
    """Something the bench measures failed (exit status 1)."""


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def fmt_s(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2f}"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * 1000:.0f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cmd(argv: list[str], timeout: float = 600) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return done.stdout


def make_image(path: Path, size: int, written: int, chunks: int) -> None:
    """A raw disk image of ``size`` bytes with ``written`` bytes of random data in ``chunks`` spread evenly (the
    rest is a hole: thin, as a real image mostly is)."""
    chunk = max(MIB, written // chunks)
    step = size // chunks
    with open(path, "wb") as fh:
        fh.truncate(size)
        for i in range(chunks):
            fh.seek(i * step)
            left = chunk
            while left > 0:
                n = min(left, 8 * MIB)
                fh.write(os.urandom(n))
                left -= n


class ConsoleTail:
    """Reads a console log as it grows; ``lines`` holds (time first seen, line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None
        self._buf = b""
        self.lines: list[tuple[float, str]] = []

    def poll(self) -> None:
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")  # noqa: SIM115 (kept open across polls)
            except FileNotFoundError:
                return
        chunk = self._fh.read()
        if not chunk:
            return
        now = time.perf_counter()
        self._buf += chunk
        *complete, self._buf = self._buf.split(b"\n")
        for raw in complete:
            self.lines.append((now, raw.decode(errors="replace").rstrip("\r")))

    def find(self, text: str, after: int = 0) -> tuple[int, float] | None:
        for i in range(after, len(self.lines)):
            if text in self.lines[i][1]:
                return i, self.lines[i][0]
        return None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


# --------------------------------------------------------------------------------------------------------------
# Ceph daemons from /proc
# --------------------------------------------------------------------------------------------------------------


def ceph_daemons(conf: Path) -> dict[str, psutil.Process]:
    """Every Ceph daemon (``ceph-*``, ``radosgw``: the agent runs the S3 gateway too once Ceph is up) whose command
    line names ``conf``'s directory, by name (``osd.0``, ``mon.x``...)."""
    found: dict[str, psutil.Process] = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        name = p.info["name"] or ""
        if not (name.startswith("ceph-") or name == "radosgw") or not any(str(conf.parent) in a for a in cmd):
            continue
        flag = next((f for f in ("-i", "--id", "--name", "-n") if f in cmd[:-1]), None)
        ident = cmd[cmd.index(flag) + 1].removeprefix("client.") if flag else str(p.pid)
        found[f"{name.removeprefix('ceph-')}.{ident}"] = p
    return found


@dataclass
class DaemonUse:
    rss_mib: float = 0.0  # at the end of the window
    rss_peak_mib: float = 0.0
    cpu_pct: float = 0.0  # of one core over the window


class CephSampler:
    """Samples the daemons' RSS every 200 ms between ``start()`` and ``stop()``; CPU from their CPU times."""

    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: dict[str, psutil.Process] = {}
        self._cpu0: dict[str, float] = {}
        self._peak: dict[str, int] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._procs = ceph_daemons(self.conf)
        self._cpu0 = {n: sum(p.cpu_times()[:2]) for n, p in self._procs.items()}
        self._peak = dict.fromkeys(self._procs, 0)
        self._t0 = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def _sample(self) -> None:
        for n, p in self._procs.items():
            with contextlib.suppress(psutil.Error):
                self._peak[n] = max(self._peak[n], p.memory_info().rss)

    def stop(self) -> dict[str, DaemonUse]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        wall = max(1e-6, time.monotonic() - self._t0)
        out: dict[str, DaemonUse] = {}
        for n, p in sorted(self._procs.items()):
            try:
                cpu = sum(p.cpu_times()[:2]) - self._cpu0[n]
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            out[n] = DaemonUse(rss / MIB, self._peak[n] / MIB, 100.0 * cpu / wall)
        return out


# --------------------------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    info: dict[str, Any] = field(default_factory=dict)
    #: (pool, image) -> seconds from POST to running, per run
    create: dict[str, list[float]] = field(default_factory=dict)
    imports: dict[str, float] = field(default_factory=dict)  # "pool/image" -> seconds to ready in the pool
    attach_guest: list[float] = field(default_factory=list)
    attach_libvirt: list[float] = field(default_factory=list)
    attach_api: list[float] = field(default_factory=list)
    detach_guest: list[float] = field(default_factory=list)
    io: dict[str, float] = field(default_factory=dict)  # row -> MiB/s or IOPS
    #: seqwrite/seqread -> the guest block layer's requests for the dd run: count and mean size (KiB)
    guest_requests: dict[str, dict[str, float]] = field(default_factory=dict)
    ceph_idle: dict[str, DaemonUse] = field(default_factory=dict)
    ceph_busy: dict[str, DaemonUse] = field(default_factory=dict)
    floor_shapes: dict[str, str] = field(default_factory=dict)  # "seqwrite guest" -> "-s 1016K -d 5"
    errors: list[str] = field(default_factory=list)


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    data: Path
    agent: Child
    client: Client
    conn: libvirt.virConnect
    res: Results
    ceph_pool: str = ""

    @property
    def ceph_root(self) -> Path:
        return self.data / "ceph"

    def rbd_args(self) -> list[str]:
        return ["--conf", str(self.ceph_root / "ceph.conf"), "--keyring", str(self.ceph_root / "client.admin.keyring")]

    def check_agent(self, what: str) -> None:
        if self.agent.proc.poll() is not None:
            raise RuntimeError(
                f"the agent exited ({self.agent.proc.returncode}) during {what}:\n{self.agent.stderr_tail()}"
            )

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.client.call("GET", path)
        except ApiError as exc:
            if exc.problem.status == 404:
                return None
            raise

    def wait_for(self, what: str, check: Any, timeout: float = STATE_TIMEOUT_S, interval: float = POLL_S) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            self.check_agent(what)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not after {timeout:.0f} s\n{self.agent.stderr_tail(15)}")
            time.sleep(interval)


def agent_config(workdir: Path, node: str, log_level: str) -> str:
    return (
        f'[agent]\nnode_name = "{node}"\nlog_level = "{log_level}"\n'
        f'[compute]\ndriver = "libvirt"\nvirt_type = "auto"\nimage_dirs = ["{workdir}"]\nstop_timeout = 5.0\n'
        "cpu_allocation_ratio = 16.0\n"
        "[network]\nenabled = false\n"
        f"[storage]\nceph_mon_port = {free_port()}\nceph_mon_port_v1 = {free_port()}\n"
        f"ceph_prometheus_port = {free_port()}\n"
    )


def spawn_agent(argv: list[str], env: dict[str, str], workdir: Path) -> Child:
    """The agent in its own session (a Ctrl-C reaches only the bench), its log (stdout) and stderr in
    ``agent.stderr``."""
    err = workdir / "agent.stderr"
    with open(err, "wb") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, env=env, start_new_session=True)
    return Child("agent", proc, err)


def build_guest(workdir: Path) -> Path:
    out = workdir / "guest"
    proc = subprocess.run(
        [str(REPO / "scripts" / "build-guest-image"), str(out)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/build-guest-image failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def enable_storage(b: Bench) -> None:
    t0 = time.perf_counter()
    b.client.storage.enable(file_size_bytes=b.args.osd_gib * GIB)
    b.wait_for("storage ready", lambda: (b.get("/v1/storage") or {}).get("state") == "ready", 300, 0.5)
    b.res.info["storage_ready_s"] = time.perf_counter() - t0
    pools = b.client.call("GET", "/v1/pools")
    items = pools.get("items", pools) if isinstance(pools, dict) else pools
    ceph = next(p for p in items if p.get("driver") == "ceph")
    b.ceph_pool = ceph["ceph_pool"]


def import_images(b: Bench) -> dict[str, int]:
    """Both images into both pools, waiting for each to be ready; returns the big image's virtual size."""
    tiny, big = b.workdir / "tiny.raw", b.workdir / "big.raw"
    make_image(tiny, 16 * MIB, 1 * MIB, 1)
    make_image(big, b.args.big_mib * MIB, b.args.big_data_mib * MIB, 16)
    for pool in ("ceph", "local"):
        for name, path in (("tiny", tiny), ("big", big)):
            t0 = time.perf_counter()
            img = b.client.call("POST", "/v1/images", json={"name": f"{name}-{pool}", "path": str(path), "pool": pool})

            def ready(iid: str = img["id"]) -> bool:
                cur = b.get(f"/v1/images/{iid}") or {}
                if cur.get("pool_state") == "error":
                    raise BenchFailure(f"image import failed: {cur.get('pool_reason')}")
                return cur.get("pool_state") in ("ready", None)

            b.wait_for(f"image {name} ready in pool {pool}", ready, 600, 0.1)
            b.res.imports[f"{pool}/{name}"] = time.perf_counter() - t0
    return {"big_virtual": b.args.big_mib * MIB}


def delete_instance(b: Bench, iid: str) -> None:
    with contextlib.suppress(ApiError):
        b.client.instances.delete(iid)
    b.wait_for(f"instance {iid} deleted", lambda: b.get(f"/v1/instances/{iid}") is None, STATE_TIMEOUT_S, 0.1)


def instance_state(b: Bench, iid: str) -> str:
    inst = b.get(f"/v1/instances/{iid}") or {}
    state = inst.get("status", {}).get("state", inst.get("state", ""))
    if state == "error":
        reason = inst.get("status", {}).get("reason", "")
        raise BenchFailure(f"instance {inst.get('name')} went to error: {reason}")
    return state


def create_runs(b: Bench, disk_gib: int) -> None:
    n = 0
    for i in range(b.args.warmup + b.args.runs):
        for pool in ("ceph", "local"):
            for name in ("tiny", "big") if i % 2 == 0 else ("big", "tiny"):
                n += 1
                t0 = time.perf_counter()
                inst = b.client.call(
                    "POST",
                    "/v1/instances",
                    json={"name": f"c{n}", "type": INSTANCE_TYPE, "image": f"{name}-{pool}", "disk_gib": disk_gib},
                )
                iid = inst["id"]
                b.wait_for(f"instance {name} on {pool} running", lambda iid=iid: instance_state(b, iid) == "running")
                took = time.perf_counter() - t0
                if i >= b.args.warmup:
                    b.res.create.setdefault(f"{pool}/{name}", []).append(took)
                print(
                    f"  create {pool}/{name}{' (warm-up)' if i < b.args.warmup else ''}: {took:.2f} s", file=sys.stderr
                )
                delete_instance(b, iid)


def volume_state(b: Bench, vid: str) -> str:
    v = b.get(f"/v1/volumes/{vid}") or {}
    state = v.get("status", {}).get("state", "")
    if state == "error":
        raise BenchFailure(f"volume {v.get('name')} went to error: {v.get('status', {}).get('reason')}")
    return state


def live_xml_names(b: Bench, dom_uuid: str, vid: str) -> bool:
    with contextlib.suppress(libvirt.libvirtError):
        return vid in b.conn.lookupByUUIDString(dom_uuid).XMLDesc(0)
    return False


def guest_phase(b: Bench, guest_kernel: Path) -> None:
    img = b.client.images.create(
        name="bench-guest", kernel=str(guest_kernel / "vmlinuz"), initrd=str(guest_kernel / "initrd.img")
    )
    # Both volumes first: the guest's script names the I/O volume by its id (its virtio serial).
    vid = b.client.call("POST", "/v1/volumes", json={"name": "hot", "size_gib": 1, "pool": "ceph"})["id"]
    io_gib = max(1, math.ceil(b.args.io_mib * MIB / GIB))
    vid2 = b.client.call("POST", "/v1/volumes", json={"name": "io", "size_gib": io_gib, "pool": "ceph"})["id"]
    script = GUEST_SCRIPT.replace("@COUNT@", str(b.args.io_mib * MIB // IO_BLOCK)).replace("@SERIAL@", vid2)
    inst = b.client.call(
        "POST",
        "/v1/instances",
        json={"name": "guest", "type": INSTANCE_TYPE, "image": img.id, "pool": "ceph", "user_data": script},
    )
    iid = inst["id"]
    console_path = b.data / "instances" / iid / "console.log"
    tail = ConsoleTail(console_path)

    def ready() -> bool:
        tail.poll()
        instance_state(b, iid)
        return tail.find("minicloud-guest: ready") is not None

    t0 = time.perf_counter()
    b.wait_for("the guest's ready marker", ready, GUEST_TIMEOUT_S, 0.05)
    b.res.info["guest_boot_s"] = time.perf_counter() - t0
    dom_uuid = (b.get(f"/v1/instances/{iid}") or {}).get("uuid") or _dom_uuid(b, iid)
    b.res.info["guest_root"] = "rbd" if "protocol='rbd'" in b.conn.lookupByUUIDString(dom_uuid).XMLDesc(0) else "file"

    # -- attach -> visible ------------------------------------------------------------------------------------
    b.wait_for("volume available", lambda: volume_state(b, vid) == "available")
    for i in range(b.args.attach_runs):
        mark_from = len(tail.lines)
        t0 = time.perf_counter()
        b.client.call("POST", f"/v1/volumes/{vid}/attach", json={"instance": iid, "device": "vdb"})
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while len(seen) < 3:
            tail.poll()
            now = time.perf_counter()
            if "guest" not in seen and tail.find("mc-disk add vdb", mark_from):
                seen["guest"] = tail.find("mc-disk add vdb", mark_from)[1]  # type: ignore[index]
            if "libvirt" not in seen and live_xml_names(b, dom_uuid, vid):
                seen["libvirt"] = now
            if "api" not in seen and volume_state(b, vid) == "in-use":
                seen["api"] = now
            if time.monotonic() > deadline:
                raise BenchFailure(f"attach {i + 1}: only {sorted(seen)} after 120 s")
            b.check_agent("attach")
            time.sleep(TAIL_S)
        b.res.attach_guest.append(seen["guest"] - t0)
        b.res.attach_libvirt.append(seen["libvirt"] - t0)
        b.res.attach_api.append(seen["api"] - t0)
        print(f"  attach {i + 1}: guest sees it after {seen['guest'] - t0:.2f} s", file=sys.stderr)
        mark_from = len(tail.lines)
        t0 = time.perf_counter()
        b.client.call("POST", f"/v1/volumes/{vid}/detach", json={"force": False})

        def gone(mark_from: int = mark_from) -> bool:
            tail.poll()
            return tail.find("mc-disk del vdb", mark_from) is not None

        b.wait_for("the guest losing the volume", gone, 120, TAIL_S)
        b.res.detach_guest.append(tail.find("mc-disk del vdb", mark_from)[1] - t0)  # type: ignore[index]
        b.wait_for("volume available again", lambda: volume_state(b, vid) == "available", 120)

    # -- I/O through the domain -------------------------------------------------------------------------------
    b.wait_for("io volume available", lambda: volume_state(b, vid2) == "available")
    sampler = CephSampler(b.ceph_root / "ceph.conf")
    sampler.start()
    mark_from = len(tail.lines)
    b.client.call("POST", f"/v1/volumes/{vid2}/attach", json={"instance": iid, "device": "vdc"})

    def io_done() -> bool:
        tail.poll()
        return tail.find("mc-io stat2", mark_from) is not None

    b.wait_for("the guest's I/O run", io_done, b.args.io_timeout, TAIL_S)
    b.res.info["volume_disk_xml"] = _disk_xml(b.conn.lookupByUUIDString(dom_uuid).XMLDesc(0), vid2)
    mib = b.args.io_mib
    for what in ("seqwrite", "seqread"):
        start = tail.find(f"mc-io {what} start", mark_from)
        end = tail.find(f"mc-io {what} end", mark_from)
        assert start and end
        b.res.io[f"guest {what}"] = mib / max(1e-6, end[1] - start[1])
    # What the guest's block layer really sent for each 4 MiB dd block (/sys/block/<dev>/stat before and after):
    # requests and their mean size. The floor repeats that shape too.
    stats = [_stat(tail, f"mc-io stat{i}", mark_from) for i in range(3)]
    for what, (ios_f, sect_f), (a, z) in (("seqwrite", (4, 6), (0, 1)), ("seqread", (0, 2), (1, 2))):
        ios = stats[z][ios_f] - stats[a][ios_f]
        size = (stats[z][sect_f] - stats[a][sect_f]) * 512 / max(1, ios)
        b.res.guest_requests[what] = {"requests": ios, "mean_kib": size / 1024}
    floor_io(b)
    b.res.ceph_busy = sampler.stop()
    tail.close()
    delete_instance(b, iid)
    for v in (vid, vid2):
        b.client.call("DELETE", f"/v1/volumes/{v}")


def _stat(tail: ConsoleTail, prefix: str, after: int) -> list[int]:
    found = tail.find(prefix, after)
    if found is None:
        raise BenchFailure(f"the guest did not print {prefix!r}")
    return [int(x) for x in tail.lines[found[0]][1].split(prefix, 1)[1].split()]


def _dom_uuid(b: Bench, iid: str) -> str:
    for dom in b.conn.listAllDomains(0):
        with contextlib.suppress(libvirt.libvirtError):
            if iid in dom.name() or iid in dom.XMLDesc(0):
                return dom.UUIDString()
    raise RuntimeError(f"no libvirt domain for instance {iid}")


def _disk_xml(xml: str, vid: str) -> str:
    import xml.etree.ElementTree as ET

    for disk in ET.fromstring(xml).iter("disk"):
        if vid in ET.tostring(disk, encoding="unicode"):
            drv = disk.find("driver")
            attrs = dict(drv.attrib) if drv is not None else {}
            iotune = disk.find("iotune") is not None
            return " ".join(f"{k}={v}" for k, v in sorted(attrs.items())) + (" iotune" if iotune else " (no iotune)")
    return ""


def floor_io(b: Bench) -> None:
    """The same amount, block size and depth as the guest's dd, straight on the pool with qemu-img bench (a scratch
    image written then read), and random 4 KiB with rbd bench."""
    scratch = f"bench-floor-{secrets.token_hex(3)}"
    size_mib = b.args.io_mib
    run_cmd(["rbd", *b.rbd_args(), "create", "--size", f"{max(size_mib, 64)}M", f"{b.ceph_pool}/{scratch}"])
    conf, keyring = b.ceph_root / "ceph.conf", b.ceph_root / "client.admin.keyring"
    target = f"rbd:{b.ceph_pool}/{scratch}:conf={conf}:id=admin:keyring={keyring}"
    count = str(size_mib * MIB // IO_BLOCK)
    try:
        for what, extra in (("seqwrite", ["-w"]), ("seqread", [])):
            # as dd asked (4 MiB, depth 1), and as the guest's block layer sent it (its mean request size, as many
            # in flight as make up 4 MiB)
            req = b.res.guest_requests.get(what, {})
            kib = int(req.get("mean_kib", 0) // 4 * 4)
            shapes = [("4M", str(IO_BLOCK), "1", count)]
            if 4 <= kib < IO_BLOCK // 1024:
                shapes.append(
                    ("guest", str(kib * 1024), str(math.ceil(IO_BLOCK / (kib * 1024))), str(size_mib * 1024 // kib))
                )
            for cache in ("writeback", "none"):
                for shape, size, depth, n in shapes:
                    t0 = time.perf_counter()
                    run_cmd(
                        ["qemu-img", "bench", "-f", "raw", "-t", cache, "-d", depth, "-s", size, "-c", n, *extra,
                         target]
                    )  # fmt: skip
                    b.res.io[f"qemu-img {what} {shape} {cache}"] = size_mib / (time.perf_counter() - t0)
                    b.res.floor_shapes[f"{what} {shape}"] = f"-s {int(size) // 1024}K -d {depth}"
        total = f"{b.args.rand_mib}M"
        for label, conf_extra in (("defaults", []), ("rbd_cache=false", ["--rbd_cache=false"])):
            for io_type in ("write", "read"):
                out = run_cmd(
                    ["rbd", *b.rbd_args(), *conf_extra, "bench", "--io-type", io_type, "--io-size", "4K",
                     "--io-threads", "16", "--io-total", total, "--io-pattern", "rand", f"{b.ceph_pool}/{scratch}"],
                    timeout=600,
                )  # fmt: skip
                b.res.io[f"rbd rand {io_type} {label}"] = _rbd_iops(out)
    finally:
        subprocess.run(["rbd", *b.rbd_args(), "rm", f"{b.ceph_pool}/{scratch}"], capture_output=True, check=False)


def _rbd_iops(out: str) -> float:
    # "elapsed: 3   ops: 4096   ops/sec: 1234.5   bytes/sec: 5.1 MiB/s"
    for line in out.splitlines():
        if line.strip().startswith("elapsed:") and "ops/sec:" in line:
            return float(line.split("ops/sec:")[1].split()[0])
    return math.nan


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def summarize(res: Results) -> dict[str, Any]:
    c = {k: median(v) for k, v in res.create.items()}
    s: dict[str, Any] = {"create_median_s": c}
    s["ceph_ratio"] = c.get("ceph/big", math.nan) / c.get("ceph/tiny", math.nan)
    s["local_ratio"] = c.get("local/big", math.nan) / c.get("local/tiny", math.nan)
    s["ceph_pass"] = bool(s["ceph_ratio"] <= TARGET_CREATE_RATIO)
    io = res.io
    for what in ("seqwrite", "seqread"):
        for shape in ("4M", "guest"):
            for cache in ("writeback", "none"):
                floor = io.get(f"qemu-img {what} {shape} {cache}", math.nan)
                s[f"io_ratio {what} {shape} {cache}"] = io.get(f"guest {what}", math.nan) / floor
    # The check: the guest against the same request stream on the pool with QEMU's defaults (the domain's cache
    # mode is part of what minicloud adds). Where the guest's requests could not be read, against 4 MiB depth 1.
    shape = "guest" if all(f"{w} guest" in res.floor_shapes for w in ("seqwrite", "seqread")) else "4M"
    s["io_check_shape"] = shape
    s["io_pass"] = bool(
        s[f"io_ratio seqwrite {shape} writeback"] >= TARGET_IO_RATIO
        and s[f"io_ratio seqread {shape} writeback"] >= TARGET_IO_RATIO
    )
    for io_type in ("write", "read"):
        s[f"rand {io_type} ratio"] = io.get(f"rbd rand {io_type} rbd_cache=false", math.nan) / io.get(
            f"rbd rand {io_type} defaults", math.nan
        )
    s["attach_guest_p50_s"] = median(res.attach_guest)
    s["attach_libvirt_p50_s"] = median(res.attach_libvirt)
    s["attach_api_p50_s"] = median(res.attach_api)
    s["detach_guest_p50_s"] = median(res.detach_guest)
    return s


def print_report(res: Results, s: dict[str, Any], args: argparse.Namespace) -> None:
    info = res.info
    print()
    print(
        f"minicloud storage bench: one node, a private Ceph ({info.get('ceph')}), one {args.osd_gib} GiB file OSD; "
        f"virt_type {info.get('virt_type')} ({info.get('virt_reason')}); {os.cpu_count()} CPUs; "
        f"libvirt {info.get('libvirt')}, QEMU {info.get('qemu')}; Python {platform.python_version()}"
    )
    print(
        f"storage enable to ready: {info.get('storage_ready_s', math.nan):.1f} s; load average (1 min) at the start"
        f" {info.get('loadavg_start', math.nan):.1f}, at the end {info.get('loadavg_end', math.nan):.1f}"
        " (other load on the machine moves every figure below)"
    )
    print()
    big = f"{args.big_mib} MiB raw, {args.big_data_mib} MiB written"
    print(f"1. instance create -> running (API), tiny image (16 MiB, 1 MiB written) vs big image ({big})")
    if args.quick:
        print("   (--quick: the big image is smaller than the issue's 2 GiB)")
    head = f"   {'pool/image':14} {'median s':>8} {'min s':>7} {'max s':>7} {'import s':>8}  runs (s, in order)"
    print(head)
    print("   " + "-" * (len(head) - 3))
    for key in ("ceph/tiny", "ceph/big", "local/tiny", "local/big"):
        runs = res.create.get(key, [])
        print(
            f"   {key:14} {fmt_s(median(runs)):>8} {fmt_s(min(runs, default=math.nan)):>7} "
            f"{fmt_s(max(runs, default=math.nan)):>7} {fmt_s(res.imports.get(key, math.nan)):>8}  "
            + " ".join(f"{x:.2f}" for x in runs)
        )
    print(
        f"   ratio big/tiny on ceph (medians): {s['ceph_ratio']:.3f}x   target <= {TARGET_CREATE_RATIO}   "
        f"{mark(s['ceph_pass'])}"
    )
    print(f"   ratio big/tiny on local qcow2 (information): {s['local_ratio']:.3f}x")
    print(
        "   (running = libvirt started the domain; the images hold data, not a boot loader; import s = POST /v1/images"
        " until ready in the pool)"
    )
    print()
    n = len(res.attach_guest)
    print(f"2. volume attach (1 GiB, ceph) to a running guest, {n} runs, p50 from POST .../attach")
    print(f"   guest sees the disk (console line)   {fmt_ms(s['attach_guest_p50_s']):>6} ms   "
          f"runs: {' '.join(fmt_ms(x) for x in res.attach_guest)}")  # fmt: skip
    print(f"   libvirt's live XML names the volume  {fmt_ms(s['attach_libvirt_p50_s']):>6} ms")
    print(f"   API says in-use                      {fmt_ms(s['attach_api_p50_s']):>6} ms")
    print(f"   detach: guest loses the disk         {fmt_ms(s['detach_guest_p50_s']):>6} ms")
    print(f"   (guest boot with its root disk on {info.get('guest_root')}: {info.get('guest_boot_s', math.nan):.1f} s)")
    print()
    io = res.io
    print(
        f"3. sequential I/O, {args.io_mib} MiB, dd bs=4M direct (queue depth 1) in the guest vs qemu-img bench on the pool (MiB/s)"
    )
    print(f"   the domain's disk: {info.get('volume_disk_xml', '?')}")
    for what in ("seqwrite", "seqread"):
        req = res.guest_requests.get(what, {})
        print(
            f"   {what}: the guest's block layer sent {req.get('requests', 0):.0f} requests of {req.get('mean_kib', 0):.0f} KiB"
            f" on average ({IO_BLOCK // MIB} MiB per dd block)"
        )
    head = f"   {'':9} {'guest':>7}  {'floor (qemu-img bench)':24} {'-t writeback':>12} {'-t none':>8} {'guest/wb':>9} {'guest/none':>10}"
    print(head)
    print("   " + "-" * (len(head) - 3))
    for what in ("seqwrite", "seqread"):
        for i, shape in enumerate(("4M", "guest")):
            if f"{what} {shape}" not in res.floor_shapes:
                continue
            label = f"{res.floor_shapes[f'{what} {shape}']} ({'as dd asks' if shape == '4M' else 'as the guest sends'})"
            guest = f"{io.get(f'guest {what}', math.nan):7.1f}" if i == 0 else " " * 7
            print(
                f"   {what if i == 0 else '':9} {guest}  {label:24} {io.get(f'qemu-img {what} {shape} writeback', math.nan):12.1f}"
                f" {io.get(f'qemu-img {what} {shape} none', math.nan):8.1f} {s[f'io_ratio {what} {shape} writeback']:8.3f}x"
                f" {s[f'io_ratio {what} {shape} none']:9.3f}x"
            )
    shape = "the guest's request stream" if s["io_check_shape"] == "guest" else "4 MiB depth 1"
    print(
        f"   guest/floor ({shape}, QEMU's default cache) >= {TARGET_IO_RATIO} (overhead < 10 %): {mark(s['io_pass'])}"
    )
    if info.get("virt_type") != "kvm":
        print("   (TCG: the guest's CPU is emulated; its kernel and dd pay for it per request, the floor does not)")
    print(f"   random 4 KiB, 16 threads, {args.rand_mib} MiB, rbd bench on the pool (IOPS):")
    for io_type in ("write", "read"):
        print(
            f"   rand {io_type:6} librbd defaults {io.get(f'rbd rand {io_type} defaults', math.nan):9.0f}   "
            f"rbd_cache=false (the domain's cache='none') {io.get(f'rbd rand {io_type} rbd_cache=false', math.nan):9.0f}"
            f"   ratio {s[f'rand {io_type} ratio']:.3f}x"
        )
    print("   (random I/O inside the busybox guest is not measured: it has no random I/O tool)")
    print()
    print("4. Ceph daemons on the node (from /proc)")
    head = f"   {'daemon':28} {'idle RSS MiB':>12} {'idle CPU %':>10} {'I/O RSS peak MiB':>17} {'I/O CPU %':>9}"
    print(head)
    print("   " + "-" * (len(head) - 3))
    names = sorted(set(res.ceph_idle) | set(res.ceph_busy))
    tot = [0.0, 0.0, 0.0, 0.0]
    for n in names:
        i, u = res.ceph_idle.get(n, DaemonUse()), res.ceph_busy.get(n, DaemonUse())
        vals = [i.rss_mib, i.cpu_pct, u.rss_peak_mib, u.cpu_pct]
        tot = [a + b for a, b in zip(tot, vals, strict=True)]
        print(f"   {n:28} {vals[0]:12.0f} {vals[1]:10.1f} {vals[2]:17.0f} {vals[3]:9.1f}")
    print(f"   {'total':28} {tot[0]:12.0f} {tot[1]:10.1f} {tot[2]:17.0f} {tot[3]:9.1f}")
    print(
        f"   (idle: {args.idle_s:.0f} s with no instance, after the creates; I/O: the guest's run and the floors; % of one core)"
    )


def write_json(path: str, res: Results, s: dict[str, Any], args: argparse.Namespace) -> None:
    doc = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "summary": json_clean(s, 4)}
    doc["results"] = json_clean(asdict(res), 4)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Setup and cleanup
# --------------------------------------------------------------------------------------------------------------


def version_str(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def cleanup(workdir: Path, data: Path, node: str) -> None:
    """Destroy every domain naming ``workdir``, then the agent's Ceph daemons, then ``ceph``/``rbd`` clients of it."""
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        print(f"cleanup: cannot connect to libvirt: {exc}", file=sys.stderr)
        conn = None
    if conn is not None:
        for dom in conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                if str(workdir) not in dom.XMLDesc(0):
                    continue
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        conn.close()
    root = data / "ceph"
    conf = root / "ceph.conf"
    if conf.exists():
        import asyncio

        from agent.storage.ceph import CephEngine, CephSettings

        fsid = next(
            (ln.split("=", 1)[1].strip() for ln in conf.read_text().splitlines() if ln.strip().startswith("fsid")), ""
        )
        if fsid:
            try:
                asyncio.run(CephEngine(CephSettings(root=root, fsid=fsid, node=node, address="127.0.0.1")).destroy())
            except Exception as exc:
                print(f"cleanup: stopping Ceph: {exc}", file=sys.stderr)
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and any(str(root) in a for a in p.info["cmdline"] or []):
                p.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, workdir: Path, data: Path, node: str, children: list[Child]) -> int:
    res = Results()
    print(f"building the test guest in {workdir} ...", file=sys.stderr)
    guest = build_guest(workdir)
    config = workdir / "minicloud.toml"
    config.write_text(agent_config(workdir, node, "info" if args.keep else "warning"))
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICLOUD_")}
    env["MINICLOUD_CONFIG"] = str(config)
    print("starting the agent ...", file=sys.stderr)
    argv = [sys.executable, "-m", "minicloud", "--socket", str(data / "s.sock"), "agent", "--data-dir", str(data),
            "--listen", "127.0.0.1:0"]  # fmt: skip
    agent = spawn_agent(argv, env, workdir)
    children.append(agent)
    state = wait_ready(agent, data / "agent.json")
    client = Client.local(state["socket"], timeout=900.0)  # a 2 GiB image import is answered once copied
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(LIBVIRT_URI)
    b = Bench(args, workdir, data, agent, client, conn, res)
    try:
        nodeinfo = client.node()
        res.info.update(
            virt_type=nodeinfo.virtualization.virt_type,
            virt_reason=nodeinfo.virtualization.reason,
            libvirt=version_str(conn.getLibVersion()),
            qemu=version_str(conn.getVersion()),
            ceph=run_cmd(["ceph", "--version"]).split("(")[0].replace("ceph version", "").strip(),
        )
        res.info["loadavg_start"] = os.getloadavg()[0]
        print("storage enable: the agent bootstraps its Ceph ...", file=sys.stderr)
        enable_storage(b)
        print("importing the images into both pools ...", file=sys.stderr)
        sizes = import_images(b)
        disk_gib = max(1, math.ceil(sizes["big_virtual"] / GIB))
        print("create -> running ...", file=sys.stderr)
        create_runs(b, disk_gib)
        # Idle: no instance, nothing imported, the cluster (and the S3 gateway the agent starts with it) settled.
        sampler = CephSampler(b.ceph_root / "ceph.conf")
        sampler.start()
        time.sleep(args.idle_s)
        res.ceph_idle = sampler.stop()
        print("guest: attach -> visible, then I/O ...", file=sys.stderr)
        guest_phase(b, guest)
        res.info["loadavg_end"] = os.getloadavg()[0]
        s = summarize(res)
        print_report(res, s, args)
        if args.json:
            write_json(args.json, res, s, args)
            print(f"\nwrote {args.json}")
        return 0
    except BenchFailure as exc:
        res.errors.append(str(exc))
        print(f"\nerrors:\n  {exc}\n{agent.stderr_tail(20)}")
        return 1
    finally:
        client.close()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = "--quick" in argv
    p.add_argument("--quick", action="store_true", help="small sizes and counts: does the bench still measure?")
    p.add_argument("--runs", type=int, default=1 if quick else 5, help="creates per pool and image (default 5)")
    p.add_argument("--warmup", type=int, default=0 if quick else 1, help="unmeasured create rounds first (default 1)")
    p.add_argument("--attach-runs", type=int, default=2 if quick else 7, help="attach/detach cycles (default 7)")
    p.add_argument("--big-mib", type=int, default=512 if quick else 2048, help="the big image's size (default 2048)")
    p.add_argument(
        "--big-data-mib", type=int, default=64 if quick else 384, help="random data written in it (default 384)"
    )
    p.add_argument("--io-mib", type=int, default=64 if quick else 512, help="sequential I/O amount (default 512)")
    p.add_argument("--rand-mib", type=int, default=8 if quick else 64, help="random I/O amount per row (default 64)")
    p.add_argument("--osd-gib", type=int, default=8, help="the file OSD's size, sparse (default 8)")
    p.add_argument("--idle-s", type=float, default=3.0 if quick else 10.0, help="idle sampling window (default 10)")
    p.add_argument("--io-timeout", type=float, default=600.0, help="seconds for the guest's I/O run (default 600)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory afterwards (the agent logs at level info to agent.stderr)",
    )
    args = p.parse_args(argv)
    if min(args.runs, args.attach_runs, args.big_mib, args.io_mib, args.rand_mib) < 1 or args.warmup < 0:
        p.error("counts and sizes must be >= 1, --warmup >= 0")
    if args.io_mib % 4:
        p.error("--io-mib must be a multiple of 4 (4 MiB blocks)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run it as root: the agent runs Ceph daemons and libvirt domains", file=sys.stderr)
        return 2
    missing = [t for t in ("ceph-mon", "ceph-osd", "ceph-mgr", "rbd", "qemu-img") if shutil.which(t) is None]
    if missing:
        print(f"missing {', '.join(missing)} (Debian packages ceph-mon ceph-osd ceph-mgr ceph-common)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="minicloud-storage-bench-", dir="/var/tmp"))
    data = workdir / "agent"
    node = f"sbench-{secrets.token_hex(3)}"
    children: list[Child] = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args, workdir, data, node, children)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("cleaning up ...", file=sys.stderr)
        if children and children[0].proc.poll() is not None and children[0].proc.returncode not in (0, -15):
            print(f"agent stderr (tail):\n{children[0].stderr_tail()}", file=sys.stderr)
        stop_children(children)
        cleanup(workdir, data, node)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
