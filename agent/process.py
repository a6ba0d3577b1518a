"""What the agent's daemon supervisors share: finding, stopping and replacing the processes they run, and writing
their private files.

Used by :mod:`agent.etcd` and :mod:`agent.tsdb` (one child process each, with a pid file) and by
:mod:`agent.storage.ceph` and :mod:`agent.storage.rgw` (daemons found by their command line). The network drivers keep
their own process helpers in :mod:`agent.net.common`, which raise the network error hierarchy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def arg(argv: list[str], flag: str) -> str | None:
    """The value after ``flag`` in ``argv`` (``--conf PATH``); None when ``flag`` is absent or last."""
    for i, a in enumerate(argv[:-1]):
        if a == flag:
            return argv[i + 1]
    return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: False when it is gone or a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def wait_gone(pids: Iterable[int], timeout: float) -> None:
    """Wait until none of ``pids`` is :func:`alive`; past ``timeout`` SIGKILL them all, and again every 10 s."""
    pids = list(pids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(alive(p) for p in pids):
        if loop.time() > deadline:
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            deadline = loop.time() + 10
        await asyncio.sleep(0.05)


async def terminate(proc: asyncio.subprocess.Process, sig: int, timeout: float) -> None:
    """Send ``sig`` to a child and wait for it; SIGKILL it when it has not exited after ``timeout``."""
    proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def kill_orphan(pid_file: Path, marker: str) -> None:
    """SIGKILL the process named in ``pid_file`` when ``marker`` is one of its arguments, and wait (up to 5 s) for it
    to go: an agent killed with SIGKILL leaves its daemon running, and the next agent replaces it. Blocking."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if marker.encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (0600, its directory 0700 when made) atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
