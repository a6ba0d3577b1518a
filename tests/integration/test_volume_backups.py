"""Volume backups into a bucket of a real agent's own Ceph + RGW (one module-scoped agent, like ``test_s3``): a
pattern written into an RBD volume, a full backup, 1 % of the volume changed, an incremental backup; both restored
into new volumes whose contents match the volume at each backup time (sha256 of ``rbd export``); the incremental
backup stores a small fraction of the full one. The figures (time and bytes) are printed (``-s``).

Also: the objects in the bucket are the manifest and the data; a backup that later ones depend on is refused; a
backup target on an address the allow-list refuses is 403; CLI lines of the docs work against the agent."""

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
    yield from ceph_agent(tmp_path_factory.mktemp("backup-node"), OSD_BYTES)


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
