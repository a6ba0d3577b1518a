"""Running this node's etcd member: command line, mutual TLS from the node's certificates, start, health, stop.

The agent supervises one ``etcd`` process per voting (or learner) node. Both its client and its peer port require
certificates signed by the cluster CA (``--client-cert-auth``, ``--peer-client-cert-auth``), so only nodes of this
cluster can talk to it; the agent itself connects with its node certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import aiohttp

from agent.process import kill_orphan, terminate

ETCD_BINARY = "etcd"


@dataclass
class EtcdMemberConfig:
    name: str
    data_dir: Path
    client_url: str  # https://IP:PORT this member serves clients on
    peer_url: str  # https://IP:PORT this member talks to its peers on
    ca_file: Path
    cert_file: Path  # the node certificate (serverAuth + clientAuth), also used as the peer certificate
    key_file: Path
    initial_cluster: dict[str, str] = field(default_factory=dict)  # name -> peer URL, this member included
    initial_state: str = "new"  # "new" | "existing"
    log_file: Path | None = None
    #: Start as a one-member cluster from this member's data, dropping every other member (quorum-loss recovery).
    force_new_cluster: bool = False
    #: ``--quota-backend-bytes``: past it etcd raises NOSPACE and refuses writes (``cluster.etcd_quota_bytes``).
    quota_backend_bytes: int = 2 << 30
    #: Revisions of history etcd keeps (revision-mode auto-compaction; ``cluster.etcd_history_revisions``).
    history_revisions: int = 100_000

    def command(self) -> list[str]:
        cluster = self.initial_cluster or {self.name: self.peer_url}
        return [
            shutil.which(ETCD_BINARY) or ETCD_BINARY,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", ",".join(f"{n}={u}" for n, u in sorted(cluster.items())),
            "--initial-cluster-state", self.initial_state,
            "--initial-cluster-token", "minicloud",
            "--client-cert-auth", "--trusted-ca-file", str(self.ca_file),
            "--cert-file", str(self.cert_file), "--key-file", str(self.key_file),
            "--peer-client-cert-auth", "--peer-trusted-ca-file", str(self.ca_file),
            "--peer-cert-file", str(self.cert_file), "--peer-key-file", str(self.key_file),
            # Fast failure detection on a rack (the defaults suit WANs): 100 ms heartbeats, 1 s elections.
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            # `cluster enable` copies a whole single-node state in one transaction.
            "--max-txn-ops", "100000", "--max-request-bytes", str(64 * 1024 * 1024),
            # Growth: history is compacted to the last N revisions (etcd checks every 5 minutes), the file may grow to
            # the quota and no further (NOSPACE alarm; `cluster show` warns at 80 %), and the services leader
            # defragments members one at a time (minicloud/cluster/node.py, ``maintain_storage``).
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", str(self.history_revisions),
            "--quota-backend-bytes", str(self.quota_backend_bytes),
            "--logger", "zap", "--log-outputs", "stderr",
        ] + (["--force-new-cluster"] if self.force_new_cluster else [])  # fmt: skip


def client_ssl_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS for talking to etcd (and to other nodes): verify against the cluster CA, present the node certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False  # members are reached by IP; the cluster CA is the trust anchor
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


class EtcdMember:
    """One etcd process. ``start`` returns once it serves a health check over mutual TLS."""

    def __init__(self, config: EtcdMemberConfig) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 60) -> None:
        """Start etcd and wait until it answers health checks (needs a quorum)."""
        await self.spawn()
        await self.wait_healthy(timeout)

    @property
    def pid_file(self) -> Path:
        return self.config.data_dir.parent / "etcd.pid"

    def _kill_orphan(self) -> None:
        """An agent killed with SIGKILL leaves its etcd running; the next agent takes over by replacing it."""
        kill_orphan(self.pid_file, str(self.config.data_dir))

    async def spawn(self) -> None:
        """Start the etcd process without waiting for it (a member of an existing cluster that may lack quorum)."""
        self._kill_orphan()
        self.config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = _open_log(self.config.log_file)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.config.command(), stdout=log, stderr=log, start_new_session=True
            )
        finally:
            log.close()
        self.pid_file.write_text(str(self.proc.pid))

    async def wait_healthy(self, timeout: float = 60) -> None:
        ctx = client_ssl_context(self.config.ca_file, self.config.cert_file, self.config.key_file)
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.config.log_file}")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(
                        f"{self.config.client_url}/health", timeout=aiohttp.ClientTimeout(total=2)
                    ) as r:
                        if r.status == 200:
                            return
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"etcd did not become healthy in {timeout} s; see {self.config.log_file}")
                await asyncio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if not self.running:
            return
        assert self.proc is not None
        await terminate(self.proc, sig, timeout)

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)


def _open_log(path: Path | None) -> BinaryIO:
    return open(path or os.devnull, "ab")
