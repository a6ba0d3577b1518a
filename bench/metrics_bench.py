#!/usr/bin/env python3
"""Metrics benchmark (issue #13): what collecting, storing and querying metrics costs.

1. **Collection CPU**: the agent's collectors (``agent.metrics.NodeMetrics``: one psutil snapshot and one bulk
   domain-stats list per interval, then three scrapes rendering it, one per voting node's TSDB) for 0 and for
   ``--instances`` instances (each with two disks and two NICs), CPU seconds per interval, as a share of one core at
   a 10 s interval; measured against the same process idle (an event loop doing nothing) in the same run. The
   domain stats come from a stand-in of libvirt's ``getAllDomainStats`` answer (the same keys, counters that move):
   what is measured is minicloud's own work, not libvirtd's. Scrape (render) duration p50/p99 with the instances.
2. **Query latency**: a 1 h and a 24 h range query of one instance's CPU rate, p50/p99 and requests/s, through the
   minicloud API (a separate process: bearer-token auth, the project scope, ``extra_label`` enforcement, the answer
   filter) against the same query sent directly to the TSDB in the same run (the API must keep >= 0.8 of direct).
   Like with like: the same aiohttp client with one keep-alive session per side, the same ``-c`` closed loops, both
   sides warmed up (``--warmup``), then ``--rounds`` alternating runs per side (direct, API, API, direct, ...) so a
   change in the machine's background load falls on both alike. Each process's CPU per answered request (the TSDB,
   the API, this client) is reported too: on a machine whose cores are all busy (two cores, three processes) the
   rate ratio follows the ratio of the three processes' CPU per request, which load does not inflate.
3. **Storage**: bytes on disk per series per day, from a day of 10 s samples imported into a fresh VictoriaMetrics
   and merged.

Usage::

    .venv/bin/python bench/metrics_bench.py              # ~2 min: 100 instances, 50 intervals, a day of 200 series
    .venv/bin/python bench/metrics_bench.py --quick      # ~10 s: small counts (tests/integration/test_bench_quick.py)
    .venv/bin/python bench/metrics_bench.py --json out.json

Exit 0 when every scenario ran cleanly (a missed target prints MISS), 1 when a scenario had errors (a non-200 answer
or a transport error), 2 when the bench could not run (no ``victoria-metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INTERVAL = 10.0  # the scrape interval the targets are stated for
SCRAPES_PER_INTERVAL = 3  # one per voting node's TSDB
CPU_TARGET = 0.02  # of one core per 100 instances
RATIO_TARGET = 0.8
DAY = 86400


# -- 1. collection -------------------------------------------------------------------------------------------------
class FakeStats:
    """libvirt's ``getAllDomainStats`` answer for ``count`` running domains (two disks, two NICs each), counters
    moving at every read, as ``LibvirtStats.read`` returns it."""

    def __init__(self, count: int) -> None:
        self.uuids = [f"00000000-0000-4000-8000-{i:012x}" for i in range(count)]
        self.reads = 0

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        self.reads += 1
        k = self.reads
        out = []
        for i, uuid in enumerate(self.uuids):
            s: dict[str, Any] = {
                "state.state": 1,
                "cpu.time": (k * 10 + i) * 10**9,
                "vcpu.current": 2,
                "balloon.current": 2 << 20,
                "balloon.available": 2 << 20,
                "balloon.unused": 1 << 20,
                "balloon.rss": 1 << 20,
                "block.count": 2,
                "net.count": 2,
            }
            for d in range(2):
                s.update({f"block.{d}.name": f"vd{'ab'[d]}", f"block.{d}.rd.bytes": k * 4096 * (i + 1),
                          f"block.{d}.wr.bytes": k * 8192, f"block.{d}.rd.reqs": k, f"block.{d}.wr.reqs": 2 * k})  # fmt: skip
                s.update({f"net.{d}.name": f"tap{i}n{d}", f"net.{d}.rx.bytes": k * 1500, f"net.{d}.tx.bytes": k * 900,
                          f"net.{d}.rx.pkts": k, f"net.{d}.tx.pkts": k, f"net.{d}.rx.drop": 0, f"net.{d}.tx.drop": 0})  # fmt: skip
            out.append((uuid, s))
        return out

    def close(self) -> None:
        pass


async def collection(instances: int, intervals: int, idle_seconds: float) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from agent.metrics import InstanceLabels, NodeMetrics

    # idle: the same process, its event loop running and doing nothing, for idle_seconds
    c0, w0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(idle_seconds)
    idle_cpu = (time.process_time() - c0) / (time.perf_counter() - w0) * INTERVAL  # CPU s per 10 s interval

    async def cost(count: int) -> tuple[float, list[float], int]:
        registry = CollectorRegistry(auto_describe=False)
        stats = FakeStats(count)
        labels = {
            u: InstanceLabels(instance_id=f"i-{n:04d}", name=f"vm{n}", project="default", project_id="prj-default")
            for n, u in enumerate(stats.uuids)
        }

        async def instance_labels() -> dict[str, InstanceLabels]:
            return labels

        m = NodeMetrics(registry, "bench", stats=stats if count else None, instances=instance_labels)
        renders: list[float] = []
        size = 0
        await m.refresh()  # warm-up
        generate_latest(registry)
        start = time.process_time()
        for _ in range(intervals):
            await m.refresh()
            for _ in range(SCRAPES_PER_INTERVAL):
                t = time.perf_counter()
                body = generate_latest(registry)
                renders.append(time.perf_counter() - t)
                size = len(body)
        spent = (time.process_time() - start) / intervals
        m.close()
        return spent, renders, size

    node_only, _, node_size = await cost(0)
    with_instances, renders, size = await cost(instances)
    per_100 = (with_instances - node_only) * 100 / max(1, instances)
    return {
        "instances": instances,
        "intervals": intervals,
        "idle_cpu_s_per_interval": idle_cpu,
        "node_only_cpu_s_per_interval": node_only,
        "with_instances_cpu_s_per_interval": with_instances,
        "per_100_instances_cpu_s_per_interval": per_100,
        "per_100_instances_core_share": per_100 / INTERVAL,
        "total_core_share": with_instances / INTERVAL,
        "render_p50_ms": _pct(renders, 50) * 1000,
        "render_p99_ms": _pct(renders, 99) * 1000,
        "scrape_bytes": size,
        "scrape_bytes_node_only": node_size,
    }


# -- the TSDB ------------------------------------------------------------------------------------------------------
class Victoria:
    def __init__(self, base: Path) -> None:
        from agent.tsdb import TsdbConfig, _free_port

        self.config = TsdbConfig(data_dir=base / "tsdb", latency_offset=1.0)
        self.config.scrape_file.parent.mkdir(parents=True, exist_ok=True)
        self.config.scrape_file.write_text("scrape_configs: []\n")
        self.port = _free_port()
        self.password = secrets.token_urlsafe(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = ("minicloud", self.password)
        self.header = "Basic " + base64.b64encode(f"minicloud:{self.password}".encode()).decode()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "httpAuth_password": self.password}
        with open(self.config.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.config.command(self.port), stdout=log, stderr=log, env=env)

    def request(self, path: str, body: bytes | None = None, **params: str) -> bytes:
        import urllib.request

        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
        req.add_header("Authorization", self.header)
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.read()

    def wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.request("/health").strip() == b"OK":
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(self.config.log_file.read_text()[-2000:])
            time.sleep(0.05)
        raise RuntimeError("victoria-metrics did not start")

    def import_day(self, series: int, now: float) -> int:
        """A day of 10 s samples for ``series`` instance series (CPU counters and memory gauges); returns samples."""
        rng = random.Random(7)
        start = int((now - DAY) // INTERVAL * INTERVAL)
        stamps = [(start + k * int(INTERVAL)) * 1000 for k in range(int(DAY / INTERVAL))]
        total = 0
        batch: list[str] = []
        for i in range(series):
            labels = {"instance_id": f"i-{i // 2:04d}", "name": f"vm{i // 2}", "project": "default",
                      "project_id": "prj-default", "node": "bench", "job": "minicloud", "instance": "10.0.0.1:8443"}  # fmt: skip
            if i % 2 == 0:
                name, acc, values = "minicloud_instance_cpu_seconds_total", 0.0, []
                for _ in stamps:
                    acc += rng.uniform(0.5, 9.5)
                    values.append(round(acc, 3))
            else:
                name = "minicloud_instance_memory_unused_bytes"
                values = [float(rng.randrange(500, 900) << 20) for _ in stamps]
            batch.append(json.dumps({"metric": {"__name__": name, **labels}, "values": values, "timestamps": stamps}))
            total += len(values)
            if len(batch) >= 20:
                self.request("/api/v1/import", "\n".join(batch).encode())
                batch = []
        if batch:
            self.request("/api/v1/import", "\n".join(batch).encode())
        self.request("/internal/force_flush")
        return total

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.config.data_dir.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def storage_cost(vm: Victoria, series: int, now: float) -> dict[str, Any]:
    empty = vm.disk_bytes()
    samples = vm.import_day(series, now)
    for month in {time.strftime("%Y_%m", time.gmtime(t)) for t in (now - DAY, now)}:
        vm.request("/internal/force_merge", partition_prefix=month)
    # force_merge runs in the background: wait until the size settles (two equal readings)
    last, deadline = -1, time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        size = vm.disk_bytes()
        if size == last:
            break
        last = size
    used = vm.disk_bytes() - empty
    return {
        "series": series,
        "samples": samples,
        "bytes": used,
        "bytes_per_series_day": used / series,
        "bytes_per_sample": used / samples,
    }


# -- 2. queries ------------------------------------------------------------------------------------------------------
def serve_api(workdir: str, vm_url: str) -> None:
    """The API in its own process (``metrics_bench.py _serve DIR URL``; the TSDB password in $BENCH_VM_PASSWORD): the
    real application (auth, scope, enforcement) with its query service pointed at the bench's VictoriaMetrics."""
    import logging

    from aiohttp import web

    from agent.daemon import AccessLogger
    from agent.http_server import GuardedRunner
    from minicloud import config as cfgmod
    from minicloud import logs
    from minicloud.api.app import create_app
    from minicloud.api.metrics import QUERY
    from minicloud.observe.query import QueryService

    base = Path(workdir)
    (base / "minicloud.toml").write_text("")
    config = cfgmod.load(
        base / "minicloud.toml",
        env={},
        overrides={
            "agent.data_dir": str(base / "data"),
            "agent.socket": str(base / "api.sock"),
            "agent.listen": "127.0.0.1:0",
            "agent.node_name": "bench",
            "compute.driver": "fake",
            "api.rate_limit_rps": 1_000_000.0,
            "api.rate_limit_burst": 1_000_000,
        },
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        app = create_app(config)
        app[QUERY] = QueryService(vm_url, auth=("minicloud", os.environ["BENCH_VM_PASSWORD"]))
        # served as agent.daemon serves it: the same runner (slow-client deadlines) and, unless --no-access-log, the
        # access log line per request through the agent's logging (JSON on stdout and in its log file)
        access = os.environ.get("BENCH_ACCESS_LOG") == "1"
        if access:
            logs.setup(config.agent.log_level, file=base / "agent.log")
        runner = GuardedRunner(
            app,
            header_timeout=config.api.header_timeout,
            body_timeout=config.api.body_timeout,
            access_log_class=AccessLogger,
            access_log=logging.getLogger("aiohttp.access") if access else None,
            handle_signals=False,
        )
        await runner.setup()
        await web.UnixSite(runner, str(base / "api.sock")).start()
        (base / "ready").write_text(str(os.getpid()))
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used: per-request CPU does not depend on the machine's load the
    way latency does (on a loaded machine a request mostly waits for a core, and a proxy adds two such waits)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


class _Tally:
    """One side's closed-loop runs added up: answered requests' latencies, errors, seconds, each process's CPU."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.seconds = 0.0
        self.cpu = dict.fromkeys(pids, 0.0)

    def figures(self) -> dict[str, Any]:
        n = max(1, len(self.latencies))
        return {
            **{f"{name}_cpu_ms_per_request": spent * 1000 / n for name, spent in self.cpu.items()},
            "requests": len(self.latencies),
            "seconds": self.seconds,
            "rps": len(self.latencies) / self.seconds if self.seconds else 0.0,
            "p50_ms": _pct(self.latencies, 50) * 1000,
            "p99_ms": _pct(self.latencies, 99) * 1000,
            "errors": self.errors,
        }


async def _load(session: Any, url: str, params: dict[str, str], headers: dict[str, str], seconds: float,
                clients: int, tally: _Tally | None) -> None:  # fmt: skip
    """``clients`` closed loops for ``seconds`` over ``session`` (one keep-alive pool); counted into ``tally``
    (None: a warm-up, not counted)."""
    cpu0 = {name: _cpu(pid) for name, pid in tally.pids.items()} if tally is not None else {}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                async with session.get(url, params=params, headers=headers) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        errors.append(f"{resp.status} {body[:200]!r}")
                        continue
            except Exception as exc:
                errors.append(repr(exc))
                continue
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    if tally is not None:
        tally.seconds += time.perf_counter() - started
        tally.latencies += latencies
        tally.errors += errors
        for name, pid in tally.pids.items():
            tally.cpu[name] += _cpu(pid) - cpu0[name]


async def queries(vm: Victoria, api_sock: Path, api_pid: int, seconds: float, clients: int, now: float,
                  rounds: int, warmup: float) -> dict[str, Any]:  # fmt: skip
    """Per range: both sides warmed up, then ``rounds`` alternating runs of ``seconds / rounds`` each (direct, API,
    API, direct, ...), so a change in the machine's background load falls on both sides alike."""
    import aiohttp

    out: dict[str, Any] = {}
    conn = aiohttp.UnixConnector(path=str(api_sock))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.post("http://localhost/v1/apikeys", json={"name": "bench"}) as r:
            body = await r.json()
            if r.status != 201:
                raise RuntimeError(f"POST /v1/apikeys: {r.status} {body}")
        token = body.get("token") or body.get("secret")
    promql = 'rate(minicloud_instance_cpu_seconds_total{instance_id="i-0000"}[1m])'
    pids = {"tsdb": vm.proc.pid, "api": api_pid, "client": os.getpid()}
    for label, span in (("1 h", 3600), ("24 h", DAY)):
        start, end, step = now - span, now, max(15, span // 240)
        common = {"query": promql, "start": f"{start:.0f}", "end": f"{end:.0f}"}
        # Like with like: the same query, window, step, clients and closed loop on both sides, each over one pooled
        # keep-alive session of the same client; the TSDB's response cache as the API's query service uses it (no
        # nocache on either).
        direct_params = {**common, "step": f"{step}s", "extra_label": "project_id=prj-default"}
        api_params = {**common, "step": f"{step}s", "project": "default"}
        async with (
            aiohttp.ClientSession() as direct,
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(api_sock))) as api,
        ):
            sides = {
                "direct": (direct, vm.url + "/api/v1/query_range", direct_params, {"Authorization": vm.header}),
                "api": (api, "http://localhost/v1/metrics/query_range", api_params,
                        {"Authorization": f"Bearer {token}"}),
            }  # fmt: skip
            tallies = {side: _Tally(pids) for side in sides}
            for side in sides.values():
                await _load(*side, warmup, clients, None)
            for r in range(rounds):
                for name in ("direct", "api") if r % 2 == 0 else ("api", "direct"):
                    await _load(*sides[name], seconds / rounds, clients, tallies[name])
        d, a = tallies["direct"].figures(), tallies["api"].figures()
        out[label] = {"direct": d, "api": a, "ratio": a["rps"] / d["rps"] if d["rps"] else 0.0}
    return out


# -- output --------------------------------------------------------------------------------------------------------
def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(col: dict[str, Any], q: dict[str, Any], st: dict[str, Any], access_log: bool) -> int:
    print("== collection (agent CPU; 3 scrapes per interval; stand-in domain stats) ==")
    print(f"idle agent (event loop only)        {col['idle_cpu_s_per_interval'] * 1000:8.2f} ms CPU per 10 s")
    print(f"node only (psutil)                  {col['node_only_cpu_s_per_interval'] * 1000:8.2f} ms CPU per interval")
    print(f"node + {col['instances']:4} instances             "
          f"{col['with_instances_cpu_s_per_interval'] * 1000:8.2f} ms CPU per interval")  # fmt: skip
    share = col["per_100_instances_core_share"]
    print(
        f"per 100 instances at 10 s            {share * 100:8.3f} % of one core   target < 2 %   {_mark(share < CPU_TARGET)}"
    )
    print(
        f"ratio (node + instances) / idle      {col['with_instances_cpu_s_per_interval'] / max(col['idle_cpu_s_per_interval'], 1e-9):8.1f} x"
    )
    print(f"scrape render p50 / p99              {col['render_p50_ms']:8.2f} / {col['render_p99_ms']:.2f} ms "
          f"({col['scrape_bytes']} bytes with {col['instances']} instances)")  # fmt: skip
    print()
    print("== query latency: one instance's CPU rate, closed loop ==")
    print(f"(the API served as the agent serves it, its access log {'on' if access_log else 'off (--no-access-log)'})")
    print("(CPU ms/req: each process's CPU per answered request, which the machine's load does not inflate;")
    print(" client: this bench's own aiohttp client, the same on both sides)")
    print(f"{'range':6} {'path':7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'requests':>8} "
          f"{'TSDB CPU':>9} {'API CPU':>8} {'client CPU':>10}")  # fmt: skip
    errors = 0
    for label, row in q.items():
        for path in ("direct", "api"):
            r = row[path]
            errors += len(r["errors"])
            print(f"{label:6} {path:7} {r['rps']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {len(r['errors']):6} "
                  f"{r['requests']:8} {r['tsdb_cpu_ms_per_request']:9.3f} {r['api_cpu_ms_per_request']:8.3f} "
                  f"{r['client_cpu_ms_per_request']:10.3f}")  # fmt: skip
        print(
            f"{label:6} ratio api/direct {row['ratio']:.2f}   target >= {RATIO_TARGET}   {_mark(row['ratio'] >= RATIO_TARGET)}"
        )
        cpu = {p: sum(row[p][f"{n}_cpu_ms_per_request"] for n in ("tsdb", "api", "client")) for p in ("direct", "api")}
        print(f"{label:6} CPU of all three processes per request: direct {cpu['direct']:.3f} ms, api {cpu['api']:.3f} ms"
              f" (ratio {cpu['direct'] / max(cpu['api'], 1e-9):.2f}: where every core is busy, req/s follow it)")  # fmt: skip
    print()
    print("== storage (VictoriaMetrics, a day of 10 s samples, merged) ==")
    print(f"{st['series']} series, {st['samples']} samples: {st['bytes']} bytes on disk")
    print(f"per series per day                   {st['bytes_per_series_day'] / 1024:8.1f} KiB "
          f"({st['bytes_per_sample']:.2f} bytes per sample)")  # fmt: skip
    samples = [e for row in q.values() for path in ("direct", "api") for e in row[path]["errors"]][:5]
    if samples:
        print("\nerrors:")
        for e in samples:
            print(f"  {e}")
    return 1 if errors else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "_serve":
        if os.environ.get("BENCH_API_PROFILE"):  # where the API's time goes: cProfile stats written at its exit
            import cProfile

            # BENCH_API_PROFILE_CPU=1: CPU time (on a loaded machine wall time mostly counts waiting for a core)
            timer = time.process_time if os.environ.get("BENCH_API_PROFILE_CPU") else time.perf_counter
            with cProfile.Profile(timer) as prof:
                serve_api(argv[1], argv[2])
            prof.dump_stats(os.environ["BENCH_API_PROFILE"])
        else:
            serve_api(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (seconds)")
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--intervals", type=int, default=50)
    ap.add_argument("--series", type=int, default=200, help="series for the storage figure (a day each)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per query scenario and side (split into --rounds)")
    ap.add_argument("-c", "--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="alternating direct/API runs per query scenario")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds each side runs, uncounted, first")
    ap.add_argument("--no-access-log", action="store_true",
                    help="the API without its access log (agent.access_log = false); default: as the agent serves it")  # fmt: skip
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if args.quick:
        args.intervals, args.series, args.seconds, args.clients, args.rounds, args.warmup = 5, 10, 0.5, 2, 2, 0.1
    if shutil.which("victoria-metrics") is None:
        print("bench failed: victoria-metrics is not installed (Debian package victoria-metrics)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="metrics-bench-", dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else None))
    vm = Victoria(work / "vm")
    api: subprocess.Popen[bytes] | None = None
    try:
        vm.wait()
        col = asyncio.run(collection(args.instances, args.intervals, 1.0 if args.quick else 5.0))
        now = time.time()
        st = storage_cost(vm, args.series, now)
        api_dir = work / "api"
        api_dir.mkdir()
        env = {**os.environ, "BENCH_VM_PASSWORD": vm.password, "BENCH_ACCESS_LOG": "0" if args.no_access_log else "1"}
        with open(work / "api.stderr", "wb") as err:
            api = subprocess.Popen([sys.executable, __file__, "_serve", str(api_dir), vm.url], env=env,
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while not (api_dir / "ready").exists():
            if api.poll() is not None or time.monotonic() > deadline:
                print("bench failed: the API did not start:\n" + (work / "api.stderr").read_text()[-3000:],
                      file=sys.stderr)  # fmt: skip
                return 2
            time.sleep(0.05)
        q = asyncio.run(queries(vm, api_dir / "api.sock", api.pid, args.seconds, args.clients, now,
                                max(1, args.rounds), args.warmup))  # fmt: skip
        status = report(col, q, st, not args.no_access_log)
        if args.json:
            for row in q.values():
                for path in ("direct", "api"):
                    row[path]["errors"] = row[path]["errors"][:5]
            Path(args.json).write_text(json.dumps({"collection": col, "queries": q, "storage": st}, indent=2))
        return status
    finally:
        if api is not None and api.poll() is None:
            api.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                api.wait(15)
        vm.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
