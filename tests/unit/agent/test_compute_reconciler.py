"""The compute reconciler against the fake hypervisor and fake network, with a real SQLite store.

Most tests drive whole passes by hand (every key the reconciler lists, one after the other: ``world.pass_()``) so the
steps are deterministic; the last ones run it under the framework's controller. The real libvirt driver is exercised
by tests/integration/test_compute.py."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import uuid

import msgspec
import pytest

from agent.compute import design
from agent.compute.driver import DomainInfo, FakeDriver
from agent.compute.xml import read_metadata
from agent.net.default import FakeNetwork, NetworkSpec
from agent.net.nodenetworks import NodeNetworks
from agent.reconcile import Controller, Result
from agent.reconcilers.compute import NODE_KEY, ComputeReconciler
from minicloud import config as cfgmod
from minicloud import ids
from minicloud.compute.kinds import (
    HYPERVISOR,
    IMAGE,
    INSTANCE,
    ImageSpec,
    InstanceNicSpec,
    InstanceObserved,
    InstanceSpec,
)
from minicloud.core.kinds import Obj
from minicloud.model.compute import Address
from minicloud.network import ipam
from minicloud.network.kinds import IPALLOC, PORT, PortSpec
from minicloud.state import Create, Record, Txn, Update
from minicloud.state.sqlite import SQLiteStore

NODE = "n1"
Instance = Obj[InstanceSpec, InstanceObserved]


def _config(tmp_path):
    f = tmp_path / "minicloud.toml"
    f.write_text('[compute]\ndriver = "fake"\nstop_timeout = 60\n[network]\nbridge = "mcunit0"\n')
    return cfgmod.load(f, env={}, overrides={"agent.data_dir": str(tmp_path / "data"), "agent.node_name": NODE})


def _record(kind: str, id_: str, name: str, spec: dict, project: str = "default", status: dict | None = None) -> Record:
    stamp = ids.now()
    return Record(kind=kind, id=id_, project=project, name=name, spec=spec, status=status or {}, created_at=stamp, updated_at=stamp)  # fmt: skip


class World:
    def __init__(self, store, config, driver, network, reconciler):
        self.store, self.config, self.driver, self.network, self.r = store, config, driver, network, reconciler
        self.enqueued: list[str] = []  # what the reconciler queued itself (driver events, recovery)

    async def pass_(self) -> dict[str, Result]:
        """Reconcile every key the reconciler lists, one after the other (what a resync queues)."""
        return {key: await self.r.reconcile(key) for key in await self.r.all_keys()}

    async def add_instance(self, name: str, **spec_changes) -> Instance:
        fields = {"uuid": str(uuid.uuid4()), "image_id": "img-1", "image_name": "guest", "type": "m1.tiny", "vcpus": 1,
                  "memory_mib": 128, "disk_gib": 1, "user_data": "#!/bin/sh\necho hi\n", "node": NODE}  # fmt: skip
        spec = InstanceSpec(**{**fields, **spec_changes})
        inst = INSTANCE.new(project="default", name=name, spec=spec)
        await self.store.commit(Txn([Create(INSTANCE.dump(inst))]))
        return await self.get(inst)

    async def get(self, inst: Instance) -> Instance | None:
        record = await self.store.get(INSTANCE.name, inst.id)
        return INSTANCE.load(record) if record is not None else None

    async def change_spec(self, inst: Instance, **changes) -> None:
        cur = await self.get(inst)
        new = cur.replace(spec=msgspec.structs.replace(cur.spec, **changes))
        await self.store.commit(Txn([Update(INSTANCE.dump(new), expect_revision=cur.revision)]))

    def domain(self, inst: Instance) -> DomainInfo | None:
        return self.driver.doms.get(inst.spec.uuid)

    def files(self, inst: Instance):
        return self.config.data_path / "instances" / inst.id


@pytest.fixture
async def world(tmp_path):
    config = _config(tmp_path)
    store = SQLiteStore(config.data_path / "state.db")
    config.data_path.mkdir(parents=True)
    await store.open()
    images = config.data_path / "images" / "img-1"
    images.mkdir(parents=True)
    (images / "kernel").write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 100)
    (images / "initrd").write_bytes(b"initrd")
    spec = ImageSpec(boot="kernel", node=NODE, cmdline="panic=-1", size_bytes=1, sha256="x")
    await store.commit(Txn([Create(IMAGE.dump(IMAGE.new(project="default", name="guest", id="img-1", spec=spec)))]))
    driver = FakeDriver()
    network = FakeNetwork(NetworkSpec(name="default", bridge="mcunit0", cidr=ipaddress.IPv4Network("10.99.0.0/24")))
    networks = NodeNetworks()
    r = ComputeReconciler(store=store, config=config, driver=driver, network=network, virt_type="qemu", virt_reason="test", networks=networks)  # fmt: skip
    world = World(store, config, driver, network, r)
    world.networks = networks
    await r.start(world.enqueued.append)
    yield world
    await r.close()
    await store.close()


async def test_a_new_instance_is_built_started_and_gets_its_address(world):
    inst = await world.add_instance("web")
    await world.pass_()
    dom = world.domain(inst)
    assert dom is not None and dom.state == "running"
    meta = read_metadata(dom.xml)
    assert (meta.id, meta.name, meta.node, meta.image) == (inst.id, "web", NODE, "img-1")
    assert "panic=-1" in dom.xml and "mcunit0" in dom.xml
    assert (world.files(inst) / "root.qcow2").exists() and (world.files(inst) / "seed.iso").exists()
    rec = await world.get(inst)
    assert rec.status.state == "running" and rec.status.virt_type == "qemu"
    assert rec.status.addresses[0].ip is None  # no lease yet
    ip = world.network.add_lease(design.mac_for(inst.id, 0))
    await world.pass_()
    assert (await world.get(inst)).status.addresses == [
        Address(network="default", mac=design.mac_for(inst.id, 0), ip=ip)
    ]


async def test_a_pass_with_nothing_to_do_writes_nothing(world):
    inst = await world.add_instance("quiet")
    await world.pass_()
    revision = (await world.get(inst)).revision
    await world.pass_()
    await world.pass_()
    assert (await world.get(inst)).revision == revision


async def test_stop_asks_the_guest_then_reports_stopped_and_start_brings_it_back(world):
    inst = await world.add_instance("svc")
    await world.pass_()
    await world.change_spec(inst, power="stopped")
    await world.pass_()  # ACPI shutdown asked; the fake guest obeys at once
    assert (await world.get(inst)).status.state == "stopping"
    await world.pass_()
    rec = await world.get(inst)
    assert rec.status.state == "stopped" and rec.status.addresses == [] and world.domain(inst).state == "shutoff"
    await world.change_spec(inst, power="running")
    await world.pass_()
    assert (await world.get(inst)).status.state == "running" and world.domain(inst).state == "running"


async def test_a_resize_while_stopped_redefines_the_domain(world):
    inst = await world.add_instance("grow", power="stopped")
    await world.pass_()
    assert "<vcpu>1</vcpu>" in world.domain(inst).xml.replace(" ", "")
    await world.change_spec(inst, vcpus=2, memory_mib=256)
    await world.pass_()
    xml = world.domain(inst).xml
    assert ">2</vcpu>" in xml and "262144" in xml


async def test_reboot_is_done_once_per_request(world):
    inst = await world.add_instance("rb")
    await world.pass_()
    await world.change_spec(inst, reboot={"seq": 1, "force": True})
    await world.pass_()
    await world.pass_()
    assert world.driver.reboots[inst.spec.uuid] == 1


async def test_delete_removes_domain_files_and_record(world):
    inst = await world.add_instance("gone")
    await world.pass_()
    await world.change_spec(inst, deleted=True)
    await world.pass_()
    assert await world.get(inst) is None
    assert world.domain(inst) is None
    assert not world.files(inst).exists()


async def test_a_failed_build_leaves_nothing_and_is_not_retried_until_the_spec_changes(world):
    inst = await world.add_instance("broken")
    world.driver.fail_next.add("define")
    await world.pass_()
    rec = await world.get(inst)
    assert rec.status.state == "error" and "fake define failure" in rec.status.reason
    assert world.domain(inst) is None and not world.files(inst).exists()
    await world.pass_()
    assert (await world.get(inst)).revision == rec.revision  # not retried for the same spec
    await world.change_spec(inst, retry=1)  # what `instance start` does for an instance in error
    await world.pass_()
    assert (await world.get(inst)).status.state == "running"


async def test_a_guest_that_powers_itself_off_becomes_stopped(world):
    inst = await world.add_instance("selfstop")
    await world.pass_()
    await world.driver.destroy(inst.spec.uuid)  # as if the guest ran `poweroff`
    await world.pass_()
    rec = await world.get(inst)
    assert rec.spec.power == "stopped" and rec.status.state == "stopped"
    assert "shut itself down" in rec.status.reason


async def test_only_our_domains_are_touched(world):
    foreign = "<domain type='qemu'><name>someone-else</name><uuid>11111111-2222-3333-4444-555555555555</uuid></domain>"
    await world.driver.define(foreign)
    await world.driver.start("11111111-2222-3333-4444-555555555555")
    inst = await world.add_instance("orphan")
    await world.pass_()
    # The record disappears behind the agent's back (e.g. deleted while it was down): the domain is an orphan.
    cur = await world.get(inst)
    from minicloud.state import Delete

    await world.store.commit(Txn([Delete(kind=INSTANCE.name, id=inst.id, expect_revision=cur.revision)]))
    await world.pass_()
    assert world.domain(inst) is None and not world.files(inst).exists()
    assert world.driver.doms["11111111-2222-3333-4444-555555555555"].state == "running"


async def test_instances_of_other_nodes_are_left_alone(world):
    inst = await world.add_instance("elsewhere", node="n2")
    await world.pass_()
    assert world.domain(inst) is None
    assert (await world.get(inst)).revision == inst.revision  # untouched: still pending


async def test_capacity_is_published_once(world):
    await world.r.publish_capacity()
    hv = HYPERVISOR.load(await world.store.get_by_name(HYPERVISOR.name, "", NODE))
    assert hv.spec.cpus >= 1 and hv.spec.virt_type == "qemu" and hv.spec.cpu_allocation_ratio == 4.0
    await world.r.publish_capacity()
    assert (await world.store.get_by_name(HYPERVISOR.name, "", NODE)).revision == hv.revision


async def test_compute_that_cannot_start_is_retried_and_reported(world):
    from agent.net.default import NetworkConflict
    from minicloud.state import Delete

    inst = await world.add_instance("waiting")
    hv = await world.store.get_by_name(HYPERVISOR.name, "", NODE)
    await world.store.commit(Txn([Delete(kind=HYPERVISOR.name, id=hv.id, expect_revision=hv.revision)]))
    world.network.fail_with = NetworkConflict("10.99.0.0/24 is already used by eth9")
    enqueued: list[str] = []
    r = ComputeReconciler(store=world.store, config=world.config, driver=FakeDriver(), network=world.network, virt_type="qemu", virt_reason="test")  # fmt: skip
    await r.start(enqueued.append)
    assert "already used" in r.problem
    assert await world.store.get_by_name(HYPERVISOR.name, "", NODE) is None  # nothing is placed on a broken node
    assert await r.reconcile(NODE_KEY) == Result(requeue_after=5.0)  # retried
    assert await r.reconcile(inst.id) == Result(requeue_after=5.0)  # instances wait for it
    assert (await world.get(inst)).revision == inst.revision  # untouched: still pending
    world.network.fail_with = None
    assert await r.reconcile(NODE_KEY) == Result()
    assert r.problem == "" and await world.store.get_by_name(HYPERVISOR.name, "", NODE) is not None
    assert set(enqueued) == {inst.id, NODE_KEY}  # everything that waited is queued again
    await r.close()


async def test_a_running_instance_gets_more_vcpus_by_hot_plug(world):
    inst = await world.add_instance("hot", max_vcpus=4)
    await world.pass_()
    assert "current='1'>4</vcpu>" in world.domain(inst).xml.replace('"', "'")
    await world.change_spec(inst, vcpus=3)
    await world.pass_()
    assert "current='3'" in world.domain(inst).xml.replace('"', "'")
    assert world.domain(inst).state == "running"  # no restart


async def test_image_files_no_record_names_are_removed_once_idle(world):
    import os

    images = world.config.data_path / "images"
    stale, fresh = images / "img-deleted-elsewhere", images / ".staging-img-importing"
    for d in (stale, fresh):
        d.mkdir()
        (d / "disk").write_bytes(b"x")
    old = 1_000_000.0  # long ago
    for path in (stale / "disk", stale):
        os.utime(path, (old, old))
    await world.pass_()
    assert not stale.exists()  # unrecorded and idle: removed
    assert fresh.exists()  # unrecorded but still being written: an import in progress
    assert (images / "img-1" / "kernel").exists()  # recorded: kept


async def test_a_record_deleted_behind_our_back_is_torn_down_by_its_own_key(world):
    inst = await world.add_instance("vanishing")
    await world.pass_()
    from minicloud.state import Delete

    cur = await world.get(inst)
    await world.store.commit(Txn([Delete(kind=INSTANCE.name, id=inst.id, expect_revision=cur.revision)]))
    assert await world.r.reconcile(inst.id) == Result()  # what the delete's change queues
    assert world.domain(inst) is None and not world.files(inst).exists()


async def test_keys_come_from_this_nodes_instances_and_image_changes_queue_the_node_key(world):
    from minicloud.state import Change

    mine, theirs = await world.add_instance("mine"), await world.add_instance("theirs", node="n2")
    assert set(await world.r.all_keys()) == {mine.id, NODE_KEY}
    change = lambda rec: Change(revision=1, type="updated", kind=rec.kind, id=rec.id, project=rec.project, record=rec)  # noqa: E731
    assert list(world.r.keys_for(change(INSTANCE.dump(mine)))) == [mine.id]
    assert list(world.r.keys_for(change(INSTANCE.dump(theirs)))) == []
    image = await world.store.get(IMAGE.name, "img-1")
    assert list(world.r.keys_for(change(image))) == [NODE_KEY]


async def test_a_hypervisor_event_queues_the_instance_of_that_domain(world):
    inst = await world.add_instance("evented")
    await world.pass_()
    world.enqueued.clear()
    await world.driver.destroy(inst.spec.uuid)  # libvirt reports the domain stopped
    await asyncio.sleep(0)  # the fake delivers events on the loop, like the libvirt driver
    assert world.enqueued == [inst.id]


async def test_waiting_for_a_guest_to_stop_or_for_its_lease_polls_the_key(world):
    inst = await world.add_instance("polled")
    assert (await world.pass_())[inst.id] == Result(requeue_after=1.0)  # no DHCP lease yet
    world.network.add_lease(design.mac_for(inst.id, 0))
    assert (await world.pass_())[inst.id] == Result()
    world.driver.shutdown = _ignore_acpi  # a guest that does not power off at once
    await world.change_spec(inst, power="stopped")
    assert (await world.pass_())[inst.id] == Result(requeue_after=1.0)
    assert (await world.get(inst)).status.state == "stopping"


async def test_a_record_written_before_the_typed_kind_converges_and_keeps_fields_it_does_not_know(world):
    spec = {
        "uuid": str(uuid.uuid4()), "image_id": "img-1", "image_name": "guest", "type": "m1.tiny", "vcpus": 1,
        "memory_mib": 128, "disk_gib": 1, "keypair": None, "public_keys": [], "user_data": "",
        "power": "running", "reboot": {"seq": 0, "force": False}, "stop_force": False, "deleted": False,
        "node": NODE, "from_the_future": 1,
    }  # fmt: skip
    old = _record("instance", ids.new_id("i"), "legacy", spec, status={"state": "pending", "future_status": "x"})
    await world.store.commit(Txn([Create(old)]))
    await world.pass_()
    record = await world.store.get(INSTANCE.name, old.id)
    assert INSTANCE.load(record).status.state == "running" and world.driver.doms[spec["uuid"]].state == "running"
    assert record.spec == spec and record.status["future_status"] == "x"  # a status write keeps what it cannot read
    revision = record.revision
    await world.pass_()
    assert (await world.store.get(INSTANCE.name, old.id)).revision == revision


async def _ignore_acpi(uuid: str) -> None:
    pass


async def wait_for(world, rec, check, timeout: float = 20.0):
    async with asyncio.timeout(timeout):
        while not check(await world.get(rec)):  # noqa: ASYNC110 - polling the store
            await asyncio.sleep(0.01)


async def test_under_the_controller_an_instance_is_built_stopped_and_deleted_from_record_changes_alone(world):
    controller = Controller(world.store, world.r, workers=2, resync_interval=3600)
    await controller.start()
    try:
        inst = await world.add_instance("live")
        await wait_for(world, inst, lambda r: r.status.state == "running")
        await world.change_spec(inst, power="stopped")
        await wait_for(world, inst, lambda r: r.status.state == "stopped")
        await world.change_spec(inst, deleted=True)
        await wait_for(world, inst, lambda r: r is None)
        assert world.domain(inst) is None and not world.files(inst).exists()
    finally:
        await controller.close()


# -- NICs on VPC networks (ports) ------------------------------------------------------------------------------------
def _nic(n: int, network: str = "net-a") -> InstanceNicSpec:
    return InstanceNicSpec(
        port=f"port-{n}", network=network, network_name=network.removeprefix("net-"), subnet="sub-a",
        subnet_name="a", mac=f"52:54:00:00:00:{n:02x}", ip=f"10.0.1.{10 + n}",
    )  # fmt: skip


def _interfaces(dom: DomainInfo) -> list[tuple[str, str]]:
    import xml.etree.ElementTree as ET

    return [
        (i.find("mac").get("address"), i.find("source").get("bridge")) for i in ET.fromstring(dom.xml).iter("interface")
    ]


async def test_a_nic_waits_for_its_network_on_this_node_then_is_plugged_with_its_mac_and_ipam_address(world):
    inst = await world.add_instance("web", nics=[_nic(1)])
    results = await world.pass_()
    assert results[inst.id].requeue_after and world.domain(inst) is None  # no bridge yet: nothing is built
    rec = await world.get(inst)
    assert rec.status.state == "pending" and "waiting for network a" in rec.status.reason
    world.networks.built("net-a", "mcb-001000")
    assert inst.id in world.enqueued  # queued again by the network's arrival
    await world.pass_()
    dom = world.domain(inst)
    assert dom.state == "running" and _interfaces(dom) == [("52:54:00:00:00:01", "mcb-001000")]
    rec = await world.get(inst)
    assert rec.status.state == "running" and rec.status.reason == ""
    assert rec.status.addresses == [Address(network="a", mac="52:54:00:00:00:01", ip="10.0.1.11")]


async def test_a_network_this_node_cannot_build_fails_the_build_with_its_reason_and_a_fixed_one_builds(world):
    """An external network whose provider is not a bridge here would make its NICs wait for ever: the network
    reconciler's reason becomes the build's error; once the network is built the instance builds."""
    inst = await world.add_instance("lan1", nics=[_nic(1, "net-lan")])
    await world.pass_()
    assert (await world.get(inst)).status.state == "pending"  # nothing known against it: it waits
    world.networks.failed("net-lan", "provider lan of external network public is eth1 on node n1, not a Linux bridge")
    assert inst.id in world.enqueued  # the failure queues it
    await world.pass_()
    rec = await world.get(inst)
    assert rec.status.state == "error" and world.domain(inst) is None
    assert "provider lan of external network public is eth1 on node n1, not a Linux bridge" in rec.status.reason
    world.networks.built("net-lan", "lanbr")  # the operator fixed the node: the failure is gone with it
    assert world.networks.failure("net-lan") is None


async def test_nics_added_or_removed_while_running_are_hot_plugged_and_while_stopped_redefined(world):
    world.networks.built("net-a", "mcb-001000")
    world.networks.built("net-b", "mcb-001001")
    inst = await world.add_instance("web", nics=[_nic(1)])
    await world.pass_()
    await world.change_spec(inst, nics=[_nic(1), _nic(2, "net-b")])
    await world.pass_()
    dom = world.domain(inst)
    assert dom.state == "running"
    assert _interfaces(dom) == [("52:54:00:00:00:01", "mcb-001000"), ("52:54:00:00:00:02", "mcb-001001")]
    await world.change_spec(inst, nics=[_nic(2, "net-b")])
    await world.pass_()
    assert _interfaces(world.domain(inst)) == [("52:54:00:00:00:02", "mcb-001001")]
    await world.change_spec(inst, power="stopped", stop_force=True)
    await world.pass_()
    await world.change_spec(inst, nics=[_nic(2, "net-b"), _nic(3)])
    await world.pass_()
    dom = world.domain(inst)
    assert dom.state == "shutoff" and [m for m, _ in _interfaces(dom)] == ["52:54:00:00:00:02", "52:54:00:00:00:03"]


async def test_a_running_guest_keeps_its_nics_while_its_network_is_not_known_yet(world):
    world.networks.built("net-a", "mcb-001000")
    inst = await world.add_instance("web", nics=[_nic(1)])
    await world.pass_()
    world.networks.gone("net-a")  # e.g. a restarted agent before the network reconciler's first pass
    await world.pass_()
    dom = world.domain(inst)
    assert dom.state == "running" and _interfaces(dom) == [("52:54:00:00:00:01", "mcb-001000")]
    assert (await world.get(inst)).status.state == "running"


async def test_the_node_removes_the_instance_record_with_its_ports_and_addresses(world):
    world.networks.built("net-a", "mcb-001000")
    inst = await world.add_instance("web", nics=[_nic(1)])
    port = PORT.new(
        project="default", name=f"{inst.id}/0", id="port-1",
        spec=PortSpec(network="net-a", subnet="sub-a", address="10.0.1.11", mac="52:54:00:00:00:01",
                      instance=inst.id, node=NODE),
    )  # fmt: skip
    alloc = IPALLOC.new(
        project="", name=ipam.alloc_name("sub-a", "10.0.1.11"),
        spec=ipam.IpAllocSpec(subnet="sub-a", address="10.0.1.11", holder="port/port-1"),
    )  # fmt: skip
    await world.store.commit(Txn([Create(PORT.dump(port)), Create(IPALLOC.dump(alloc))]))
    await world.pass_()
    await world.change_spec(inst, deleted=True)
    await world.pass_()
    assert await world.get(inst) is None and world.domain(inst) is None
    assert await world.store.get(PORT.name, "port-1") is None
    assert await world.store.list(IPALLOC.name, project="") == []


# -- the default bridge's guests: a fixed address, a named tap, started once their anti-spoofing rules are in place --
async def test_a_default_bridge_guest_gets_a_fixed_address_and_waits_for_its_anti_spoofing_rules(world):
    from agent.net.default import guest_tap

    asked: list[str] = []
    world.networks.use_default_bridge("mcunit0", world.network.assignments)
    world.networks.on_guests_changed(lambda: asked.append("ruleset"))  # the network reconciler's listener
    inst = await world.add_instance("pinned")
    mac, tap = design.mac_for(inst.id, 0), guest_tap(inst.id)
    await world.pass_()
    assert world.network.assignments() == {mac: "10.99.0.10"} and asked == ["ruleset"]
    dom = world.domain(inst)
    assert dom.state == "shutoff" and f'<target dev="{tap}"' in dom.xml.replace("'", '"')  # built, not started
    assert "anti-spoofing" in (await world.get(inst)).status.reason
    world.networks.set_guarded({tap: ("10.99.0.99",)})  # another address: not yet
    await world.pass_()
    assert world.domain(inst).state == "shutoff"
    world.enqueued.clear()
    world.networks.set_guarded({tap: ("10.99.0.10",)})
    assert world.enqueued == [inst.id]  # queued again by the guard
    await world.pass_()
    assert world.domain(inst).state == "running"
    assert world.network.add_lease(mac) == "10.99.0.10"  # DHCP hands out exactly that address
    await world.change_spec(inst, deleted=True)
    await world.pass_()
    assert await world.get(inst) is None and world.network.assignments() == {} and asked == ["ruleset"] * 2


async def test_a_default_bridge_guest_keeps_the_address_it_has_and_the_node_key_drops_the_addresses_of_gone_ones(world):
    inst = await world.add_instance("old", power="stopped")
    await world.pass_()
    mac = design.mac_for(inst.id, 0)
    assert world.network.assignments() == {mac: "10.99.0.10"}
    await world.network.assign("52:00:00:00:00:99")  # a guest whose record is gone
    world.network.add_lease("52:00:00:00:00:98", "10.99.0.12")
    await world.r.reconcile(NODE_KEY)
    assert world.network.assignments() == {mac: "10.99.0.10"}
    # a guest that arrives with an address (a lease here, or its address where it ran before) keeps it
    moved = await world.add_instance("moved", power="stopped", node="n2")
    rec = await world.get(moved)
    prior = Address(network="default", mac=design.mac_for(moved.id, 0), ip="10.99.0.40")
    new = rec.replace(spec=msgspec.structs.replace(rec.spec, node=NODE), status=msgspec.structs.replace(rec.status, addresses=[prior]))  # fmt: skip
    await world.store.commit(Txn([Update(INSTANCE.dump(new), expect_revision=rec.revision)]))
    await world.pass_()
    assert world.network.assignments()[design.mac_for(moved.id, 0)] == "10.99.0.40"


async def _with_address(world, inst: Instance, ip: str) -> Instance:
    rec = await world.get(inst)
    addr = Address(network="default", mac=design.mac_for(inst.id, 0), ip=ip)
    new = rec.replace(status=msgspec.structs.replace(rec.status, addresses=[addr]))
    await world.store.commit(Txn([Update(INSTANCE.dump(new), expect_revision=rec.revision)]))
    return await world.get(inst)


async def test_a_default_bridge_guest_arriving_live_keeps_its_address_or_the_target_refuses_it(world):
    """Each node's default bridge has its own DHCP; a guest keeps its address through a live migration. A new guest
    here avoids the addresses guests on other nodes have (so they can come here live); an arriving one gets its
    own address held before it comes, or the preparation fails with the reason when another guest here has it
    (its tap would be pinned to another address: cut off), holding nothing."""
    from agent.compute.driver import DriverError
    from agent.reconcilers import migration as migrating

    elsewhere = await _with_address(world, await world.add_instance("far", node="n2"), "10.99.0.10")
    parked = await world.add_instance("parked", node="n3", power="stopped")  # stopped: no lease, its fixed address
    rec = await world.get(parked)
    parked_status = msgspec.structs.replace(rec.status, bridge_ip="10.99.0.11")
    await world.store.commit(
        Txn([Update(INSTANCE.dump(rec.replace(status=parked_status)), expect_revision=rec.revision)])
    )
    local = await world.add_instance("here", power="stopped")
    await world.pass_()
    # not the ones n2's and n3's guests have; recorded, so that other nodes avoid it in turn
    assert world.network.assignments() == {design.mac_for(local.id, 0): "10.99.0.12"}
    assert (await world.get(local)).status.bridge_ip == "10.99.0.12"

    free = await _with_address(world, await world.add_instance("comes", node="n2"), "10.99.0.30")
    await migrating._hold_bridge_address(world.r, free.replace(spec=msgspec.structs.replace(free.spec, node=NODE)))
    assert world.network.assignments()[design.mac_for(free.id, 0)] == "10.99.0.30"

    clash = await _with_address(world, elsewhere, "10.99.0.12")  # the address "here" has on this node
    arriving = clash.replace(spec=msgspec.structs.replace(clash.spec, node=NODE))
    with pytest.raises(DriverError, match=re.escape("address 10.99.0.12 on the default bridge is taken on node")):
        await migrating._hold_bridge_address(world.r, arriving)
    assert design.mac_for(clash.id, 0) not in world.network.assignments()


async def test_the_target_tells_the_network_side_when_an_arriving_guest_runs_here(world):
    """Live migration: once the guest's domain runs on the target (its resume event queues the instance there), the
    target's NICs of it are landed (the network side takes their floating IPs over at once); not before."""
    from agent.reconcilers import migration as migrating
    from minicloud.compute.migration import MigrationSpec

    inst = await world.add_instance("comes", node="n2", nics=[_nic(1)])
    m = MigrationSpec(instance=inst.id, project="default", source="n2", target=NODE, phase="migrating")
    world.driver.doms[inst.spec.uuid] = DomainInfo(uuid=inst.spec.uuid, name="x", state="paused", xml="")
    await migrating.incoming(world.r, inst, m)
    assert not world.networks.is_landed("port-1")  # still coming: paused here until libvirt's switchover
    assert world.r._ids[inst.spec.uuid] == inst.id  # its lifecycle events here queue it
    world.driver.doms[inst.spec.uuid] = DomainInfo(uuid=inst.spec.uuid, name="x", state="running", xml="")
    await migrating.incoming(world.r, inst, m)
    assert world.networks.is_landed("port-1")


async def test_a_stopped_domain_defined_without_a_tap_name_is_redefined_with_it(world):
    from agent.net.default import guest_tap

    inst = await world.add_instance("legacy", power="stopped")
    await world.pass_()
    dom = world.domain(inst)
    legacy = re.sub(r"\s*<target dev=\"mcg-[0-9a-f]+\"\s*/>", "", dom.xml)
    assert legacy != dom.xml
    world.driver.doms[inst.spec.uuid] = DomainInfo(uuid=dom.uuid, name=dom.name, state="shutoff", xml=legacy)
    await world.change_spec(inst, power="running")
    await world.pass_()
    assert guest_tap(inst.id) in world.domain(inst).xml and world.domain(inst).state == "running"
