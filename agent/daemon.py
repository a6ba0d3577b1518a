"""``minicloud agent``: serve the API on the Unix socket and on HTTPS until SIGTERM.

Start-up order: configuration → data directory, CA and certificates → store (migrations) → listeners → write
``<data_dir>/agent.json`` (pid, socket, HTTPS address, CA fingerprint; tests and scripts read it) → ``READY=1`` to
systemd. SIGTERM/SIGINT: ``STOPPING=1``, stop accepting, finish in-flight requests and queued writes, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from agent import systemd
from agent.http_server import GuardedRunner
from agent.node import attach_node_services
from minicloud.api.app import create_app
from minicloud.api.keys import PKI, STORE, TLS
from minicloud.config import Config

log = logging.getLogger("minicloud.agent")


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "ms": round(time * 1000, 2),
                "request_id": response.headers.get("X-Request-Id", ""),
            },
        )


def _write_state_file(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _prepare_socket_path(path: Path) -> Path:
    """Create the socket's directory and remove a stale socket left by a killed agent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return path


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Run the agent until ``stop`` is set. Raises on a start-up failure (port in use, bad socket path)."""
    app = attach_node_services(create_app(config))  # the API, then this node's drivers and reconcilers
    runner = GuardedRunner(
        app,
        # Slow clients: a request's headers and body must arrive within these bounds, or the connection is closed.
        header_timeout=config.api.header_timeout,
        body_timeout=config.api.body_timeout,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("aiohttp.access") if config.agent.access_log else None,
        handle_signals=False,
        shutdown_timeout=10,
    )
    await runner.setup()
    state_file = config.data_path / "agent.json"
    try:
        sock_path = _prepare_socket_path(Path(config.agent.socket))
        old_umask = os.umask(0o177)
        try:
            unix = web.UnixSite(runner, str(sock_path))
            await unix.start()
        finally:
            os.umask(old_umask)
        os.chmod(sock_path, 0o600)
        https_address = None
        if (addr := config.listen_address()) is not None:
            site = web.TCPSite(runner, addr[0], addr[1], ssl_context=app[TLS])
            await site.start()
            sockets = site._server.sockets if site._server else []  # the real port when 0 was asked for
            host, port = sockets[0].getsockname()[:2]
            https_address = f"{'[' + host + ']' if ':' in host else host}:{port}"
        _write_state_file(
            state_file,
            {
                "pid": os.getpid(),
                "socket": str(sock_path),
                "https": https_address,
                "ca_fingerprint": app[PKI].ca_fingerprint,
                "node": config.node_name,
            },
        )
        log.info(
            "minicloud agent ready",
            extra={"socket": str(sock_path), "https": https_address, "node": config.node_name},
        )
        systemd.notify("READY=1\nSTATUS=serving")
        store = app[STORE]
        watchdog = asyncio.create_task(systemd.watchdog_loop(lambda: store.alive, systemd.watchdog_interval()))
        await stop.wait()
        log.info("stopping")
        systemd.notify("STOPPING=1")
        watchdog.cancel()
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        log.info("stopped")


def run(config: Config) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(main())
