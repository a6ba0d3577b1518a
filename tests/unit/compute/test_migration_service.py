"""``instance migrate`` without HTTP: what is refused (409 with the reason) and what a migration writes; and the
source's rewrite of the guest's live definition with the target's paths (:func:`agent.compute.migrate.target_xml`)."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import msgspec
import pytest

from agent.compute import migrate
from agent.reconcilers import migration as migration_reconciler
from minicloud import errors
from minicloud.cluster.kinds import NODE, NodeSpec
from minicloud.compute import instances, migration
from minicloud.compute.kinds import HYPERVISOR, IMAGE, INSTANCE, HypervisorSpec, ImageFileSpec, ImageSpec
from minicloud.core.context import Context
from minicloud.core.operation import OPERATION
from minicloud.model.compute import InstanceCreate
from minicloud.operations import Operations
from minicloud.state import Create, SQLiteStore, Txn, Update

KERNEL = {"kernel": ImageFileSpec(size_bytes=1, sha256="k"), "initrd": ImageFileSpec(size_bytes=1, sha256="i")}


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    ops = []
    for node, image_id, sha in (("n1", "img-1", "k"), ("n2", "img-2", "k"), ("n3", "img-3", "other")):
        image = IMAGE.new(
            project="default", name=f"guest-{node}", id=image_id,
            spec=ImageSpec(boot="kernel", size_bytes=1, sha256=sha, node=node, files=KERNEL if sha == "k" else {}),
        )  # fmt: skip
        hv = HYPERVISOR.new(project="", name=node, spec=HypervisorSpec(cpus=4, memory_mib=4096, disk_gib=100))
        member = NODE.new(project="", name=node, spec=NodeSpec(address=f"10.0.0.{node[1]}"))
        ops += [Create(IMAGE.dump(image)), Create(HYPERVISOR.dump(hv)), Create(NODE.dump(member))]
    await s.commit(Txn(ops))
    yield s
    await s.close()


async def running(store: SQLiteStore, name: str = "vm") -> str:
    ctx = Context.system("test", action="compute:instances:create")
    written = await instances.create_instance(
        ctx, store, InstanceCreate(name=name, image="guest-n1", type="m1.tiny")
    )  # fmt: skip
    record = await store.get(INSTANCE.name, written.body.id)
    obj = INSTANCE.load(record)
    obj = obj.replace(status=msgspec.structs.replace(obj.status, state="running"))
    await store.commit(Txn([Update(INSTANCE.dump(obj), expect_revision=record.revision)]))
    return obj.id


async def test_migrate_refuses_with_the_reason_and_records_a_migration_with_the_targets_image(store):
    instance_id = await running(store)
    ops = Operations(store, "n1")
    ctx = Context.system("operator", action=migration.ACTION)
    try:
        for node, cold, reason in (
            ("n1", False, "already runs on node n1"),
            ("n9", False, "has not registered compute capacity"),
            ("n3", False, "import the same image on node n3"),
            ("n2", True, "stop it first \\(`instance stop`\\) for a cold migration"),
        ):
            with pytest.raises(errors.Conflict, match=reason):
                await migration.migrate_instance(ctx, store, ops, "vm", node=node, cold=cold)
        # a GPU instance cannot move live
        rec = await store.get(INSTANCE.name, instance_id)
        gpu = msgspec.structs.replace(rec, spec={**rec.spec, "gpus": 1})
        await store.commit(Txn([Update(gpu, expect_revision=rec.revision)]))
        with pytest.raises(errors.Conflict, match="1 GPU\\(s\\) passed through"):
            await migration.migrate_instance(ctx, store, ops, "vm", node="n2")
        rec = await store.get(INSTANCE.name, instance_id)
        await store.commit(Txn([Update(msgspec.structs.replace(rec, spec={**rec.spec, "gpus": 0}),
                                       expect_revision=rec.revision)]))  # fmt: skip
        # a cordoned node takes nothing new
        rec = await store.get_by_name(NODE.name, "", "n2")
        cordoned = msgspec.structs.replace(rec, spec={**rec.spec, "cordoned": True, "cordon_reason": "kernel update"})
        await store.commit(Txn([Update(cordoned, expect_revision=rec.revision)]))
        with pytest.raises(errors.Conflict, match="node n2 is cordoned \\(kernel update\\)"):
            await migration.migrate_instance(ctx, store, ops, "vm", node="n2")
        rec = await store.get_by_name(NODE.name, "", "n2")
        await store.commit(Txn([Update(msgspec.structs.replace(rec, spec={**rec.spec, "cordoned": False}),
                                       expect_revision=rec.revision)]))  # fmt: skip
        # the scheduler's pick: n2 (n3 has no copy of the image)
        written = await migration.migrate_instance(ctx, store, ops, "vm")
        assert written.status == 202
        op = OPERATION.load(await store.get(OPERATION.name, written.body.id))
        assert op.spec.action == migration.ACTION and op.spec.target["id"] == instance_id
        mig, _ = await migration.get_migration(store, instance_id)
        assert (mig.spec.source, mig.spec.target, mig.spec.phase, mig.spec.target_image) == (
            "n1",
            "n2",
            "preparing",
            "img-2",
        )
        assert mig.spec.operation == written.body.id
        with pytest.raises(errors.Conflict, match="already migrating"):
            await migration.migrate_instance(ctx, store, ops, "vm", node="n2")
        # the phases the agents write end it; the operation follows
        await migration.update_migration(store, instance_id, phase="failed", error="boom")
        final = await ops.wait(written.body.id, 10)
        assert OPERATION.load(final).status.state == "failed"
        assert "boom" in OPERATION.load(final).status.error.detail
        assert await migration.update_migration(store, instance_id, phase="ready") is None  # finished: kept as is
    finally:
        await ops.close()


LIVE = """<domain type='qemu' id='3'><name>mc-i-1</name><uuid>u-1</uuid>
<metadata><minicloud:instance xmlns:minicloud="https://minicloud.dev/xmlns/instance/1"><minicloud:node>n1</minicloud:node></minicloud:instance></metadata>
<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><kernel>/a/images/img-1/kernel</kernel><initrd>/a/images/img-1/initrd</initrd></os>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a/instances/i-1/root.qcow2' index='2'/><target dev='vda' bus='virtio'/><address type='pci' bus='0x04'/></disk>
<disk type='file' device='cdrom'><source file='/a/instances/i-1/seed.iso'/><target dev='sda' bus='sata'/></disk>
<interface type='bridge'><mac address='52:00:00:00:00:01'/><source bridge='mcbr0'/><target dev='vnet0'/></interface>
<serial type='file'><source path='/a/instances/i-1/console.log' append='on'/></serial>
<console type='file'><source path='/a/instances/i-1/console.log' append='on'/></console>
</devices></domain>"""
DEST = """<domain type='qemu'><name>mc-i-1</name><uuid>u-1</uuid>
<metadata><minicloud:instance xmlns:minicloud="https://minicloud.dev/xmlns/instance/1"><minicloud:node>n2</minicloud:node></minicloud:instance></metadata>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>/b/images/img-2/kernel</kernel><initrd>/b/images/img-2/initrd</initrd></os>
<devices>
<disk type='file' device='disk'><source file='/b/instances/i-1/root.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='/b/instances/i-1/seed.iso'/><target dev='sda' bus='sata'/></disk>
<interface type='bridge'><mac address='52:00:00:00:00:01'/><source bridge='mcbr1'/></interface>
<serial type='file'><source path='/b/instances/i-1/console.log'/></serial>
<console type='file'><source path='/b/instances/i-1/console.log'/></console>
</devices></domain>"""


def test_target_xml_keeps_the_guest_and_takes_the_targets_paths_bridges_and_metadata():
    out = migrate.target_xml(LIVE, DEST)
    assert "/a/" not in out
    for kept in ("pc-q35-7.2", '<address type="pci" bus="0x04"', "vnet0", "u-1"):
        assert kept in out  # what the running guest has (machine type, device addresses) is not touched
    for taken in ("/b/images/img-2/kernel", "/b/instances/i-1/root.qcow2", "/b/instances/i-1/seed.iso",
                  "/b/instances/i-1/console.log", "bridge=\"mcbr1\"", ">n2<"):  # fmt: skip
        assert taken in out
    assert ">n1<" not in out


def test_tls_files_take_the_nodes_cluster_certificate_under_libvirts_and_qemus_names(tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "ca.crt").write_text("CA")
    (pki / "server.crt").write_text("CERT")
    (pki / "server.key").write_text("KEY")
    d = migrate.write_tls_files(tmp_path)
    assert d == tmp_path / "pki" / "libvirt"
    assert (d / "cacert.pem").read_text() == (d / "ca-cert.pem").read_text() == "CA"
    assert (d / "servercert.pem").read_text() == (d / "client-cert.pem").read_text() == "CERT"
    for key in ("serverkey.pem", "clientkey.pem", "server-key.pem", "client-key.pem"):
        assert (d / key).read_text() == "KEY" and (d / key).stat().st_mode & 0o077 == 0
    conf = migrate.libvirtd_conf(d)
    assert "listen_tls = 1" in conf and "listen_tcp = 0" in conf and "tls_no_verify_certificate = 0" in conf
    assert "migrate_tls_x509_verify = 1" in migrate.qemu_conf(d)
    assert migrate.dest_uri("10.0.0.2", d) == f"qemu+tls://10.0.0.2/system?pkipath={d}"


async def test_drain_cordons_moves_what_can_move_and_says_why_the_rest_stays(store):
    moving = await running(store, "web")
    ctx = Context.system("test", action="compute:instances:create")
    await instances.create_instance(
        ctx, store, InstanceCreate(name="off", image="guest-n1", type="m1.tiny", start=False)
    )
    ops = Operations(store, "n1")

    async def agents() -> None:  # the target prepares, the source moves it: here, straight to done
        sub = store.subscribe()
        try:
            async for change in sub:
                if change.kind == migration.MIGRATION.name and change.record.spec["phase"] == "preparing":
                    await migration.update_migration(store, moving, phase="done")
                    return
        finally:
            sub.close()

    helper = asyncio.create_task(agents())
    try:
        written = await migration.drain_node(
            Context.system("operator", action=migration.DRAIN_ACTION), store, ops, "n1"
        )
        final = OPERATION.load(await ops.wait(written.body.id, 10))
        assert final.status.state == "succeeded", final.status
        result = final.status.result
        assert result["moved"] == [{"instance": "web", "id": moving, "node": "n2"}]
        [stay] = result["stayed"]
        # never started: neither running nor stopped
        assert stay["instance"] == "off" and "is pending" in stay["reason"]
        member = await store.get_by_name(NODE.name, "", "n1")
        assert member.spec["cordoned"] is True and member.spec["cordon_reason"] == "draining"
    finally:
        helper.cancel()
        await ops.close()


async def test_an_arriving_guest_is_no_orphan_of_the_target_during_or_just_after_its_migration(store):
    """The target's sweep lists its instances, then meets the arrived guest: whether the migration is still active or
    was finished in between (the record now names the target), the guest is kept; elsewhere it is an orphan."""
    instance_id = await running(store)
    ops = Operations(store, "n1")
    try:
        await migration.migrate_instance(Context.system("op", action=migration.ACTION), store, ops, "vm", node="n2")
        assert await migration_reconciler.incoming_active(store, instance_id, "n2")
        assert not await migration_reconciler.incoming_active(store, instance_id, "n3")
        await migration.update_migration(store, instance_id, phase="done")
        assert not await migration_reconciler.incoming_active(
            store, instance_id, "n2"
        )  # done, and the record still says n1
        rec = await store.get(INSTANCE.name, instance_id)
        moved = msgspec.structs.replace(rec, spec={**rec.spec, "node": "n2"})
        await store.commit(Txn([Update(moved, expect_revision=rec.revision)]))
        assert await migration_reconciler.incoming_active(store, instance_id, "n2")
    finally:
        await ops.close()


RBD_LIVE = LIVE.replace(
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a/instances/i-1/root.qcow2' "
    "index='2'/>",
    "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' "
    "name='minicloud/i-1-root' index='2'><host name='10.0.0.1' port='3300'/></source>",
)
RBD_DEST = DEST.replace(
    "<disk type='file' device='disk'><source file='/b/instances/i-1/root.qcow2'/>",
    "<disk type='network' device='disk'><source protocol='rbd' name='minicloud/i-1-root'>"
    "<host name='10.0.0.2' port='3300'/></source>",
)


class _MigratingDriver:
    """What the source's migration asks of the compute driver; records the libvirt call."""

    def __init__(self, live: str) -> None:
        self.live = live
        self.calls: list[tuple[str, dict, int]] = []

    async def migratable_xml(self, uuid: str) -> str:
        return self.live

    async def migrate(self, uuid: str, uri: str, params: dict, flags: int) -> None:
        self.calls.append((uri, params, flags))


@pytest.mark.parametrize("pool_driver", ["ceph", ""])
async def test_a_ceph_root_disk_moves_without_a_copy_and_the_operation_says_which(store, tmp_path, pool_driver):
    """Issue #16: 'disks on Ceph need no copy'. The source migrates a Ceph-backed guest without libvirt's storage
    copy (no NON_SHARED_INC, no disks URI), its RBD source untouched; a local root disk is copied. The migration
    record and the operation's result say which (``disk_copy``)."""
    import libvirt

    instance_id = await running(store)
    rec = await store.get(INSTANCE.name, instance_id)
    spec = {**rec.spec, "pool_driver": pool_driver, "pool": "minicloud" if pool_driver else ""}
    await store.commit(Txn([Update(msgspec.structs.replace(rec, spec=spec), expect_revision=rec.revision)]))
    ops = Operations(store, "n1")
    try:
        ctx = Context.system("op", action=migration.ACTION)
        written = await migration.migrate_instance(ctx, store, ops, "vm", node="n2")
        ceph = pool_driver == "ceph"
        await migration.update_migration(store, instance_id, phase="ready", dest_xml=RBD_DEST if ceph else DEST)
        mig, _ = await migration.get_migration(store, instance_id)
        driver = _MigratingDriver(RBD_LIVE if ceph else LIVE)
        pki = tmp_path / "pki"
        pki.mkdir()
        for name in ("ca.crt", "server.crt", "server.key"):
            (pki / name).write_text(name)
        (tmp_path / "instances").mkdir()
        node = SimpleNamespace(
            store=store, driver=driver, node="n1", config=SimpleNamespace(data_path=tmp_path),
            instances_dir=tmp_path / "instances", _ids={}, _uuids={},
        )  # fmt: skip
        inst = INSTANCE.load(await store.get(INSTANCE.name, instance_id))
        await migration_reconciler.outgoing(node, inst, mig.spec)
        ((uri, params, flags),) = driver.calls
        assert uri.startswith("qemu+tls://10.0.0.2/system")
        assert bool(flags & libvirt.VIR_MIGRATE_NON_SHARED_INC) is not ceph
        assert (libvirt.VIR_MIGRATE_PARAM_DISKS_URI in params) is not ceph
        sent = params[libvirt.VIR_MIGRATE_PARAM_DEST_XML]
        if ceph:
            assert 'name="minicloud/i-1-root"' in sent and "root.qcow2" not in sent
        mig, _ = await migration.get_migration(store, instance_id)
        assert (mig.spec.phase, mig.spec.disk_copy) == ("done", not ceph)
        final = OPERATION.load(await ops.wait(written.body.id, 10))
        assert final.status.state == "succeeded" and final.status.result["disk_copy"] is (not ceph), final.status
        assert INSTANCE.load(await store.get(INSTANCE.name, instance_id)).spec.node == "n2"
    finally:
        await ops.close()


async def test_finish_moves_the_instance_and_its_root_disk_snapshots_to_the_target_in_one_transaction(store, tmp_path):
    from minicloud.storage.kinds import SNAPSHOT, SnapshotSpec

    instance_id = await running(store)
    ops = Operations(store, "n1")
    try:
        await migration.migrate_instance(
            Context.system("operator", action=migration.ACTION), store, ops, "vm", node="n2"
        )
    finally:
        await ops.close()
    snaps = {
        "root": SNAPSHOT.new(
            project="default", name="root", spec=SnapshotSpec(volume="", instance=instance_id, node="n1")
        ),
        "other": SNAPSHOT.new(
            project="default", name="other", spec=SnapshotSpec(volume="", instance="i-other", node="n1")
        ),
        "volume": SNAPSHOT.new(project="default", name="vol", spec=SnapshotSpec(volume="vol-1", node="n1")),
    }
    await store.commit(Txn([Create(SNAPSHOT.dump(s)) for s in snaps.values()]))
    inst = INSTANCE.load(await store.get(INSTANCE.name, instance_id))
    mig, _ = await migration.get_migration(store, instance_id)
    rec = SimpleNamespace(store=store, _ids={}, _uuids={}, instances_dir=tmp_path)
    await migration_reconciler.finish(rec, inst, mig.spec)
    assert INSTANCE.load(await store.get(INSTANCE.name, instance_id)).spec.node == "n2"
    assert (await migration.get_migration(store, instance_id))[0].spec.phase == "done"
    nodes = {k: SNAPSHOT.load(await store.get(SNAPSHOT.name, s.id)).spec.node for k, s in snaps.items()}
    assert nodes == {"root": "n2", "other": "n1", "volume": "n1"}  # only this instance's root-disk snapshots move


async def test_vpc_nics_arrive_on_the_target_with_the_migration_and_move_or_stay_with_its_end(store, tmp_path):
    from minicloud.model.compute import NicCreate
    from minicloud.model.network import NetworkCreate, SubnetCreate
    from minicloud.network.kinds import PORT
    from minicloud.network.networks import create_network
    from minicloud.network.subnets import create_subnet

    ctx = Context.system("test", action="network:test")
    await create_network(ctx, store, NetworkCreate(name="vpc", cidr="10.0.0.0/16"))
    await create_subnet(ctx, store, SubnetCreate(name="web", network="vpc", cidr="10.0.1.0/24"))
    body = InstanceCreate(name="vm", image="guest-n1", type="m1.tiny", nics=[NicCreate(subnet="web")] * 2)
    written = await instances.create_instance(Context.system("test", action="compute:instances:create"), store, body)
    record = await store.get(INSTANCE.name, written.body.id)
    inst = INSTANCE.load(record)
    inst = inst.replace(status=msgspec.structs.replace(inst.status, state="running"))
    await store.commit(Txn([Update(INSTANCE.dump(inst), expect_revision=record.revision)]))
    port_ids = [n.port for n in inst.spec.nics]

    async def ports() -> list[tuple[str, str]]:
        return [(p.spec.node, p.spec.arriving) for p in [PORT.load(await store.get(PORT.name, i)) for i in port_ids]]

    assert await ports() == [("n1", ""), ("n1", "")]
    ops = Operations(store, "n1")
    operator = Context.system("operator", action=migration.ACTION)
    try:
        await migration.migrate_instance(operator, store, ops, "vm", node="n2")
        # with the migration, in its transaction: n2 builds the NICs' network before the guest comes
        assert await ports() == [("n1", "n2"), ("n1", "n2")]
        # their NICs stay as they were while it moves
        nic = NicCreate(subnet="web")
        with pytest.raises(errors.Conflict, match="is migrating to node n2 \\(preparing\\)"):
            await instances.add_nic(ctx, store, "vm", nic)
        with pytest.raises(errors.Conflict, match="is migrating to node n2"):
            await instances.remove_nic(ctx, store, "vm", port_ids[1])
        # a failed migration leaves them on the source
        await migration_reconciler._fail(store, inst.id, "boom")
        assert await ports() == [("n1", ""), ("n1", "")]
        # a successful one moves them in the transaction that moves the instance
        await migration.migrate_instance(operator, store, ops, "vm", node="n2")
        mig, _ = await migration.get_migration(store, inst.id)
        current = INSTANCE.load(await store.get(INSTANCE.name, inst.id))
        rec = SimpleNamespace(store=store, _ids={}, _uuids={}, instances_dir=tmp_path)
        await migration_reconciler.finish(rec, current, mig.spec)
        assert await ports() == [("n2", ""), ("n2", "")]
        assert INSTANCE.load(await store.get(INSTANCE.name, inst.id)).spec.node == "n2"
    finally:
        await ops.close()


async def test_a_nic_straight_on_an_external_network_arrives_on_the_target_like_a_vpc_nic(store):
    """The target plugs it into its own provider bridge and serves it DHCP (tests/cluster/test_migration.py)."""
    from minicloud.model.compute import NicCreate
    from minicloud.model.network import NetworkCreate
    from minicloud.network.kinds import PORT
    from minicloud.network.networks import create_network

    admin = Context.system("test", action="admin:networks:create")
    lan = NetworkCreate(
        name="public", cidr="192.0.2.0/24", external=True, provider="lan", gateway="192.0.2.1",
        pool="192.0.2.100-192.0.2.199",
    )  # fmt: skip
    await create_network(admin, store, lan)
    body = InstanceCreate(name="vm", image="guest-n1", type="m1.tiny", nics=[NicCreate(network="public")])
    written = await instances.create_instance(admin, store, body)
    record = await store.get(INSTANCE.name, written.body.id)
    inst = INSTANCE.load(record)
    inst = inst.replace(status=msgspec.structs.replace(inst.status, state="running"))
    await store.commit(Txn([Update(INSTANCE.dump(inst), expect_revision=record.revision)]))
    ops = Operations(store, "n1")
    try:
        await migration.migrate_instance(Context.system("operator", action=migration.ACTION), store, ops, "vm",
                                         node="n2")  # fmt: skip
        port = PORT.load(await store.get(PORT.name, inst.spec.nics[0].port))
        assert (port.spec.node, port.spec.arriving) == ("n1", "n2")
    finally:
        await ops.close()


async def test_ceph_volumes_move_with_the_instance_and_a_local_one_is_refused_with_the_reason(store, tmp_path):
    from minicloud.storage.kinds import SNAPSHOT, VOLUME, Attachment, SnapshotSpec, VolumeSpec

    instance_id = await running(store)

    def volume(name: str, driver: str, device: str, state: str = "in-use"):
        att = Attachment(instance=instance_id, instance_name="vm", node="n1", device=device)
        spec = VolumeSpec(size_gib=1, pool=f"pool-{driver}", pool_name=driver, driver=driver, node="n1", attachment=att)
        vol = VOLUME.new(project="default", name=name, spec=spec)
        return vol.replace(status=msgspec.structs.replace(vol.status, state=state))

    data = volume("data", "ceph", "vdb")
    snap = SNAPSHOT.new(project="default", name="s", spec=SnapshotSpec(volume=data.id, node="n1"))
    data = data.replace(spec=msgspec.structs.replace(data.spec, snapshots=[snap.id]))
    scratch = volume("scratch", "local", "vdc")
    await store.commit(Txn([Create(VOLUME.dump(data)), Create(VOLUME.dump(scratch)), Create(SNAPSHOT.dump(snap))]))
    ops = Operations(store, "n1")
    operator = Context.system("operator", action=migration.ACTION)
    try:
        with pytest.raises(
            errors.Conflict, match="volume scratch in local pool local on node n1: a local volume stays"
        ):
            await migration.migrate_instance(operator, store, ops, "vm", node="n2")
        rec = await store.get(VOLUME.name, scratch.id)
        await store.commit(
            Txn(
                [
                    Update(
                        msgspec.structs.replace(rec, spec={**rec.spec, "attachment": None}),
                        expect_revision=rec.revision,
                    )
                ]
            )
        )  # fmt: skip  (detached)
        rec = await store.get(VOLUME.name, data.id)
        attaching = {**rec.status, "state": "attaching"}
        await store.commit(Txn([Update(msgspec.structs.replace(rec, status=attaching), expect_revision=rec.revision)]))
        with pytest.raises(errors.Conflict, match="volume data is attaching: migrate it once that ends"):
            await migration.migrate_instance(operator, store, ops, "vm", node="n2")
        rec = await store.get(VOLUME.name, data.id)
        in_use = {**rec.status, "state": "in-use"}
        await store.commit(Txn([Update(msgspec.structs.replace(rec, status=in_use), expect_revision=rec.revision)]))
        await migration.migrate_instance(operator, store, ops, "vm", node="n2")
    finally:
        await ops.close()
    assert VOLUME.load(await store.get(VOLUME.name, data.id)).spec.node == "n1"  # not before the move ends
    inst = INSTANCE.load(await store.get(INSTANCE.name, instance_id))
    mig, _ = await migration.get_migration(store, instance_id)
    rec = SimpleNamespace(store=store, _ids={}, _uuids={}, instances_dir=tmp_path)
    await migration_reconciler.finish(rec, inst, mig.spec)
    moved = VOLUME.load(await store.get(VOLUME.name, data.id)).spec
    assert (moved.node, moved.attachment.node, moved.previous_node) == ("n2", "n2", "")  # handed over: no fence
    assert SNAPSHOT.load(await store.get(SNAPSHOT.name, snap.id)).spec.node == "n2"
    assert VOLUME.load(await store.get(VOLUME.name, scratch.id)).spec.node == "n1"  # detached: stays
    assert INSTANCE.load(await store.get(INSTANCE.name, instance_id)).spec.node == "n2"


async def _bridge_address(store: SQLiteStore, instance_id: str, ip: str, node: str | None = None) -> None:
    """Give a default-bridge guest the DHCP address its node reports (``status.addresses``), and move it to ``node``."""
    from minicloud.model.compute import Address

    rec = await store.get(INSTANCE.name, instance_id)
    obj = INSTANCE.load(rec)
    address = Address(network="default", mac="52:54:00:00:00:01", ip=ip)
    obj = obj.replace(
        spec=msgspec.structs.replace(obj.spec, node=node or obj.spec.node),
        status=msgspec.structs.replace(obj.status, addresses=[address]),
    )
    await store.commit(Txn([Update(INSTANCE.dump(obj), expect_revision=rec.revision)]))


async def test_a_default_bridge_guest_does_not_move_live_where_another_guest_has_its_address(store):
    """Each node's default bridge is its own segment with its own DHCP, and a guest keeps its address through a live
    migration: a node where another guest has that address would cut it off. Named, it is a 409 that says so; the
    scheduler passes over it; a cold migration (the guest gets a free address there) is not concerned."""
    mover = await running(store, "vm")
    peer = await running(store, "peer")
    await _bridge_address(store, mover, "10.213.0.10")
    await _bridge_address(store, peer, "10.213.0.10", node="n2")
    ops = Operations(store, "n1")
    ctx = Context.system("operator", action=migration.ACTION)
    try:
        taken = "address 10.213.0.10 on the default bridge is taken on node n2 by instance peer: a live migration"
        with pytest.raises(errors.Conflict, match=re.escape(taken)):
            await migration.migrate_instance(ctx, store, ops, "vm", node="n2")
        with pytest.raises(errors.Conflict, match="no other node can take instance vm"):  # n3 lacks the image
            await migration.migrate_instance(ctx, store, ops, "vm")
        # a stopped guest has no lease, but keeps its fixed address on its node's bridge (status.bridge_ip)
        rec = await store.get(INSTANCE.name, peer)
        obj = INSTANCE.load(rec)
        parked = obj.replace(status=msgspec.structs.replace(obj.status, addresses=[], bridge_ip="10.213.0.10"))
        await store.commit(Txn([Update(INSTANCE.dump(parked), expect_revision=rec.revision)]))
        with pytest.raises(errors.Conflict, match=re.escape(taken)):
            await migration.migrate_instance(ctx, store, ops, "vm", node="n2")
        rec = await store.get(INSTANCE.name, peer)
        obj = INSTANCE.load(rec)
        await store.commit(Txn([Update(INSTANCE.dump(obj.replace(status=msgspec.structs.replace(obj.status, bridge_ip=""))), expect_revision=rec.revision)]))  # fmt: skip
        assert await migration.get_migration(store, mover) is None  # nothing half-made
        await _bridge_address(store, peer, "10.213.0.11")
        written = await migration.migrate_instance(ctx, store, ops, "vm")
        assert written.status == 202
        mig, _ = await migration.get_migration(store, mover)
        assert (mig.spec.target, mig.spec.live) == ("n2", True)
    finally:
        await ops.close()
