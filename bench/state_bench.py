"""Durable-write bench for the state store: single-node SQLite against a 3-node etcd cluster, plus leader failover.

Usage::

    .venv/bin/python bench/state_bench.py [--seconds 5] [--warmup 1] [--failovers 10] [--skip-cluster] [--json FILE]
    .venv/bin/python bench/state_bench.py --quick      # short windows, one failover: does every scenario still work?

Needs root (network namespaces). Everything lives in a temporary directory on the real disk (fsync is real) and in
network namespaces made with the multi-node test harness (``tests/cluster/harness.py``); no traffic leaves them.

Write scenarios, each with 1 and 16 closed-loop writers, ``--warmup`` seconds unrecorded then ``--seconds`` recorded;
a write counts once it is acknowledged (durable):

* ``sqlite store``: ``SQLiteStore.commit(Txn([Create(record)]))`` in this process, on a fresh database file;
* ``sqlite api``: ``POST /v1/keypairs`` (unique names) over the Unix socket of one agent, alone in its own network
  namespace (a 1-node harness cluster, clustering not enabled);
* ``etcd api``: the same request through one node of a 3-node cluster (each node in its own namespace, etcd over
  mutual TLS between them); it returns only once etcd committed the write *and* that node's replica applied it;
* ``etcd store``: ``EtcdStore.commit`` directly, from a helper process inside that node's namespace with its own
  SQLite replica, against the cluster's etcd (the cost of the store without the HTTP layer).

Failover: with the cluster healthy, the etcd leader's node is SIGKILLed whole (agent and etcd); from the kill, a write
attempt is launched every 20 ms through the two surviving nodes (each with a short timeout, several in flight), and the
time to the first acknowledged one is recorded. The node is restarted and the cluster is waited on until it is healthy
again (all members online, every node sees the same etcd leader, a write through every node succeeds), ``--failovers``
times; the median, min and max are reported.

Targets (from the issue) are printed as PASS/MISS; a missed target does not change the exit status. It is 1 when a
scenario had errors, the etcd store helper failed or a failover saw no write (the bench did not measure what it
says), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_bench import timing_args  # noqa: E402

from minicloud import ids  # noqa: E402
from minicloud.state import Create, Record, SQLiteStore, Txn  # noqa: E402

TARGET_SINGLE_WPS = 1000.0  # single node, 16 writers
TARGET_CLUSTER_WPS = 400.0  # 3 nodes, 16 writers
TARGET_FAILOVER_S = 3.0  # kill of the etcd leader -> first acknowledged write (median)

WRITER_COUNTS = (1, 16)
ATTEMPT_EVERY_S = 0.02  # failover: a new write attempt this often
ATTEMPT_TIMEOUT_S = 2.0  # failover: each attempt gives up after this long
MAX_IN_FLIGHT = 200  # failover: at most this many attempts at once (more than ATTEMPT_TIMEOUT_S / ATTEMPT_EVERY_S)
FAILOVER_GIVE_UP_S = 60.0
HEALTHY_TIMEOUT_S = 90.0


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str  # "sqlite" (single node) or "etcd" (3 nodes)
    path: str  # "store" (commit() directly) or "api" (POST /v1/keypairs over the Unix socket)
    writers: int
    writes: int
    errors: int
    seconds: float
    wps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_pct: float  # % of one core: the agent(s) and etcd(s) for api/etcd rows, nan for "sqlite store"
    generator_cpu_pct: float  # % of one core: the process issuing the writes
    error_statuses: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)


@dataclass
class Failover:
    victim: str
    services_leader_killed: bool
    seconds: float  # kill -> first acknowledged write; nan if none within FAILOVER_GIVE_UP_S
    acked_by: str
    attempts: int
    failed_attempts: dict[str, int]
    recovery_s: float  # restart of the victim -> cluster healthy again


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class ClosedLoop:
    """``writers`` tasks calling ``write(wid, i)`` back to back; latencies of acknowledged writes in the window."""

    def __init__(self, writers: int, warmup: float, seconds: float, server_procs: list[psutil.Process]) -> None:
        self.writers = writers
        self.warmup = warmup
        self.seconds = seconds
        self.server_procs = server_procs
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.samples: list[str] = []

    def note_error(self, what: str, detail: str) -> None:
        self.statuses[what] += 1
        if len(self.samples) < 5 and detail not in self.samples:
            self.samples.append(detail)

    async def run(self, write: Callable[[int, int], Awaitable[str | None]], *, backend: str, path: str) -> Result:
        """``write`` returns None when acknowledged, else a short error description (``status: detail``)."""
        clock = time.perf_counter
        me = psutil.Process()
        t_measure = clock() + self.warmup
        t_end = t_measure + self.seconds
        marks: dict[str, float] = {}

        async def marker() -> None:
            await asyncio.sleep(max(0.0, t_measure - clock()))
            marks["srv0"], marks["gen0"], marks["t0"] = cpu_seconds(self.server_procs), cpu_seconds([me]), clock()
            await asyncio.sleep(max(0.0, t_end - clock()))
            marks["srv1"], marks["gen1"], marks["t1"] = cpu_seconds(self.server_procs), cpu_seconds([me]), clock()

        async def worker(wid: int) -> None:
            i = 0
            while True:
                t0 = clock()
                if t0 >= t_end:
                    return
                i += 1
                try:
                    error = await write(wid, i)
                except Exception as exc:  # a transport error, a store exception
                    error = f"{type(exc).__name__}: {exc}"
                t1 = clock()
                if t0 < t_measure:
                    continue
                if error is None:
                    self.latencies.append(t1 - t0)
                else:
                    self.note_error(error.split(":", 1)[0], error[:300])
                    await asyncio.sleep(0.01)  # don't spin on a failing target

        await asyncio.gather(marker(), *(worker(w) for w in range(self.writers)))
        elapsed = clock() - t_measure
        window = max(1e-9, marks["t1"] - marks["t0"])
        lat = sorted(self.latencies)
        return Result(
            backend=backend,
            path=path,
            writers=self.writers,
            writes=len(lat),
            errors=sum(self.statuses.values()),
            seconds=round(elapsed, 3),
            wps=len(lat) / elapsed,
            p50_ms=percentile(lat, 50) * 1000,
            p99_ms=percentile(lat, 99) * 1000,
            max_ms=lat[-1] * 1000 if lat else math.nan,
            server_cpu_pct=100 * (marks["srv1"] - marks["srv0"]) / window if self.server_procs else math.nan,
            generator_cpu_pct=100 * (marks["gen1"] - marks["gen0"]) / window,
            error_statuses=dict(self.statuses),
            error_samples=self.samples,
        )


def new_record(kind: str, name: str) -> Record:
    stamp = ids.now()
    return Record(kind=kind, id=ids.new_id("th"), project="p", name=name, created_at=stamp, updated_at=stamp)


# --------------------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------------------


async def bench_store(store: Any, tag: str, writers: int, args: argparse.Namespace, *, backend: str) -> Result:
    async def write(wid: int, i: int) -> str | None:
        await store.commit(Txn([Create(new_record("benchthing", f"{tag}{wid}-{i}"))]))
        return None

    loop = ClosedLoop(writers, args.warmup, args.seconds, [])
    return await loop.run(write, backend=backend, path="store")


async def bench_sqlite_store(workdir: Path, args: argparse.Namespace) -> list[Result]:
    store = SQLiteStore(workdir / "store.db")
    await store.open()
    try:
        results = []
        for writers in WRITER_COUNTS:
            progress(f"sqlite store, {writers:2d} writer(s)")
            r = await bench_store(store, f"s{writers}w", writers, args, backend="sqlite")
            progress_done(r)
            results.append(r)
        return results
    finally:
        await store.close()


def post_keypair(session: aiohttp.ClientSession, public_key: str) -> Callable[[str], Awaitable[str | None]]:
    async def write(name: str) -> str | None:
        async with session.post("http://localhost/v1/keypairs", json={"name": name, "public_key": public_key}) as r:
            if r.status == 201:
                await r.read()
                return None
            return f"{r.status}: {(await r.read())[:300].decode(errors='replace')}"

    return write


async def bench_api(
    socket: Path,
    tag: str,
    writers: int,
    args: argparse.Namespace,
    public_key: str,
    procs: list[psutil.Process],
    *,
    backend: str,
) -> Result:
    connector = aiohttp.UnixConnector(path=str(socket), limit=writers)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        post = post_keypair(session, public_key)

        async def write(wid: int, i: int) -> str | None:
            return await post(f"{tag}{wid}-{i}")

        loop = ClosedLoop(writers, args.warmup, args.seconds, procs)
        return await loop.run(write, backend=backend, path="api")


def ssh_public_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def namespace_procs(netns: list[str]) -> list[psutil.Process]:
    """Every process running in these namespaces now (agents and their etcd members)."""
    from tests.cluster.harness import netns_pids

    procs = []
    for ns in netns:
        for pid in netns_pids(ns):
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
    return procs


# -- the etcd store directly, from a helper inside a node's namespace (`state_bench.py _etcd_store ...`) -----------


def run_etcd_store_helper(data_dir: str, workdir: str, warmup: str, seconds: str) -> None:
    from agent.etcd import client_ssl_context
    from minicloud.state.etcd import EtcdStore
    from minicloud.state.etcd_client import EtcdClient

    data = Path(data_dir)
    pki = data / "pki"
    endpoints = json.loads((data / "cluster.json").read_text())["endpoints"]
    args = argparse.Namespace(warmup=float(warmup), seconds=float(seconds))

    async def main() -> list[Result]:
        client = EtcdClient(endpoints, client_ssl_context(pki / "ca.crt", pki / "server.crt", pki / "server.key"))
        store = EtcdStore(SQLiteStore(Path(workdir) / "replica.db"), client)
        await store.open()
        try:
            return [await bench_store(store, f"e{w}w", w, args, backend="etcd") for w in WRITER_COUNTS]
        finally:
            await store.close()

    results = asyncio.run(main())
    print(json.dumps([clean(asdict(r)) for r in results]))


# --------------------------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------------------------


def cluster_info(node: Any, timeout: float = 5) -> dict[str, Any] | None:
    from minicloud.client import ApiError, ConnectError

    try:
        return node.client(timeout=timeout).call("GET", "/v1/cluster")
    except (ApiError, ConnectError, OSError):
        return None


def sync_write(node: Any, name: str, public_key: str) -> bool:
    from minicloud.client import ApiError, ConnectError

    try:
        node.client(timeout=10).keypairs.create(name=name, public_key=public_key)
        return True
    except (ApiError, ConnectError, OSError):
        return False


def wait_healthy(cluster: Any, public_key: str, tag: str, timeout: float = HEALTHY_TIMEOUT_S) -> dict[str, Any]:
    """Until every node answers, all members are online voters, all agree on one etcd leader (and there is a services
    leader), and a write through every node is acknowledged. Returns one node's /v1/cluster."""
    from tests.cluster.harness import wait_for

    counter = iter(range(1_000_000))

    def healthy() -> dict[str, Any] | None:
        infos = [cluster_info(n) for n in cluster.nodes]
        if any(i is None for i in infos):
            return None
        leaders = {i["etcd_leader"] for i in infos}  # type: ignore[index]
        first = infos[0]
        assert first is not None
        members = first["members"]
        if (
            len(leaders) != 1
            or None in leaders
            or not first.get("leader")
            or len(members) != len(cluster.nodes)
            or any(m["status"] != "online" or m["role"] != "voter" for m in members)
        ):
            return None
        if not all(sync_write(n, f"{tag}-h{next(counter)}", public_key) for n in cluster.nodes):
            return None
        return first

    return wait_for(healthy, timeout=timeout, interval=0.2, what="a healthy cluster")


def form_cluster(cluster: Any, public_key: str) -> dict[str, Any]:
    first, *others = cluster.nodes
    first.cli("cluster", "enable", check=True)
    for node in others:
        token = first.json("cluster", "add", node.node_name)["token"]
        node.cli("join", token, check=True)
    return wait_healthy(cluster, public_key, "form")


async def measure_failover(
    victim: Any, survivors: list[Any], public_key: str, tag: str
) -> tuple[float, str, int, dict]:
    """SIGKILL everything in the victim's namespace; return (seconds to the first acknowledged write, the node that
    acknowledged it, attempts made, failed attempts by status)."""
    from tests.cluster.harness import netns_pids

    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(n.socket), limit=MAX_IN_FLIGHT),
            timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S),
        )
        for n in survivors
    ]
    posts = [post_keypair(s, public_key) for s in sessions]
    failures: Counter[str] = Counter()
    done: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
    tasks: set[asyncio.Task[None]] = set()
    clock = time.perf_counter
    try:
        # Warm a connection to each survivor, so the first attempts measure the cluster and not a connect.
        for k, post in enumerate(posts):
            if await post(f"{tag}-pre{k}") is not None:
                raise RuntimeError(f"a write through {survivors[k].node_name} failed before the kill")
        pids = netns_pids(victim.netns)
        t_kill = clock()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        async def attempt(n: int) -> None:
            k = n % len(posts)
            try:
                error = await posts[k](f"{tag}-a{n}")
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = type(exc).__name__
            if error is None:
                if not done.done():
                    done.set_result((clock() - t_kill, survivors[k].node_name))
            else:
                failures[error.split(":", 1)[0]] += 1

        n = 0
        while not done.done() and clock() - t_kill < FAILOVER_GIVE_UP_S:
            if len(tasks) < MAX_IN_FLIGHT:
                task = asyncio.create_task(attempt(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), ATTEMPT_EVERY_S)
        seconds, by = done.result() if done.done() else (math.nan, "")
        return seconds, by, n, dict(failures)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in sessions:
            await s.close()


def bench_failovers(cluster: Any, public_key: str, count: int) -> list[Failover]:
    by_name = {n.node_name: n for n in cluster.nodes}
    out: list[Failover] = []
    for k in range(count):
        state = wait_healthy(cluster, public_key, f"f{k}")
        victim = by_name[state["etcd_leader"]]
        survivors = [n for n in cluster.nodes if n is not victim]
        progress(f"failover {k + 1}/{count}: killing {victim.node_name} (etcd leader)")
        seconds, acked_by, attempts, failed = asyncio.run(measure_failover(victim, survivors, public_key, f"f{k}"))
        victim.crash()  # make sure all of it is gone (and reaped) before it starts again
        t_restart = time.perf_counter()
        victim.start(timeout=60)
        wait_healthy(cluster, public_key, f"r{k}")
        recovery = time.perf_counter() - t_restart
        print(f" {seconds:.2f} s (back to healthy {recovery:.1f} s after the restart)", file=sys.stderr)
        out.append(
            Failover(
                victim=victim.node_name,
                services_leader_killed=state["leader"] == victim.node_name,
                seconds=seconds,
                acked_by=acked_by,
                attempts=attempts,
                failed_attempts=failed,
                recovery_s=recovery,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def progress(what: str) -> None:
    print(f"  {what} ...", end="", flush=True, file=sys.stderr)


def progress_done(r: Result) -> None:
    print(f" {r.wps:.0f} writes/s", file=sys.stderr)


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def evaluate(results: list[Result], failovers: list[Failover]) -> dict[str, Any]:
    for r in results:
        if r.writers == 16 and r.path == "api":
            target = TARGET_SINGLE_WPS if r.backend == "sqlite" else TARGET_CLUSTER_WPS
            r.checks[f"wps>={target:,.0f}"] = r.wps >= target
        if r.errors:
            r.checks["no errors"] = False
    summary: dict[str, Any] = {}
    if failovers:
        times = [f.seconds for f in failovers]
        ok = [t for t in times if not math.isnan(t)]
        median = statistics.median(times) if len(ok) == len(times) else math.nan
        summary = {
            "runs": len(times),
            "median_s": median,
            "min_s": min(ok) if ok else math.nan,
            "max_s": max(ok) if ok else math.nan,
            "no_write_within_s": FAILOVER_GIVE_UP_S,
            "failed_runs": len(times) - len(ok),
            "pass": not math.isnan(median) and median <= TARGET_FAILOVER_S,
        }
    return summary


def fmt(v: float, spec: str) -> str:
    return "-" if math.isnan(v) else format(v, spec)


def print_report(
    results: list[Result], failovers: list[Failover], summary: dict[str, Any], args: argparse.Namespace, info: dict
) -> None:
    print()
    etcd = f", {info['etcd']}" if "etcd" in info else ""
    print(
        f"minicloud state bench: durable writes, {args.warmup:g} s warm-up + {args.seconds:g} s per scenario, "
        f"closed-loop writers; {os.cpu_count()} CPUs, Python {platform.python_version()}{etcd}"
    )
    print(
        "store = commit() in-process; api = POST /v1/keypairs over the node's Unix socket (acknowledged = durable, "
        "and in a cluster applied by that node's replica)"
    )
    print("cpu = % of one core in the measured window (srv: agent + etcd processes of the nodes; gen: the writer)")
    if info.get("write_node"):
        print(f"cluster writes go through {info['write_node']}")
    print()
    head = (
        f"{'backend':18} {'path':5} {'writers':>7} {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'errors':>6} {'srv cpu':>7} {'gen cpu':>7}  targets"
    )
    print(head)
    print("-" * len(head))
    label = {"sqlite": "sqlite (1 node)", "etcd": "etcd (3 nodes)"}
    for r in results:
        checks = ", ".join(f"{k} {mark(v)}" for k, v in r.checks.items())
        srv = "-" if math.isnan(r.server_cpu_pct) else f"{r.server_cpu_pct:6.0f}%"
        print(
            f"{label[r.backend]:18} {r.path:5} {r.writers:7d} {r.wps:9.0f} {fmt(r.p50_ms, '7.2f')} "
            f"{fmt(r.p99_ms, '7.2f')} {fmt(r.max_ms, '7.2f')} {r.errors:6d} {srv:>7} {r.generator_cpu_pct:6.0f}%  "
            f"{checks}"
        )
    if failovers:
        print()
        print(
            f"failover: SIGKILL of the etcd leader's node -> first acknowledged write through a survivor "
            f"(attempt every {ATTEMPT_EVERY_S * 1000:.0f} ms, {ATTEMPT_TIMEOUT_S:g} s timeout each)"
        )
        for i, f in enumerate(failovers, 1):
            also = " (also the services leader)" if f.services_leader_killed else ""
            failed = ", ".join(f"{k}: {v}" for k, v in sorted(f.failed_attempts.items())) or "none"
            print(
                f"  {i:2d}. killed {f.victim}{also}: {fmt(f.seconds, '.2f')} s, acknowledged by {f.acked_by or '-'}; "
                f"{f.attempts} attempts, failed: {failed}; healthy again {f.recovery_s:.1f} s after the restart"
            )
        missing = ""
        if summary["failed_runs"]:
            missing = f" ({summary['failed_runs']} without a write within {FAILOVER_GIVE_UP_S:g} s)"
        print(
            f"  median {fmt(summary['median_s'], '.2f')} s, min {fmt(summary['min_s'], '.2f')} s, "
            f"max {fmt(summary['max_s'], '.2f')} s over {summary['runs']} runs{missing}"
            f"  target median <= {TARGET_FAILOVER_S:g} s {mark(summary['pass'])}"
        )
    errored = [r for r in results if r.errors]
    if errored:
        print()
        print("errors:")
        for r in errored:
            print(f"  {r.backend} {r.path} {r.writers} writer(s): {r.error_statuses}")
            for s in r.error_samples:
                print(f"    {s}")


def clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 3)
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v


def write_json(
    path: str, results: list[Result], failovers: list[Failover], summary: dict, args: argparse.Namespace, info: dict
) -> None:
    doc = {
        "config": {
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "failovers": args.failovers,
            "skip_cluster": args.skip_cluster,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            **info,
        },
        "targets": {
            "single_node_wps_16_writers": TARGET_SINGLE_WPS,
            "cluster_wps_16_writers": TARGET_CLUSTER_WPS,
            "failover_median_s": TARGET_FAILOVER_S,
        },
        "results": [clean(asdict(r)) for r in results],
        "failovers": [clean(asdict(f)) for f in failovers],
        "failover_summary": clean(summary),
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = timing_args(
        p, argv, "0.5 s per scenario, 0.2 s warm-up, 1 failover unless given: does every scenario still work?"
    )
    p.add_argument(
        "--failovers", type=int, default=1 if quick else 10, help="leader kills to time (default 10; 0: none)"
    )
    p.add_argument("--skip-cluster", action="store_true", help="only the single-node scenarios (no etcd)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (agent and etcd logs)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.failovers < 0:
        p.error("--seconds must be > 0, --warmup and --failovers >= 0")
    return args


def etcd_version() -> str:
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("etcd version"):
                return "etcd " + line.split(":", 1)[1].strip()
    return "etcd ?"


def run(args: argparse.Namespace, workdir: Path, clusters: list[Any]) -> int:
    from tests.cluster import harness

    results: list[Result] = []
    failovers: list[Failover] = []
    failures: list[str] = []  # what makes the run a failed bench (exit 1), beyond errors in a scenario
    info: dict[str, Any] = {"workdir": str(workdir)}
    public_key = ssh_public_key()
    reason = harness.unavailable_reason()
    if reason:
        raise SystemExit(f"state_bench: {reason}")
    extra = ["--log-level", "warning"]

    print(f"working in {workdir}", file=sys.stderr)
    results += asyncio.run(bench_sqlite_store(workdir, args))

    print("starting one agent in its own namespace ...", file=sys.stderr)
    single = harness.Cluster(workdir / "single", n=1, start=True, extra_args=extra)
    clusters.append(single)
    node = single.nodes[0]
    procs = namespace_procs(single.netns_names)
    for writers in WRITER_COUNTS:
        progress(f"sqlite api,   {writers:2d} writer(s)")
        r = asyncio.run(bench_api(node.socket, f"s{writers}w", writers, args, public_key, procs, backend="sqlite"))
        progress_done(r)
        results.append(r)
    single.close()

    if not args.skip_cluster:
        info["etcd"] = etcd_version()
        print("starting 3 agents in their own namespaces and forming a cluster ...", file=sys.stderr)
        t0 = time.perf_counter()
        cluster = harness.Cluster(workdir / "cluster", n=3, start=True, extra_args=extra)
        clusters.append(cluster)
        state = form_cluster(cluster, public_key)
        print(f"  formed in {time.perf_counter() - t0:.1f} s; etcd leader {state['etcd_leader']}", file=sys.stderr)
        # Write through a follower of etcd (what 2 of 3 clients see); its proposals are forwarded to the leader.
        target = next(n for n in cluster.nodes if n.node_name != state["etcd_leader"])
        info["write_node"] = f"{target.node_name} (an etcd follower; leader {state['etcd_leader']})"
        procs = namespace_procs(cluster.netns_names)
        for writers in WRITER_COUNTS:
            progress(f"etcd api,     {writers:2d} writer(s)")
            r = asyncio.run(bench_api(target.socket, f"e{writers}w", writers, args, public_key, procs, backend="etcd"))
            progress_done(r)
            results.append(r)
        progress(f"etcd store,   {'/'.join(map(str, WRITER_COUNTS))} writer(s) (helper in {target.node_name}'s netns)")
        helper_dir = workdir / "etcd-store"
        helper_dir.mkdir()
        budget = (args.warmup + args.seconds) * len(WRITER_COUNTS) + 120
        out = target.exec(
            sys.executable,
            os.path.abspath(__file__),
            "_etcd_store",
            target.data_dir,
            helper_dir,
            args.warmup,
            args.seconds,
            timeout=budget,
        )
        if out.returncode != 0:
            print(f" failed ({out.returncode}):\n{out.stderr[-3000:]}", file=sys.stderr)
            failures.append(f"the etcd store helper exited with {out.returncode}")
        else:
            for doc in json.loads(out.stdout.strip().splitlines()[-1]):
                doc = {k: (math.nan if v is None else v) for k, v in doc.items()}
                results.append(Result(**doc))
            print(
                " " + ", ".join(f"{r.wps:.0f}" for r in results[-len(WRITER_COUNTS) :]) + " writes/s", file=sys.stderr
            )
        if args.failovers:
            print(f"timing {args.failovers} failovers ...", file=sys.stderr)
            failovers = bench_failovers(cluster, public_key, args.failovers)

    summary = evaluate(results, failovers)
    print_report(results, failovers, summary, args, info)
    if args.json:
        write_json(args.json, results, failovers, summary, args, info)
        print(f"\nwrote {args.json}")
    failures += [f"errors in {r.backend} {r.path} with {r.writers} writer(s)" for r in results if r.errors]
    failures += [f"no write after killing {f.victim}" for f in failovers if math.isnan(f.seconds)]
    if failures:
        print(f"\nbench failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    if argv[:1] == ["_etcd_store"]:
        run_etcd_store_helper(*argv[1:5])
        return 0
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="minicloud-state-bench-", dir="/var/tmp"))
    clusters: list[Any] = []
    signal.signal(signal.SIGTERM, _interrupt)  # e.g. a CI timeout: clean up as on Ctrl-C
    try:
        return run(args, workdir, clusters)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for c in clusters:
            try:
                c.close()
            except Exception as exc:
                print(f"cleanup: {exc}", file=sys.stderr)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
