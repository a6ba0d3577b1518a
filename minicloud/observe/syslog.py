"""Forwarding a node's log lines to a syslog collector: RFC 5424 messages, octet-counted (RFC 6587 §3.4.1) over TCP
or TLS (RFC 5425), as rsyslog's ``imtcp``/``imptcp``, syslog-ng's ``syslog()`` source and Vector's ``syslog`` source
read them.

One message per line::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID [minicloud@32473 source="…" instance="…"] LINE

PRI is facility ``daemon`` (3) for services and ``user`` (1) for instance consoles, with a severity from the line's
level (info when it has none); HOSTNAME the node's name; APP-NAME the service (``agent``, ``etcd``, ``console`` …);
MSGID ``log``. 32473 is the private enterprise number RFC 5612 reserves for examples (minicloud has none of its own).
The forwarder follows the node's files from where they end when the agent starts (it sends no history), keeps at most
``logs.forward_queue`` lines while the collector is away (dropping the oldest, counted in the agent's log), and
reconnects with a growing wait (1 s doubling to 60 s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from pathlib import Path

from minicloud.observe.logs import Filter, Follower, LogLine

log = logging.getLogger("minicloud.logs")

_SEVERITY = {
    "emerg": 0,
    "panic": 0,
    "fatal": 1,
    "alert": 1,
    "crit": 2,
    "critical": 2,
    "error": 3,
    "err": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
PEN = 32473


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, ``-`` when empty."""
    clean = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return clean or "-"


def format_5424(line: LogLine) -> bytes:
    """One RFC 5424 message (without framing)."""
    facility = 1 if line.service == "console" else 3
    pri = facility * 8 + _SEVERITY.get(line.level.lower(), 6)
    params = [f'source="{_sd_escape(line.source)}"']
    if line.instance:
        params.append(f'instance="{_sd_escape(line.instance)}"')
    sd = f"[minicloud@{PEN} {' '.join(params)}]"
    head = f"<{pri}>1 {line.time} {_header_field(line.node, 255)} {_header_field(line.service, 48)} - log {sd} "
    # BOM: the message is UTF-8 (RFC 5424 §6.4)
    return head.encode() + b"\xef\xbb\xbf" + line.line.encode(errors="replace")


def frame(message: bytes) -> bytes:
    """Octet-counting framing: ``LEN SP MSG``."""
    return str(len(message)).encode() + b" " + message


def parse_target(target: str) -> tuple[str, str, int]:
    """``tcp://host:port`` / ``tls://host:port`` → ``(scheme, host, port)``."""
    scheme, _, rest = target.partition("://")
    host, _, port = rest.rpartition(":")
    return scheme, host.strip("[]"), int(port)


class Forwarder:
    """Follows this node's sources and sends every new line to the collector."""

    def __init__(
        self,
        target: str,
        *,
        data_path: Path,
        node: str,
        services: list[str],
        ca_file: str = "",
        queue: int = 100_000,
        interval: float = 1.0,
    ) -> None:
        self.scheme, self.host, self.port = parse_target(target)
        self.data_path = data_path
        self.node = node
        self.services = set(services) if services else None
        self.ca_file = ca_file
        self.queue: collections.deque[bytes] = collections.deque(maxlen=queue)
        self.interval = interval
        self.dropped = 0
        self.sent = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: Set once the follower has noted where the files end (what is written after it is sent).
        self.follower_ready = asyncio.Event()

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.scheme != "tls":
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="logs-forward")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def offer(self, lines: list[LogLine]) -> None:
        for line in lines:
            if len(self.queue) == self.queue.maxlen:
                self.dropped += 1
            self.queue.append(frame(format_5424(line)))
        if lines:
            self._wake.set()

    async def _follow(self) -> None:
        follower = await asyncio.to_thread(Follower, self.data_path, self.node, Filter(services=self.services))
        self.follower_ready.set()
        while True:
            try:
                self.offer(await asyncio.to_thread(follower.poll))
            except Exception:
                log.exception("reading the logs to forward failed; will retry")
            await asyncio.sleep(self.interval)

    async def _run(self) -> None:
        follow = asyncio.create_task(self._follow(), name="logs-forward-follow")
        wait = 1.0
        try:
            while True:
                try:
                    _, writer = await asyncio.open_connection(
                        self.host,
                        self.port,
                        ssl=self.ssl_context(),
                        server_hostname=self.host if self.scheme == "tls" else None,
                    )
                except (OSError, ssl.SSLError) as exc:
                    log.warning(
                        "cannot reach the log collector; will retry",
                        extra={"target": f"{self.scheme}://{self.host}:{self.port}", "error": str(exc), "wait": wait},
                    )
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, 60.0)
                    continue
                wait = 1.0
                try:
                    await self._send(writer)
                except (OSError, ssl.SSLError, ConnectionError) as exc:
                    log.warning("the log collector connection broke; reconnecting", extra={"error": str(exc)})
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        reported = 0
        while True:
            if self.dropped != reported:
                log.warning("log lines dropped while the collector was away", extra={"dropped": self.dropped})
                reported = self.dropped
            while self.queue:
                message = self.queue[0]
                writer.write(message)
                await writer.drain()
                self.queue.popleft()  # only once written: a broken connection resends it
                self.sent += 1
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)
            if writer.is_closing():
                raise ConnectionError("closed by the collector")
