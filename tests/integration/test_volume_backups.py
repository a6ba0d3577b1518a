"""Volume backups into a bucket of a real agent's own Ceph + RGW (one module-scoped agent, like ``test_s3``): a
pattern written into an RBD volume, a full backup, 1 % of the volume changed, an incremental backup; both restored
into new volumes whose contents match the volume at each backup time (sha256 of ``rbd export``); the incremental
backup stores a small fraction of the full one. The figures (time and bytes) are printed (``-s``).

Also: the objects in the bucket are the manifest and the data; a backup that later ones depend on is refused; a
backup target on an address the allow-list refuses is 403; CLI lines of the docs work against the agent. State
backups: ``admin backup --bucket`` and a ``--state`` schedule (the leader's loop, with its retention) put the state
into a bucket; one downloaded with boto3 and restored with ``admin restore`` into a fresh node's data directory
brings the buckets, volumes, backups and schedules back there. A volume schedule backs up through a backup target
(this gateway reached as another endpoint, under the allow-list), restores from it, and the target cannot be
deleted while used."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest

from minicloud.client import ApiError
from tests import ceph
from tests.integration.ceph_agent import ceph_agent
from tests.integration.ceph_agent import wait as _wait
from tests.integration.conftest import Agent
from tests.integration.test_s3 import _key, _s3, _usable

pytestmark = [
    pytest.mark.skipif(not ceph.ceph_installed() or not shutil.which("radosgw"), reason=ceph.SKIP_REASON),
    pytest.mark.timeout(1800),  # a cluster, a gateway, 2 GiB volumes exported for checksums, on a loaded machine
]
boto3 = pytest.importorskip("boto3")

OSD_BYTES = 8 << 30
GIB = 1 << 30
VOLUME_GIB = 2
WRITTEN = 256 << 20  # the pattern: 256 MiB at the start of a 2 GiB volume
CHANGED = (VOLUME_GIB * GIB) // 100  # 1 % of the volume, in 1 MiB blocks spread over it
POOL = "minicloud"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    # "localhost" is allowed by name: a backup target at https://localhost:PORT is this node's gateway seen as
    # "another S3 endpoint" (https://127.0.0.1 stays refused: the 403 test)
    yield from ceph_agent(
        tmp_path_factory.mktemp("backup-node"), OSD_BYTES, compute='image_url_allow = ["localhost"]\n'
    )


@pytest.fixture(scope="module")
def gateway(agent):
    """The S3 endpoint once its gateway answers (any HTTP answer)."""
    import ssl
    import urllib.error
    import urllib.request

    ep = agent.client().call("GET", "/v1/s3/endpoint")
    ctx = ssl.create_default_context(cafile=ep["ca_path"])
    ctx.check_hostname = False

    def answers() -> bool:
        try:
            urllib.request.urlopen(ep["url"] + "/", context=ctx, timeout=5).read()
        except urllib.error.HTTPError:
            return True
        return True

    _wait("the S3 gateway answers", answers, timeout=300, agent=agent)
    return ep


def _rbd(agent: Agent, *args: str, stdin: bytes | None = None) -> bytes:
    root = agent.data_dir / "ceph"
    argv = ["rbd", "--conf", str(root / "ceph.conf"), "--id", "minicloud", "--keyring",
            str(root / "client.minicloud.keyring"), *args]  # fmt: skip
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def _qemu_target(agent: Agent, image: str) -> str:
    root = agent.data_dir / "ceph"
    return f"rbd:{POOL}/{image}:id=minicloud:conf={root / 'ceph.conf'}:keyring={root / 'client.minicloud.keyring'}"


def _write(agent: Agent, image: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` through QEMU's rbd driver (what a guest's writes go through)."""
    src = agent.root / "chunk.bin"
    src.write_bytes(data)
    cmd = f"write -s {src} {offset} {len(data)}"
    done = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, _qemu_target(agent, image)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and "wrote" in done.stdout, done.stdout + done.stderr


def _sha(agent: Agent, image: str) -> str:
    root = agent.data_dir / "ceph"
    argv = ["rbd", "--conf", str(root / "ceph.conf"), "--id", "minicloud", "--keyring",
            str(root / "client.minicloud.keyring"), "export", "--no-progress", f"{POOL}/{image}", "-"]  # fmt: skip
    h = hashlib.sha256()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            h.update(chunk)
    assert proc.returncode == 0
    return h.hexdigest()


def _available(c, path: str, what: str, agent: Agent, timeout: float = 600.0) -> dict:
    def check():
        x = c.call("GET", path)
        assert x["status"]["state"] != "error", x["status"]["reason"]
        return x if x["status"]["state"] == "available" else None

    return _wait(what, check, timeout=timeout, agent=agent)


def test_full_and_incremental_backups_restore_to_what_the_volume_held(agent, gateway):
    c = agent.client()
    key = _key(agent, "k-backup")
    _usable(gateway, key)
    bucket = c.call("POST", "/v1/buckets", json={"name": "vol-backups"})
    _wait("bucket ready", lambda: c.call("GET", f"/v1/buckets/{bucket['id']}")["status"]["state"] == "ready",
          agent=agent)  # fmt: skip
    vol = c.call("POST", "/v1/volumes", json={"name": "data", "size_gib": VOLUME_GIB})
    _available(c, f"/v1/volumes/{vol['id']}", "volume available", agent)
    seed = os.urandom(16)
    pattern = b"".join(hashlib.sha256(seed + i.to_bytes(4)).digest() * 32768 for i in range(WRITTEN >> 20))
    _write(agent, vol["id"], 0, pattern)
    sha_full = _sha(agent, vol["id"])

    t0 = time.monotonic()
    full = c.call("POST", "/v1/volume-backups", json={"volume": "data", "bucket": "vol-backups", "name": "full-1"})
    full = _available(c, f"/v1/volume-backups/{full['id']}", "full backup stored", agent)
    full_wall = time.monotonic() - t0
    assert full["chain"] == [full["id"]] and not full["incremental"]

    # change 1 % of the volume: 1 MiB blocks spread over the data (a block in a never-written part of an RBD
    # image makes a new RADOS object, which export-diff sends from the object's start: up to 4 MiB for 1 MiB)
    blocks = CHANGED >> 20
    stride = WRITTEN // blocks
    for i in range(blocks):
        _write(agent, vol["id"], i * stride, bytes([i % 251 + 1]) * (1 << 20))
    sha_inc = _sha(agent, vol["id"])
    assert sha_inc != sha_full

    t0 = time.monotonic()
    inc = c.call("POST", "/v1/volume-backups",
                 json={"volume": "data", "bucket": "vol-backups", "name": "inc-1", "incremental": True})  # fmt: skip
    inc = _available(c, f"/v1/volume-backups/{inc['id']}", "incremental backup stored", agent)
    inc_wall = time.monotonic() - t0
    assert inc["parent"] == full["id"] and inc["chain"] == [full["id"], inc["id"]]

    fs, ist = full["status"], inc["status"]
    print(f"\nfull backup: {fs['stored_bytes']} bytes in {fs['seconds']:.2f} s (node) / {full_wall:.2f} s (API); "
          f"incremental (1 % changed): {ist['stored_bytes']} bytes in {ist['seconds']:.2f} s / {inc_wall:.2f} s")  # fmt: skip
    assert fs["stored_bytes"] >= WRITTEN
    assert (CHANGED >> 20) << 20 <= ist["stored_bytes"] < fs["stored_bytes"] / 5

    # only the chain head's snapshot stays on the volume
    def snaps() -> list[str]:
        return [s["name"] for s in json.loads(_rbd(agent, "snap", "ls", f"{POOL}/{vol['id']}", "--format", "json"))]

    _wait("the parent's snapshot is dropped", lambda: snaps() == [f"bk-{inc['id']}"], timeout=60, agent=agent)

    # the bucket holds each backup's manifest and data
    s3 = _s3(gateway, key["id"], key["secret_access_key"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="vol-backups", Prefix="minicloud-backups/")["Contents"]}
    base = f"minicloud-backups/volumes/{vol['id']}"
    assert keys == {f"{base}/{b}/{n}" for b in (full["id"], inc["id"]) for n in ("data", "manifest.json")}
    manifest = json.loads(s3.get_object(Bucket="vol-backups", Key=f"{base}/{inc['id']}/manifest.json")["Body"].read())
    assert manifest["chain"] == [full["id"], inc["id"]] and manifest["size_bytes"] == VOLUME_GIB * GIB

    # restore both into new volumes
    t0 = time.monotonic()
    r_full = c.call("POST", f"/v1/volume-backups/{full['id']}/restore", json={"name": "from-full"})
    r_inc = c.call("POST", f"/v1/volume-backups/{inc['id']}/restore", json={"name": "from-inc"})
    assert r_inc["source"]["type"] == "backup"
    _available(c, f"/v1/volumes/{r_full['id']}", "restore of the full backup", agent)
    _available(c, f"/v1/volumes/{r_inc['id']}", "restore of the incremental backup", agent)
    print(f"both restores: {time.monotonic() - t0:.2f} s")
    assert _sha(agent, r_full["id"]) == sha_full
    assert _sha(agent, r_inc["id"]) == sha_inc
    assert json.loads(_rbd(agent, "snap", "ls", f"{POOL}/{r_inc['id']}", "--format", "json")) == []

    # the full backup is needed by the incremental one
    with pytest.raises(ApiError) as exc:
        c.call("DELETE", f"/v1/volume-backups/{full['id']}")
    assert exc.value.status == 409 and "inc-1" in str(exc.value)
    # the CLI lists them and deletes newest first; the objects go with them
    out = agent.cli("volume", "backup", "list", "data", check=True).stdout
    assert "full-1" in out and "inc-1" in out
    agent.cli("volume", "backup", "delete", "inc-1", check=True)
    _wait("inc-1 gone", lambda: not c.call("GET", "/v1/volume-backups?name=inc-1")["items"], agent=agent)
    agent.cli("volume", "backup", "delete", "full-1", check=True)
    _wait("full-1 gone", lambda: not c.call("GET", "/v1/volume-backups?name=full-1")["items"], agent=agent)
    assert "Contents" not in s3.list_objects_v2(Bucket="vol-backups", Prefix="minicloud-backups/")


def test_a_target_on_a_refused_address_is_403(agent):
    c = agent.client()
    with pytest.raises(ApiError) as exc:
        c.call("POST", "/v1/backup-targets", json={"name": "here", "endpoint": "https://127.0.0.1:8444",
                                                   "access_key": "AK", "secret_key": "SK"})  # fmt: skip
    assert exc.value.status == 403 and "image_url_allow" in str(exc.value)


def _ready(c, path: str, what: str, agent: Agent, timeout: float = 180.0) -> dict:
    def check():
        x = c.call("GET", path)
        return x if x["status"]["state"] == "ready" else None

    return _wait(what, check, timeout=timeout, agent=agent)


def _state_keys(s3, bucket: str) -> set[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="minicloud-backups/state/")
    return {o["Key"] for o in listed.get("Contents", [])}


def test_state_backups_schedules_a_target_and_a_restore_into_a_fresh_node(agent, gateway, tmp_path):
    from urllib.parse import urlsplit

    c = agent.client()
    key = _key(agent, "k-state")
    s3 = _usable(gateway, key)
    for name in ("cluster-state", "offsite"):
        b = c.call("POST", "/v1/buckets", json={"name": name})
        _ready(c, f"/v1/buckets/{b['id']}", f"bucket {name} ready", agent)

    # a one-shot state backup into the bucket (CLI as documented), listed from the bucket
    made = agent.json("admin", "backup", "--bucket", "cluster-state")
    assert made["bucket"] == "cluster-state" and made["object"] == f"minicloud-backups/state/{made['name']}"
    assert _state_keys(s3, "cluster-state") == {made["object"], made["object"] + ".manifest.json"}
    listed = agent.json("admin", "backup", "list", "--bucket", "cluster-state")
    assert [(b["name"], b["bucket"]) for b in listed] == [(made["name"], "cluster-state")]
    assert listed[0]["size_bytes"] == made["size_bytes"]

    # a backup target: this gateway as "another endpoint" (by name, allowed by name), with an IAM key and the CA
    port = urlsplit(gateway["url"]).port
    target = c.call("POST", "/v1/backup-targets", json={
        "name": "site2", "endpoint": f"https://localhost:{port}", "access_key": key["id"],
        "secret_key": key["secret_access_key"], "ca_bundle": gateway["ca_bundle"]})  # fmt: skip
    vol = c.call("POST", "/v1/volumes", json={"name": "sched", "size_gib": 1})
    _available(c, f"/v1/volumes/{vol['id']}", "volume available", agent)
    _write(agent, vol["id"], 1 << 20, os.urandom(1 << 20))
    sha = _sha(agent, vol["id"])

    # the leader's schedule loop: both schedules are due at once; keep 1 prunes the one-shot state backup
    agent.cli("backup-schedule", "create", "--state", "--bucket", "cluster-state", "--every", "1h", "--keep", "1",
              "--name", "state-hourly", check=True)  # fmt: skip
    agent.cli("backup-schedule", "create", "--volume", "sched", "--bucket", "offsite", "--target", "site2",
              "--every", "1h", "--keep", "1", "--name", "sched-hourly", check=True)  # fmt: skip

    def ran(name: str):
        (s,) = c.call("GET", f"/v1/backup-schedules?name={name}")["items"]
        assert not s["status"]["reason"], s["status"]["reason"]
        return s if s["status"]["last_backup"] else None

    state_sched = _wait("the state schedule ran", lambda: ran("state-hourly"), timeout=180, agent=agent)
    name = state_sched["status"]["last_backup"]
    assert name != made["name"]
    obj = f"minicloud-backups/state/{name}"
    assert _state_keys(s3, "cluster-state") == {obj, obj + ".manifest.json"}  # the older one pruned (keep 1)
    vol_sched = _wait("the volume schedule ran", lambda: ran("sched-hourly"), timeout=180, agent=agent)
    backup = _available(c, f"/v1/volume-backups/{vol_sched['status']['last_backup']}", "backup via the target", agent)
    assert backup["target"] in (target["id"], "site2") and backup["bucket"] == "offsite"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="offsite", Prefix="minicloud-backups/")["Contents"]}
    assert f"minicloud-backups/volumes/{vol['id']}/{backup['id']}/manifest.json" in keys
    restored = c.call("POST", f"/v1/volume-backups/{backup['id']}/restore", json={"name": "from-site2"})
    _available(c, f"/v1/volumes/{restored['id']}", "restore from the target", agent)
    assert _sha(agent, restored["id"]) == sha

    # a schedule as the issue writes it, without --bucket: into the project's bucket `backups`, made on first use
    agent.cli("backup-schedule", "create", "--volume", "sched", "--every", "1d", "--keep", "7", check=True)

    def ran_once_made(name: str):  # its first look may find the bucket still being made: due again at the next
        (s,) = c.call("GET", f"/v1/backup-schedules?name={name}")["items"]
        reason = s["status"]["reason"]
        assert not reason or "creating" in reason, reason
        return s if s["status"]["last_backup"] and not reason else None

    daily = _wait("the schedule without a bucket ran", lambda: ran_once_made("sched-every-86400s"), timeout=240,
                  agent=agent)  # fmt: skip
    assert daily["bucket"] == "backups"
    into = _available(c, f"/v1/volume-backups/{daily['status']['last_backup']}", "backup into 'backups'", agent)
    assert into["bucket"] == "backups"
    assert c.call("GET", "/v1/buckets?name=backups")["items"][0]["status"]["state"] == "ready"
    agent.cli("backup-schedule", "delete", "sched-every-86400s", check=True)

    # a target in use is not deleted
    r = agent.cli("backup-target", "delete", "site2")
    assert r.returncode != 0 and "sched-hourly" in r.stderr and backup["name"] in r.stderr

    # the scheduled state backup, downloaded with boto3, restored into a fresh node's data directory
    file = tmp_path / name
    s3.download_file("cluster-state", obj, str(file))
    fresh = Agent(tmp_path / "fresh")
    fresh.config.write_text('[agent]\nnode_name = "fresh"\n[compute]\ndriver = "none"\n[objects]\nenabled = false\n')
    out = fresh.cli("admin", "restore", str(file), "--data-dir", str(fresh.data_dir), check=True).stdout
    assert "Restored revision" in out
    fresh.start()
    try:
        f = fresh.client()
        assert {"cluster-state", "offsite"} <= {b["name"] for b in f.call("GET", "/v1/buckets")["items"]}
        assert "sched" in {v["name"] for v in f.call("GET", "/v1/volumes")["items"]}
        assert {"state-hourly", "sched-hourly"} <= {s["name"] for s in f.call("GET", "/v1/backup-schedules")["items"]}
        assert backup["id"] in {b["id"] for b in f.call("GET", "/v1/volume-backups")["items"]}
        assert f.call("GET", "/v1/backup-targets/site2")["id"] == target["id"]
    finally:
        fresh.stop()

    for s in ("state-hourly", "sched-hourly"):
        agent.cli("backup-schedule", "delete", s, check=True)
