"""The compute API on one node with the fake hypervisor: validation, placement, project isolation, lifecycle."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from agent.node import COMPUTE
from minicloud.api import instances
from minicloud.api.keys import CONFIG, STORE
from minicloud.compute.kinds import HYPERVISOR
from minicloud.iam import apikeys
from minicloud.state import Create, Txn, Update


def _kernel(api, name: str = "vmlinuz") -> str:
    d = api.app[CONFIG].data_path / "import"
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    return str(path)


async def _image(api, name: str = "guest", project: str = "default") -> dict:
    resp = await api.post(f"/v1/images?project={project}", json={"name": name, "kernel": _kernel(api)})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def _wait_state(api, ref: str, state: str, project: str = "default") -> dict:
    for _ in range(200):
        resp = await api.get(f"/v1/instances/{ref}?project={project}")
        body = await resp.json()
        if body["status"]["state"] == state:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"instance {ref} never became {state}: {body['status']}")


async def test_an_instance_goes_from_pending_to_running_and_is_deleted(api):
    image = await _image(api)
    assert image["boot"] == "kernel" and image["node"] == "n1" and len(image["sha256"]) == 64
    resp = await api.post("/v1/instances", json={"name": "vm1", "image": "guest", "type": "m1.tiny"})
    assert resp.status == 201
    inst = await resp.json()
    assert (inst["vcpus"], inst["memory_mib"], inst["disk_gib"], inst["status"]["node"]) == (1, 128, 1, "n1")
    await _wait_state(api, "vm1", "running")
    refused = await api.post("/v1/instances/vm1/resize", json={"type": "m1.small"})  # running: memory can't change
    assert refused.status == 409 and "its memory would change" in (await refused.json())["detail"]
    body = {"name": "tiny2", "vcpus": 2, "memory_mib": 128, "disk_gib": 1}
    assert (await api.post("/v1/instance-types", json=body)).status == 201
    if inst["max_vcpus"] >= 2:  # the node has at least two CPUs: hot-plug one
        resp = await api.post("/v1/instances/vm1/resize", json={"type": "tiny2"})
        assert resp.status == 202 and (await resp.json())["vcpus"] == 2
    assert (await api.post("/v1/instances/vm1/stop", json={"force": True})).status == 202
    await _wait_state(api, "vm1", "stopped")
    resp = await api.post("/v1/instances/vm1/resize", json={"type": "m1.small"})
    assert resp.status == 202 and (await resp.json())["memory_mib"] == 2048
    assert (await api.delete("/v1/images/guest")).status == 409  # in use
    resp = await api.delete("/v1/instances/vm1")
    assert resp.status == 202 and (await resp.json())["status"]["state"] == "deleting"
    for _ in range(200):
        if (await api.get("/v1/instances/vm1")).status == 404:
            break
        await asyncio.sleep(0.02)
    assert (await api.get("/v1/instances/vm1")).status == 404
    assert (await api.delete("/v1/images/guest")).status == 204
    assert not (api.app[CONFIG].data_path / "images" / image["id"]).exists()


async def test_bad_instance_requests_are_422_and_create_nothing(api):
    await _image(api)
    bad = [
        ({"name": "a", "image": "nope", "type": "m1.tiny"}, "image"),
        ({"name": "a", "image": "guest", "type": "m9.huge"}, "type"),
        ({"name": "a", "image": "guest", "type": "m1.tiny", "keypair": "nokey"}, "keypair"),
        ({"name": "a", "image": "guest", "type": "m1.tiny", "disk_gib": 0}, "disk_gib"),
        ({"name": "a", "image": "guest", "type": "m1.tiny", "disk_gib": 10**9}, "disk_gib"),
        ({"name": "a b", "image": "guest", "type": "m1.tiny"}, "name"),
        ({"name": "a", "image": "guest", "type": "m1.tiny", "user_data": "x" * 70000}, "user_data"),
    ]
    for body, param in bad:
        resp = await api.post("/v1/instances", json=body)
        assert resp.status == 422, (body, resp.status)
        problem = await resp.json()
        assert resp.content_type == "application/problem+json"
        assert any(p["name"] == param for p in problem["invalid_params"]), (param, problem)
    assert (await (await api.get("/v1/instances")).json())["items"] == []


async def test_image_import_checks_sources(api, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"x")
    cases = [
        ({"name": "i1", "path": str(outside)}, 403),
        ({"name": "i1", "kernel": "/etc/passwd"}, 403),
        ({"name": "i1"}, 422),
        ({"name": "i1", "path": _kernel(api), "kernel": _kernel(api)}, 422),
        ({"name": "i1", "initrd": _kernel(api)}, 422),
        ({"name": "i1", "path": str(api.app[CONFIG].data_path / "import" / "missing")}, 422),
        ({"name": "i1", "url": "ftp://example.invalid/x"}, 422),
    ]
    notkernel = api.app[CONFIG].data_path / "import" / "text"
    notkernel.write_text("hello")
    cases.append(({"name": "i1", "kernel": str(notkernel)}, 422))
    for body, status in cases:
        resp = await api.post("/v1/images", json=body)
        assert resp.status == status, (body, resp.status, await resp.text())
    assert (await (await api.get("/v1/images")).json())["items"] == []
    store_dir = api.app[CONFIG].data_path / "images"
    assert not store_dir.exists() or list(store_dir.iterdir()) == []


@pytest.mark.parametrize("across_nodes", [False, True], ids=["one-node", "as-if-from-several-nodes"])
async def test_placement_refuses_what_does_not_fit_and_concurrent_creates_cannot_oversubscribe(api, across_nodes):
    if across_nodes:  # only the compare-and-swap on the placement record stands between the racers
        api.app[instances.PLACEMENT_LOCKS].get = lambda node: asyncio.Lock()  # as if each ran on another node
    await _image(api)
    store = api.app[STORE]
    for _ in range(100):  # the compute context publishes the node's capacity at start
        record = await store.get_by_name(HYPERVISOR.name, "", "n1")
        if record is not None:
            break
        await asyncio.sleep(0.01)
    # Room for exactly one m1.tiny on this node.
    hv = HYPERVISOR.load(record)
    room = msgspec.structs.replace(hv.spec, cpus=1, cpu_allocation_ratio=1.0, memory_mib=200, reserved_memory_mib=0)
    await store.commit(Txn([Update(HYPERVISOR.dump(hv.replace(spec=room)), expect_revision=hv.revision)]))
    results = await asyncio.gather(
        *(api.post("/v1/instances", json={"name": f"race{i}", "image": "guest", "type": "m1.tiny"}) for i in range(4))
    )
    statuses = sorted(r.status for r in results)
    assert statuses == [201, 409, 409, 409], statuses
    refused = next(r for r in results if r.status == 409)
    problem = await refused.json()
    assert problem["type"].endswith("/insufficient-capacity") and "vCPUs" in problem["detail"]


async def test_names_repeat_across_projects_and_other_projects_are_invisible(api):
    for p in ("p1", "p2"):
        assert (await api.post("/v1/projects", json={"name": p})).status == 201
    img = {p: await _image(api, "guest", p) for p in ("p1", "p2")}
    inst = {}
    for p in ("p1", "p2"):
        resp = await api.post(f"/v1/instances?project={p}", json={"name": "vm", "image": "guest", "type": "m1.tiny"})
        assert resp.status == 201
        inst[p] = await resp.json()
        assert inst[p]["image_id"] == img[p]["id"]  # each project's own "guest"
    # A member of p1 sees p1's image and instance, and nothing of p2's, not even by id.
    mia = await api.post("/v1/users", json={"name": "mia"})
    assert mia.status == 201
    grant = {"role": "member", "principal": "user:mia", "scope_project": "p1"}
    assert (await api.post("/v1/rolebindings?project=p1", json=grant)).status == 201
    record, token = apikeys.new_key("p1", "mia-key", "", None, {}, principal=f"user:{(await mia.json())['id']}")
    await api.app[STORE].commit(Txn([Create(record)]))
    auth = {"Authorization": f"Bearer {token}"}
    c = api.client
    listed = await (await c.get("/v1/instances?project=p1", headers=auth)).json()
    assert [i["id"] for i in listed["items"]] == [inst["p1"]["id"]]
    assert (await c.get(f"/v1/instances/{inst['p2']['id']}?project=p1", headers=auth)).status == 404
    assert (await c.get(f"/v1/images/{img['p2']['id']}?project=p1", headers=auth)).status == 404
    assert (await c.get("/v1/instances?project=p2", headers=auth)).status == 404
    assert (await c.delete("/v1/instances/vm?project=p2", headers=auth)).status == 404
    # Using another project's image by id is "no such image" too.
    body = {"name": "x", "image": img["p2"]["id"], "type": "m1.tiny"}
    assert (await c.post("/v1/instances?project=p1", json=body, headers=auth)).status == 422


async def test_instance_types_builtin_and_custom(api):
    listed = await (await api.get("/v1/instance-types")).json()
    tiny = next(t for t in listed["items"] if t["name"] == "m1.tiny")
    assert (tiny["vcpus"], tiny["memory_mib"], tiny["builtin"]) == (1, 128, True)
    resp = await api.post("/v1/instance-types", json={"name": "c1.big", "vcpus": 4, "memory_mib": 4096, "disk_gib": 10})
    assert resp.status == 201
    assert (await api.post("/v1/instance-types", json={"name": "m1.tiny", "vcpus": 1, "memory_mib": 64, "disk_gib": 1})).status == 409  # fmt: skip
    assert (await (await api.get("/v1/instance-types/c1.big")).json())["vcpus"] == 4
    assert (await api.delete("/v1/instance-types/m1.tiny")).status == 403
    assert (await api.delete("/v1/instance-types/c1.big")).status == 204
    assert (await api.get("/v1/instance-types/c1.big")).status == 404


async def test_console_returns_the_log_and_follow_streams_until_the_instance_goes(api):
    await _image(api)
    inst = await (await api.post("/v1/instances", json={"name": "con", "image": "guest", "type": "m1.tiny"})).json()
    await _wait_state(api, "con", "running")
    log = api.app[CONFIG].data_path / "instances" / inst["id"] / "console.log"
    log.write_bytes(b"minicloud-guest: init started\nminicloud-guest: ready\n")
    resp = await api.get("/v1/instances/con/console")
    assert resp.status == 200 and (await resp.text()).endswith("minicloud-guest: ready\n")
    assert await (await api.get("/v1/instances/con/console?tail=6")).text() == "ready\n"
    follow = await api.get("/v1/instances/con/console?follow=true&tail=6")
    assert await follow.content.readexactly(6) == b"ready\n"
    with log.open("ab") as f:
        f.write(b"more\n")
    assert await follow.content.readexactly(5) == b"more\n"
    assert (await api.delete("/v1/instances/con")).status == 202
    rest = await asyncio.wait_for(follow.content.read(), 10)  # the stream ends once the instance is deleted
    assert rest == b""


@pytest.fixture
async def api_loopback_allowed(tmp_path):
    """A node whose operator lets image imports download from loopback (compute.image_url_allow)."""
    from tests.unit.api.conftest import make_config, start_api

    cfg = make_config(tmp_path)
    cfg = msgspec.structs.replace(cfg, compute=msgspec.structs.replace(cfg.compute, image_url_allow=["127.0.0.1/32"]))
    a = await start_api(cfg)
    yield a
    await a.client.close()


async def _operation_result(api, resp) -> dict:
    assert resp.status == 202, await resp.text()
    op = await resp.json()
    assert resp.headers["Location"] == f"/v1/operations/{op['id']}" and op["action"] == "image.import"
    for _ in range(100):
        op = await (await api.get(f"/v1/operations/{op['id']}?wait=5")).json()
        if op["state"] != "running":
            return op
    raise AssertionError(f"operation {op['id']} never ended")


async def test_a_disk_image_is_imported_from_a_url_and_its_format_comes_from_qemu_img(api_loopback_allowed, tmp_path):
    import functools
    import hashlib
    import http.server
    import threading

    api = api_loopback_allowed
    served = tmp_path / "www"
    served.mkdir()
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", str(served / "disk.qcow2"), "64M"
    )
    assert await proc.wait() == 0
    digest = hashlib.sha256((served / "disk.qcow2").read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/disk.qcow2"
        body = {"name": "web", "url": url, "os_distro": "debian", "os_version": "12", "sha256": digest}
        op = await _operation_result(api, await api.post("/v1/images", json=body))
        assert op["state"] == "succeeded", op
        assert op["result"]["sha256"] == digest and op["progress"]["message"] == "recording the image"
        image = await (await api.get(f"/v1/images/{op['result']['image_id']}")).json()
        assert (image["boot"], image["format"], image["virtual_size_bytes"]) == ("disk", "qcow2", 64 << 20)
        assert image["os"] == {"distro": "debian", "version": "12"} and image["source"] == url
        assert image["name"] == "web" and image["sha256"] == digest
        wrong = {"name": "w2", "url": url, "format": "raw"}
        op = await _operation_result(api, await api.post("/v1/images", json=wrong))
        assert op["state"] == "failed" and "qemu-img finds qcow2" in op["error"]["detail"]
        op = await _operation_result(api, await api.post("/v1/images", json={"name": "w3", "url": url + ".nope"}))
        assert op["state"] == "failed" and "HTTP 404" in op["error"]["detail"]
        op = await _operation_result(api, await api.post("/v1/images", json={**body, "name": "w4", "sha256": "a" * 64}))
        assert op["state"] == "failed" and "SHA-256" in op["error"]["detail"]
        # The 64 MiB image fits the smallest root disk (1 GiB): instances of it are accepted.
        resp = await api.post("/v1/instances", json={"name": "vm", "image": "web", "type": "m1.tiny"})
        assert resp.status == 201
    finally:
        server.shutdown()
    names = [i["name"] for i in (await (await api.get("/v1/images")).json())["items"]]
    assert names == ["web"]
    store_dir = api.app[CONFIG].data_path / "images"
    assert sorted(p.name for p in store_dir.iterdir()) == [image["id"]]  # failed imports left nothing


async def test_start_tries_an_instance_in_error_again(api):
    await _image(api)
    driver = api.app[COMPUTE].driver  # the fake hypervisor
    driver.fail_next.add("define")
    assert (await api.post("/v1/instances", json={"name": "flaky", "image": "guest", "type": "m1.tiny"})).status == 201
    failed = await _wait_state(api, "flaky", "error")
    assert "fake define failure" in failed["status"]["reason"]
    assert (await api.post("/v1/instances/flaky/start")).status == 202
    await _wait_state(api, "flaky", "running")


async def test_a_create_retried_with_its_idempotency_key_gets_the_first_answer(api):
    await _image(api)
    body = {"name": "once", "image": "guest", "type": "m1.tiny"}
    first = await api.post("/v1/instances", json=body, headers={"Idempotency-Key": "k-1"})
    again = await api.post("/v1/instances", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status == again.status == 201
    assert (await again.json())["id"] == (await first.json())["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = await api.post("/v1/instances", json=body, headers={"Idempotency-Key": "k-2"})
    assert other.status == 409  # a new request for the same name is a conflict
    img = {"name": "guest2", "kernel": _kernel(api, "k2")}
    first = await api.post("/v1/images", json=img, headers={"Idempotency-Key": "i-1"})
    again = await api.post("/v1/images", json=img, headers={"Idempotency-Key": "i-1"})
    assert first.status == again.status == 201 and (await again.json())["id"] == (await first.json())["id"]


async def test_a_verb_answers_202_with_an_etag_honours_if_match_and_replays_as_202(api):
    await _image(api)
    inst = await (await api.post("/v1/instances", json={"name": "v", "image": "guest", "type": "m1.tiny"})).json()
    stale = {"If-Match": f'"{inst["revision"] - 1}"'}
    assert (await api.post("/v1/instances/v/stop", json={}, headers=stale)).status == 412
    key = {"Idempotency-Key": "stop-1"}
    first = await api.post("/v1/instances/v/stop", json={"force": True}, headers=key)
    assert first.status == 202 and first.headers["ETag"] == f'"{(await first.json())["revision"]}"'
    again = await api.post("/v1/instances/v/stop", json={"force": True}, headers=key)
    assert again.status == 202 and again.headers.get("Idempotent-Replayed") == "true"
    assert (await again.json())["revision"] == (await first.json())["revision"]
    resp = await api.patch("/v1/instances/v", json={"labels": {"tier": "web"}, "description": "d"})
    assert resp.status == 200 and (await resp.json())["labels"] == {"tier": "web"}
    listed = await (await api.get("/v1/instances?label=tier=web")).json()
    assert [i["name"] for i in listed["items"]] == ["v"]
