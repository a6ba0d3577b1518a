"""The image services without HTTP (``minicloud.compute.images``): imports and deletes write through the write layer
(audit, idempotency, project guards) whoever calls, and a URL import's finished image is recorded on the
requester's behalf."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from minicloud import errors
from minicloud.compute import images
from minicloud.compute.kinds import IMAGE, INSTANCE
from minicloud.core.context import Context, Idempotency
from minicloud.iam.keystore import KeyStore
from minicloud.model.compute import ImageImport
from minicloud.operations import Operations
from minicloud.state import Create, Delete, Record, SQLiteStore, Txn, Update

NODE = "n1"


@dataclass(frozen=True)
class User:
    ref: str
    admin: bool = False


def ctx(project: str = "default", **kw: object) -> Context:
    fields: dict = {"action": "compute:images:create", "request_id": "req-1", "method": "POST", "path": "/v1/images"}
    return Context(principal=User("user:usr-alice"), project=project, **{**fields, **kw})


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def node(tmp_path, store):
    ops = Operations(store, NODE)
    yield images.NodeImages(
        node=NODE,
        root=tmp_path / "images",
        import_dirs=[tmp_path / "import"],
        url_allow=["127.0.0.1/32"],
        url_max_bytes=1 << 20,
        operations=ops,
    )
    await ops.close()


def kernel(tmp_path) -> str:
    d = tmp_path / "import"
    d.mkdir(exist_ok=True)
    path = d / "vmlinuz"
    path.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    return str(path)


class Server:
    """A loopback HTTP server sending ``body`` once ``release`` is set."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.release = asyncio.Event()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/disk.img"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _handle(self, reader, writer) -> None:  # type: ignore[no-untyped-def]
        await reader.readuntil(b"\r\n\r\n")
        await self.release.wait()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(self.body), self.body)
        )
        await writer.drain()
        writer.close()


async def audit_of(store, target_id: str) -> list[Record]:
    return [e for e in await store.list("audit", project=None, limit=1000) if e.spec["target"].get("id") == target_id]


async def finished(node, op_id: str) -> dict:
    record = await node.operations.wait(op_id, 30)
    assert record is not None and record.status["state"] != "running", record
    return record.status


async def test_a_file_import_is_created_with_its_audit_entry_and_its_files(store, node, tmp_path):
    written = await images.import_image(ctx(), store, node, ImageImport(name="guest", kernel=kernel(tmp_path)))
    assert written.status == 201 and written.headers["Location"] == f"/v1/images/{written.body.id}"
    image = IMAGE.load(await store.get(IMAGE.name, written.body.id))
    assert (image.spec.boot, image.spec.node, image.spec.files["kernel"].size_bytes) == ("kernel", NODE, 0x202 + 68)
    assert (node.root / image.id / "kernel").is_file()
    [entry] = await audit_of(store, image.id)
    assert (entry.spec["principal"], entry.spec["action"], entry.revision) == (
        "user:usr-alice",
        "compute:images:create",
        written.revision,
    )
    again = images.import_image(ctx(), store, node, ImageImport(name="guest", kernel=kernel(tmp_path)))
    with pytest.raises(errors.AlreadyExists):
        await again


async def test_a_finished_url_import_records_the_image_on_behalf_of_the_requester(store, node, tmp_path):
    """Before, the operation committed the image straight to the store: no audit entry, no project guard. It is
    committed with the requester's context (not replayed from the request's Idempotency-Key)."""
    idem = Idempotency("idem-test", "fingerprint", KeyStore(tmp_path / "keys"))
    async with Server(b"x" * 100) as server:
        server.release.set()
        started = await images.import_image(ctx(idempotency=idem), store, node, ImageImport(name="web", url=server.url))
        assert started.status == 202 and started.headers["Location"] == f"/v1/operations/{started.body.id}"
        status = await finished(node, started.body.id)
    assert status["state"] == "succeeded", status
    image_id = status["result"]["image_id"]
    record = await store.get(IMAGE.name, image_id)
    assert IMAGE.load(record).spec.format == "raw" and IMAGE.load(record).spec.source == server.url
    [entry] = await audit_of(store, image_id)
    assert (entry.spec["principal"], entry.spec["action"], entry.spec["request_id"], entry.revision) == (
        "user:usr-alice",
        "compute:images:create",
        "req-1",
        record.revision,
    )
    # The same request again replays the operation and starts nothing.
    again = await images.import_image(ctx(idempotency=idem), store, node, ImageImport(name="web", url=server.url))
    assert again.replayed and again.body["id"] == started.body.id


async def test_a_url_import_into_a_project_being_deleted_records_nothing_and_keeps_nothing(store, node):
    stamp = "2024-01-01T00:00:00Z"
    project = Record(kind="project", id="prj-1", project="", name="p1", spec={}, created_at=stamp, updated_at=stamp)
    await store.commit(Txn([Create(project)]))
    async with Server(b"x" * 100) as server:
        started = await images.import_image(ctx("p1"), store, node, ImageImport(name="web", url=server.url))
        project = await store.get("project", "prj-1")
        project.status = {"state": "deleting"}
        await store.commit(Txn([Update(project, expect_revision=project.revision)]))
        server.release.set()
        status = await finished(node, started.body.id)
    assert status["state"] == "failed" and status["error"]["status"] == 409, status
    assert await store.list(IMAGE.name, project=None) == []
    assert list(node.root.iterdir()) == []


async def test_an_image_in_use_is_not_deleted_and_a_deleted_image_loses_its_files(store, node, tmp_path):
    image = (await images.import_image(ctx(), store, node, ImageImport(name="guest", kernel=kernel(tmp_path)))).body
    stamp = "2024-01-01T00:00:00Z"
    vm = Record(
        kind=INSTANCE.name, id="i-1", project="default", name="vm", spec={"image_id": image.id},
        created_at=stamp, updated_at=stamp,
    )  # fmt: skip
    await store.commit(Txn([Create(vm)]))
    delete = ctx(action="compute:images:delete", method="DELETE", path="/v1/images/guest")
    with pytest.raises(errors.InUse, match="vm"):
        await images.delete_image(delete, store, node, "guest")
    await store.commit(Txn([Delete(kind=INSTANCE.name, id="i-1")]))
    written = await images.delete_image(delete, store, node, "guest")
    assert written.status == 204 and await store.get(IMAGE.name, image.id) is None
    assert not (node.root / image.id).exists()
    assert [e.spec["action"] for e in await audit_of(store, image.id)] == [
        "compute:images:create",
        "compute:images:delete",
    ]


async def _pools(store, *, default: str) -> None:
    from minicloud.storage.kinds import POOL, PoolSpec

    ops = []
    for name, driver in (("local", "local"), ("ceph", "ceph")):
        spec = PoolSpec(driver=driver, ceph_pool="minicloud" if driver == "ceph" else "", default=name == default)
        ops.append(Create(POOL.dump(POOL.new(project="", name=name, id=f"pool-{name}", spec=spec))))
    await store.commit(Txn(ops))


async def test_a_disk_image_goes_into_the_default_pool_or_the_one_asked_and_a_kernel_image_stays_a_file(
    store, node, tmp_path
):
    await _pools(store, default="ceph")
    async with Server(b"x" * 100) as server:
        server.release.set()
        for name, pool in (("web", None), ("web-local", "local")):
            started = await images.import_image(ctx(), store, node, ImageImport(name=name, url=server.url, pool=pool))
            status = await finished(node, started.body.id)
            assert status["state"] == "succeeded", status
            image = IMAGE.load(await store.get(IMAGE.name, status["result"]["image_id"]))
            # the image's node copies it into the pool (agent.reconcilers.storage) and says `ready`
            want = ("pool-ceph", "ceph") if pool is None else ("pool-local", "local")
            assert (image.spec.pool, image.spec.pool_driver, image.status.pool_state) == (*want, "importing")
            assert IMAGE.to_view(image).pool_state == "importing"
    written = await images.import_image(ctx(), store, node, ImageImport(name="k", kernel=kernel(tmp_path)))
    image = IMAGE.load(await store.get(IMAGE.name, written.body.id))
    assert (image.spec.pool, image.status.pool_state) == ("", "")
    with pytest.raises(errors.ValidationFailed, match="kernel images stay files"):
        await images.import_image(ctx(), store, node, ImageImport(name="k2", kernel=kernel(tmp_path), pool="ceph"))
    with pytest.raises(errors.NotFound, match="no storage pool 'nope'"):
        await images.import_image(ctx(), store, node, ImageImport(name="k2", url="http://127.0.0.1:1/x", pool="nope"))


async def test_an_image_with_volumes_made_from_it_is_not_deleted(store, node, tmp_path):
    from minicloud.storage.kinds import VOLUME, VolumeSource, VolumeSpec

    await _pools(store, default="ceph")
    async with Server(b"x" * 100) as server:
        server.release.set()
        started = await images.import_image(ctx(), store, node, ImageImport(name="web", url=server.url))
        image_id = (await finished(node, started.body.id))["result"]["image_id"]
    spec = VolumeSpec(size_gib=1, pool="pool-ceph", source=VolumeSource(type="image", id=image_id, name="web"))
    vol = VOLUME.new(project="default", name="data", spec=spec)
    await store.commit(Txn([Create(VOLUME.dump(vol))]))
    delete = ctx(action="compute:images:delete", method="DELETE", path="/v1/images/web")
    with pytest.raises(errors.InUse, match=r"volume\(s\) made from it \(data\)"):
        await images.delete_image(delete, store, node, "web")
