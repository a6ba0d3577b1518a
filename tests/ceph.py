"""One real Ceph cluster per pytest run, shared by the xdist workers (fixture ``ceph_cluster`` in tests/conftest.py).

The first worker that needs it bootstraps it under the run's shared temporary directory while holding a lock file
there; the others wait on the lock and reuse it (``ceph/handle.json``). The controller process (the one that is not an
xdist worker) tears it down at the end of the session. It binds 127.0.0.1 only, on free ports picked at bootstrap (a
real minicloud, or another pytest run, may hold the defaults); 3 file OSDs (sparse, 3 GiB each), every pool 2 copies
(one OSD may die and I/O goes on), and the pool ``mc-tests`` (application rbd).

A test that stops or kills daemons of the shared cluster puts them back before it ends (``engine.ensure_running()``
then ``engine.wait_ready(...)``); tests that need to destroy a cluster bootstrap a private one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.storage.ceph import CephEngine, CephSettings

SKIP_REASON = "Ceph is not installed (Debian packages ceph-mon ceph-osd ceph-mgr ceph-common)"
OSD_SIZE = 3 << 30
OSD_MEMORY_TARGET = 512 << 20
TEST_POOL = "mc-tests"


def ceph_installed() -> bool:
    return all(shutil.which(b) for b in ("ceph-mon", "ceph-osd", "ceph-mgr", "ceph", "ceph-authtool", "monmaptool"))


@dataclass(frozen=True)
class CephHandle:
    root: Path
    conf: Path
    keyring: Path  # client.admin's keyring
    address: str
    mon_port: int
    mon_port_v1: int
    prometheus_port: int
    fsid: str
    node: str = "ceph-test"
    user: str = "admin"  # the cephx id (client.admin)
    pool: str = TEST_POOL

    def settings(self) -> CephSettings:
        return CephSettings(
            root=self.root,
            fsid=self.fsid,
            node=self.node,
            address=self.address,
            mon_hosts={self.node: self.address},
            mon_port=self.mon_port,
            mon_port_v1=self.mon_port_v1,
            osd_memory_target=OSD_MEMORY_TARGET,
            prometheus_port=self.prometheus_port,
        )

    def engine(self) -> CephEngine:
        """A fresh engine on this cluster's settings (it adopts the running daemons)."""
        return CephEngine(self.settings())

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> CephHandle:
        d = json.loads(text)
        for k in ("root", "conf", "keyring"):
            d[k] = Path(d[k])
        return cls(**d)


@contextlib.contextmanager
def exclusive(handle: CephHandle) -> Iterator[CephHandle]:
    """Hold the shared cluster alone among the tests that take this too (those that count, kill or add daemons);
    other tests may still use its pools meanwhile. Restarts any daemon of it that is down on the way out."""
    with open(handle.root.parent / "ceph.exclusive.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            engine = handle.engine()

            async def restore() -> None:
                await engine.ensure_running()
                await engine.wait_ready(120)

            asyncio.run(restore())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_handle(root: Path, *, node: str = "ceph-test") -> CephHandle:
    """Settings for a new cluster at ``root``: 127.0.0.1, free ports, a new fsid."""
    return CephHandle(
        root=root,
        conf=root / "ceph.conf",
        keyring=root / "client.admin.keyring",
        address="127.0.0.1",
        mon_port=free_port(),
        mon_port_v1=free_port(),
        prometheus_port=free_port(),
        fsid=str(uuid.uuid4()),
        node=node,
    )


async def bootstrap(handle: CephHandle, *, osds: int = 3, replicas: int = 2, timeout: float = 180) -> None:
    """Bootstrap ``handle``'s cluster: MON + MGR, ``osds`` file OSDs created in parallel, ``replicas`` copies, the
    test pool; returns once every PG is active+clean."""
    engine = handle.engine()
    await engine.bootstrap()
    await asyncio.gather(*(engine.add_osd_file(OSD_SIZE) for _ in range(osds)))
    await engine.set_replicas(replicas)
    await engine.ensure_pool(handle.pool)
    await engine.wait_ready(timeout)


def destroy(handle: CephHandle) -> None:
    asyncio.run(handle.engine().destroy())


def _owner_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def cleanup_stale(tmp_root: Path) -> None:
    """Destroy shared clusters that a killed pytest run left running (their owner process is gone)."""
    for handle_file in tmp_root.glob("pytest-*/ceph/handle.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(handle_file.read_text())
            if not _owner_alive(int(data.pop("owner"))):
                destroy(CephHandle.from_json(json.dumps(data)))


def shared_cluster(shared: Path, owner: int) -> CephHandle:
    """The run's shared cluster under ``shared`` (bootstrapped by whoever comes first); ``owner`` is the pid of the
    process that tears it down (the xdist controller)."""
    root = shared / "ceph"
    handle_file = root / "handle.json"
    with open(shared / "ceph.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if handle_file.exists():
            data = json.loads(handle_file.read_text())
            if "error" in data:
                raise RuntimeError(f"the shared Ceph cluster failed to bootstrap: {data['error']}")
            data.pop("owner")
            return CephHandle.from_json(json.dumps(data))
        cleanup_stale(shared.parent)
        handle = new_handle(root)
        try:
            asyncio.run(bootstrap(handle))
        except Exception as exc:
            with contextlib.suppress(Exception):
                destroy(handle)
            root.mkdir(parents=True, exist_ok=True)
            handle_file.write_text(json.dumps({"error": str(exc), "owner": owner}))
            raise
        data = json.loads(handle.to_json())
        data["owner"] = owner
        handle_file.write_text(json.dumps(data))
        return handle


def teardown_shared_cluster(shared: Path) -> None:
    """Kill the shared cluster's daemons and delete its files (the controller, at the end of the session)."""
    handle_file = shared / "ceph" / "handle.json"
    if not handle_file.exists():
        return
    data = json.loads(handle_file.read_text())
    if "error" in data:
        shutil.rmtree(shared / "ceph", ignore_errors=True)
        return
    data.pop("owner", None)
    destroy(CephHandle.from_json(json.dumps(data)))


def owner_pid(config) -> int:
    """The pid of the process that tears the shared cluster down: the xdist controller (a worker's parent), or this
    process without xdist."""
    return os.getppid() if hasattr(config, "workerinput") else os.getpid()
