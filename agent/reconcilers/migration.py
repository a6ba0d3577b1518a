"""Live migration run by the compute reconciler: the target's preparation, the source's libvirt migration, and the
resolution of one that was interrupted (:mod:`minicloud.compute.migration` has the record, its phases and what is
refused; :mod:`agent.compute.migrate` the TLS files and the definition rewrite).

**Target** (:func:`incoming`, run by the target's compute reconciler while the migration is ``preparing``): the
instance directory with the root disk (a blank qcow2 of the same size, or an overlay on the target's copy of the
image: only the overlay's data is copied) and the NoCloud seed, then its own domain definition of the guest — its
paths, its bridges — recorded in the migration (``ready``). On ``failed``, what it prepared is removed.

**Source** (:func:`outgoing`): ``ready`` → ``migrating`` (recorded first), then ``virDomainMigrateToURI3`` with
``LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE | TLS`` (+ ``NON_SHARED_INC`` for a root disk in local files) and
the live definition with the target's paths; then :func:`finish`: the instance's ``node`` (and image) and the
migration's ``done`` in one transaction, and the source's leftover directory removed.

**Interrupted** (:func:`resolve`: a ``migrating`` migration this process is not running — the source agent restarted):
libvirtd runs a peer-to-peer migration by itself, so it may still be going (wait), have finished (the guest runs on
the target only: :func:`finish`) or have failed (the guest runs on the source: ``failed``). The target resumes a
guest only after the source stopped it, so there is never a second running copy; a copy left *paused* on either side
is destroyed when the other one runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

import msgspec

from agent.compute import design
from agent.compute.driver import DriverError
from agent.compute.migrate import dest_uri, target_xml, tls_dir, write_tls_files
from agent.reconcile import Result
from minicloud import ids
from minicloud.cluster.kinds import NODE
from minicloud.compute.kinds import IMAGE, INSTANCE
from minicloud.compute.migration import (
    MIGRATION,
    MigrationSpec,
    get_migration,
    ports_moved,
    update_migration,
    volumes_moved,
)
from minicloud.state import Store, Txn, TxnFailed, Update, list_all
from minicloud.storage.kinds import SNAPSHOT

if TYPE_CHECKING:
    from agent.reconcilers.compute import ComputeReconciler, Instance

log = logging.getLogger("minicloud.compute.migrate")
#: How soon to look again at a migration libvirtd is still running, or one waiting for the other node.
_POLL = 2.0


async def node_address(store: Store, node: str) -> str:
    record = await store.get_by_name(NODE.name, "", node)
    if record is None:
        raise DriverError(f"node {node} is not a cluster member (no address to migrate to)")
    return NODE.load(record).spec.address


def _as_target(inst: Instance, m: MigrationSpec, node: str) -> Instance:
    spec = msgspec.structs.replace(inst.spec, node=node, image_id=m.target_image or inst.spec.image_id)
    return inst.replace(spec=spec)


async def incoming(rec: ComputeReconciler, inst: Instance, m: MigrationSpec) -> Result:
    """This node is the target: prepare (``preparing`` → ``ready``), or clean up after a failed one."""
    d = rec.instances_dir / inst.id
    if m.phase == "failed" or not m.active:
        if m.phase == "failed" and inst.spec.node != rec.node:
            dom = await rec.driver.domain(inst.spec.uuid)
            if dom is None or dom.state not in ("running", "paused"):
                if dom is not None:
                    await rec.driver.undefine(inst.spec.uuid)
                await asyncio.to_thread(shutil.rmtree, d, True)
                if not inst.spec.nics:  # the default-bridge address held for it here
                    await rec._release_default(design.mac_for(inst.id, 0))
        return Result()
    rec._ids[inst.spec.uuid] = inst.id  # its domain's lifecycle events here (it resumes here) queue it
    if m.phase == "migrating" and inst.spec.nics and rec.networks is not None:
        dom = await rec.driver.domain(inst.spec.uuid)
        if dom is not None and dom.state == "running":  # it runs here now: its floating IPs come here at once
            rec.networks.landed({n.port: n.network for n in inst.spec.nics})
    if m.phase != "preparing":
        return Result()
    try:
        there = _as_target(inst, m, rec.node)
        image = await rec._image(there)
        nics = rec.nics_of(there)
        if nics is None:
            if reasons := rec._network_failures(there):  # e.g. no provider bridge here for a NIC on the LAN
                raise DriverError("; ".join(reasons))
            return Result(requeue_after=_POLL)
        if m.live:
            await _hold_bridge_address(rec, there)
        disks = await rec.disks_of(there, arriving_from=m.source)
        if disks.unplugged:
            names = ", ".join(sorted(v.name for v in disks.unplugged))
            raise DriverError(f"node {rec.node} cannot open the pool of volume(s) {names} (no usable Ceph client)")
        await rec._ensure_secret(disks)
        await asyncio.to_thread(rec._write_files, there, image, d)
        xml = design.domain_for(rec._guest_spec(there, image, nics, disks)).to_xml()
        await asyncio.to_thread(write_tls_files, rec.config.data_path)
    except Exception as exc:
        log.warning("preparing an incoming migration failed", extra={"instance": inst.id, "error": str(exc)})
        await _fail(rec.store, inst.id, f"preparing node {rec.node} failed: {exc}")
        await asyncio.to_thread(shutil.rmtree, d, True)
        return Result()
    await update_migration(rec.store, inst.id, phase="ready", dest_xml=xml)
    return Result()


async def _hold_bridge_address(rec: ComputeReconciler, inst: Instance) -> None:
    """A default-bridge guest arriving live keeps its address: hold it on this node's bridge before it comes, or
    refuse when another guest here has it (the guest would be cut off: its tap is pinned to its address)."""
    if inst.spec.nics or rec.network is None:
        return
    mac = design.mac_for(inst.id, 0)
    leased = [a.ip for a in inst.status.addresses if a.mac == mac and a.ip]
    keep = leased[0] if leased else inst.status.bridge_ip
    if not keep:
        return
    if await rec._default_address(inst) != keep:
        await rec._release_default(mac)
        raise DriverError(
            f"the guest's address {keep} on the default bridge is taken on node {rec.node} by another guest: a "
            "live migration keeps the guest's address; choose another node, or stop it and migrate it cold"
        )


async def _fail(store: Store, instance_id: str, error: str) -> None:
    """The migration failed: recorded, and the instance's NICs no longer arriving on the target (its network there
    goes when nothing else needs it)."""
    await update_migration(store, instance_id, phase="failed", error=error, finished_at=ids.now())
    for _ in range(10):
        try:
            if ops := await ports_moved(store, instance_id, to=None):
                await store.commit(Txn(ops))
            return
        except TxnFailed:
            continue


def _local_root(inst: Instance) -> bool:
    return not inst.spec.root_volume and inst.spec.pool_driver != "ceph"


async def outgoing(rec: ComputeReconciler, inst: Instance, m: MigrationSpec) -> Result:
    """This node is the source of a ``ready`` or ``migrating`` migration."""
    running: set[str] = rec.__dict__.setdefault("_migrations_running", set())
    if inst.id in running:
        return Result()  # this process is moving it; its end queues the key again
    if m.phase == "migrating":
        return await resolve(rec, inst, m)
    migrating = await update_migration(rec.store, inst.id, phase="migrating", disk_copy=_local_root(inst))
    if migrating is None:
        return Result()
    running.add(inst.id)
    try:
        return await _run(rec, inst, m)
    finally:
        running.discard(inst.id)


async def _run(rec: ComputeReconciler, inst: Instance, m: MigrationSpec) -> Result:
    import libvirt

    driver: Any = rec.driver
    uuid = inst.spec.uuid
    if not hasattr(driver, "migrate"):
        await _fail(rec.store, inst.id, f"the compute driver of node {rec.node} cannot migrate")
        return Result()
    try:
        address = await node_address(rec.store, m.target)
        tls = await asyncio.to_thread(write_tls_files, rec.config.data_path)
        if not m.live:
            await driver.start_paused(uuid)  # QEMU at reset, the guest not running: its disks move with it
        live = await driver.migratable_xml(uuid)
        if live is None:
            raise DriverError(f"the guest is not running on node {rec.node}")
        there = target_xml(live, m.dest_xml)
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: there,
            # The target's persistent definition too (else it keeps the source's paths and metadata, and the target's
            # compute reconciler would not recognise the guest as its own).
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: there,
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{address}",
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: address,
        }
        flags = (
            (libvirt.VIR_MIGRATE_LIVE if m.live else libvirt.VIR_MIGRATE_PAUSED)
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | libvirt.VIR_MIGRATE_TLS
        )
        if _local_root(inst):
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = f"tcp://{address}"
        log.info("migrating", extra={"instance": inst.id, "target": m.target, "disk_copy": _local_root(inst)})
        await driver.migrate(uuid, dest_uri(address, tls), params, flags)
        if not m.live:
            await driver.remote_stop(dest_uri(address, tls), uuid)  # stopped there as it was here
    except (DriverError, OSError, ET.ParseError) as exc:
        if not m.live:
            with contextlib.suppress(DriverError):
                await driver.destroy(uuid)  # the paused source copy: the instance stays stopped here
        log.warning("migration failed", extra={"instance": inst.id, "target": m.target, "error": str(exc)})
        return await resolve(rec, inst, m, error=str(exc))
    await finish(rec, inst, m)
    return Result()


async def resolve(rec: ComputeReconciler, inst: Instance, m: MigrationSpec, *, error: str = "") -> Result:
    """Decide a ``migrating`` migration from what the two libvirtds hold (see the module docstring)."""
    driver: Any = rec.driver
    uuid = inst.spec.uuid
    if await driver.job_active(uuid):
        return Result(requeue_after=_POLL)  # libvirtd is still moving it
    local = await driver.domain(uuid)
    local_state = local.state if local is not None and rec._is_ours(local) else None
    try:
        uri = dest_uri(await node_address(rec.store, m.target), tls_dir(rec.config.data_path))
        remote = await driver.remote_state(uri, uuid)
    except DriverError as exc:
        if local_state == "running":
            await _fail(rec.store, inst.id, error or f"node {m.target}'s libvirtd cannot be reached: {exc}")
            return Result()
        return Result(requeue_after=_POLL)  # nothing runs here: the guest can only be there; ask again
    if not m.live:
        return await _resolve_cold(rec, inst, m, uri, local_state, remote, error)
    if remote == "running" and local_state != "running":
        if local_state is not None:
            await driver.destroy(uuid)  # a paused leftover: the target's copy is the guest
            await driver.undefine(uuid)
        await finish(rec, inst, m)
        return Result()
    if local_state in ("running", "paused"):
        if remote is not None:
            await driver.remote_destroy(uri, uuid)  # a copy that never took over
        await driver.resume(uuid)
        await _fail(rec.store, inst.id, error or "the migration was interrupted; the guest stays on the source")
        return Result()
    if remote == "paused":
        return Result(requeue_after=_POLL)  # the target is finishing (or its agent will)
    await _fail(rec.store, inst.id, error or f"the guest runs on neither {m.source} nor {m.target}")
    return Result()


async def _resolve_cold(
    rec: ComputeReconciler,
    inst: Instance,
    m: MigrationSpec,
    uri: str,
    local: str | None,
    remote: str | None,
    error: str,
) -> Result:
    """A cold migration found ``migrating``: nothing runs a guest on either side, so what counts is where the
    definition is. On the target (the source's was undefined by the migration): done, stopped there; else failed."""
    driver: Any = rec.driver
    if local is None and remote is not None:
        if remote != "shutoff":
            await driver.remote_stop(uri, inst.spec.uuid)
        await finish(rec, inst, m)
        return Result()
    if local is not None and local != "shutoff":
        await driver.destroy(inst.spec.uuid)
    if remote is not None:
        await driver.remote_destroy(uri, inst.spec.uuid)
    await _fail(rec.store, inst.id, error or "the cold migration was interrupted; the instance stays on the source")
    return Result()


async def finish(rec: ComputeReconciler, inst: Instance, m: MigrationSpec) -> None:
    """The guest runs on the target: the instance's node (and image) and the migration's ``done`` in one
    transaction, then the source's leftover files go."""
    store = rec.store
    for _ in range(20):
        irec = await store.get(INSTANCE.name, inst.id)
        found = await get_migration(store, inst.id)
        if irec is None or found is None:
            break
        obj, mrec = found
        cur = INSTANCE.load(irec)
        changes: dict[str, Any] = {"node": m.target}
        if m.target_image:
            image = await store.get(IMAGE.name, m.target_image)
            changes["image_id"] = m.target_image
            if image is not None:
                changes["image_name"] = image.name
        new_inst = cur.replace(spec=msgspec.structs.replace(cur.spec, **changes), updated_at=ids.now())
        done = obj.replace(
            spec=msgspec.structs.replace(obj.spec, phase="done", dest_xml="", finished_at=ids.now()),
            updated_at=ids.now(),
        )
        moves = await _root_snapshots_to(store, inst.id, m.source, m.target)
        moves += await ports_moved(store, inst.id, to=m.target)  # the NICs: the network follows on every node
        moves += await volumes_moved(store, cur, m.target)  # Ceph volumes: their node with the instance's
        try:
            await store.commit(
                Txn(
                    [
                        Update(INSTANCE.dump(new_inst), expect_revision=irec.revision),
                        Update(MIGRATION.dump(done), expect_revision=mrec.revision),
                        *moves,
                    ]
                )
            )
            break
        except TxnFailed:
            continue
    log.info("migrated", extra={"instance": inst.id, "target": m.target})
    rec._ids.pop(inst.spec.uuid, None)
    rec._uuids.pop(inst.id, None)
    await asyncio.to_thread(shutil.rmtree, rec.instances_dir / inst.id, True)


async def _root_snapshots_to(store: Store, instance_id: str, source: str, target: str) -> list[Update]:
    """The instance's root-disk snapshots handed to ``target`` with the instance: a snapshot is made and removed by
    its ``node``, and the source may leave the cluster (the data is in the shared pool, so either node can; taking
    one is idempotent, so one the source was still taking is simply taken again, as done, by the target)."""
    moves = []
    for record in await list_all(store, SNAPSHOT.name, where={"node": source}):
        snap = SNAPSHOT.load(record)
        if snap.spec.instance == instance_id:
            moved = snap.replace(spec=msgspec.structs.replace(snap.spec, node=target), updated_at=ids.now())
            moves.append(Update(SNAPSHOT.dump(moved), expect_revision=record.revision))
    return moves


async def incoming_active(store: Store, instance_id: str, node: str) -> bool:
    """Whether a guest of ``instance_id`` on ``node`` that the node's sweep did not expect is one arriving by
    migration (not an orphan): ``node`` is the target of its active migration, or the migration finished since the
    sweep listed the node's instances (the record now says ``node``)."""
    found = await get_migration(store, instance_id)
    if found is not None and found[0].spec.active and found[0].spec.target == node:
        return True
    record = await store.get(INSTANCE.name, instance_id)
    return record is not None and INSTANCE.load(record).spec.node == node
