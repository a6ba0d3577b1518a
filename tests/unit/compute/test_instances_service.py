"""The instance services without HTTP: a leader-loop-style caller (``Context.system``) creates, changes and deletes
instances on a real SQLite store, with placement, and every change is audited like an HTTP request's."""

from __future__ import annotations

import asyncio

import pytest

from minicloud import errors
from minicloud.compute import instances
from minicloud.compute.kinds import (
    HYPERVISOR,
    IMAGE,
    INSTANCE,
    PLACEMENT,
    HypervisorSpec,
    ImageSpec,
    InstanceSpec,
    RebootRequest,
)
from minicloud.core.context import Context
from minicloud.model.compute import InstanceCreate
from minicloud.state import Create, Record, SQLiteStore, Txn

NODE = "n1"


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    image = IMAGE.new(
        project="default",
        name="guest",
        id="img-1",
        spec=ImageSpec(boot="kernel", size_bytes=1, sha256="x", node=NODE),
    )
    await s.commit(Txn([Create(IMAGE.dump(image))]))
    yield s
    await s.close()


async def publish(store: SQLiteStore, **capacity: int) -> None:
    """What the node's compute reconciler publishes: room for ``capacity`` (default: plenty)."""
    spec = HypervisorSpec(**{"cpus": 4, "memory_mib": 4096, "disk_gib": 100, **capacity})  # type: ignore[arg-type]
    await store.commit(Txn([Create(HYPERVISOR.dump(HYPERVISOR.new(project="", name=NODE, spec=spec)))]))


async def audit_entries(store: SQLiteStore) -> list[Record]:
    return await store.list("audit", project=None, limit=1000)


def create(name: str = "vm", **kw: object) -> InstanceCreate:
    return InstanceCreate(name=name, image="guest", type="m1.tiny", **kw)  # type: ignore[arg-type]


async def test_a_leader_loop_creates_an_instance_through_the_service_and_it_is_audited(store):
    await publish(store)
    ctx = Context.system("autoscaler", action="compute:instances:create")
    written = await instances.create_instance(ctx, store, create(labels={"pool": "web"}))
    assert written.status == 201 and written.headers["Location"] == f"/v1/instances/{written.body.id}"
    view = written.body
    assert (view.vcpus, view.memory_mib, view.max_vcpus, view.status.state, view.status.node) == (1, 128, 4, "pending", NODE)  # fmt: skip
    stored = INSTANCE.load(await store.get(INSTANCE.name, view.id))
    assert stored.spec.image_id == "img-1" and stored.spec.power == "running" and stored.labels == {"pool": "web"}
    assert stored.revision == written.revision
    placement = PLACEMENT.load(await store.get(PLACEMENT.name, instances.placement_id(NODE)))
    assert placement.spec.seq == 1
    [entry] = await audit_entries(store)
    assert entry.spec["principal"] == "system:autoscaler" and entry.spec["action"] == "compute:instances:create"
    assert entry.spec["target"] == {"kind": "instance", "id": view.id, "name": "vm"}
    assert entry.revision == written.revision  # committed with the change, in one transaction
    # The same service refuses the same name, an unknown image and what does not fit.
    with pytest.raises(errors.AlreadyExists):
        await instances.create_instance(ctx, store, create())
    with pytest.raises(errors.ValidationFailed, match="no image 'nope'"):
        await instances.create_instance(ctx, store, InstanceCreate(name="x", image="nope", type="m1.tiny"))
    with pytest.raises(errors.InsufficientCapacity, match="memory"):
        await instances.create_instance(ctx, store, InstanceCreate(name="big", image="guest", type="m1.xlarge"))
    assert len(await audit_entries(store)) == 1  # refusals wrote nothing


async def test_concurrent_creates_through_the_service_take_the_last_slot_once(store):
    await publish(store, cpus=1, memory_mib=200)  # room for exactly one m1.tiny
    ctx = Context.system("test")
    results = await asyncio.gather(
        *(instances.create_instance(ctx, store, create(f"race{i}")) for i in range(4)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, errors.InsufficientCapacity) for r in results if isinstance(r, Exception))


async def test_the_verbs_change_the_spec_and_answer_202(store):
    await publish(store)
    ctx = Context.system("test")
    vm = (await instances.create_instance(ctx, store, create())).body
    written = await instances.stop_instance(ctx, store, "vm", force=True)
    assert written.status == 202 and written.body.power == "stopped"
    assert INSTANCE.load(await store.get(INSTANCE.name, vm.id)).spec.stop_force
    with pytest.raises(errors.Conflict, match="start it instead"):
        await instances.reboot_instance(ctx, store, "vm")
    await instances.start_instance(ctx, store, vm.id)
    await instances.reboot_instance(ctx, store, "vm", force=True)
    spec = INSTANCE.load(await store.get(INSTANCE.name, vm.id)).spec
    assert (spec.power, spec.reboot) == ("running", RebootRequest(seq=1, force=True))
    with pytest.raises(errors.Conflict, match="its memory would change"):
        await instances.resize_instance(ctx, store, "vm", "m1.small")  # running
    written = await instances.delete_instance(ctx, store, "vm")
    assert written.status == 202 and written.body.status.state == "deleting"
    with pytest.raises(errors.Conflict, match="being deleted"):
        await instances.start_instance(ctx, store, "vm")
    actions = [e.spec["target"]["id"] for e in await audit_entries(store)]
    assert actions == [vm.id] * 5  # create, stop, start, reboot, delete: each audited


async def test_an_instance_whose_node_never_ran_compute_is_deleted_at_once(store):
    ctx = Context.system("test")
    spec = InstanceSpec(
        uuid="u", image_id="img-1", image_name="guest", type="m1.tiny", vcpus=1, memory_mib=128, disk_gib=1, node="gone"
    )
    obj = INSTANCE.new(project="default", name="stray", spec=spec)
    await store.commit(Txn([Create(INSTANCE.dump(obj))]))
    assert (await instances.delete_instance(ctx, store, "stray")).status == 204
    assert await store.get(INSTANCE.name, obj.id) is None


def test_an_instance_record_written_before_the_typed_kind_reads_with_defaults():
    spec = {"uuid": "u", "image_id": "img-1", "image_name": "guest", "type": "m1.tiny", "vcpus": 2,
            "memory_mib": 128, "disk_gib": 1, "keypair": None, "public_keys": [], "user_data": "",
            "power": "running", "reboot": {"seq": 3, "force": False}, "stop_force": False, "deleted": False,
            "node": NODE}  # fmt: skip
    record = Record(kind="instance", id="i-1", project="default", name="old", spec=spec, status={"state": "running"},
                    created_at="t", updated_at="t")  # fmt: skip
    obj = INSTANCE.load(record)
    assert (obj.spec.max_vcpus, obj.spec.vcpu_limit, obj.spec.retry, obj.spec.reboot.seq) == (None, 2, 0, 3)
    view = INSTANCE.to_view(obj)
    assert (view.max_vcpus, view.description, view.status.state, view.status.addresses) == (2, "", "running", [])


def test_the_sdk_collection_derives_its_paths_from_the_declaration():
    from minicloud.client.compute import Instances

    calls: list[tuple] = []

    class FakeClient:
        def call(self, method, path, type=None, **kw):
            calls.append((method, path, kw.get("json"), kw.get("headers")))

        def paginate(self, path, type, **query):
            calls.append(("LIST", path, query, None))
            return iter(())

    sdk = Instances(FakeClient())  # type: ignore[arg-type]
    sdk.list(label="a=b")
    sdk.get("vm 1")
    sdk.update("vm", labels={"x": "y"})
    sdk.create(name="vm", image="guest", type="m1.tiny", idempotency_key="k")
    sdk.stop("vm", force=True)
    sdk.start("vm")
    sdk.delete("vm", if_match=3)
    assert calls == [
        ("LIST", "/v1/instances", {"label": "a=b"}, None),
        ("GET", "/v1/instances/vm%201", None, None),
        ("PATCH", "/v1/instances/vm", {"labels": {"x": "y"}}, None),
        ("POST", "/v1/instances", {"name": "vm", "image": "guest", "type": "m1.tiny"}, {"Idempotency-Key": "k"}),
        ("POST", "/v1/instances/vm/stop", {"force": True}, None),
        ("POST", "/v1/instances/vm/start", None, None),
        ("DELETE", "/v1/instances/vm", None, {"If-Match": '"3"'}),
    ]
