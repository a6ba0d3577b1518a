"""A real etcd member for tests, started with the same command line and mutual TLS the agent uses."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent.etcd import EtcdMemberConfig, client_ssl_context
from minicloud.pki import ensure_node_pki


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EtcdServer:
    config: EtcdMemberConfig
    proc: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return self.config.client_url

    def ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.config.ca_file, self.config.cert_file, self.config.key_file)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_etcd(root: Path, name: str = "test") -> EtcdServer:
    pki = ensure_node_pki(root / "pki-node", name)
    config = EtcdMemberConfig(
        name=name,
        data_dir=root / "etcd",
        client_url=f"https://127.0.0.1:{free_port()}",
        peer_url=f"https://127.0.0.1:{free_port()}",
        ca_file=pki.ca_cert,
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        log_file=root / "etcd.log",
    )
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(config.log_file, "ab") as log:  # type: ignore[arg-type]
        proc = subprocess.Popen(config.command(), stdout=log, stderr=log, start_new_session=True)
    server = EtcdServer(config, proc)
    ctx = server.ssl_context()
    host, port = config.client_url.removeprefix("https://").rsplit(":", 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited: {config.log_file.read_text()[-2000:]}")  # type: ignore[union-attr]
        try:
            conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise TimeoutError("etcd did not become healthy")
