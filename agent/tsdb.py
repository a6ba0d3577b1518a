"""The node's time-series database: VictoriaMetrics (Debian's ``victoria-metrics``), run and supervised by the agent.

Why VictoriaMetrics rather than Prometheus (both are in Debian): one static binary and one process that stores,
scrapes (``-promscrape.config``, Prometheus' own scrape format) and answers PromQL (MetricsQL, a superset); ~24 MiB
idle; and ``extra_label`` enforces a label on every selector of a query server-side, which is exactly the project
scoping the query API needs (Prometheus needs prom-label-proxy in front for that, which Debian does not ship).

Why it **scrapes** rather than agents pushing: the agents already serve ``/metrics`` for users' own Prometheus, so
the TSDB reads the same endpoint with the same token; scraping records ``up`` and ``scrape_duration_seconds`` per
target, so a dead agent shows as ``up == 0`` instead of silence; and each voting node's TSDB scraping every agent is
the redundancy the design asks for (losing a node loses no history) with no fan-out code in the agent.

Exposure: the HTTP listener is bound to ``127.0.0.1`` only and needs HTTP basic auth with a password made at each
start and handed over in the environment (``-envflag.enable``), never on the command line, which every local user can
read in ``/proc``. The agent's query service is its only client.

Supervision is like etcd's (``agent/etcd.py``): a pid file next to the data, an orphan left by a SIGKILLed agent is
killed and replaced (and the process asks the kernel for SIGTERM when the agent dies, so orphans are rare), and :class:`TsdbSupervisor` restarts a process that exits (with backoff) and rewrites the scrape
configuration when the set of agents changes (VictoriaMetrics re-reads it on SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp
import yaml

from agent.process import kill_orphan, terminate
from minicloud.observe.query import basic_auth

log = logging.getLogger("minicloud.tsdb")
TSDB_BINARY = "victoria-metrics"
USERNAME = "minicloud"


@dataclass
class TsdbConfig:
    data_dir: Path  # DATA_DIR/metrics/tsdb; the pid file, scrape config and log live beside it
    #: 0: a free loopback port, chosen at each (re)start.
    port: int = 0
    retention_days: int = 15
    scrape_interval: float = 10.0
    #: Samples newer than this are not yet visible to instant queries (VictoriaMetrics' default, 30 s, hides two
    #: scrapes; one interval is enough for one TSDB).
    latency_offset: float = 10.0
    #: Where scrapers read the bearer token for ``/metrics`` and the CA that signed every agent's certificate.
    token_file: Path | None = None
    ca_file: Path | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def base(self) -> Path:
        return self.data_dir.parent

    @property
    def scrape_file(self) -> Path:
        return self.base / "scrape.yml"

    @property
    def pid_file(self) -> Path:
        return self.base / "tsdb.pid"

    @property
    def log_file(self) -> Path:
        return self.base / "tsdb.log"

    def command(self, port: int) -> list[str]:
        return [
            shutil.which(TSDB_BINARY) or TSDB_BINARY,
            f"-storageDataPath={self.data_dir}",
            f"-httpListenAddr=127.0.0.1:{port}",
            f"-retentionPeriod={self.retention_days}d",
            f"-search.latencyOffset={self.latency_offset:g}s",
            f"-promscrape.config={self.scrape_file}",
            "-promscrape.suppressScrapeErrors",  # a node down is `up == 0`, not a log line every scrape
            "-envflag.enable",  # the password comes from the environment (httpAuth_password), not argv
            f"-httpAuth.username={USERNAME}",
            "-loggerLevel=WARN",
            *self.extra_args,
        ]

    def scrape_config(
        self, targets: list[str], ceph: list[str] | None = None, ca_path: Path | None = None
    ) -> dict[str, object]:
        """The ``-promscrape.config`` document: every agent's ``/metrics`` over HTTPS with the metrics token; and,
        where the cluster runs Ceph, each MGR's ``prometheus`` module (``ceph``: ``address:port`` of every MGR,
        plain HTTP on the cluster address it is bound to). Only the active MGR answers with figures: redirects are
        not followed, so a standby reads ``up == 0`` instead of duplicating the active's series."""
        job: dict[str, object] = {
            "job_name": "minicloud",
            "scheme": "https",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": sorted(set(targets))}],
        }
        if self.token_file is not None:
            job["bearer_token_file"] = str(self.token_file)
        if self.ca_file is not None:
            job["tls_config"] = {"ca_file": str(ca_path or self.ca_file)}
        jobs = [job]
        if ceph:
            jobs.append(
                {
                    "job_name": "ceph",
                    "scheme": "http",
                    "metrics_path": "/metrics",
                    "follow_redirects": False,
                    "honor_labels": True,
                    "static_configs": [{"targets": sorted(set(ceph))}],
                }
            )
        return {"global": {"scrape_interval": f"{self.scrape_interval:g}s"}, "scrape_configs": jobs}


class Tsdb:
    """One VictoriaMetrics process. ``start`` returns once it answers ``/health``."""

    def __init__(self, config: TsdbConfig) -> None:
        self.config = config
        self.password = secrets.token_urlsafe(24)
        self.proc: asyncio.subprocess.Process | None = None
        self.port = config.port
        self.spawned_with = ""  # credentials() when the running process started

    @property
    def url(self) -> str:
        """Where it listens now (the port may change at a restart when ``config.port`` is 0)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str]:
        return USERNAME, self.password

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def write_scrape_config(self, targets: list[str], ceph: list[str] | None = None) -> bool:
        """Write the scrape configuration (atomically); True when it changed. A running process re-reads it on
        SIGHUP (:meth:`reload`)."""
        ca_copy = self._ca_copy()
        text = yaml.safe_dump(self.config.scrape_config(targets, ceph, ca_copy), sort_keys=True)
        path = self.config.scrape_file
        with contextlib.suppress(OSError):
            if path.read_text() == text:
                return False
        _replace(path, text.encode())
        for stale in path.parent.glob("ca-*.crt"):  # copies the configuration no longer names
            if stale != ca_copy:
                stale.unlink(missing_ok=True)
        return True

    def _ca_copy(self) -> Path | None:
        """The agents' CA, copied beside the scrape configuration under a name of its content (``ca-<sha256>.crt``).
        VictoriaMetrics reads a ``ca_file`` when it loads the configuration, and a node that joins a cluster gets
        the cluster's CA in place of its own at the same path: named by content, a new CA is a new path, so a
        change of the configuration the supervisor writes and reloads. (With the path itself, the TSDB kept the
        old CA and could not verify its own agent's new certificate: up == 0 until a restart.) None without a CA
        file yet (the path is named as it is)."""
        if self.config.ca_file is None:
            return None
        try:
            data = self.config.ca_file.read_bytes()
        except OSError:
            return None
        copy = self.config.base / f"ca-{hashlib.sha256(data).hexdigest()[:16]}.crt"
        with contextlib.suppress(OSError):
            if copy.read_bytes() == data:
                return copy
        _replace(copy, data)
        return copy

    def credentials(self) -> str:
        """A digest of what the scrapes authenticate with: the agents' CA and the metrics token, as the files hold
        them now. :meth:`spawn` keeps the value it started with (``spawned_with``)."""
        digest = hashlib.sha256()
        for path in (self.config.ca_file, self.config.token_file):
            with contextlib.suppress(OSError):
                if path is not None:
                    digest.update(path.read_bytes())
            digest.update(b"\0")
        return digest.hexdigest()

    def reload(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

    def _kill_orphan(self) -> None:
        """An agent killed with SIGKILL leaves its TSDB running (own session); the next agent replaces it."""
        kill_orphan(self.config.pid_file, f"-storageDataPath={self.config.data_dir}")

    async def spawn(self) -> None:
        """Start the process without waiting for it. The scrape configuration must exist (an empty target list is
        fine)."""
        self._kill_orphan()
        self.config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.config.scrape_file.exists():
            self.write_scrape_config([])
        self.spawned_with = self.credentials()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "httpAuth_password": self.password}
        self.port = self.config.port or _free_port()
        logf = _open_log(self.config.log_file)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.config.command(self.port), stdout=logf, stderr=logf, stdin=asyncio.subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        finally:
            logf.close()
        self.config.pid_file.write_text(str(self.proc.pid))

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession(headers={"Authorization": basic_auth(*self.auth)}) as http:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(
                        f"victoria-metrics exited with {self.proc.returncode}; see {self.config.log_file}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"victoria-metrics did not answer in {timeout} s; see {self.config.log_file}")
                await asyncio.sleep(0.05)

    async def start(self, timeout: float = 30) -> None:
        await self.spawn()
        await self.wait_ready(timeout)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if not self.running:
            return
        assert self.proc is not None
        await terminate(self.proc, sig, timeout)
        with contextlib.suppress(OSError):
            self.config.pid_file.unlink()


class TsdbSupervisor:
    """Keeps the TSDB running and its targets current: every ``interval`` seconds it restarts a process that exited
    (waiting longer after each quick failure, up to a minute) and rewrites the scrape configuration from
    ``targets()`` (reloading the process when it changed). ``start`` does not wait for the TSDB to be ready: the agent
    serves without it, and the query API answers 503 until it is."""

    def __init__(
        self,
        tsdb: Tsdb,
        targets: Callable[[], Awaitable[list[str]]],
        *,
        interval: float = 10.0,
        ceph_targets: Callable[[], Awaitable[list[str]]] | None = None,
    ) -> None:
        self.tsdb = tsdb
        self.targets = targets
        self.ceph_targets = ceph_targets
        self.interval = interval
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._refresh_targets()
        try:
            await self.tsdb.spawn()
        except OSError as exc:  # the binary is missing: log it, keep trying (the package may be installed later)
            log.warning("time-series database not started", extra={"error": str(exc)})
        self._task = asyncio.create_task(self._loop(), name="tsdb-supervisor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.tsdb.stop()

    async def _refresh_targets(self) -> None:
        try:
            targets = await self.targets()
            ceph = await self.ceph_targets() if self.ceph_targets is not None else []
        except Exception:
            log.warning("listing scrape targets failed; keeping the last ones", exc_info=True)
            return
        changed = self.tsdb.write_scrape_config(targets, ceph)
        if changed:
            log.info("scrape targets", extra={"targets": targets, "ceph": ceph})
        if self.tsdb.running and self.tsdb.spawned_with != self.tsdb.credentials():
            # A node that joined a cluster: a new CA and a new token. After a reload (SIGHUP), the TSDB of a node
            # that joined kept failing to scrape its own agent, the one target it had before (up == 0; "x509:
            # certificate signed by unknown authority" on its targets page), in CI even once the configuration
            # named the new CA under a new path. A restart reads both afresh; it happens once per join.
            log.info("the agents' CA or the metrics token changed; restarting the time-series database")
            await self.tsdb.stop()
            try:
                await self.tsdb.spawn()
            except OSError as exc:  # the loop restarts it at its next pass
                log.warning("time-series database not started", extra={"error": str(exc)})
        elif changed:
            self.tsdb.reload()

    async def _loop(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.interval if failures == 0 else min(60.0, self.interval * 2**failures))
            await self._refresh_targets()
            if self.tsdb.running:
                failures = 0
                continue
            failures += 1
            code = self.tsdb.proc.returncode if self.tsdb.proc is not None else None
            log.warning(
                "time-series database is not running; restarting",
                extra={"exit_code": code, "log": str(self.tsdb.config.log_file), "failures": failures},
            )
            try:
                await self.tsdb.spawn()
                self.restarts += 1
            except OSError as exc:
                log.warning("time-series database not started", extra={"error": str(exc)})


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (a reader sees the old or the new file), making its directory (0700) if needed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _open_log(path: Path) -> BinaryIO:
    return open(path, "ab")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the agent dies, even by SIGKILL (PR_SET_PDEATHSIG), so no TSDB
    outlives its agent; the pid file covers the race where the agent died before this ran."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
