"""A real agent with its own small Ceph and S3 gateway (``storage enable``, one file OSD), on free ports, for
module-scoped fixtures (``test_s3``, ``test_volume_backups``): made ready, and torn down with every daemon naming its
cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tests import ceph
from tests.integration.conftest import Agent


def wait(what: str, check, timeout: float = 180.0, agent: Agent | None = None):
    """``check()``'s first truthy value, polled every 0.2 s; past ``timeout`` an AssertionError naming ``what``, the
    last value or error, and the end of ``agent``'s log."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the last error is reported
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    log = agent.log.read_text()[-4000:] if agent is not None else ""
    raise AssertionError(f"{what}: not after {timeout:.0f} s (last: {last!r})\n{log}")


def ceph_agent(
    root: Path, osd_bytes: int, extra_env: dict[str, str] | None = None, *, compute: str = "", objects: str = ""
) -> Iterator[Agent]:
    """For a fixture to ``yield from``: an agent in ``root`` whose storage is ready on one OSD file of
    ``osd_bytes``; afterwards the agent is stopped and its Ceph and gateway are destroyed. ``compute`` and
    ``objects``: more lines for those sections of its configuration."""
    (root / "minicloud.toml").write_text(
        f'[compute]\ndriver = "none"\n{compute}'
        f"[storage]\nceph_mon_port = {ceph.free_port()}\nceph_mon_port_v1 = {ceph.free_port()}\n"
        f"ceph_prometheus_port = {ceph.free_port()}\n"
        f"[objects]\nport = {ceph.free_port()}\n{objects}"
    )
    a = Agent(root, extra_env=extra_env).start()
    try:
        c = a.client()
        c.call("POST", "/v1/storage/enable", json={"file_size_bytes": osd_bytes})
        wait("storage ready", lambda: c.call("GET", "/v1/storage")["state"] == "ready", agent=a)
        yield a
    finally:
        if a.proc is not None:
            a.proc.terminate()
            a.proc.wait(timeout=30)
        teardown(a)


def teardown(a: Agent) -> None:
    from agent.storage.ceph import CephEngine, CephSettings

    root = a.data_dir / "ceph"
    conf = (root / "ceph.conf").read_text() if (root / "ceph.conf").exists() else ""
    fsid = next((ln.split("=", 1)[1].strip() for ln in conf.splitlines() if ln.startswith("fsid")), "")
    # the gateway first (a radosgw naming this cluster's conf), then the cluster's daemons
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace")
            if str(root) in argv and int(entry.name) != os.getpid():
                os.kill(int(entry.name), 9)
    if fsid:
        import socket

        engine = CephEngine(CephSettings(root=root, fsid=fsid, node=socket.gethostname(), address="127.0.0.1"))
        asyncio.run(engine.destroy())
