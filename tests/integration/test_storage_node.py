"""The storage reconciler in a real agent on a private Ceph: ``storage enable`` bootstraps a cluster through the
records (one sparse 3 GiB file OSD), ``storage show`` says ready, a volume on RBD is made and deleted without leaving an RBD
image, and an imported image is copied into the pool with its protected ``base`` snapshot.

One module-scoped agent: the cluster it bootstraps is its own (the engine's own path, not the shared test cluster),
on free ports, torn down with the agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time

import pytest

from minicloud.client import Client
from tests import ceph
from tests.integration.conftest import Agent

pytestmark = pytest.mark.skipif(not ceph.ceph_installed(), reason=ceph.SKIP_REASON)

OSD_BYTES = 3 << 30  # sparse; what a 1 GiB volume needs free, with BlueStore's own share


def _wait(what: str, check, timeout: float = 180.0, agent: Agent | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    log = agent.log.read_text()[-3000:] if agent is not None else ""
    raise AssertionError(f"{what}: not after {timeout:.0f} s (last: {last!r})\n{log}")


def _rbd(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    root = agent.data_dir / "ceph"
    return subprocess.run(
        ["rbd", "--conf", str(root / "ceph.conf"), "--keyring", str(root / "client.admin.keyring"), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage-node")
    (root / "minicloud.toml").write_text(
        '[compute]\ndriver = "none"\n'
        f"[storage]\nceph_mon_port = {ceph.free_port()}\nceph_mon_port_v1 = {ceph.free_port()}\n"
        f"ceph_prometheus_port = {ceph.free_port()}\n"
        # the node's TSDB too (off by default without compute): it scrapes the Ceph MGR (test_the_tsdb_scrapes...)
        '[metrics]\ntsdb = "on"\nscrape_interval = 1.0\n'
    )
    a = Agent(root).start()
    try:
        yield a
    finally:
        if a.proc is not None:
            a.proc.terminate()
            a.proc.wait(timeout=30)
        # the daemons outlive the agent on purpose: take them down with the cluster's own engine
        from agent.storage.ceph import CephEngine, CephSettings

        conf = (a.data_dir / "ceph" / "ceph.conf").read_text() if (a.data_dir / "ceph" / "ceph.conf").exists() else ""
        fsid = next((ln.split("=", 1)[1].strip() for ln in conf.splitlines() if ln.startswith("fsid")), "")
        if fsid:
            engine = CephEngine(CephSettings(root=a.data_dir / "ceph", fsid=fsid, node="", address="127.0.0.1"))
            asyncio.run(_destroy(engine))
        _kill_clients(str(a.data_dir / "ceph"))


def _kill_clients(root: str) -> None:
    """``ceph`` commands the stopped agent left waiting for the monitors it no longer runs."""
    import os
    import signal
    from pathlib import Path

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if root in argv and os.getpid() != int(entry.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


async def _destroy(engine) -> None:
    # every daemon of this root (the node name is not needed to find OSDs; MON/MGR are named after the node)
    import socket

    engine.settings.node = socket.gethostname()
    await engine.destroy()


def _client(agent: Agent) -> Client:
    return agent.client()


def _ready(agent: Agent) -> dict:
    """Storage enabled on the module's agent (by whichever test of this module runs first on this xdist worker: the
    tests may be split over workers, each with its own agent) and ready: the storage view."""
    c = _client(agent)
    if not c.call("GET", "/v1/storage").get("enabled"):
        c.call("POST", "/v1/storage/enable", json={"file_size_bytes": OSD_BYTES})

    def ready():
        st = c.call("GET", "/v1/storage")
        return st if st["state"] == "ready" else None

    return _wait("storage ready", ready, agent=agent)


def test_enable_bootstraps_a_ready_cluster_through_the_records(agent):
    _ready(agent)
    c = _client(agent)

    def disk_up() -> dict | None:  # the disk's record follows its OSD: the cluster may say ready a moment before
        st = c.call("GET", "/v1/storage")
        return st if [d["state"] for d in st["disks"]] == ["up"] else None

    st = _wait("the disk record up", disk_up, agent=agent)
    assert st["state"] == "ready" and st["health"] and st["summary"]
    assert [o["up"] for o in st["osds"]] == [True]
    shown = agent.cli("storage", "show")
    assert shown.returncode == 0 and "ready" in shown.stdout


def test_the_tsdb_scrapes_the_ceph_mgr(agent):
    """Once Ceph runs, the node's TSDB scrapes its MGR's prometheus module (bound to the MON's address): Ceph's own
    series are there for administrators (cluster scope), and in no project's."""
    import json

    _ready(agent)

    def health() -> list | None:
        out = agent.cli("-o", "json", "metrics", "query", 'ceph_health_status{job="ceph"}', "--cluster")
        found = json.loads(out.stdout)["result"] if out.returncode == 0 else []
        return found or None

    found = _wait("ceph_health_status scraped from the MGR", health, agent=agent)
    assert found[0]["metric"]["job"] == "ceph"
    out = agent.cli("-o", "json", "metrics", "query", "ceph_health_status")
    assert out.returncode == 0 and json.loads(out.stdout)["result"] == []  # not a project's series


def test_a_volume_on_rbd_is_made_and_deleted_without_leaving_an_image(agent):
    _ready(agent)
    c = _client(agent)
    vol = c.call("POST", "/v1/volumes", json={"name": "data", "size_gib": 1})
    vid = vol["id"]

    def available():
        v = c.call("GET", f"/v1/volumes/{vid}")
        assert v["status"]["state"] != "error", v["status"]
        return v if v["status"]["state"] == "available" else None

    v = _wait("volume available", available, agent=agent)
    assert v["status"]["size_gib"] == 1
    listed = _rbd(agent, "ls", "minicloud")
    assert vid in listed.stdout.split(), listed.stderr
    c.call("DELETE", f"/v1/volumes/{vid}")
    _wait("volume record gone", lambda: c.raw("GET", f"/v1/volumes/{vid}").status == 404, agent=agent)
    assert vid not in _rbd(agent, "ls", "minicloud").stdout.split()


def test_an_imported_image_is_copied_into_the_pool(agent):
    _ready(agent)
    c = _client(agent)
    src = agent.data_dir / "import" / "small.qcow2"
    src.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "64M"], check=True, timeout=60)
    image = agent.json("image", "import", "small", str(src))
    iid = image["id"]
    c = _client(agent)

    def ready():
        img = c.call("GET", f"/v1/images/{iid}")
        assert img.get("pool_state", img.get("status", {}).get("pool_state")) != "error", img
        return img if "ready" in json.dumps(img) else None

    _wait("image ready in the pool", ready, agent=agent)
    snaps = _rbd(agent, "snap", "ls", "--format", "json", f"minicloud/{iid}")
    assert snaps.returncode == 0, snaps.stderr
    assert [s["name"] for s in json.loads(snaps.stdout)] == ["base"]
    # a volume from it is a clone of that snapshot
    vol = c.call("POST", "/v1/volumes", json={"name": "from-image", "size_gib": 1, "image": iid})
    _wait(
        "clone available",
        lambda: c.call("GET", f"/v1/volumes/{vol['id']}")["status"]["state"] == "available",
        agent=agent,
    )
    info = json.loads(_rbd(agent, "info", "--format", "json", f"minicloud/{vol['id']}").stdout)
    assert info["parent"]["image"] == iid and info["parent"]["snapshot"] == "base"


def _qemu_io(agent: Agent, vol: str, command: str) -> str:
    """Run one qemu-io command on RBD image ``minicloud/<vol>`` as ``client.admin`` (what a guest would do)."""
    root = agent.data_dir / "ceph"
    target = f"rbd:minicloud/{vol}:id=admin:conf={root / 'ceph.conf'}:keyring={root / 'client.admin.keyring'}"
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, target], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and "failed" not in out.stdout + out.stderr, (command, out.stdout, out.stderr)
    return out.stdout


def test_a_flattened_clone_keeps_its_data_once_its_snapshot_is_deleted(agent):
    """Issue #11: a volume made from a snapshot is an RBD clone (``rbd info`` names its parent); `minicloud volume
    flatten NAME --wait`, run exactly so, leaves it without a parent, the snapshot then deletes (data and record),
    and the volume still reads what the snapshot held."""
    _ready(agent)
    c = _client(agent)
    src = agent.json("volume", "create", "flat-src", "--size", "1", "--wait")
    _qemu_io(agent, src["id"], "write -P 0x5a 0 1M")
    snap = agent.json("snapshot", "create", "flat-s", "--volume", "flat-src")
    _wait("snapshot available", lambda: c.call("GET", f"/v1/snapshots/{snap['id']}")["status"]["state"] == "available",
          agent=agent)  # fmt: skip
    _qemu_io(agent, src["id"], "write -P 0x11 0 1M")  # the volume moves on; the snapshot keeps 0x5a
    copy = agent.json("volume", "create", "flat-copy", "--size", "1", "--snapshot", "flat-s", "--wait")
    info = json.loads(_rbd(agent, "info", "--format", "json", f"minicloud/{copy['id']}").stdout)
    assert info["parent"]["image"] == src["id"] and info["parent"]["snapshot"] == snap["id"], info
    refused = agent.cli("snapshot", "delete", "flat-s")
    assert refused.returncode != 0 and "minicloud volume flatten flat-copy" in refused.stderr, refused.stderr
    flat = agent.cli("volume", "flatten", "flat-copy", "--wait")
    assert flat.returncode == 0, flat.stderr
    shown = agent.json("volume", "show", "flat-copy")
    assert shown["status"]["flattened"] is True and shown["status"]["state"] == "available", shown
    info = json.loads(_rbd(agent, "info", "--format", "json", f"minicloud/{copy['id']}").stdout)
    assert "parent" not in info, info
    assert agent.cli("snapshot", "delete", "flat-s").returncode == 0
    _wait("snapshot gone", lambda: c.raw("GET", f"/v1/snapshots/{snap['id']}").status == 404, agent=agent)
    snaps = _rbd(agent, "snap", "ls", "--format", "json", f"minicloud/{src['id']}")
    assert snaps.returncode == 0 and json.loads(snaps.stdout) == [], snaps.stdout
    _qemu_io(agent, copy["id"], "read -P 0x5a 0 1M")  # the snapshot's data, now the clone's own
    for name in ("flat-copy", "flat-src"):
        agent.cli("volume", "delete", name, "--wait", check=True)
