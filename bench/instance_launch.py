"""Instance launch bench: ``POST /v1/instances`` to the guest's boot marker, against raw ``virConnect.createXML``.

Usage::

    .venv/bin/python bench/instance_launch.py [--runs 5] [--burst 10] [--json FILE] [--keep]
    .venv/bin/python bench/instance_launch.py --quick   # one agent launch and one floor launch, no burst

Needs root and a running libvirtd (``scripts/start-libvirtd``). It builds the test guest
(``scripts/build-guest-image``: a Debian kernel and a busybox initramfs that prints ``minicloud-guest: ready`` on its
serial console once it has read its NoCloud seed and taken a DHCP lease) into a temporary directory, and starts the
real agent there as a subprocess (libvirt driver, ``virt_type = "auto"``: KVM where the hardware has it, TCG
otherwise; its own bridge and subnet, picked at random), then imports the guest as an image.

Single launches, ``--runs`` of each, alternating so that drift on the machine affects both sides alike, after
``--warmup`` unmeasured pairs:

* ``agent``: ``POST /v1/instances`` (type ``m1.tiny``) through the SDK over the Unix socket, timed from just before
  the request until the marker appears in ``<data_dir>/instances/<id>/console.log``;
* ``floor``: the domain XML libvirt holds for an instance the agent launched (``VIR_DOMAIN_XML_INACTIVE``), with a new
  name, UUID and MAC address, its files (a fresh root disk made the way the agent makes it, a copy of the NoCloud
  seed, its own console log) in a directory of the bench's, and the minicloud metadata removed (so the agent never
  takes it for its own), started as a transient domain by ``virConnect.createXML`` on the bench's own connection and
  timed from that call until the marker appears in its console log. Its files are made before the clock starts: the
  floor is what libvirt and the guest cost; everything the agent does on top is the agent's overhead.

Both console logs are tailed directly (every 20 ms), so no API polling runs during the measurement. The instance is
deleted through the API (and its record is gone) and the floor domain destroyed before the next run. The ratio of the
medians, agent/floor, is checked against the issue's target (<= 1.15). The agent publishes the node's capacity from
its compute loop, after it started serving; the first (warm-up) create is sent again while it is refused for that.

Where the time goes is read from outside the agent, with no instrumentation: libvirt lifecycle events on the bench's
connection (domain defined, started), the birth and modification times of the files the agent and libvirt write
(instance directory, root disk from ``qemu-img``, seed ISO, console log), the first console output and the guest's
own console lines (init started, DHCP lease, ready).

Then the burst: ``--burst`` instances created at once (one thread and SDK client each, released together), timed
until every marker has appeared; the agent's RSS is sampled every 50 ms throughout (peak reported), as is the total
RSS of the instances' QEMU processes (children of libvirtd, reported separately). The agent's config raises
``cpu_allocation_ratio`` so that the burst fits on this node. A create answered 409 ``conflict`` (the placement lost
its compare-and-swap to the other creates too often; the API asks to retry) is sent again, and counted.

The exit status is 0 unless the bench itself fails. Ctrl-C or SIGTERM (and any error) destroy the domains, stop the
agent, remove its bridge, dnsmasq and nftables table, and the temporary directory (``--keep`` keeps the directory:
the agent's stderr is in ``agent.stderr``).
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import psutil

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from api_bench import Child, json_clean, mark, spawn, stop_children, wait_ready  # noqa: E402

from minicloud.client import ApiError, Client  # noqa: E402

TARGET_RATIO = 1.15
MARKER = b"minicloud-guest: ready"
# Lines the test guest prints on its console (scripts/build-guest-image), in order; "marker" ends the launch.
GUEST_MARKS: list[tuple[str, bytes]] = [
    ("guest_init", b"minicloud-guest: init started"),
    ("guest_ip", b"minicloud-guest: ip="),
    ("marker", MARKER),
]
INSTANCE_TYPE = "m1.tiny"
IMAGE_NAME = "bench-guest"
TAIL_INTERVAL_S = 0.02
RSS_INTERVAL_S = 0.05
DELETE_TIMEOUT_S = 120.0
COMPUTE_READY_TIMEOUT_S = 60.0  # for the agent's compute loop to publish the node's capacity after it started
MAX_CREATE_ATTEMPTS = 5  # per burst instance, when the API answers 409 conflict (placement race) and asks to retry
LIBVIRT_URI = "qemu:///system"

# Timeline events of one launch, in the order they normally happen; seconds since the request (agent) or the
# createXML call (floor). Labels are printed as they are here.
AGENT_EVENTS: list[tuple[str, str]] = [
    ("response", "POST answered (201)"),
    ("build_start", "instance dir created (build began)"),
    ("disk_start", "root disk file created (qemu-img)"),
    ("disk_done", "root disk written (qemu-img done)"),
    ("seed_start", "seed ISO file created"),
    ("seed_done", "seed ISO written"),
    ("defined", "domain defined (libvirt event)"),
    ("console_open", "console log created (by libvirt)"),
    ("started", "domain started (libvirt event)"),
    ("first_output", "first console output"),
    ("guest_init", "guest: init started"),
    ("guest_ip", "guest: DHCP lease (ip=)"),
    ("marker", "boot marker (ready)"),
]
FLOOR_EVENTS: list[tuple[str, str]] = [
    ("console_open", "console log created (by libvirt)"),
    ("response", "createXML returned"),
    ("started", "domain started (libvirt event)"),
    ("first_output", "first console output"),
    ("guest_init", "guest: init started"),
    ("guest_ip", "guest: DHCP lease (ip=)"),
    ("marker", "boot marker (ready)"),
]


# --------------------------------------------------------------------------------------------------------------
# libvirt: events on the bench's own connection
# --------------------------------------------------------------------------------------------------------------


class Events:
    """Lifecycle events by domain name: the first time each event type was seen (``time.perf_counter``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int], float] = {}

    def callback(self, _conn: Any, dom: libvirt.virDomain, event: int, _detail: int, _opaque: Any) -> None:
        now = time.perf_counter()
        with contextlib.suppress(libvirt.libvirtError):
            key = (dom.name(), event)
            with self._lock:
                self._seen.setdefault(key, now)

    def when(self, name: str, event: int) -> float | None:
        with self._lock:
            return self._seen.get((name, event))


def open_libvirt(events: Events) -> libvirt.virConnect:
    """Open the bench's connection with lifecycle events delivered to ``events`` (libvirt's default event loop runs
    in a daemon thread; it must be registered before the connection is opened)."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    conn = libvirt.open(LIBVIRT_URI)
    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, events.callback, None)
    return conn


def version_str(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


# --------------------------------------------------------------------------------------------------------------
# Console tailing and file times
# --------------------------------------------------------------------------------------------------------------


class ConsoleTail:
    """Follows one console log file from its start; notes when it appeared, its first byte, and each line of
    ``GUEST_MARKS`` (the last of which is the boot marker)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None
        self._buf = b""
        self.t_open: float | None = None
        self.t_first: float | None = None
        self.marks: dict[str, float] = {}

    @property
    def t_marker(self) -> float | None:
        return self.marks.get("marker")

    def poll(self, now: float) -> bool:
        if "marker" in self.marks:
            return True
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")  # noqa: SIM115 (kept open across polls)
            except FileNotFoundError:
                return False
            self.t_open = now
        chunk = self._fh.read()
        if chunk:
            if self.t_first is None:
                self.t_first = now
            start = max(0, len(self._buf) - 64)  # a mark may straddle two reads
            self._buf += chunk
            for key, text in GUEST_MARKS:
                if key not in self.marks and text in self._buf[start:]:
                    self.marks[key] = now
            if "marker" in self.marks:
                self.close()
                return True
        return False

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def file_times(paths: list[Path]) -> dict[Path, tuple[float | None, float | None]]:
    """(birth, modification) wall-clock times of each path that exists; birth is None where the filesystem does not
    record it. One ``stat`` call (Python's ``os.stat`` has no birth time on Linux)."""
    existing = [p for p in paths if p.exists()]
    if not existing:
        return {}
    out = subprocess.run(
        ["stat", "-c", "%.9W %.9Y", "--", *map(str, existing)], capture_output=True, text=True, check=False
    )
    times: dict[Path, tuple[float | None, float | None]] = {}
    for p, line in zip(existing, out.stdout.splitlines(), strict=False):
        try:
            birth_s, mod_s = line.split()
            birth, mod = float(birth_s), float(mod_s)
        except ValueError:
            continue
        times[p] = (birth if birth > 0 else None, mod)
    return times


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    side: str  # "agent" or "floor"
    index: int
    warmup: bool
    seconds: float  # start -> marker
    #: Seconds since the start of each timeline event that could be observed (see AGENT_EVENTS / FLOOR_EVENTS).
    events: dict[str, float] = field(default_factory=dict)
    agent_cpu_s: float = math.nan  # the agent's CPU time (user + system) from the start to the marker


@dataclass
class Bench:
    """What the runs share."""

    args: argparse.Namespace
    workdir: Path
    data: Path
    agent: Child
    agent_proc: psutil.Process
    client: Client
    conn: libvirt.virConnect
    events: Events
    template_xml: str = ""
    template_dir: Path = Path()
    disk_info: dict[str, Any] = field(default_factory=dict)


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def wait_markers(b: Bench, tails: list[ConsoleTail], what: str, on_slow: Any = None) -> None:
    """Poll ``tails`` every 20 ms until each has its marker. ``on_slow()`` runs every 10 s while waiting (it may
    raise, e.g. when the instance went to ``error``); the agent dying ends the wait at once."""
    start = time.monotonic()
    next_check = start + 10.0
    while True:
        now = time.perf_counter()
        if all([t.poll(now) for t in tails]):
            return
        if b.agent.proc.poll() is not None:
            raise RuntimeError(f"the agent exited ({b.agent.proc.returncode}) during {what}:\n{b.agent.stderr_tail()}")
        mono = time.monotonic()
        if mono - start > b.args.boot_timeout:
            missing = [str(t.path) for t in tails if t.t_marker is None]
            raise RuntimeError(f"{what}: no boot marker after {b.args.boot_timeout:.0f} s in {', '.join(missing)}")
        if on_slow is not None and mono >= next_check:
            on_slow()
            next_check = mono + 10.0
        time.sleep(TAIL_INTERVAL_S)


def check_instances(b: Bench, ids_: list[str]) -> None:
    for iid in ids_:
        inst = b.client.instances.get(iid)
        if inst.status.state == "error":
            raise RuntimeError(f"instance {inst.name} ({iid}) went to error: {inst.status.reason}")


def delete_instances(b: Bench, ids_: list[str]) -> float:
    """Delete through the API and wait until the records are gone (the reconciler removes a record only after it
    destroyed the domain and removed its files). Returns the seconds it took."""
    t0 = time.perf_counter()
    for iid in ids_:
        with contextlib.suppress(ApiError):
            b.client.instances.delete(iid)
    deadline = time.monotonic() + DELETE_TIMEOUT_S
    pending = list(ids_)
    while pending:
        still = []
        for iid in pending:
            try:
                b.client.instances.get(iid)
                still.append(iid)
            except ApiError as exc:
                if exc.problem.status != 404:
                    raise
        pending = still
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"instances {pending} were not deleted within {DELETE_TIMEOUT_S:.0f} s")
        if pending:
            time.sleep(0.1)
    return time.perf_counter() - t0


def agent_run(b: Bench, index: int, warmup: bool, first: bool = False) -> tuple[Run, str]:
    """One launch through the API; returns the run and the instance id (the instance is left running)."""
    name = f"launch-{'w' if warmup else ''}{index}"
    # The agent connects to libvirt, builds its network and publishes the node's capacity in its compute loop, after
    # it started serving: until then a create is refused (409 insufficient-capacity). Only the very first create
    # (``first``: a warm-up, or the measured run of --quick) may meet that; it is sent again, and the clock starts at
    # the attempt that is accepted.
    deadline = time.monotonic() + (COMPUTE_READY_TIMEOUT_S if first else 0)
    while True:
        cpu0 = cpu_s(b.agent_proc)
        t0_wall = time.time()
        t0 = time.perf_counter()
        try:
            inst = b.client.instances.create(name=name, image=IMAGE_NAME, type=INSTANCE_TYPE)
            break
        except ApiError as exc:
            if not exc.problem.type.endswith("/insufficient-capacity") or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    t_resp = time.perf_counter()
    d = b.data / "instances" / inst.id
    tail = ConsoleTail(d / "console.log")
    try:
        wait_markers(b, [tail], f"agent launch {name}", lambda: check_instances(b, [inst.id]))
    finally:
        tail.close()
    cpu1 = cpu_s(b.agent_proc)
    assert tail.t_marker is not None
    events: dict[str, float] = {"response": t_resp - t0}
    dom_name = f"mc-{inst.id}"
    for key, ev in (("defined", libvirt.VIR_DOMAIN_EVENT_DEFINED), ("started", libvirt.VIR_DOMAIN_EVENT_STARTED)):
        t = b.events.when(dom_name, ev)
        if t is not None:
            events[key] = t - t0
    ft = file_times([d, d / "root.qcow2", d / "seed.iso", d / "console.log"])
    for key, path, which in (
        ("build_start", d, 0),
        ("disk_start", d / "root.qcow2", 0),
        ("disk_done", d / "root.qcow2", 1),
        ("seed_start", d / "seed.iso", 0),
        ("seed_done", d / "seed.iso", 1),
        ("console_open", d / "console.log", 0),
    ):
        t = ft.get(path, (None, None))[which]
        if t is not None:
            events[key] = t - t0_wall
    if "console_open" not in events and tail.t_open is not None:
        events["console_open"] = tail.t_open - t0  # no birth times on this filesystem: when the poll saw it
    if tail.t_first is not None:
        events["first_output"] = tail.t_first - t0
    events.update({key: t - t0 for key, t in tail.marks.items()})
    run = Run("agent", index, warmup, tail.t_marker - t0, events, cpu1 - cpu0)
    return run, inst.id


def capture_template(b: Bench, instance_id: str) -> None:
    """Keep what the floor needs from a running instance of the agent's: its persistent XML, how its root disk was
    made, and a copy of its seed."""
    d = b.data / "instances" / instance_id
    b.template_xml = b.conn.lookupByName(f"mc-{instance_id}").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    b.template_dir = d
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(d / "root.qcow2")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    b.disk_info = {
        "virtual_size": int(info["virtual-size"]),
        "format": info.get("format", "qcow2"),
        "backing": info.get("full-backing-filename") or info.get("backing-filename"),
        "backing_format": info.get("backing-filename-format"),
    }
    keep = b.workdir / "floor-template"
    keep.mkdir(exist_ok=True)
    shutil.copyfile(d / "seed.iso", keep / "seed.iso")


def floor_xml(b: Bench, name: str, floor_dir: Path) -> str:
    """The template XML with a new identity and this run's files, without minicloud's metadata."""
    text = b.template_xml.replace(str(b.template_dir), str(floor_dir))
    root = ET.fromstring(text)
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
    meta = root.find("metadata")
    if meta is not None:
        root.remove(meta)
    for mac in root.iterfind("devices/interface/mac"):
        mac.set("address", ":".join(f"{x:02x}" for x in (0x52, *secrets.token_bytes(5))))
    out = ET.tostring(root, encoding="unicode")
    if str(b.data / "instances") in out:
        raise RuntimeError("the floor's XML still names a path in the agent's instances directory")
    return out


def prepare_floor(b: Bench, floor_dir: Path) -> None:
    """The files the agent would have made, made the same way (qemu-img create; the seed is copied)."""
    floor_dir.mkdir(parents=True)
    info = b.disk_info
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if info["backing"]:
        cmd += ["-F", info["backing_format"] or "qcow2", "-b", info["backing"]]
    subprocess.run([*cmd, str(floor_dir / "root.qcow2"), str(info["virtual_size"])], check=True, capture_output=True)
    shutil.copyfile(b.workdir / "floor-template" / "seed.iso", floor_dir / "seed.iso")


def floor_run(b: Bench, index: int, warmup: bool) -> Run:
    name = f"mcbench-floor-{secrets.token_hex(3)}-{index}"
    floor_dir = b.workdir / "floor" / name
    prepare_floor(b, floor_dir)
    xml = floor_xml(b, name, floor_dir)
    tail = ConsoleTail(floor_dir / "console.log")
    dom: libvirt.virDomain | None = None
    cpu0 = cpu_s(b.agent_proc)
    t0_wall = time.time()
    t0 = time.perf_counter()
    try:
        dom = b.conn.createXML(xml, 0)
        t_resp = time.perf_counter()

        def alive() -> None:
            if dom is not None and not dom.isActive():
                raise RuntimeError(f"floor domain {name} stopped before its boot marker")

        wait_markers(b, [tail], f"floor launch {name}", alive)
        cpu1 = cpu_s(b.agent_proc)
    finally:
        tail.close()
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
    assert tail.t_marker is not None
    events: dict[str, float] = {"response": t_resp - t0}
    t = b.events.when(name, libvirt.VIR_DOMAIN_EVENT_STARTED)
    if t is not None:
        events["started"] = t - t0
    birth = file_times([floor_dir / "console.log"]).get(floor_dir / "console.log", (None, None))[0]
    if birth is not None:
        events["console_open"] = birth - t0_wall
    elif tail.t_open is not None:
        events["console_open"] = tail.t_open - t0
    if tail.t_first is not None:
        events["first_output"] = tail.t_first - t0
    events.update({key: t - t0 for key, t in tail.marks.items()})
    shutil.rmtree(floor_dir, ignore_errors=True)
    return Run("floor", index, warmup, tail.t_marker - t0, events, cpu1 - cpu0)


# --------------------------------------------------------------------------------------------------------------
# The burst
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Burst:
    instances: int
    answered_s: float  # until every POST had its 201
    first_started_s: float  # libvirt's "started" event of the first domain
    last_started_s: float  # ... and of the last one
    first_marker_s: float
    median_marker_s: float
    total_s: float  # until the last marker
    agent_rss_before_mib: float
    agent_rss_peak_mib: float
    agent_rss_after_mib: float
    agent_cpu_s: float
    qemu_rss_peak_mib: float
    qemu_processes: int
    delete_s: float
    markers_s: list[float] = field(default_factory=list)
    #: Creates the API refused with 409 conflict (placement kept racing) and the bench sent again.
    create_retries: list[str] = field(default_factory=list)


class RssSampler(threading.Thread):
    """Every 50 ms: the agent's RSS, and the summed RSS of the QEMU processes running guests from ``instances``
    (looked up every 5th sample)."""

    def __init__(self, agent: psutil.Process, instances: Path) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.agent = agent
        self.needle = str(instances)
        self.stop = threading.Event()
        self.agent_peak = 0
        self.qemu_peak = 0
        self.qemu_seen: dict[int, psutil.Process] = {}

    def _scan(self) -> None:
        for p in psutil.process_iter(["name", "cmdline"]):
            if p.pid in self.qemu_seen or not (p.info["name"] or "").startswith("qemu-system"):
                continue
            if any(self.needle in a for a in p.info["cmdline"] or ()):
                self.qemu_seen[p.pid] = p

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.agent_peak = max(self.agent_peak, self.agent.memory_info().rss)
            if n % 5 == 0:
                with contextlib.suppress(psutil.Error):
                    self._scan()
            total = 0
            for p in list(self.qemu_seen.values()):
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.qemu_peak = max(self.qemu_peak, total)
            n += 1
            self.stop.wait(RSS_INTERVAL_S)


def burst(b: Bench, count: int) -> Burst:
    sock = str(b.client.socket_path)
    barrier = threading.Barrier(count + 1)
    created: dict[int, tuple[str, float]] = {}
    failures: list[str] = []
    retries: list[str] = []
    retries_lock = threading.Lock()

    def create(i: int) -> None:
        c = Client.local(sock)
        try:
            c.node()  # connect before the start line
            barrier.wait()
            for attempt in range(1, MAX_CREATE_ATTEMPTS + 1):
                try:
                    inst = c.instances.create(name=f"burst-{i}", image=IMAGE_NAME, type=INSTANCE_TYPE)
                    break
                except ApiError as exc:
                    # 409 "conflict" (not "already-exists"): the placement lost its compare-and-swap too many times
                    # against the other creates; the API says to retry, as a client would.
                    if (
                        exc.status != 409
                        or not exc.problem.type.endswith("/conflict")
                        or attempt == MAX_CREATE_ATTEMPTS
                    ):
                        raise
                    with retries_lock:
                        retries.append(f"burst-{i}: {exc.problem.detail}")
            created[i] = (inst.id, time.perf_counter())
        except Exception as exc:
            failures.append(f"burst-{i}: {type(exc).__name__}: {exc}")
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()
        finally:
            c.close()

    rss_before = b.agent_proc.memory_info().rss
    sampler = RssSampler(b.agent_proc, b.data / "instances")
    threads = [threading.Thread(target=create, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    sampler.start()
    ids_: list[str] = []
    try:
        cpu0 = cpu_s(b.agent_proc)
        with contextlib.suppress(threading.BrokenBarrierError):  # a thread failed: reported below
            barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        if failures:
            raise RuntimeError("burst creates failed:\n  " + "\n  ".join(failures))
        answered = max(t for _, t in created.values()) - t0
        ids_ = [created[i][0] for i in range(count)]
        tails = [ConsoleTail(b.data / "instances" / iid / "console.log") for iid in ids_]
        try:
            wait_markers(b, tails, f"the burst of {count}", lambda: check_instances(b, ids_))
        finally:
            for tail in tails:
                tail.close()
        cpu1 = cpu_s(b.agent_proc)
    finally:
        sampler.stop.set()
        sampler.join()
    markers = sorted(t.t_marker - t0 for t in tails if t.t_marker is not None)
    started = sorted(
        t - t0 for iid in ids_ if (t := b.events.when(f"mc-{iid}", libvirt.VIR_DOMAIN_EVENT_STARTED)) is not None
    )
    print(f"  all {count} booted in {markers[-1]:.2f} s; deleting them ...", file=sys.stderr)
    delete_s = delete_instances(b, ids_)
    mib = 1 << 20
    return Burst(
        instances=count,
        answered_s=answered,
        first_started_s=started[0] if started else math.nan,
        last_started_s=started[-1] if len(started) == count else math.nan,
        first_marker_s=markers[0],
        median_marker_s=statistics.median(markers),
        total_s=markers[-1],
        agent_rss_before_mib=rss_before / mib,
        agent_rss_peak_mib=sampler.agent_peak / mib,
        agent_rss_after_mib=b.agent_proc.memory_info().rss / mib,
        agent_cpu_s=cpu1 - cpu0,
        qemu_rss_peak_mib=sampler.qemu_peak / mib,
        qemu_processes=len(sampler.qemu_seen),
        delete_s=delete_s,
        markers_s=markers,
        create_retries=retries,
    )


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize(runs: list[Run]) -> dict[str, Any]:
    measured = {side: [r for r in runs if r.side == side and not r.warmup] for side in ("agent", "floor")}
    out: dict[str, Any] = {}
    for side, rs in measured.items():
        secs = [r.seconds for r in rs]
        out[side] = {
            "median_s": med(secs),
            "min_s": min(secs) if secs else math.nan,
            "max_s": max(secs) if secs else math.nan,
            "runs_s": secs,
            "agent_cpu_median_s": med([r.agent_cpu_s for r in rs]),
            "events_median_s": {
                key: med([r.events[key] for r in rs if key in r.events])
                for key, _ in (AGENT_EVENTS if side == "agent" else FLOOR_EVENTS)
            },
            # The two halves of a launch: up to "domain started", then the guest's boot to its marker.
            "to_started_median_s": med([r.events["started"] for r in rs if "started" in r.events]),
            "boot_median_s": med([r.seconds - r.events["started"] for r in rs if "started" in r.events]),
        }
    floor = out["floor"]["median_s"]
    out["ratio"] = out["agent"]["median_s"] / floor if floor and not math.isnan(floor) else math.nan
    out["pass"] = bool(out["ratio"] <= TARGET_RATIO)
    return out


def ms(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * 1000:.0f}"


def print_report(
    runs: list[Run], summary: dict[str, Any], burst_result: Burst | None, info: dict[str, Any], args: argparse.Namespace
) -> None:
    print()
    print(
        f"minicloud instance launch bench: {INSTANCE_TYPE} ({info['vcpus']} vCPU, {info['memory_mib']} MiB), the "
        f"kernel + initramfs test guest; {args.runs} runs per side after {args.warmup} warm-up pair(s), alternating"
    )
    print(
        f"virt_type {info['virt_type']} ({info['virt_reason']}); {os.cpu_count()} CPUs; libvirt {info['libvirt']}, "
        f"QEMU {info['qemu']}; Python {platform.python_version()}"
    )
    print()
    head = f"{'launch to boot marker':34} {'median s':>8} {'min s':>7} {'max s':>7}  runs (s, in order)"
    print(head)
    print("-" * len(head))
    for side, label in (("agent", "agent  POST /v1/instances"), ("floor", "floor  virConnect.createXML")):
        s = summary[side]
        runs_s = " ".join(f"{x:.2f}" for x in s["runs_s"])
        print(f"{label:34} {s['median_s']:8.2f} {s['min_s']:7.2f} {s['max_s']:7.2f}  {runs_s}")
    print()
    ratio = summary["ratio"]
    print(f"ratio agent/floor (medians): {ratio:.3f}x   target <= {TARGET_RATIO}   {mark(summary['pass'])}")
    diff = summary["agent"]["median_s"] - summary["floor"]["median_s"]
    print(f"difference of the medians: {diff * 1000:+.0f} ms")
    print()
    print("where the time goes: median ms from the request (agent) or the createXML call (floor) to each event")
    head = f"  {'event':38} {'agent':>7} {'floor':>7}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    a_ev, f_ev = summary["agent"]["events_median_s"], summary["floor"]["events_median_s"]
    labels = dict(AGENT_EVENTS)
    for key, label in FLOOR_EVENTS:
        labels.setdefault(key, label)
    order = [k for k, _ in AGENT_EVENTS] + [k for k, _ in FLOOR_EVENTS if k not in dict(AGENT_EVENTS)]
    for key in order:
        label = "POST answered / createXML returned" if key == "response" else labels[key]
        print(f"  {label:38} {ms(a_ev.get(key)):>7} {ms(f_ev.get(key)):>7}")
    a, f = summary["agent"], summary["floor"]
    print(
        f"  {'-> to domain started':38} {ms(a['to_started_median_s']):>7} {ms(f['to_started_median_s']):>7}"
        "   (the launch path)"
    )
    print(
        f"  {'-> domain started to boot marker':38} {ms(a['boot_median_s']):>7} {ms(f['boot_median_s']):>7}"
        "   (the guest's boot)"
    )
    print(
        f"  {'agent CPU time during a launch':38} {ms(a['agent_cpu_median_s']):>7} {ms(f['agent_cpu_median_s']):>7}"
        "   (ms of CPU, request to marker)"
    )
    print(
        "  (file times are birth/modification times of the agent's files, so they are exact; console output and the "
        "marker are seen by a 20 ms poll)"
    )
    if burst_result is not None:
        br = burst_result
        n = br.instances

        def row(label: str, value: str) -> None:
            print(f"  {label:34} {value}")

        print()
        print(
            f"burst: {n} instances created at once ({n} threads, one SDK client each), from the release of the threads"
        )
        row("every POST answered", f"{br.answered_s:8.2f} s")
        retried = f"   (e.g. {br.create_retries[0]})" if br.create_retries else ""
        row("creates answered 409, sent again", f"{len(br.create_retries):8d}{retried}")
        row("first domain started", f"{br.first_started_s:8.2f} s")
        row(f"all {n} domains started", f"{br.last_started_s:8.2f} s")
        row("first boot marker", f"{br.first_marker_s:8.2f} s")
        row("median boot marker", f"{br.median_marker_s:8.2f} s")
        row(f"all {n} boot markers (total)", f"{br.total_s:8.2f} s")
        row(
            "agent RSS, peak",
            f"{br.agent_rss_peak_mib:8.1f} MiB (before {br.agent_rss_before_mib:.1f}, after {br.agent_rss_after_mib:.1f};"
            " sampled every 50 ms)",
        )
        row("agent CPU time during the burst", f"{br.agent_cpu_s:8.2f} s")
        row(
            "QEMU processes' RSS, peak total",
            f"{br.qemu_rss_peak_mib:8.1f} MiB over {br.qemu_processes} processes (libvirtd's children, not the agent's)",
        )
        row(f"deleting all {n} (API, until gone)", f"{br.delete_s:8.2f} s")


def write_json(
    path: str,
    runs: list[Run],
    summary: dict[str, Any],
    burst_result: Burst | None,
    info: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    def clean(v: Any) -> Any:
        return json_clean(v, 4)

    doc = {
        "config": {
            "runs": args.runs,
            "warmup": args.warmup,
            "burst": args.burst,
            "instance_type": INSTANCE_TYPE,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            **info,
        },
        "target_ratio": TARGET_RATIO,
        "summary": clean(summary),
        "runs": [clean(asdict(r)) for r in runs],
        "burst": clean(asdict(burst_result)) if burst_result is not None else None,
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Setup and cleanup
# --------------------------------------------------------------------------------------------------------------


def agent_config(workdir: Path, bridge: str, cidr: str, burst_size: int) -> str:
    cpus = os.cpu_count() or 1
    # The scheduler hands out cpus * cpu_allocation_ratio vCPUs (default 4.0); the burst must fit.
    ratio = min(64.0, max(4.0, float(math.ceil((burst_size + 1) / cpus))))
    return (
        f'[agent]\nnode_name = "bench-{secrets.token_hex(3)}"\nlog_level = "warning"\n'
        f'[compute]\ndriver = "libvirt"\nvirt_type = "auto"\nimage_dirs = ["{workdir}"]\nstop_timeout = 5.0\n'
        f"cpu_allocation_ratio = {ratio}\n"
        f'[network]\nbridge = "{bridge}"\ncidr = "{cidr}"\n'
    )


def build_guest(workdir: Path) -> Path:
    out = workdir / "guest"
    proc = subprocess.run(
        [str(REPO / "scripts" / "build-guest-image"), str(out)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        hint = " (no guest kernel package could be downloaded or found in the cache)" if proc.returncode == 3 else ""
        raise RuntimeError(f"scripts/build-guest-image failed ({proc.returncode}){hint}:\n{proc.stderr[-3000:]}")
    return out


def cleanup_host(workdir: Path, data: Path, bridge: str, cidr: str) -> None:
    """Destroy (in parallel: ~1.5 s each) and undefine every domain whose XML names a path in ``workdir``, then
    remove the agent's network. Each step runs even when an earlier one fails."""
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        print(f"cleanup: cannot connect to libvirt: {exc}", file=sys.stderr)
        conn = None
    if conn is not None:
        try:
            doms = []
            for dom in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if str(workdir) in dom.XMLDesc(0):
                        doms.append(dom)

            def remove(dom: libvirt.virDomain) -> None:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isPersistent():
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

            threads = [threading.Thread(target=remove, args=(d,)) for d in doms]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if doms:
                print(f"cleanup: removed {len(doms)} leftover domain(s)", file=sys.stderr)
        finally:
            conn.close()
    import asyncio

    from agent.net.default import BridgeNetwork, NetworkSpec

    try:
        spec = NetworkSpec(name="default", bridge=bridge, cidr=cidr)  # type: ignore[arg-type]
        asyncio.run(BridgeNetwork(spec, data / "networks" / "default").teardown())
    except Exception as exc:
        print(f"cleanup: removing bridge {bridge}: {exc}", file=sys.stderr)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, workdir: Path, data: Path, bridge: str, cidr: str, children: list[Child]) -> int:
    print(f"building the test guest in {workdir} ...", file=sys.stderr)
    guest = build_guest(workdir)
    config = workdir / "minicloud.toml"
    config.write_text(agent_config(workdir, bridge, cidr, args.burst))
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICLOUD_")}
    env["MINICLOUD_CONFIG"] = str(config)
    print(f"starting the agent (bridge {bridge}, {cidr}) ...", file=sys.stderr)
    agent_child = spawn(
        "agent",
        [
            sys.executable,
            "-m",
            "minicloud",
            "--socket",
            str(data / "s.sock"),
            "agent",
            "--data-dir",
            str(data),
            "--listen",
            "127.0.0.1:0",
        ],
        env,
        workdir,
    )
    children.append(agent_child)
    state = wait_ready(agent_child, data / "agent.json")
    events = Events()
    conn = open_libvirt(events)
    client = Client.local(state["socket"])
    b = Bench(args, workdir, data, agent_child, psutil.Process(int(state["pid"])), client, conn, events)
    try:
        node = client.node()
        client.images.create(name=IMAGE_NAME, kernel=str(guest / "vmlinuz"), initrd=str(guest / "initrd.img"))
        itype = client.types.get(INSTANCE_TYPE)
        info: dict[str, Any] = {
            "virt_type": node.virtualization.virt_type,
            "virt_reason": node.virtualization.reason,
            "vcpus": itype.vcpus,
            "memory_mib": itype.memory_mib,
            "libvirt": version_str(conn.getLibVersion()),
            "qemu": version_str(conn.getVersion()),
        }
        runs: list[Run] = []

        def note(r: Run) -> None:
            runs.append(r)
            tag = "warm-up" if r.warmup else f"{r.index}/{args.runs}"
            print(f"  {r.side} {tag}: {r.seconds:.2f} s", file=sys.stderr)

        def settle() -> None:
            time.sleep(args.settle)

        print(f"launching: {args.warmup} warm-up pair(s), then {args.runs} of each, alternating ...", file=sys.stderr)
        for i in range(args.warmup + args.runs):
            warm = i < args.warmup
            index = i + 1 if warm else i - args.warmup + 1
            r, iid = agent_run(b, index, warm, first=i == 0)
            note(r)
            if not b.template_xml:
                capture_template(b, iid)
                inst = client.instances.get(iid)
                info["instance_virt_type"] = inst.status.virt_type
            delete_instances(b, [iid])
            settle()
            note(floor_run(b, index, warm))
            settle()

        burst_result = None
        if args.burst:
            print(f"burst: creating {args.burst} instances at once ...", file=sys.stderr)
            burst_result = burst(b, args.burst)

        summary = summarize(runs)
        print_report(runs, summary, burst_result, info, args)
        if args.json:
            write_json(args.json, runs, summary, burst_result, info, args)
            print(f"\nwrote {args.json}")
        return 0
    finally:
        client.close()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = "--quick" in argv
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 run per side, no warm-up pair, no burst, no settling unless given: does the launch path still work?",
    )
    p.add_argument("--runs", type=int, default=1 if quick else 5, help="measured launches per side (default 5)")
    p.add_argument(
        "--warmup", type=int, default=0 if quick else 1, help="unmeasured agent+floor pairs first (default 1)"
    )
    p.add_argument(
        "--burst",
        type=int,
        default=0 if quick else 10,
        help="instances created at once in the burst (default 10; 0: none)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.0 if quick else 1.0,
        help="seconds of quiet after each run's cleanup (default 1)",
    )
    p.add_argument("--boot-timeout", type=float, default=300.0, help="seconds to wait for boot markers (default 300)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (agent stderr) afterwards")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.burst < 0 or args.settle < 0 or args.boot_timeout <= 0:
        p.error("--runs must be >= 1, --warmup, --burst and --settle >= 0, --boot-timeout > 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run it as root: the agent manages a bridge, dnsmasq and nftables", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="minicloud-launch-bench-"))
    data = workdir / "agent"
    tag = secrets.token_hex(3)
    bridge = f"mcb{tag}"
    cidr = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24"
    children: list[Child] = []
    signal.signal(signal.SIGTERM, _interrupt)  # e.g. a CI timeout: clean up as on Ctrl-C
    try:
        return run(args, workdir, data, bridge, cidr, children)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        # No second interruption half-way through the cleanup (it is bounded: stop timeouts, parallel destroys).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("cleaning up ...", file=sys.stderr)
        if children and children[0].proc.poll() is not None and children[0].proc.returncode not in (0, -15):
            print(f"agent stderr (tail):\n{children[0].stderr_tail()}", file=sys.stderr)
        stop_children(children)
        cleanup_host(workdir, data, bridge, cidr)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
