"""The sd_notify protocol without a dependency: one datagram per message to ``$NOTIFY_SOCKET``.

Does nothing when not run by systemd (no ``NOTIFY_SOCKET``), so the same code path serves containers and CI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``); True when a notification socket exists and the send worked."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), in seconds; None when not requested."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def watchdog_loop(alive: Callable[[], bool], interval: float | None) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds while ``alive()`` is true (the store's writer runs).

    Once it turns false the pings stop for good, so systemd restarts the agent after ``WatchdogSec`` instead of
    keeping a node that can no longer acknowledge a write. Returns at once when no watchdog was requested."""
    if interval is None:
        return
    while alive():
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
    log.critical("the store writer is dead; no more watchdog pings (systemd will restart the agent)")
    notify("STATUS=store writer stopped; waiting for the watchdog restart")
