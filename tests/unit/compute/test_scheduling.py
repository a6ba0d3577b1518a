"""Scheduling across nodes, through the services on a real SQLite store: zones, ``--node``, server groups (and
their compare-and-swap under concurrent creates), cordon, the recorded reason, and the filters/weighers alone."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from minicloud import errors
from minicloud.cluster.kinds import NODE, NodeSpec, NodeStatus
from minicloud.compute import instances, nodes, server_groups
from minicloud.compute.kinds import (
    HYPERVISOR,
    IMAGE,
    INSTANCE,
    SERVERGROUP,
    HypervisorSpec,
    ImageSpec,
    ImageStatus,
    ServerGroupSpec,
)
from minicloud.compute.scheduler import (
    FILTERS,
    Demand,
    Group,
    NodeCapacity,
    NodeView,
    SchedRequest,
    capacity_filter,
    schedule,
    server_group_filter,
    zone_filter,
)
from minicloud.core.context import Context, SystemCaller
from minicloud.model.compute import InstanceCreate, ServerGroupCreate
from minicloud.state import Create, Delete, SQLiteStore, Txn, Update
from minicloud.storage.kinds import POOL, PoolSpec

CTX = Context.system("test", action="compute:instances:create")
TINY = Demand(1, 128, 1)


def view(name: str, memory: int = 1024, used: int = 0, zone: str = "", **kw: bool) -> NodeView:
    return NodeView(capacity=NodeCapacity(name, 8, memory, 100), used=Demand(0, used, 0), zone=zone, **kw)


# -- pure: filters and weighers ------------------------------------------------------------------------------------
def test_spread_takes_the_most_free_memory_and_pack_the_least():
    nodes_ = [view("a", 1024), view("b", 4096, used=1024), view("c", 2048)]
    assert schedule(SchedRequest(demand=TINY), nodes_).node == "b"
    assert schedule(SchedRequest(demand=TINY), nodes_, weigher="pack").node == "a"
    with pytest.raises(errors.ValidationFailed, match="unknown scheduler weigher"):
        schedule(SchedRequest(demand=TINY), nodes_, weigher="random")


def test_each_filter_refuses_with_its_reason_and_the_409_lists_every_node():
    req = SchedRequest(demand=Demand(1, 2000, 1), zone="a")
    nodes_ = [view("n1", zone="a", cordoned=True), view("n2", zone="b"), view("n3", zone="a"), view("n4", offline=True)]
    with pytest.raises(errors.InsufficientCapacity) as exc:
        schedule(req, nodes_)
    detail = exc.value.detail
    assert "n1: cordoned" in detail and "n2: in zone 'b', not 'a'" in detail and "n4: offline" in detail
    assert "n3: not enough memory (1024 of 1024 MiB free, 2000 needed)" in detail
    assert zone_filter(SchedRequest(demand=TINY, zone="a"), view("x")) == "has no zone, not 'a'"
    assert capacity_filter(SchedRequest(demand=TINY), view("x")) is None


def test_server_group_policies_by_node_and_by_zone():
    anti = Group(name="g", policy="anti-affinity", member_nodes=("a",), member_zones=("z1",))
    assert "already has a member in this node" in server_group_filter(SchedRequest(demand=TINY, group=anti), view("a"))
    assert server_group_filter(SchedRequest(demand=TINY, group=anti), view("b", zone="z1")) is None
    by_zone = Group(name="g", policy="anti-affinity", scope="zone", member_nodes=("a",), member_zones=("z1",))
    assert "zone 'z1'" in server_group_filter(SchedRequest(demand=TINY, group=by_zone), view("b", zone="z1"))
    together = Group(name="g", policy="affinity", member_nodes=("a", "a"), member_zones=("", ""))
    assert schedule(SchedRequest(demand=TINY, group=together), [view("a"), view("b", 8192)]).node == "a"
    first = Group(name="g", policy="affinity")
    assert schedule(SchedRequest(demand=TINY, group=first), [view("a"), view("b", 8192)]).node == "b"
    # soft: the node with the fewest members first, whatever the memory; never a refusal
    soft = Group(name="g", policy="soft-anti-affinity", member_nodes=("b", "a", "b"), member_zones=("", "", ""))
    assert schedule(SchedRequest(demand=TINY, group=soft), [view("a"), view("b", 8192)]).node == "a"
    soft_all = Group(name="g", policy="soft-anti-affinity", member_nodes=("a", "b"), member_zones=("", ""))
    assert schedule(SchedRequest(demand=TINY, group=soft_all), [view("a"), view("b", 8192)]).node == "b"


def test_a_decision_says_why_and_filters_are_an_extension_point():
    decision = schedule(SchedRequest(demand=TINY), [view("a", 1024), view("b", 2048), view("c", cordoned=True)])
    assert decision.node == "b"
    assert decision.reason.startswith("spread: 1920 MiB free after placement, best of 2 of 3 nodes")
    assert "refused c: cordoned" in decision.reason

    def no_b(req: SchedRequest, node: NodeView) -> str | None:
        return "has no GPU" if node.name == "b" else None

    decision = schedule(SchedRequest(demand=TINY), [view("a"), view("b", 2048)], filters=[*FILTERS, no_b])
    assert decision.node == "a" and "b: has no GPU" in decision.reason
    with pytest.raises(errors.InsufficientCapacity, match="holding its image or disk \\(n9\\) has not registered"):
        schedule(SchedRequest(demand=TINY, pinned="n9"), [view("a")])


# -- services on a store -------------------------------------------------------------------------------------------
@pytest.fixture
async def store(tmp_path):
    """Three nodes n1..n3 in zones a, a, b; a ready Ceph image 'deb' (runs anywhere)."""
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    ops = []
    for node, zone in (("n1", "a"), ("n2", "a"), ("n3", "b")):
        spec = HypervisorSpec(cpus=4, memory_mib=4096, disk_gib=100)
        ops.append(Create(HYPERVISOR.dump(HYPERVISOR.new(project="", name=node, spec=spec))))
        member = NODE.new(project="", name=node, spec=NodeSpec(address="10.0.0.1"), labels={"zone": zone},
                          status=NodeStatus(state="online"))  # fmt: skip
        ops.append(Create(NODE.dump(member)))
    ceph = PoolSpec(driver="ceph", ceph_pool="minicloud", default=True)
    ops.append(Create(POOL.dump(POOL.new(project="", name="ceph", id="pool-ceph", spec=ceph))))
    spec = ImageSpec(boot="disk", format="qcow2", virtual_size_bytes=1 << 30, size_bytes=1, sha256="x", node="n1",
                     pool="pool-ceph", pool_driver="ceph")  # fmt: skip
    image = IMAGE.new(project="default", name="deb", spec=spec, status=ImageStatus(pool_state="ready"))
    ops.append(Create(IMAGE.dump(image)))
    await s.commit(Txn(ops))
    yield s
    await s.close()


def body(name: str, **kw: object) -> InstanceCreate:
    return InstanceCreate(name=name, image="deb", type="m1.tiny", **kw)  # type: ignore[arg-type]


async def placed(store, written) -> str:
    return INSTANCE.load(await store.get(INSTANCE.name, written.body.id)).spec.node


async def test_spread_zone_and_the_recorded_reason(store):
    first = await instances.create_instance(CTX, store, body("vm1"))
    assert first.body.status.placement.startswith("spread: ") and "best of 3 of 3 nodes" in first.body.status.placement
    spread = {await placed(store, first)}
    for i in (2, 3):
        spread.add(await placed(store, await instances.create_instance(CTX, store, body(f"vm{i}"))))
    assert spread == {"n1", "n2", "n3"}
    in_b = await instances.create_instance(CTX, store, body("vm4", zone="b"))
    assert await placed(store, in_b) == "n3" and in_b.body.zone == "b"
    assert "zone b" in in_b.body.status.placement and "n1: in zone 'a', not 'b'" in in_b.body.status.placement
    with pytest.raises(errors.BadRequest, match="there is no zone 'c': the zones are a, b"):
        await instances.create_instance(CTX, store, body("vm5", zone="c"))
    # pack: the fullest node that fits
    packed = await instances.create_instance(CTX, store, body("vm6"), weigher="pack")
    assert await placed(store, packed) == "n3"


async def test_node_hint_is_for_administrators_only(store):
    member = Context(principal=SystemCaller("x", admin=False), project="default")
    admin = CTX
    with pytest.raises(errors.Forbidden, match="for cluster administrators"):
        await instances.create_instance(member, store, body("vm0", node="n2"))
    written = await instances.create_instance(admin, store, body("vm1", node="n2"))
    assert await placed(store, written) == "n2" and "node n2 asked for" in written.body.status.placement
    with pytest.raises(errors.BadRequest, match="no compute node 'n9'"):
        await instances.create_instance(admin, store, body("vm2", node="n9"))


async def test_anti_affinity_refuses_a_fourth_on_three_nodes_even_when_created_together(store):
    await server_groups.create_server_group(CTX, store, ServerGroupCreate(name="web", policy="anti-affinity"))
    results = await asyncio.gather(
        *(instances.create_instance(CTX, store, body(f"w{i}", server_group="web")) for i in range(4)),
        return_exceptions=True,
    )
    made = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(made) == 3 and len(refused) == 1, results
    assert {await placed(store, w) for w in made} == {"n1", "n2", "n3"}
    assert isinstance(refused[0], errors.Conflict)
    assert "anti-affinity group 'web' already has a member in this node" in refused[0].detail
    shown = await server_groups.show_server_group(CTX, store, "web")
    assert sorted(shown.member_nodes) == ["n1", "n2", "n3"] and len(shown.members) == 3
    with pytest.raises(errors.InUse, match="has 3 member"):
        await server_groups.delete_server_group(CTX, store, "web")
    # by zone: two zones, so two members at most
    await server_groups.create_server_group(CTX, store, ServerGroupCreate(name="z", policy="anti-affinity", scope="zone"))  # fmt: skip
    await instances.create_instance(CTX, store, body("z1", server_group="z"))
    await instances.create_instance(CTX, store, body("z2", server_group="z"))
    with pytest.raises(errors.InsufficientCapacity, match="allows one member per zone"):
        await instances.create_instance(CTX, store, body("z3", server_group="z"))


async def test_a_server_group_of_another_project_is_unknown(store):
    theirs = SERVERGROUP.new(project="other", name="theirs", spec=ServerGroupSpec(policy="affinity"))
    await store.commit(Txn([Create(SERVERGROUP.dump(theirs))]))
    for ref in ("theirs", theirs.id):
        with pytest.raises(errors.NotFound, match="no server group"):
            await instances.create_instance(CTX, store, body("vm", server_group=ref))


async def test_cordon_excludes_a_node_and_uncordon_brings_it_back(store):
    await nodes.cordon(CTX, store, "n1", "kernel update")
    await nodes.cordon(CTX, store, "n2")
    listed = {n.name: n for n in await nodes.list_nodes(store)}
    assert listed["n1"].scheduling == "cordoned" and listed["n1"].cordon_reason == "kernel update"
    assert listed["n3"].scheduling == "schedulable" and listed["n3"].zone == "b" and listed["n3"].state == "online"
    for i in range(3):
        assert await placed(store, await instances.create_instance(CTX, store, body(f"vm{i}"))) == "n3"
    with pytest.raises(errors.InsufficientCapacity, match="n1: cordoned"):
        await instances.create_instance(CTX, store, body("x", zone="a"))
    await nodes.uncordon(CTX, store, "n1")
    assert await placed(store, await instances.create_instance(CTX, store, body("back", zone="a"))) == "n1"
    assert {n.name: n for n in await nodes.list_nodes(store)}["n3"].instances == 3
    with pytest.raises(errors.NotFound, match="no node 'n9'"):
        await nodes.cordon(CTX, store, "n9")


async def test_cordon_of_a_node_running_alone_is_refused(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=100)
    await s.open()
    try:
        hv = HYPERVISOR.new(project="", name="solo", spec=HypervisorSpec(cpus=1, memory_mib=1024, disk_gib=10))
        await s.commit(Txn([Create(HYPERVISOR.dump(hv))]))
        with pytest.raises(errors.Conflict, match="runs alone"):
            await nodes.cordon(CTX, s, "solo")
        [solo] = await nodes.list_nodes(s)
        assert (solo.name, solo.state, solo.scheduling, solo.zone) == ("solo", "online", "schedulable", "")
    finally:
        await s.close()


async def test_the_placement_cache_follows_every_change_and_a_reset(store):
    cache = nodes.placement_cache(store)
    await server_groups.create_server_group(CTX, store, ServerGroupCreate(name="g", policy="soft-anti-affinity"))
    a = await instances.create_instance(CTX, store, body("a", server_group="g"))
    b = await instances.create_instance(CTX, store, body("b", node="n1"))
    usage = await cache.usage(store)
    assert usage["n1"][1] + sum(u[1] for n, u in usage.items() if n != "n1") == 2
    record = await store.get(INSTANCE.name, b.body.id)
    grown = {**record.spec, "memory_mib": 1000}
    await store.commit(Txn([Update(msgspec.structs.replace(record, spec=grown), expect_revision=record.revision)]))
    assert (await cache.usage(store))["n1"][0].memory_mib >= 1000
    gid = (await server_groups.show_server_group(CTX, store, "g")).id
    assert [m[0] for m in await cache.members(store, gid)] == [a.body.id]
    record = await store.get(INSTANCE.name, a.body.id)
    await store.commit(Txn([Delete(kind=INSTANCE.name, id=a.body.id, expect_revision=record.revision)]))
    assert await cache.members(store, gid) == []
    cache._apply(None)  # an etcd resync: everything is read again
    assert sum(u[1] for u in (await cache.usage(store)).values()) == 1
