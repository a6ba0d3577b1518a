"""Bad input to the storage API, each through HTTP: a problem+json with the right 4xx, a detail that says what to do
or names what is in the way, and nothing left behind — every storage, compute and bookkeeping record (volumes,
snapshots, ``storageusage``, ``diskslots``, pools, images, instances) is the same, at the same revision, before and
after the refused request.

The API runs alone (no node reconciler): the tests write the status a node would, like tests/unit/api/
test_storage_api.py, which covers the happy paths and the 422s of the request bodies (sizes, names, QoS, unknown
fields)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from minicloud.api.app import create_app
from minicloud.api.keys import STORE
from minicloud.compute.kinds import IMAGE, INSTANCE
from minicloud.iam import apikeys
from minicloud.state import Create, Store, Txn
from minicloud.storage.kinds import (
    CEPH,
    DISK_SLOTS,
    POOL,
    SNAPSHOT,
    STORAGE_DISK,
    STORAGE_USAGE,
    VOLUME,
)
from tests.unit.api.conftest import Api, FakeHost, make_config
from tests.unit.api.test_network_api import _member, _ok, _problem
from tests.unit.storage.conftest import put_image, put_instance, set_status

GIB = 1 << 30
#: Every kind a storage request may write.
KINDS = (VOLUME, SNAPSHOT, STORAGE_USAGE, DISK_SLOTS, POOL, CEPH, STORAGE_DISK, IMAGE, INSTANCE)


async def _start(tmp_path, **storage: Any) -> Api:
    cfg = make_config(tmp_path)
    if storage:
        cfg = msgspec.structs.replace(cfg, storage=msgspec.structs.replace(cfg.storage, **storage))
    client = TestClient(TestServer(create_app(cfg, host=FakeHost())))
    await client.start_server()
    record, token = apikeys.new_key("default", "test-admin", "", None, {}, principal="user:usr-admin")
    await client.server.app[STORE].commit(Txn([Create(record)]))
    return Api(client, token)


@pytest.fixture
async def api(tmp_path):
    a = await _start(tmp_path)
    yield a
    await a.client.close()


async def _records(store: Store) -> set[tuple[str, str, int]]:
    found = set()
    for kind in KINDS:
        found |= {(r.kind, r.id, r.revision) for r in await store.list(kind.name, limit=100_000)}
    return found


async def refused(api: Api, method: str, path: str, status: int, *, json: Any = None, headers=None) -> str:
    """Send the request; assert a problem with ``status`` and that no record changed. Returns the detail."""
    store = api.app[STORE]
    before = await _records(store)
    resp = await api.client.request(method, path, json=json, headers=headers or api._headers(None, False))
    problem = await _problem(resp, status)
    assert await _records(store) == before, f"{method} {path} left something behind"
    return str(problem["detail"])


async def _volume(api: Api, name: str, size: int = 1, **body: Any) -> dict:
    v = await _ok(await api.post("/v1/volumes", json={"name": name, "size_gib": size, **body}), 201)
    await set_status(api.app[STORE], VOLUME, v["id"], state="available", size_gib=size)
    return v


async def _running(store: Store, name: str, **kw: Any) -> Any:
    inst = await put_instance(store, name, **kw)
    return await set_status(store, INSTANCE, inst.id, state="running")


# -- sizes and space -----------------------------------------------------------------------------------------------
async def test_size_zero_negative_or_too_big_is_422_and_makes_nothing(api):
    for size in (0, -1, 65537):
        detail = await refused(api, "POST", "/v1/volumes", 422, json={"name": "v", "size_gib": size})
        assert "size_gib" in detail
    await _volume(api, "v", size=2)
    for size in (0, 1, 2):  # extend only grows
        await refused(api, "POST", "/v1/volumes/v/extend", 422, json={"size_gib": size})


async def test_a_volume_bigger_than_the_ceph_pool_is_409_with_the_free_space(api):
    await _ok(await api.post("/v1/storage/enable", json={"no_disk": True}), 201)
    store = api.app[STORE]
    ceph = CEPH.load(await store.get_by_name(CEPH.name, "", "ceph"))
    await set_status(store, CEPH, ceph.id, capacity_bytes=100 * GIB, available_bytes=8 * GIB, observed_at="t")
    detail = await refused(api, "POST", "/v1/volumes", 409, json={"name": "big", "size_gib": 9})
    assert "has 8 GiB free" in detail and "storage disk add" in detail
    v = await _volume(api, "fits", size=8)
    assert v["driver"] == "ceph"
    await set_status(store, CEPH, ceph.id, available_bytes=2 * GIB)
    detail = await refused(api, "POST", "/v1/volumes/fits/extend", 409, json={"size_gib": 11})
    assert "has 2 GiB free, less than the 3 GiB asked" in detail


# -- quotas --------------------------------------------------------------------------------------------------------
async def test_each_quota_is_a_409_naming_it(tmp_path):
    api = await _start(tmp_path, quota_volumes=1, quota_volume_gib=5, quota_snapshots=1)
    try:
        await _volume(api, "v", size=2)
        detail = await refused(api, "POST", "/v1/volumes", 409, json={"name": "w", "size_gib": 1})
        assert "quota exceeded: volumes 2" in detail and "quota_volumes" in detail
        detail = await refused(api, "POST", "/v1/volumes/v/extend", 409, json={"size_gib": 6})
        assert "volume storage 6 GiB would pass the project's quota of 5 GiB" in detail
        assert "quota_volume_gib" in detail
        await _ok(await api.post("/v1/snapshots", json={"name": "s1", "volume": "v"}), 201)
        detail = await refused(api, "POST", "/v1/snapshots", 409, json={"name": "s2", "volume": "v"})
        assert "snapshots 2" in detail and "quota_snapshots" in detail
    finally:
        await api.client.close()


# -- attach --------------------------------------------------------------------------------------------------------
async def test_attach_to_an_instance_of_another_project_is_404_by_name_and_by_id(api):
    member = await _member(api)  # a member of p1
    store = api.app[STORE]
    theirs = await _running(store, "web")  # in project default
    mine = await _ok(await api.client.post("/v1/volumes?project=p1", json={"name": "v", "size_gib": 1},
                                           headers=member), 201)  # fmt: skip
    await set_status(store, VOLUME, mine["id"], state="available")
    for ref in ("web", theirs.id):
        await refused(api, "POST", "/v1/volumes/v/attach?project=p1", 404, json={"instance": ref}, headers=member)
    # and the other way: p1's volume is not the default project's to attach
    await refused(api, "POST", f"/v1/volumes/{mine['id']}/attach", 404, json={"instance": "web"})


async def test_attaching_an_attached_volume_is_409_naming_the_instance(api):
    store = api.app[STORE]
    await _running(store, "web")
    await _running(store, "db")
    await _volume(api, "v")
    await _ok(await api.post("/v1/volumes/v/attach", json={"instance": "web"}))
    for target in ("web", "db"):
        detail = await refused(api, "POST", "/v1/volumes/v/attach", 409, json={"instance": target})
        assert "attached to instance 'web' as vdb" in detail and "volume detach v" in detail


async def test_a_taken_device_is_409_naming_its_volume(api):
    store = api.app[STORE]
    await _running(store, "web")
    await _volume(api, "a")
    await _volume(api, "b")
    await _ok(await api.post("/v1/volumes/a/attach", json={"instance": "web", "device": "vdc"}))
    detail = await refused(api, "POST", "/v1/volumes/b/attach", 409, json={"instance": "web", "device": "vdc"})
    assert "vdc of instance 'web' is taken by volume 'a'" in detail


async def test_a_local_volume_to_an_instance_on_another_node_is_409_naming_both_nodes(api):
    await _running(api.app[STORE], "far", node="n2")
    await _volume(api, "v", pool="local")
    detail = await refused(api, "POST", "/v1/volumes/v/attach", 409, json={"instance": "far"})
    assert "on node 'n1'" in detail and "runs on node 'n2'" in detail


# -- deletes -------------------------------------------------------------------------------------------------------
async def test_deleting_an_attached_volume_is_409_naming_the_instance(api):
    await _running(api.app[STORE], "web")
    await _volume(api, "v")
    await _ok(await api.post("/v1/volumes/v/attach", json={"instance": "web"}))
    detail = await refused(api, "DELETE", "/v1/volumes/v", 409)
    assert "attached to instance 'web'" in detail and "detach it first" in detail


async def test_deleting_a_snapshot_or_its_volume_while_clones_exist_is_409_naming_them(api):
    store = api.app[STORE]
    await _volume(api, "v", size=2)
    s = await _ok(await api.post("/v1/snapshots", json={"name": "s1", "volume": "v"}), 201)
    await set_status(store, SNAPSHOT, s["id"], state="available")
    await _volume(api, "c1", size=2, snapshot="s1")
    await _volume(api, "c2", size=3, snapshot="s1")
    detail = await refused(api, "DELETE", "/v1/snapshots/s1", 409)
    assert "'c1'" in detail and "'c2'" in detail
    detail = await refused(api, "DELETE", "/v1/volumes/v", 409)
    assert "snapshot 's1'" in detail and "'c1'" in detail and "'c2'" in detail


async def test_deleting_an_image_with_volumes_made_from_it_is_409_naming_them(api):
    store = api.app[STORE]
    await _ok(await api.get("/v1/pools"))  # the local pool exists from first use
    image = await put_image(store, "deb", virtual=GIB, pool="pool-local", pool_driver="local")
    await set_status(store, IMAGE, image.id, pool_state="ready")
    await _volume(api, "root1", image="deb")
    await _volume(api, "root2", image="deb")
    detail = await refused(api, "DELETE", "/v1/images/deb", 409)
    assert "2 volume(s) made from it (root1, root2)" in detail


# -- revert --------------------------------------------------------------------------------------------------------
async def test_revert_of_a_volume_attached_to_a_running_instance_is_409(api):
    store = api.app[STORE]
    await _running(store, "web")
    v = await _volume(api, "v")
    s = await _ok(await api.post("/v1/snapshots", json={"name": "s1", "volume": "v"}), 201)
    await set_status(store, SNAPSHOT, s["id"], state="available")
    await _ok(await api.post("/v1/volumes/v/attach", json={"instance": "web"}))
    await set_status(store, VOLUME, v["id"], state="in-use", device="vdb")
    detail = await refused(api, "POST", "/v1/snapshots/s1/revert", 409)
    assert "instance 'web', which is running" in detail and "instance stop web" in detail


async def test_revert_to_a_snapshot_not_yet_taken_is_409(api):
    await _volume(api, "v")
    await _ok(await api.post("/v1/snapshots", json={"name": "s1", "volume": "v"}), 201)
    detail = await refused(api, "POST", "/v1/snapshots/s1/revert", 409)
    assert "is creating" in detail


# -- references ----------------------------------------------------------------------------------------------------
async def test_unknown_references_are_404_and_make_nothing(api):
    await _volume(api, "v")
    await refused(api, "POST", "/v1/volumes", 404, json={"name": "w", "size_gib": 1, "image": "nope"})
    await refused(api, "POST", "/v1/volumes", 404, json={"name": "w", "size_gib": 1, "snapshot": "nope"})
    await refused(api, "POST", "/v1/snapshots", 404, json={"name": "s", "volume": "nope"})
    await refused(api, "POST", "/v1/volumes/v/attach", 404, json={"instance": "nope"})
    await refused(api, "POST", "/v1/snapshots/nope/revert", 404)
    await refused(api, "DELETE", "/v1/snapshots/nope", 404)
    detail = await refused(api, "POST", "/v1/volumes", 422, json={"name": "w", "size_gib": 1, "image": "x",
                                                                  "snapshot": "y"})  # fmt: skip
    assert "not both" in detail
