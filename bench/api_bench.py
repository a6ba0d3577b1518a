"""API throughput/latency bench: the real agent against a bare aiohttp floor, on the Unix socket and on HTTPS.

Usage::

    .venv/bin/python bench/api_bench.py [--seconds 5] [--warmup 1] [--concurrency 16] [--json FILE]
    .venv/bin/python bench/api_bench.py --quick      # a few seconds: does every scenario still work?

It starts, in a temporary directory:

* the real agent (``python -m minicloud agent``) as a subprocess, HTTPS on 127.0.0.1:<free port>;
* a "floor" server: a separate subprocess running a bare aiohttp app (one handler returning a small JSON body,
  like ``/v1/node``), on its own Unix socket and HTTPS port, with the agent's own server certificate and key so
  the TLS cost is the same.

One closed-loop load generator (this process, ``--concurrency`` aiohttp clients sharing a keep-alive connector)
drives every scenario the same way, so the floor and minicloud figures are comparable: after ``--warmup`` seconds
unrecorded it records each request's latency for ``--seconds``. Scenarios, on each transport: floor GET,
``GET /v1/node``, ``GET /v1/keypairs/{name}`` and ``POST /v1/keypairs`` (durable creates). Non-2xx responses and
transport errors are counted as errors and shown. Server and generator CPU use (% of one core) are reported so a
client-bound run can be recognised: if the generator sits near 100 %, the figures (and the ratio) are a lower
bound on what the server can do.

The agent runs with the per-principal HTTPS rate limit raised (:data:`AGENT_CONFIG`): with the default (200 req/s)
the HTTPS rows would measure the limiter's 429s, not the API.

Targets (from the issue) are printed next to the figures as PASS/MISS; a missed target does not change the exit
status (it is a benchmark, not a test). The exit status is 1 when a scenario had errors (non-2xx replies or transport
errors: the bench did not measure what it says) and 0 otherwise.
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
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

TARGET_READ_RPS = 2000.0
TARGET_CREATE_RPS = 500.0
TARGET_P99_MS = 20.0
TARGET_FLOOR_RATIO = 0.5

START_TIMEOUT_S = 30.0

# The agent's config: no guests, and a per-principal rate limit no bench reaches (the default, 200 req/s with a burst
# of 400, would turn the HTTPS rows into a measurement of the limiter's 429s). The socket is not limited anyway.
AGENT_CONFIG = """\
[compute]
driver = "none"

[api]
rate_limit_rps = 1000000.0
rate_limit_burst = 1000000
"""
STOP_TIMEOUT_S = 10.0

# The floor's reply: shaped and sized like GET /v1/node (~650 bytes of JSON).
FLOOR_DOC: dict[str, Any] = {
    "name": "bench-node",
    "hostname": "bench-node",
    "kernel": "6.1.0-00-amd64",
    "os": "Debian GNU/Linux 12 (bookworm)",
    "arch": "x86_64",
    "cpu_count": 2,
    "cpu_model": "Generic x86-64 processor",
    "memory_total_bytes": 25276502016,
    "memory_available_bytes": 24837316608,
    "load_average": [0.22, 0.1, 0.05],
    "boot_time": "2026-01-01T00:00:00Z",
    "disks": [
        {
            "mountpoint": "/",
            "device": "/dev/vda",
            "fstype": "ext4",
            "total_bytes": 270553174016,
            "free_bytes": 84924264448,
        }
    ],
    "virtualization": {
        "kvm_device": True,
        "hardware_virt": True,
        "virt_type": "kvm",
        "reason": "padding so that the body is about as large as the real node facts document (about 650 bytes)",
    },
    "version": "0.0.0",
}


# --------------------------------------------------------------------------------------------------------------
# The floor server (runs in its own process: `api_bench.py _floor DIR CERT KEY`)
# --------------------------------------------------------------------------------------------------------------


def run_floor(state_dir: str, cert: str, key: str) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(FLOOR_DOC)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        # Same TLS settings as the agent's listener (agent/daemon.py: server_ssl_context).
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        sock_path = os.path.join(state_dir, "floor.sock")
        await web.UnixSite(runner, sock_path).start()
        tcp = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await tcp.start()
        port = tcp._server.sockets[0].getsockname()[1] if tcp._server else 0
        ready = Path(state_dir, "floor.json")
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "socket": sock_path, "https": f"127.0.0.1:{port}"}))
        os.replace(tmp, ready)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------------------------
# Process management
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr_tail(self, n: int = 30) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def spawn(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Child:
    err = workdir / f"{name}.stderr"
    with open(err, "wb") as fh:
        # Own session: a Ctrl-C in the terminal reaches only the bench, which then stops the children itself.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh, env=env, start_new_session=True
        )
    return Child(name, proc, err)


def wait_ready(child: Child, state_file: Path) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(
                f"{child.name} exited with status {child.proc.returncode} before it was ready:\n{child.stderr_tail()}"
            )
        with contextlib.suppress(OSError, ValueError):
            return json.loads(state_file.read_text())
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} not ready after {START_TIMEOUT_S:.0f} s:\n{child.stderr_tail()}")


def stop_children(children: list[Child]) -> None:
    for c in children:
        if c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(
                f"{c.name} (pid {c.proc.pid}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killing it", file=sys.stderr
            )
            with contextlib.suppress(ProcessLookupError):
                c.proc.kill()
            c.proc.wait()


# --------------------------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """Where a server listens, on both transports."""

    socket: str
    https: str  # host:port
    pid: int


@dataclass
class Scenario:
    server: str  # "floor" or "minicloud"
    kind: str  # "read" or "create"
    label: str
    method: str
    path: str


@dataclass
class Result:
    transport: str
    server: str
    kind: str
    scenario: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    body_bytes: int
    server_cpu_pct: float
    generator_cpu_pct: float
    error_statuses: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def make_session(transport: str, target: Target, concurrency: int, ssl_ctx: ssl.SSLContext) -> tuple[Any, str]:
    connector: aiohttp.BaseConnector
    if transport == "unix":
        connector = aiohttp.UnixConnector(path=target.socket, limit=concurrency)
        base = "http://localhost"
    else:
        connector = aiohttp.TCPConnector(ssl=ssl_ctx, limit=concurrency)
        base = f"https://{target.https}"
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)), base


async def run_scenario(
    transport: str,
    scenario: Scenario,
    target: Target,
    *,
    headers: dict[str, str],
    public_key: str,
    ssl_ctx: ssl.SSLContext,
    concurrency: int,
    warmup: float,
    seconds: float,
) -> Result:
    session, base = make_session(transport, target, concurrency, ssl_ctx)
    url = base + scenario.path
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    samples: list[str] = []
    body_bytes = 0
    server_proc = psutil.Process(target.pid)
    me = psutil.Process()
    clock = time.perf_counter
    t_begin = clock()
    t_measure = t_begin + warmup
    t_end = t_measure + seconds
    cpu_marks: dict[str, float] = {}

    def note_error(what: str, detail: str) -> None:
        statuses[what] += 1
        if len(samples) < 5 and detail not in samples:
            samples.append(detail)

    async def marker() -> None:
        # CPU use is sampled over the measured window only.
        await asyncio.sleep(max(0.0, t_measure - clock()))
        cpu_marks["srv0"], cpu_marks["gen0"] = cpu_seconds(server_proc), cpu_seconds(me)
        await asyncio.sleep(max(0.0, t_end - clock()))
        cpu_marks["srv1"], cpu_marks["gen1"] = cpu_seconds(server_proc), cpu_seconds(me)
        cpu_marks["t"] = clock()

    async def worker(wid: int) -> None:
        nonlocal body_bytes
        i = 0
        while True:
            t0 = clock()
            if t0 >= t_end:
                return
            i += 1
            kwargs: dict[str, Any] = {"headers": headers}
            if scenario.kind == "create":
                kwargs["json"] = {"name": f"b{transport[0]}{wid}-{i}", "public_key": public_key}
            try:
                async with session.request(scenario.method, url, **kwargs) as resp:
                    body = await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if t0 >= t_measure:
                    note_error(type(exc).__name__, f"{type(exc).__name__}: {exc}")
                continue
            t1 = clock()
            if t0 < t_measure:
                continue
            if 200 <= status < 300:
                latencies.append(t1 - t0)
                body_bytes = len(body)
            else:
                note_error(str(status), f"{status}: {body[:300].decode(errors='replace')}")

    try:
        await asyncio.gather(marker(), *(worker(w) for w in range(concurrency)))
        t_done = clock()
    finally:
        await session.close()

    elapsed = t_done - t_measure
    window = max(1e-9, cpu_marks["t"] - t_measure)
    latencies.sort()
    errors = sum(statuses.values())
    return Result(
        transport=transport,
        server=scenario.server,
        kind=scenario.kind,
        scenario=scenario.label,
        requests=len(latencies),
        errors=errors,
        seconds=round(elapsed, 3),
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=(latencies[-1] * 1000) if latencies else math.nan,
        body_bytes=body_bytes,
        server_cpu_pct=100 * (cpu_marks["srv1"] - cpu_marks["srv0"]) / window,
        generator_cpu_pct=100 * (cpu_marks["gen1"] - cpu_marks["gen0"]) / window,
        error_statuses=dict(statuses),
        error_samples=samples,
    )


async def create_setup(agent: Target) -> tuple[str, str]:
    """Create an API key (over the trusted socket) and the keypair the read scenario fetches."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public_key = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=agent.socket)) as s:
        async with s.post("http://localhost/v1/apikeys", json={"name": "bench"}) as r:
            body = await r.text()
            if r.status != 201:
                raise RuntimeError(f"POST /v1/apikeys: {r.status} {body}")
            secret = json.loads(body)["secret"]
        async with s.post("http://localhost/v1/keypairs", json={"name": "bench-read", "public_key": public_key}) as r:
            if r.status != 201:
                raise RuntimeError(f"POST /v1/keypairs: {r.status} {await r.text()}")
    return secret, public_key


async def bench(
    agent: Target, floor: Target, ca_file: Path, args: argparse.Namespace, transports: list[str]
) -> list[Result]:
    secret, public_key = await create_setup(agent)
    ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
    ssl_ctx.check_hostname = False
    scenarios = [
        Scenario("floor", "read", "floor GET (bare aiohttp)", "GET", "/"),
        Scenario("minicloud", "read", "GET /v1/node", "GET", "/v1/node"),
        Scenario("minicloud", "read", "GET /v1/keypairs/{name}", "GET", "/v1/keypairs/bench-read"),
        Scenario("minicloud", "create", "POST /v1/keypairs", "POST", "/v1/keypairs"),
    ]
    results: list[Result] = []
    for transport in transports:
        # The socket is trusted (no token); HTTPS needs the bearer token. The floor gets the same header so the
        # request bytes are the same size; it ignores it.
        headers = {"Authorization": f"Bearer {secret}"} if transport == "https" else {}
        for sc in scenarios:
            print(f"  {transport:5} {sc.label} ...", end="", flush=True, file=sys.stderr)
            r = await run_scenario(
                transport,
                sc,
                floor if sc.server == "floor" else agent,
                headers=headers,
                public_key=public_key,
                ssl_ctx=ssl_ctx,
                concurrency=args.concurrency,
                warmup=args.warmup,
                seconds=args.seconds,
            )
            print(f" {r.rps:.0f} req/s", file=sys.stderr)
            results.append(r)
    return results


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def evaluate(results: list[Result]) -> dict[str, dict[str, float]]:
    """Fill in each result's checks; return the read/floor ratios per transport."""
    ratios: dict[str, dict[str, float]] = {}
    for transport in dict.fromkeys(r.transport for r in results):
        rows = [r for r in results if r.transport == transport]
        floor = next((r for r in rows if r.server == "floor"), None)
        ratios[transport] = {}
        for r in rows:
            if r.server == "floor":
                continue
            if r.kind == "read":
                r.checks[f"rps>={TARGET_READ_RPS:.0f}"] = r.rps >= TARGET_READ_RPS
            else:
                r.checks[f"rps>={TARGET_CREATE_RPS:.0f}"] = r.rps >= TARGET_CREATE_RPS
            r.checks[f"p99<{TARGET_P99_MS:.0f}ms"] = r.p99_ms < TARGET_P99_MS
            if r.kind == "read" and floor is not None and floor.rps > 0:
                ratio = r.rps / floor.rps
                ratios[transport][r.scenario] = ratio
                r.checks[f"floor>={TARGET_FLOOR_RATIO}"] = ratio >= TARGET_FLOOR_RATIO
            if r.errors:
                r.checks["no errors"] = False
    return ratios


def print_report(results: list[Result], ratios: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print()
    print(
        f"minicloud API bench: {args.concurrency} closed-loop clients, {args.warmup:g} s warm-up + "
        f"{args.seconds:g} s per scenario, one generator process; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
    )
    print("cpu = % of one core during the measured window (srv: the server process; gen: this load generator)")
    print()
    head = (
        f"{'transport':9} {'scenario':26} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'errors':>6} {'bytes':>5} {'srv cpu':>7} {'gen cpu':>7}  targets"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        checks = ", ".join(f"{k} {mark(v)}" for k, v in r.checks.items()) if r.checks else "(floor)"
        print(
            f"{r.transport:9} {r.scenario:26} {r.rps:8.0f} {r.p50_ms:7.2f} {r.p99_ms:7.2f} {r.max_ms:7.2f} "
            f"{r.errors:6d} {r.body_bytes:5d} {r.server_cpu_pct:6.0f}% {r.generator_cpu_pct:6.0f}%  {checks}"
        )
    print()
    print(f"read throughput relative to the bare aiohttp floor (target >= {TARGET_FLOOR_RATIO}):")
    for transport, by_scenario in ratios.items():
        for scenario, ratio in by_scenario.items():
            print(f"  {transport:5} {scenario:26} {ratio:5.2f}x  {mark(ratio >= TARGET_FLOOR_RATIO)}")
    if any(r.generator_cpu_pct >= 90 for r in results):
        print()
        print(
            "note: the load generator used >= 90 % of a core in some scenarios; those figures (the floor especially)"
            " are bounded by the client, so the floor ratio overstates minicloud's relative speed there."
        )
    errored = [r for r in results if r.errors]
    if errored:
        print()
        print("errors:")
        for r in errored:
            print(f"  {r.transport} {r.scenario}: {r.error_statuses}")
            for s in r.error_samples:
                print(f"    {s}")


def json_clean(v: Any, digits: int = 3) -> Any:
    """``v`` ready for JSON: floats rounded to ``digits``, NaN as null, through dicts and lists."""
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, digits)
    if isinstance(v, dict):
        return {k: json_clean(x, digits) for k, x in v.items()}
    if isinstance(v, list):
        return [json_clean(x, digits) for x in v]
    return v


def failed_exit_status(results: list[Any]) -> int:
    """1 (and a line on stderr) when a scenario had errors: its figures are not those of what it says it measures."""
    errored = [f"{r.transport} {r.scenario}" for r in results if r.errors]
    if errored:
        print(f"\nbench failed: errors in {len(errored)} scenario(s): {'; '.join(errored)}", file=sys.stderr)
        return 1
    return 0


def write_json(path: str, results: list[Result], ratios: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    clean = json_clean

    doc = {
        "config": {
            "concurrency": args.concurrency,
            "warmup_s": args.warmup,
            "seconds": args.seconds,
            "transports": args.transport,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "platform": platform.platform(),
        },
        "targets": {
            "read_rps": TARGET_READ_RPS,
            "create_rps": TARGET_CREATE_RPS,
            "p99_ms": TARGET_P99_MS,
            "floor_ratio": TARGET_FLOOR_RATIO,
        },
        "results": [clean(asdict(r)) for r in results],
        "floor_ratios": clean(ratios),
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def timing_args(p: argparse.ArgumentParser, argv: list[str], quick_help: str) -> bool:
    """``--quick``, ``--seconds`` and ``--warmup``, shared by the benches; returns whether ``--quick`` was given
    (its defaults apply unless a flag is given explicitly)."""
    quick = "--quick" in argv
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument(
        "--seconds", type=float, default=0.5 if quick else 5.0, help="measured seconds per scenario (default 5)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.2 if quick else 1.0,
        help="unrecorded warm-up seconds per scenario (default 1)",
    )
    return quick


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = timing_args(
        p, argv, "a few seconds in all (0.5 s per scenario, 0.2 s warm-up, 4 clients unless given): does it still work?"
    )
    p.add_argument("--concurrency", "-c", type=int, default=4 if quick else 16, help="closed-loop clients (default 16)")
    p.add_argument("--transport", choices=["unix", "https", "both"], default="both", help="which listener(s) to bench")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (agent logs) afterwards")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1:
        p.error("--seconds must be > 0, --warmup >= 0 and --concurrency >= 1")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_floor"]:
        run_floor(*argv[1:4])
        return 0
    args = parse_args(argv)
    transports = ["unix", "https"] if args.transport == "both" else [args.transport]
    workdir = Path(tempfile.mkdtemp(prefix="minicloud-bench-"))
    children: list[Child] = []
    try:
        data = workdir / "agent"
        data.mkdir()
        config = workdir / "minicloud.toml"
        config.write_text(AGENT_CONFIG)  # also keeps /etc/minicloud out of it
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINICLOUD_")}
        env["MINICLOUD_LOG_LEVEL"] = "warning"
        print(f"starting the agent and the floor server in {workdir} ...", file=sys.stderr)
        agent_child = spawn(
            "agent",
            [
                sys.executable,
                "-m",
                "minicloud",
                "--socket",
                str(data / "s.sock"),
                "agent",
                "--config",
                str(config),
                "--data-dir",
                str(data),
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "warning",
            ],
            env,
            workdir,
        )
        children.append(agent_child)
        state = wait_ready(agent_child, data / "agent.json")
        agent = Target(socket=state["socket"], https=state["https"], pid=int(state["pid"]))
        pki = data / "pki"
        floor_child = spawn(
            "floor",
            [
                sys.executable,
                os.path.abspath(__file__),
                "_floor",
                str(workdir),
                str(pki / "server.crt"),
                str(pki / "server.key"),
            ],
            env,
            workdir,
        )
        children.append(floor_child)
        fstate = wait_ready(floor_child, workdir / "floor.json")
        floor = Target(socket=fstate["socket"], https=fstate["https"], pid=int(fstate["pid"]))

        results = asyncio.run(bench(agent, floor, pki / "ca.crt", args, transports))
        ratios = evaluate(results)
        print_report(results, ratios, args)
        if args.json:
            write_json(args.json, results, ratios, args)
            print(f"\nwrote {args.json}")
        if any(r.errors for r in results) and agent_child.stderr_tail():
            print("\nagent stderr (tail):\n" + agent_child.stderr_tail())
        return failed_exit_status(results)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        stop_children(children)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
