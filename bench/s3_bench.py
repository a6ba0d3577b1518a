"""S3 bench: PUT/GET throughput of 1 MiB and 64 MiB objects and ops/s of 4 KiB objects, 16 concurrent clients,
through minicloud's S3 endpoint against a bare RADOS Gateway on the same Ceph (the floor), in the same run.

Usage::

    .venv/bin/python bench/s3_bench.py [--clients 16] [--rounds 2] [--floor-tls] [--json FILE] [--keep]
    .venv/bin/python bench/s3_bench.py --quick   # 1 MiB and 8 MiB objects, 2 s of 4 KiB ops, one round; 256 MiB backup
    .venv/bin/python bench/s3_bench.py --phase backup [--backup-mib 2048] [--change-pct 1]

Needs root and Ceph with the gateway (Debian packages ceph-mon ceph-osd ceph-mgr ceph-common radosgw; the backup
phase also qemu-utils). It starts the real agent in a temporary directory (no compute, no networking, Ceph ports
picked free) and, through the API, ``storage enable`` with one sparse file OSD (``--osd-gib``, 16): the agent
bootstraps its own cluster and starts its gateway (the endpoint: TLS with the node certificate, the agent's RGW
settings — usage log on, quota caches, 128 threads). An access key and a bucket are made through the API, as a user
would.

The floor is a bare RGW: a second ``radosgw`` on the same cluster, started by the bench with its own cephx key, on
another port of the same address, with Ceph's defaults — plain HTTP (``rgw_frontends = beast endpoint=ADDRESS:PORT``,
Ceph's own ``beast port=7480`` bound to that address only), no usage log, no quota settings, Ceph's thread count.
RGW's users and buckets are cluster-wide, so the same key and the same bucket serve both sides: only the gateway in
the path differs, and the ratio counts everything minicloud puts there — TLS (the node certificate, from the cluster
CA) and its settings (the usage log writes a record per request into RADOS every tick); there is no proxy and no auth
hook (clients talk to RGW directly). ``--floor-tls`` serves the floor over TLS with the same certificate instead
(like with like: both sides pay TLS, and the ratio is that of the settings alone).

One closed-loop load generator (this process, asyncio + aiohttp, ``--clients`` connections, SigV4 signed with
minicloud's signer, payloads UNSIGNED-PAYLOAD as the AWS CLI sends them over HTTPS, and the same to the floor over
HTTP so the generator's work per request is the same) runs each scenario against each side, alternating which side
goes first per round:

| scenario        | what                                                                                       |
|-----------------|--------------------------------------------------------------------------------------------|
| PUT 1 MiB       | ``--small-count`` objects of 1 MiB, spread over the clients; MiB/s and p50/p99 per request |
| GET 1 MiB       | the same objects read back (body streamed and dropped)                                     |
| PUT 64 MiB      | ``--big-count`` objects of ``--big-mib`` (64; ``--quick``: 8)                              |
| GET 64 MiB      | read back                                                                                  |
| PUT 4 KiB ops   | for ``--ops-s`` seconds: PUTs of 4 KiB objects (keys cycle over 1,000); ops/s, p50/p99      |
| GET 4 KiB ops   | for ``--ops-s`` seconds: GETs of those objects                                              |

Then a volume backup phase (after the S3 scenarios; ``--phase backup`` runs it alone), through the CLI as a user
types it, into the same bucket; the floor is the full backup of the same run:

| step            | what                                                                                       |
|-----------------|--------------------------------------------------------------------------------------------|
| fill            | ``volume create`` of 2 GiB, written in full with non-zero data (``--backup-mib`` 2048;     |
|                 | ``--quick``: 256 MiB at the start of a 1 GiB volume) through QEMU's rbd driver (qemu-io)   |
| full backup     | ``volume backup create V --bucket B --wait``: wall time, the node's seconds, bytes stored  |
| change          | ``--change-pct`` (1 %) of the data in 256 KiB blocks spread evenly over it                 |
| incremental     | ``volume backup create V --bucket B --incremental --wait``; ratio incremental/full for     |
|                 | time and bytes (the bytes stored in the bucket, from the backup records)                   |
| restore         | ``volume backup restore INC --name R --wait`` (the chain: full + incremental) into a new   |
|                 | volume; sha256 of ``rbd export`` of it must equal that of the volume at the incremental    |

Per scenario it prints both sides (the best round), the ratio minicloud/floor with the target (>= 0.9, PASS/MISS),
and the CPU of each gateway and of the generator (% of one core). Exit status 0 when the bench ran, whatever the
figures; 1 when a request failed (the figures are then not those of the row) or the restored volume's checksum
differs; other values when it could not run.
On two loaded cores the generator, both gateways and the OSD share the CPU: compare the ratio, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from yarl import URL

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from api_bench import Child, json_clean, mark, stop_children, wait_ready  # noqa: E402

from minicloud.client import Client  # noqa: E402
from minicloud.objects import sigv4  # noqa: E402

MIB = 1 << 20
TARGET_RATIO = 0.9
BUCKET = "bench"
OPS_KEYS = 1000


class BenchFailure(Exception):
    """A request failed: the figures are not those of the row."""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class Row:
    scenario: str
    side: str
    requests: int = 0
    seconds: float = 0.0
    bytes: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    gateway_cpu: float = float("nan")  # % of one core
    generator_cpu: float = float("nan")
    errors: list[str] = field(default_factory=list)

    @property
    def mib_s(self) -> float:
        return self.bytes / MIB / self.seconds if self.seconds else float("nan")

    @property
    def ops_s(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")


class Side:
    """One gateway as the generator sees it: URL, key, the process whose CPU is sampled."""

    def __init__(self, name: str, url: str, key: str, secret: str, ca: str, pid: int) -> None:
        self.name, self.url, self.key, self.secret, self.pid = name, url.rstrip("/"), key, secret, pid
        # aiohttp's ``ssl=``: the cluster CA for an https:// side; False (no TLS settings) for a plain HTTP one
        self.ssl: ssl.SSLContext | bool = False
        if self.url.startswith("https://"):
            self.ssl = ssl.create_default_context(cafile=ca)
            self.ssl.check_hostname = False

    def signed(self, method: str, path: str) -> tuple[URL, dict[str, str]]:
        url = f"{self.url}{path}"
        headers = sigv4.sign(method, url, access_key=self.key, secret_key=self.secret, region="us-east-1",
                             unsigned_payload=True)  # fmt: skip
        return URL(url, encoded=True), headers


async def one(session: aiohttp.ClientSession, side: Side, method: str, key: str, body: bytes | None) -> int:
    """One request; the bytes moved (body sent or received). Raises BenchFailure on a non-2xx answer."""
    url, headers = side.signed(method, f"/{BUCKET}/{key}")
    async with session.request(method, url, data=body, headers=headers, ssl=side.ssl) as resp:
        got = 0
        async for chunk in resp.content.iter_chunked(1 << 20):
            got += len(chunk)
        if resp.status >= 300:
            raise BenchFailure(f"{side.name}: {method} {key}: HTTP {resp.status}")
    return len(body) if body is not None else got


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    return float("nan")


async def run_scenario(
    side: Side, scenario: str, method: str, keys: list[str], body: bytes | None, clients: int, seconds: float
) -> Row:
    """``clients`` connections; each takes the next key (count mode: every key once; timed mode: cycling for
    ``seconds``)."""
    row = Row(scenario, side.name)
    lat: list[float] = []
    timed = seconds > 0
    state = {"i": 0}
    deadline = [0.0]

    async def client() -> None:
        conn = aiohttp.TCPConnector(limit=1, force_close=False)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
            while True:
                i = state["i"]
                if timed:
                    if time.perf_counter() >= deadline[0]:
                        return
                elif i >= len(keys):
                    return
                state["i"] = i + 1
                t0 = time.perf_counter()
                try:
                    moved = await one(session, side, method, keys[i % len(keys)], body)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    row.errors.append(f"{side.name}: {method} {keys[i % len(keys)]}: {exc!r}")
                    return
                except BenchFailure as exc:
                    row.errors.append(str(exc))
                    return
                lat.append(time.perf_counter() - t0)
                row.requests += 1
                row.bytes += moved

    me = os.getpid()
    g0, c0 = cpu_seconds(side.pid), cpu_seconds(me)
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    await asyncio.gather(*(client() for _ in range(clients)))
    row.seconds = time.perf_counter() - t0
    g1, c1 = cpu_seconds(side.pid), cpu_seconds(me)
    row.gateway_cpu = 100 * (g1 - g0) / row.seconds
    row.generator_cpu = 100 * (c1 - c0) / row.seconds
    if lat:
        row.p50_ms, row.p99_ms = 1000 * pct(lat, 0.5), 1000 * pct(lat, 0.99)
    return row


def scenarios(args: argparse.Namespace) -> list[tuple[str, str, list[str], bytes | None, float]]:
    small = os.urandom(MIB)
    big = os.urandom(args.big_mib * MIB)
    tiny = os.urandom(4096)
    small_keys = [f"small/{i:05d}" for i in range(args.small_count)]
    big_keys = [f"big/{i:04d}" for i in range(args.big_count)]
    ops_keys = [f"ops/{i:04d}" for i in range(OPS_KEYS)]
    return [
        ("PUT 1 MiB", "PUT", small_keys, small, 0.0),
        ("GET 1 MiB", "GET", small_keys, None, 0.0),
        (f"PUT {args.big_mib} MiB", "PUT", big_keys, big, 0.0),
        (f"GET {args.big_mib} MiB", "GET", big_keys, None, 0.0),
        ("PUT 4 KiB ops", "PUT", ops_keys, tiny, args.ops_s),
        ("GET 4 KiB ops", "GET", ops_keys, None, args.ops_s),
    ]


async def measure(args: argparse.Namespace, sides: list[Side]) -> list[tuple[Row, Row]]:
    """Every scenario on both sides, ``--rounds`` times (the side that goes first alternates); the best round."""
    out: list[tuple[Row, Row]] = []
    plan = scenarios(args)
    # the 4 KiB GETs read what the PUTs wrote: write every ops key once on each side's first pass
    for name, method, keys, body, seconds in plan:
        best: dict[str, Row] = {}
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else list(reversed(sides))
            for side in order:
                print(f"  {name:14} {side.name:9} round {r + 1}", file=sys.stderr)
                if method == "GET" and seconds and not best:
                    await run_scenario(side, "prefill", "PUT", keys, os.urandom(4096), args.clients, 0.0)
                row = await run_scenario(side, name, method, keys, body, args.clients, seconds)
                if row.errors:
                    raise BenchFailure("; ".join(row.errors[:5]))
                score = row.ops_s if seconds else row.mib_s
                prev = best.get(side.name)
                if prev is None or score > (prev.ops_s if seconds else prev.mib_s):
                    best[side.name] = row
        out.append((best["minicloud"], best["floor"]))
    return out


def report(rows: list[tuple[Row, Row]], args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    print(f"\nS3: {args.clients} clients, {args.rounds} round(s), best per side; Ceph {info.get('ceph', '?')}, "
          f"one {args.osd_gib} GiB file OSD; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"minicloud: {info.get('minicloud_url', '?')} (TLS); floor: a bare radosgw at {info.get('floor_url', '?')} "
          f"({'TLS, --floor-tls' if args.floor_tls else 'plain HTTP'})")  # fmt: skip
    head = f"{'scenario':16} {'side':9} {'MiB/s':>8} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'gw CPU%':>8} {'gen CPU%':>8}"
    print(head)
    summary: dict[str, Any] = {}
    for mc, fl in rows:
        timed = "ops" in mc.scenario
        for r in (fl, mc):
            print(f"{r.scenario:16} {r.side:9} {r.mib_s:8.1f} {r.ops_s:8.1f} {r.p50_ms:8.1f} {r.p99_ms:8.1f} "
                  f"{r.gateway_cpu:8.0f} {r.generator_cpu:8.0f}")  # fmt: skip
        a, b = (mc.ops_s, fl.ops_s) if timed else (mc.mib_s, fl.mib_s)
        ratio = a / b if b else float("nan")
        summary[mc.scenario] = {
            "minicloud": {"mib_s": mc.mib_s, "ops_s": mc.ops_s, "p50_ms": mc.p50_ms, "p99_ms": mc.p99_ms},
            "floor": {"mib_s": fl.mib_s, "ops_s": fl.ops_s, "p50_ms": fl.p50_ms, "p99_ms": fl.p99_ms},
            "ratio": ratio,
        }
    print("\nratio minicloud/floor (target >= 0.9):")
    for name, s in summary.items():
        print(f"  {name:16} {s['ratio']:.2f}  {mark(s['ratio'] >= TARGET_RATIO)}")
    return summary


# -- the backup phase ---------------------------------------------------------------------------------------------

POOL = "minicloud"  # the RADOS pool ``storage enable`` makes (the default pool)
FILL_CHUNK = 64 * MIB
CHANGE_BLOCK = 256 << 10  # the changed blocks' size


@dataclass
class Backup:
    """One timed backup (or restore): wall time through the CLI (``--wait``), the node's own seconds, bytes stored."""

    name: str
    wall_s: float = 0.0
    node_s: float = float("nan")
    stored_bytes: int = 0


class Cli:
    """``minicloud -o json …`` against the bench's agent, as a user types it."""

    def __init__(self, socket: str, env: dict[str, str]) -> None:
        self.socket, self.env = socket, env

    def __call__(self, *args: str, timeout: float = 3600) -> Any:
        argv = [sys.executable, "-m", "minicloud", "--socket", self.socket, "-o", "json", *args]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if done.returncode != 0:
            raise BenchFailure(f"minicloud {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return json.loads(done.stdout)


def _ceph_args(data: Path) -> list[str]:
    root = data / "ceph"
    return ["--conf", str(root / "ceph.conf"), "--id", "minicloud", "--keyring", str(root / "client.minicloud.keyring")]


def _qemu_io(data: Path, image: str, commands: list[str]) -> None:
    """Write into an RBD image through QEMU's rbd driver (what a guest's writes go through), one process."""
    root = data / "ceph"
    target = f"rbd:{POOL}/{image}:id=minicloud:conf={root / 'ceph.conf'}:keyring={root / 'client.minicloud.keyring'}"
    argv = ["qemu-io", "-f", "raw", *(x for c in commands for x in ("-c", c)), target]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or done.stdout.count("wrote") != len(commands):
        raise BenchFailure(f"qemu-io: {done.stdout[-500:]}{done.stderr[-500:]}")


def _sha(data: Path, image: str) -> str:
    """sha256 of ``rbd export`` of the image (the whole volume, holes as zeros)."""
    h = hashlib.sha256()
    argv = ["rbd", *_ceph_args(data), "export", "--no-progress", f"{POOL}/{image}", "-"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(4 * MIB):
            h.update(chunk)
    if proc.returncode != 0:
        raise BenchFailure(f"rbd export {image}: exit status {proc.returncode}")
    return h.hexdigest()


def backup_phase(args: argparse.Namespace, cli: Cli, data: Path, workdir: Path) -> dict[str, Any]:
    """A volume written with ``--backup-mib`` of non-zero data, a full backup, 1 % changed, an incremental one, the
    chain restored into a new volume and compared (sha256 of the exports)."""
    written = args.backup_mib * MIB
    size_gib = -(-written // (1 << 30))
    print(f"backup: a {size_gib} GiB volume, {args.backup_mib} MiB written ...", file=sys.stderr)
    vol = cli("volume", "create", "bk-vol", "--size", str(size_gib), "--wait")
    src = workdir / "fill.bin"
    src.write_bytes(os.urandom(FILL_CHUNK))
    chunks = [f"write -s {src} {off} {min(FILL_CHUNK, written - off)}" for off in range(0, written, FILL_CHUNK)]
    t0 = time.perf_counter()
    _qemu_io(data, vol["id"], chunks)
    fill_s = time.perf_counter() - t0
    src.unlink()
    sha_full = _sha(data, vol["id"])

    def backup(name: str, *extra: str) -> Backup:
        t0 = time.perf_counter()
        b = cli("volume", "backup", "create", "bk-vol", "--bucket", BUCKET, "--name", name, *extra, "--wait")
        wall = time.perf_counter() - t0
        if b["status"]["state"] != "available":
            raise BenchFailure(f"backup {name}: {b['status']['state']} {b['status'].get('reason', '')}")
        return Backup(name, wall, float(b["status"].get("seconds") or "nan"), int(b["status"]["stored_bytes"]))

    print("backup: the full backup ...", file=sys.stderr)
    full = backup("bk-full")
    # 1 % of the written span, in blocks spread evenly over it
    blocks = max(1, round(written * args.change_pct / 100 / CHANGE_BLOCK))
    stride = written // blocks
    _qemu_io(data, vol["id"], [f"write -P {i % 255 + 1} {i * stride} {CHANGE_BLOCK}" for i in range(blocks)])
    sha_inc = _sha(data, vol["id"])
    if sha_inc == sha_full:
        raise BenchFailure("the changes did not change the volume")
    print(f"backup: {blocks} x {CHANGE_BLOCK >> 10} KiB changed; the incremental backup ...", file=sys.stderr)
    inc = backup("bk-inc", "--incremental")
    print("backup: restoring the incremental chain into a new volume ...", file=sys.stderr)
    t0 = time.perf_counter()
    restored = cli("volume", "backup", "restore", "bk-inc", "--name", "bk-restored", "--wait")
    restore_s = time.perf_counter() - t0
    if restored["status"]["state"] != "available":
        raise BenchFailure(f"restore: {restored['status']['state']} {restored['status'].get('reason', '')}")
    same = _sha(data, restored["id"]) == sha_inc
    return {
        "volume_gib": size_gib,
        "written_mib": args.backup_mib,
        "fill_s": fill_s,
        "changed": {"blocks": blocks, "block_kib": CHANGE_BLOCK >> 10, "pct": blocks * CHANGE_BLOCK * 100 / written},
        "full": vars(full),
        "incremental": vars(inc),
        "ratio": {"time": inc.wall_s / full.wall_s, "bytes": inc.stored_bytes / full.stored_bytes},
        "restore_s": restore_s,
        "checksum_equal": same,
    }


def report_backup(b: dict[str, Any]) -> None:
    ch = b["changed"]
    print(f"\nBackup: a {b['volume_gib']} GiB volume, {b['written_mib']} MiB written with non-zero data "
          f"({b['fill_s']:.1f} s); then {ch['blocks']} x {ch['block_kib']} KiB changed ({ch['pct']:.2f} %), "
          f"spread over it; load {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"{'backup':16} {'wall s':>8} {'node s':>8} {'stored MiB':>11}")
    for k in ("full", "incremental"):
        r = b[k]
        print(f"{k:16} {r['wall_s']:8.2f} {r['node_s']:8.2f} {r['stored_bytes'] / MIB:11.2f}")
    print(f"ratio incremental/full: time {b['ratio']['time']:.3f}, bytes {b['ratio']['bytes']:.4f}")
    print(f"restore of the incremental chain into a new volume: {b['restore_s']:.2f} s; "
          f"sha256 of the exports equal: {'yes' if b['checksum_equal'] else 'NO'}")  # fmt: skip


# -- the cluster and its gateways ---------------------------------------------------------------------------------


def agent_config(node: str, log_level: str, s3_port: int) -> str:
    return (
        f'[agent]\nnode_name = "{node}"\nlog_level = "{log_level}"\n'
        '[compute]\ndriver = "none"\n[network]\nenabled = false\n'
        f"[storage]\nceph_mon_port = {free_port()}\nceph_mon_port_v1 = {free_port()}\n"
        f"ceph_prometheus_port = {free_port()}\n[objects]\nport = {s3_port}\n"
    )


def wait_for(what: str, check: Any, agent: Child, timeout: float = 300.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except Exception as exc:  # reported when it times out
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if agent.proc.poll() is not None:
            raise RuntimeError(f"the agent exited during {what}:\n{agent.stderr_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s (last: {last!r})\n{agent.stderr_tail(15)}")
        time.sleep(interval)


def floor_gateway(data: Path, node: str, address: str, port: int, tls: bool) -> Any:
    """A bare radosgw on the agent's cluster with Ceph's defaults: plain HTTP (``beast endpoint=ADDRESS:PORT``), or
    with ``tls`` the agent's TLS frontend and the node certificate. Its ``url``: what clients use."""
    from agent.storage.ceph import CephEngine, CephSettings
    from agent.storage.rgw import DEFAULT_OPTIONS, Rgw, RgwSettings, http_status

    host = f"[{address}]" if ":" in address else address

    class Bare(Rgw):
        url = f"{'https' if tls else 'http'}://{host}:{port}"

        def argv(self) -> list[str]:
            drop = {f"--{k}=" for k, _ in DEFAULT_OPTIONS}
            argv = [a for a in super().argv() if not any(a.startswith(d) for d in drop)]
            if tls:
                return argv
            plain = f"--rgw_frontends=beast endpoint={host}:{port}"
            return [plain if a.startswith("--rgw_frontends=") else a for a in argv]

        async def probe(self) -> int:
            """One anonymous ``GET /`` (over plain HTTP unless ``tls``); the HTTP status."""
            return await (super().probe() if tls else http_status(address, port))

    root = data / "ceph"
    conf = (root / "ceph.conf").read_text()
    fsid = next(ln.split("=", 1)[1].strip() for ln in conf.splitlines() if ln.strip().startswith("fsid"))
    engine = CephEngine(CephSettings(root=root, fsid=fsid, node=node, address=address))
    pki = data / "pki"
    settings = RgwSettings(node=f"{node}-floor", address=address, port=port, cert=pki / "server.crt",
                           key=pki / "server.key")  # fmt: skip
    return Bare(engine, settings)


def gateway_pid(data: Path, entity: str) -> int:
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            argv = p.info["cmdline"] or []
            if argv and Path(argv[0]).name == "radosgw" and entity in argv and str(data) in " ".join(argv):
                return p.pid
    raise RuntimeError(f"no radosgw {entity} running")


def cleanup(data: Path, node: str) -> None:
    root = data / "ceph"
    for p in psutil.process_iter(["cmdline"]):  # the gateways first
        with contextlib.suppress(psutil.Error):
            argv = p.info["cmdline"] or []
            if argv and Path(argv[0]).name == "radosgw" and any(str(root) in a for a in argv):
                p.kill()
    conf = root / "ceph.conf"
    if conf.exists():
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
    config = workdir / "minicloud.toml"
    s3_port = free_port()
    config.write_text(agent_config(node, "info" if args.keep else "warning", s3_port))
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICLOUD_")}
    env["MINICLOUD_CONFIG"] = str(config)
    print("starting the agent ...", file=sys.stderr)
    argv = [sys.executable, "-m", "minicloud", "--socket", str(data / "s.sock"), "agent", "--data-dir", str(data),
            "--listen", "127.0.0.1:0"]  # fmt: skip
    err = workdir / "agent.stderr"
    with open(err, "wb") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, env=env, start_new_session=True)
    agent = Child("agent", proc, err)
    children.append(agent)
    state = wait_ready(agent, data / "agent.json")
    client = Client.local(state["socket"], timeout=300.0)
    info: dict[str, Any] = {}
    try:
        info["ceph"] = subprocess.run(["ceph", "--version"], capture_output=True, text=True).stdout.split("(")[0]
        info["ceph"] = info["ceph"].replace("ceph version", "").strip()
        print("storage enable: the agent bootstraps its Ceph and its S3 gateway ...", file=sys.stderr)
        t0 = time.perf_counter()
        client.storage.enable(file_size_bytes=args.osd_gib << 30)
        wait_for("storage ready", lambda: client.call("GET", "/v1/storage")["state"] == "ready", agent)
        ep = client.call("GET", "/v1/s3/endpoint")
        key = client.call("POST", "/v1/accesskeys", json={"name": "bench"})
        client.call("POST", "/v1/buckets", json={"name": BUCKET})
        wait_for(
            "the bucket is ready",
            lambda: client.call("GET", f"/v1/buckets/{BUCKET}")["status"]["state"] == "ready",
            agent,
        )
        info["s3_ready_s"] = time.perf_counter() - t0
        out: dict[str, Any] = {"info": info, "args": vars(args)}
        if args.phase in ("all", "s3"):
            out["scenarios"] = s3_phase(args, client, data, node, ep, key, agent, info)
        if args.phase in ("all", "backup"):
            cli = Cli(state["socket"], env)
            out["backup"] = backup_phase(args, cli, data, workdir)
            report_backup(out["backup"])
        if args.json:
            Path(args.json).write_text(json.dumps(json_clean(out), indent=2))
            print(f"\nwrote {args.json}")
        return 0 if out.get("backup", {}).get("checksum_equal", True) else 1
    except BenchFailure as exc:
        print(f"\nerrors:\n  {exc}\n{agent.stderr_tail(20)}")
        return 1
    finally:
        client.close()


def s3_phase(args: argparse.Namespace, client: Client, data: Path, node: str, ep: dict[str, Any],
             key: dict[str, Any], agent: Child, info: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The S3 scenarios against the agent's gateway and a bare one started here (the floor)."""
    floor_port = free_port()
    address = URL(ep["url"]).host or "127.0.0.1"
    floor = floor_gateway(data, node, address, floor_port, args.floor_tls)
    print(f"the floor: a bare radosgw at {floor.url} ...", file=sys.stderr)
    info["minicloud_url"], info["floor_url"] = ep["url"], floor.url
    asyncio.run(floor.ensure_key())
    asyncio.run(floor.ensure_running())
    mc_side = Side("minicloud", ep["url"], key["id"], key["secret_access_key"], ep["ca_path"],
                   gateway_pid(data, f"client.rgw.{node}"))  # fmt: skip
    fl_side = Side("floor", floor.url, key["id"], key["secret_access_key"], ep["ca_path"],
                   gateway_pid(data, floor.settings.entity))  # fmt: skip

    async def key_works() -> bool:
        async with aiohttp.ClientSession() as s:
            for side in (mc_side, fl_side):
                url, headers = side.signed("GET", f"/{BUCKET}")
                async with s.get(url, headers=headers, ssl=side.ssl) as r:
                    if r.status != 200:
                        return False
        return True

    wait_for("the key works on both gateways", lambda: asyncio.run(key_works()), agent, timeout=120)
    print("measuring ...", file=sys.stderr)
    rows = asyncio.run(measure(args, [mc_side, fl_side]))
    return report(rows, args, info)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    quick = "--quick" in argv
    p.add_argument("--quick", action="store_true", help="small sizes and counts: does the bench still measure?")
    p.add_argument("--clients", "-c", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--rounds", type=int, default=1 if quick else 2, help="rounds per scenario and side (default 2)")
    p.add_argument("--small-count", type=int, default=32 if quick else 256, help="1 MiB objects (default 256)")
    p.add_argument("--big-mib", type=int, default=8 if quick else 64, help="the big objects' size (default 64)")
    p.add_argument("--big-count", type=int, default=16, help="big objects (default 16)")
    p.add_argument("--ops-s", type=float, default=2.0 if quick else 10.0, help="seconds per 4 KiB row (default 10)")
    p.add_argument("--osd-gib", type=int, default=16, help="the file OSD's size, sparse (default 16)")
    p.add_argument("--floor-tls", action="store_true",
                   help="serve the floor over TLS with the node certificate, like minicloud's endpoint (default: "
                        "plain HTTP, Ceph's default, so that the ratio counts minicloud's TLS too)")  # fmt: skip
    p.add_argument("--phase", choices=("all", "s3", "backup"), default="all",
                   help="the S3 scenarios, the volume backup one, or both (default)")  # fmt: skip
    p.add_argument("--backup-mib", type=int, default=256 if quick else 2048,
                   help="the backed-up volume's data, written in full (default 2048: a 2 GiB volume)")  # fmt: skip
    p.add_argument("--change-pct", type=float, default=1.0, help="%% of that data changed before the incremental")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (agent log level info)")
    args = p.parse_args(argv)
    if min(args.clients, args.rounds, args.small_count, args.big_mib, args.big_count, args.backup_mib) < 1:
        p.error("counts and sizes must be >= 1")
    if args.ops_s <= 0 or not 0 < args.change_pct <= 50:
        p.error("--ops-s > 0, 0 < --change-pct <= 50")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run it as root: the agent runs Ceph daemons", file=sys.stderr)
        return 2
    tools = ("ceph-mon", "ceph-osd", "ceph-mgr", "radosgw") + (("rbd", "qemu-io") if args.phase != "s3" else ())
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(
            f"missing {', '.join(missing)} (Debian packages ceph-mon ceph-osd ceph-mgr ceph-common radosgw qemu-utils)",
            file=sys.stderr,
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="minicloud-s3-bench-", dir="/var/tmp"))
    data = workdir / "agent"
    node = f"s3bench-{secrets.token_hex(3)}"
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
        stop_children(children)
        cleanup(data, node)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
