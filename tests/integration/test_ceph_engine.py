"""The Ceph engine against real Ceph daemons: the run's shared cluster (tests/ceph.py) where a test leaves it as it
found it, one small private cluster where a test must create or destroy one."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.storage.ceph import CephEngine, CephError
from agent.storage.ceph_status import OsdInfo
from tests import ceph
from tests.ceph import CephHandle

pytestmark = pytest.mark.skipif(not ceph.ceph_installed(), reason=ceph.SKIP_REASON)


@pytest.fixture
def cluster(ceph_cluster: CephHandle) -> Iterator[CephHandle]:
    """The shared cluster, held alone: these tests count, kill and add its daemons (xdist runs tests in parallel)."""
    with ceph.exclusive(ceph_cluster) as handle:
        yield handle


async def _gone(pid: int, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while "Z" not in _state(pid):
        assert loop.time() < deadline, f"pid {pid} still exists after SIGKILL"
        await asyncio.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


async def _osd_reported(engine: CephEngine, osd_id: int, timeout: float = 60) -> OsdInfo:
    """The OSD once the MGR reports its size (its statistics lag its start by a few seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        osd = next((o for o in (await engine.status()).osds if o.id == osd_id), None)
        if osd is not None and osd.size_bytes:
            return osd
        assert loop.time() < deadline, f"osd.{osd_id} not reported in {timeout} s"
        await asyncio.sleep(0.5)


async def test_shared_cluster_is_ready_and_healthy(cluster: CephHandle) -> None:
    engine = cluster.engine()
    st = await engine.wait_ready(120)
    assert st.health == "HEALTH_OK", st.checks
    assert st.summary.startswith("Healthy: 3 OSDs on 1 node"), st.summary
    assert [(o.node, o.up, o.in_) for o in st.osds] == [(cluster.node, True, True)] * 3
    assert st.capacity_bytes >= 3 * ceph.OSD_SIZE * 0.9 and 0 < st.used_bytes < st.capacity_bytes
    assert set(st.pgs) == {"active+clean"}
    assert [(m.name, m.address, m.in_quorum) for m in st.mons] == [
        (cluster.node, f"127.0.0.1:{cluster.mon_port}", True)
    ]
    pool = (await engine.pools())[cluster.pool]
    assert (pool["size"], pool["min_size"], pool["pg_num"]) == (2, 1, 32)
    assert "rbd" in pool["application_metadata"]
    assert (cluster.root / "client.admin.keyring").stat().st_mode & 0o077 == 0


async def test_sigkill_of_each_daemon_restarts_exactly_that_one(cluster: CephHandle) -> None:
    engine = cluster.engine()
    await engine.wait_ready(120)
    for name in ("osd.1", "mgr." + cluster.node, "mon." + cluster.node):
        before = engine.pids()
        assert len(before) == 5, before
        os.kill(before[name], signal.SIGKILL)
        await _gone(before[name])
        assert name not in engine.pids()
        assert await cluster.engine().ensure_running() == [name]
        after = engine.pids()
        assert {n: p for n, p in after.items() if n != name} == {n: p for n, p in before.items() if n != name}
        assert after[name] != before[name]
        await engine.wait_ready(120)


async def test_a_new_engine_adopts_the_running_daemons(cluster: CephHandle) -> None:
    before = cluster.engine().pids()
    engine = CephEngine(cluster.settings())
    assert await engine.ensure_running() == []
    assert engine.pids() == before


async def test_file_osd_is_added_then_drained_and_removed(cluster: CephHandle) -> None:
    engine = cluster.engine()
    osd_id = await engine.add_osd_file(2 << 30)
    new = await _osd_reported(engine, osd_id)
    assert (new.node, new.up, new.in_, new.size_bytes) == (cluster.node, True, True, 2 << 30)
    assert (cluster.root / "osd" / str(osd_id) / "block").stat().st_blocks * 512 < 2 << 30  # sparse
    await engine.wait_ready(120)

    await engine.remove_osd(osd_id, timeout=120)
    st = await engine.wait_ready(120)
    assert osd_id not in [o.id for o in st.osds]
    assert len(st.osds) == 3
    assert not (cluster.root / "osd" / str(osd_id)).exists()
    assert f"osd.{osd_id}" not in engine.pids()
    await engine.remove_osd(osd_id)  # gone already: success


async def test_blocklisted_address_shows_in_the_blocklist(cluster: CephHandle) -> None:
    engine = cluster.engine()
    await engine.blocklist_add("192.0.2.10", expire_seconds=600)
    assert "192.0.2.10:0/0" in await engine.blocklist_ls()
    await engine.blocklist_rm("192.0.2.10")
    assert "192.0.2.10:0/0" not in await engine.blocklist_ls()


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every TCP socket in LISTEN state owned by ``pids`` (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    out = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                hexaddr = fields[1].split(":")[0]
                addr = ".".join(str(b) for b in bytes.fromhex(hexaddr)[::-1]) if family == 4 else hexaddr
                out.append((inodes[fields[9]], addr))
    return out


async def test_daemons_listen_on_the_configured_address_only(cluster: CephHandle) -> None:
    pids = cluster.engine().pids()
    sockets = _listening(set(pids.values()))
    assert {p for p, _ in sockets} == set(pids.values())  # every daemon listens (mon, mgr, osds)
    assert {a for _, a in sockets} == {"127.0.0.1"}, sockets


def _global_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback (the "cluster address" a MON moves to), or None."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


async def test_private_cluster_bootstraps_from_nothing_and_is_destroyed(tmp_path: Path) -> None:
    """A long root (pytest's) puts admin sockets in /run/mcceph-*; one OSD, one copy; its lone MON on 127.0.0.1
    moves to a cluster address (with every daemon: storage enabled before ``cluster enable``) when the machine has
    one; destroy leaves nothing."""
    if os.geteuid() != 0:
        pytest.skip("Ceph's daemons need root here")
    handle = ceph.new_handle(tmp_path / ("x" * 80) / "ceph", node="solo")
    engine = handle.engine()
    assert str(engine.settings.socket_dir).startswith("/run/mcceph-")
    try:
        keys = await engine.bootstrap()
        assert set(keys.entities()) == {"mon.", "client.admin", "client.bootstrap-osd"}
        with pytest.raises(CephError, match="already has a monitor"):
            await engine.bootstrap()
        await engine.add_osd_file(2 << 30)
        await engine.set_replicas(1)
        await engine.ensure_pool("p1")
        st = await engine.wait_ready(120)
        assert st.ready and st.health == "HEALTH_OK", st
        assert "keep one copy" in st.summary
        assert {(p["pool_name"], p["size"]) for p in (await engine.pools()).values()} >= {("p1", 1)}
        assert sorted(engine.pids()) == ["mgr.solo", "mon.solo", "osd.0"]
        assert any(engine.settings.socket_dir.glob("*.asok"))
        conf = engine.conf_path.read_text()
        assert "mgr_initial_modules = prometheus" in conf
        mgr = (await engine.ceph("mgr", "services")) or {}
        assert mgr.get("prometheus", "").startswith(f"http://127.0.0.1:{handle.prometheus_port}")
        # storage enabled before `cluster enable`: the lone MON (and every daemon) moves to the cluster address
        address = _global_ipv4()
        if address is not None:
            assert await engine.mon_bound_address() == "127.0.0.1"
            moved = CephEngine(dataclasses.replace(engine.settings, address=address, mon_hosts={"solo": address}))
            assert not await engine.readdress_mon()  # already where its settings say
            assert await moved.readdress_mon()
            engine = moved
            assert await engine.mon_bound_address() == address
            st = await engine.wait_ready(120)
            assert st.ready, st
            sockets = _listening(set(engine.pids().values()))
            assert {a for _, a in sockets} == {address}, sockets
            assert not await engine.readdress_mon()
    finally:
        pids = list(engine.pids().values())
        await engine.destroy()
    for pid in pids:
        await _gone(pid)
    assert not handle.root.exists()
    assert not engine.settings.socket_dir.exists()
