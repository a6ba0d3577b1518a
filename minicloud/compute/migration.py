"""Instance migration between nodes: the ``migration`` record and the ``instance migrate`` service.

``POST /v1/instances/{ref}/migrate`` (an administrator's action: it names nodes) checks what can move and where,
writes the instance's ``migration`` record (one per instance, named by the instance id; the last one stays as the
outcome) and answers 202 with an ``operation`` that follows it. The agents do the work (:mod:`agent.reconcilers.migration`):

1. ``preparing``: the **target** node's compute reconciler makes the instance's directory there (a root disk of the
   same size for a node-local root disk, the NoCloud seed) and its own domain definition of the same guest (its
   paths, its bridges), and records it (``ready``). Nothing of the guest runs there yet.
2. ``ready`` → ``migrating``: the **source** node's compute reconciler asks its libvirtd for a peer-to-peer live
   migration to the target's libvirtd over TLS (the nodes' cluster-CA certificates, both ways), with QEMU's own TLS
   for the memory and (``local`` pool) disk streams: nothing listens unauthenticated.
3. ``done``: the instance's ``node`` (and image) is the target's in one transaction with the migration's end; the
   target adopts the guest, the source removes its leftover directory. ``failed``: the guest stays on the source,
   ``error`` says why.

A **stopped** instance migrates cold, the same way: the source starts its domain paused (QEMU at reset, the guest not
running), migrates it with its disks (``VIR_MIGRATE_PAUSED``) and powers it off on the target, where it stays
defined and stopped. ``--cold`` on a running instance is refused (stop it first).

A migration interrupted by an agent dying is resolved from what the two libvirtds hold (see
:func:`agent.reconcilers.migration.resolve`): libvirt's migration protocol never resumes the guest on the target before the
source has stopped it, so there is one running copy, and the record is made to say where.

VPC NICs follow: the migration's transaction marks the instance's ports ``arriving`` on the target (whose network
reconciler builds their network, DHCP host and firewall chain before it says ``ready``), and the one that ends it
moves their ``node`` with the instance (a failure only clears ``arriving``).

Volumes in a Ceph pool (attached ones and a boot volume) follow the same way: the target's definition names them
(QEMU opens them there as the source's does: nothing is copied), and the transaction that ends the migration moves
their ``node`` (and their snapshots') with the instance.

What does not move, refused with the reason (409): an instance holding GPUs (passed-through host devices stay with
their node), one neither running nor stopped (building, stopping, error), a volume in a ``local`` pool (its file is
the node's); and not yet: a node-local image the target has no copy of (same files, imported there too). A NIC
straight on an external network's LAN moves like a VPC NIC: the target plugs it into its own provider bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Annotated, Any, Literal

import msgspec

from minicloud import errors, ids
from minicloud.cluster.kinds import NODE
from minicloud.compute import scheduler
from minicloud.compute.instances import attached_volumes, get_instance, hypervisor, node_usage
from minicloud.compute.kinds import HYPERVISOR, IMAGE, INSTANCE, ImageSpec
from minicloud.core.context import Context
from minicloud.core.kinds import Kind, Obj, declare
from minicloud.core.write import Written
from minicloud.network.kinds import PORT
from minicloud.operations import Operations, Reporter
from minicloud.state import Check, Create, Delete, Op, Record, Store, Txn, TxnFailed, Update, list_all
from minicloud.storage.kinds import VOLUME
from minicloud.storage.volumes import snapshots_follow

#: The operation's ``spec.action``.
ACTION = "admin:instances:migrate"
DRAIN_ACTION = "nodes:drain"
#: How long the operation follows a migration before giving up on it (the migration itself goes on).
WAIT_LIMIT = 3600.0
Phase = Literal["preparing", "ready", "migrating", "done", "failed"]
ACTIVE: frozenset[str] = frozenset({"preparing", "ready", "migrating"})
_PROGRESS = {"preparing": 1, "ready": 2, "migrating": 3, "done": 4}


class InstanceMigrate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/instances/{ref}/migrate``: the target node (default: the scheduler's pick) and whether to move the
    instance stopped (``cold``: a stopped instance always moves cold; a running one is refused: stop it first)."""

    node: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] | None
    ) = None
    cold: bool = False


class MigrationSpec(msgspec.Struct, kw_only=True):
    """See the module docstring. Written by the service (a new migration), the target (``ready``, ``dest_xml``) and
    the source (``migrating``, ``done``/``failed``), each with compare-and-swap."""

    instance: str
    project: str
    operation: str = ""
    source: str
    target: str
    live: bool = True
    phase: Phase = "preparing"
    #: The target's domain definition (its own paths, the same guest), written by the target while preparing.
    dest_xml: str = ""
    #: The image with the same files on the target, for an image kept in node-local files ("": the same image).
    target_image: str = ""
    #: Whether the source copies the root disk block by block (a ``local``-pool root disk), set with ``migrating``;
    #: a root disk in a Ceph pool is opened by the target's QEMU as it is (no copy).
    disk_copy: bool = False
    error: str = ""
    started_at: str = ""
    finished_at: str = ""

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE


#: Internal (no view, no generic verbs): read through the instance's operation and ``instance show``'s node.
MIGRATION = declare(
    Kind(name="migration", plural="migrations", prefix="mig", spec=MigrationSpec, scope="cluster", generic=frozenset())
)
Migration = Obj[MigrationSpec, Any]


async def get_migration(store: Store, instance_id: str) -> tuple[Migration, Record] | None:
    record = await store.get_by_name(MIGRATION.name, "", instance_id)
    return (MIGRATION.load(record), record) if record is not None else None


async def update_migration(store: Store, instance_id: str, **changes: Any) -> Migration | None:
    """Set ``changes`` on the instance's migration with compare-and-swap (a fresh read after a concurrent write);
    None when there is none. Only an active migration changes (a finished one is the record of its outcome)."""
    for _ in range(10):
        found = await get_migration(store, instance_id)
        if found is None or not found[0].spec.active:
            return None
        obj, record = found
        new = obj.replace(spec=msgspec.structs.replace(obj.spec, **changes), updated_at=ids.now())
        try:
            await store.commit(Txn([Update(MIGRATION.dump(new), expect_revision=record.revision)]))
            return new
        except TxnFailed:
            continue
    raise errors.Unavailable("the migration record kept changing; try again")


async def forget(store: Store, instance_id: str) -> None:
    """Remove the migration record of an instance whose record is gone (its node's compute reconciler calls it):
    one record per instance, and none outlives it."""
    found = await get_migration(store, instance_id)
    if found is not None:
        with contextlib.suppress(TxnFailed):
            await store.commit(Txn([Delete(kind=MIGRATION.name, id=found[1].id, expect_revision=found[1].revision)]))


def same_files(a: ImageSpec, b: ImageSpec) -> bool:
    """Two images with the same bytes (disk, or kernel and initrd) and boot settings."""
    return (
        a.boot == b.boot
        and a.sha256 == b.sha256
        and {k: f.sha256 for k, f in a.files.items()} == {k: f.sha256 for k, f in b.files.items()}
        and a.cmdline == b.cmdline
        and a.firmware == b.firmware
    )


async def target_image(store: Store, inst: Any, target: str) -> str:
    """The image the instance uses on ``target``: "" when its own image serves there (a disk image cloned in a Ceph
    pool, or one already on the target), else an image on the target with the same files; 409 when there is none."""
    spec = inst.spec
    if not spec.image_id:
        return ""
    record = await store.get(IMAGE.name, spec.image_id)
    if record is None:
        raise errors.Conflict(f"instance {inst.name}'s image {spec.image_name} no longer exists: it cannot be rebuilt")
    image = IMAGE.load(record)
    if image.spec.node == target or (spec.pool_driver == "ceph" and image.spec.boot == "disk"):
        return ""
    for rec in await list_all(store, IMAGE.name):
        other = IMAGE.load(rec)
        if other.spec.node == target and other.id != image.id and same_files(other.spec, image.spec):
            return other.id
    raise errors.Conflict(
        f"image {image.name} is stored on node {image.spec.node} only: import the same image on node {target} "
        "(same files) and migrate again"
    )


async def bridge_addresses(store: Store, *, node: str | None = None) -> dict[str, tuple[str, str, str]]:
    """address -> (instance id, name, node) of the default-bridge guests (instances without NICs) whose status has
    an address (:func:`bridge_ips`), on ``node`` only or everywhere. Each node's default bridge is its
    own segment with its own DHCP; a guest keeps its address through a live migration, so an address is only free
    for it on a node where no other guest has it."""
    where = {"where": {"node": node}} if node else {}
    out: dict[str, tuple[str, str, str]] = {}
    for record in await list_all(store, INSTANCE.name, **where):
        inst = INSTANCE.load(record)
        if not inst.spec.nics:
            for ip in bridge_ips(inst):
                out[ip] = (inst.id, inst.name, inst.spec.node)
    return out


def bridge_ips(inst: Any) -> set[str]:
    """A default-bridge guest's addresses: its fixed one (``status.bridge_ip``, kept while stopped) and its lease."""
    return {a.ip for a in inst.status.addresses if a.ip} | ({inst.status.bridge_ip} - {""})


async def address_taken(store: Store, inst: Any, target: str) -> str | None:
    """Why a live migration of default-bridge guest ``inst`` to ``target`` would cut it off (another guest there has
    its address), or None."""
    if inst.spec.nics:
        return None
    mine = bridge_ips(inst)
    for ip, (iid, name, _) in sorted((await bridge_addresses(store, node=target)).items()):
        if ip in mine and iid != inst.id:
            return (
                f"instance {inst.name}'s address {ip} on the default bridge is taken on node {target} by instance "
                f"{name}: a live migration keeps the guest's address; choose another node, or stop it and migrate it "
                "cold (it gets a free address there)"
            )
    return None


async def check_target(store: Store, inst: Any, target: str, *, live: bool = False) -> None:
    """409 unless ``target`` runs compute, is not the instance's node and has room for it (and, ``live``, has the
    guest's default-bridge address free)."""
    if target == inst.spec.node:
        raise errors.Conflict(f"instance {inst.name} already runs on node {target}")
    member = await store.get_by_name(NODE.name, "", target)
    if member is not None and member.spec.get("cordoned"):
        reason = member.spec.get("cordon_reason") or "no reason given"
        raise errors.Conflict(f"node {target} is cordoned ({reason}): nothing new is placed there")
    hv = await hypervisor(store, target)
    if hv is None:
        raise errors.Conflict(f"node {target} has not registered compute capacity (no such node, or no compute)")
    cap = scheduler.NodeCapacity.of(target, hv.spec)
    used = (await node_usage(store, target)).get(target, scheduler.ZERO)
    short = scheduler.shortfall(scheduler.demand_of(inst.spec), cap, used)
    if short:
        raise errors.Conflict(f"node {target} has no room for instance {inst.name}: not enough {', '.join(short)}")
    if live and (why := await address_taken(store, inst, target)):
        raise errors.Conflict(why)


async def pick_target(store: Store, inst: Any, *, live: bool = False) -> str:
    """The node with the most free memory that can take the instance (not its own; ``live``: not one where another
    guest has its default-bridge address)."""
    candidates = []
    used: dict[str, scheduler.Demand] = {}
    for rec in await list_all(store, HYPERVISOR.name):
        hv = HYPERVISOR.load(rec)
        member = await store.get_by_name(NODE.name, "", hv.name)
        if hv.name == inst.spec.node or (member is not None and member.spec.get("cordoned")):
            continue
        try:
            await target_image(store, inst, hv.name)
        except errors.Conflict:
            continue
        if live and await address_taken(store, inst, hv.name):
            continue
        candidates.append(scheduler.NodeCapacity.of(hv.name, hv.spec))
        used.update(await node_usage(store, hv.name))
    if not candidates:
        raise errors.Conflict(f"no other node can take instance {inst.name}")
    return scheduler.place(scheduler.demand_of(inst.spec), candidates, used)


async def begin(store: Store, inst: Any, op_id: str, *, node: str | None = None, cold: bool = False) -> str:
    """Check that ``inst`` can move (to ``node``, or the node the scheduler prefers) and record its migration as
    ``preparing`` under operation ``op_id``; returns the target. 409 with the reason otherwise."""
    spec = inst.spec
    if spec.deleted:
        raise errors.Conflict(f"instance {inst.name} is being deleted")
    state = inst.status.state
    live = spec.power == "running" and state == "running"
    if not live and not (spec.power == "stopped" and state == "stopped"):
        raise errors.Conflict(
            f"instance {inst.name} is {state}: a running instance migrates live, a stopped one cold; wait until it "
            "is one or the other"
        )
    if cold and live:
        raise errors.Conflict(f"instance {inst.name} is running: stop it first (`instance stop`) for a cold migration")
    if getattr(spec, "gpus", 0):
        raise errors.Conflict(
            f"instance {inst.name} holds {spec.gpus} GPU(s) passed through from node {spec.node}: the GPUs are this "
            "node's devices and do not move (create the instance anew elsewhere)"
        )
    for vol, _ in await attached_volumes(store, inst):
        if vol.status.state != "in-use":
            raise errors.Conflict(
                f"instance {inst.name}'s volume {vol.name} is {vol.status.state}: migrate it once that ends"
            )
        if vol.spec.driver != "ceph":
            what = "boot volume" if vol.id == spec.root_volume else "volume"
            raise errors.Conflict(
                f"instance {inst.name} has {what} {vol.name} in local pool {vol.spec.pool_name or vol.spec.pool} on "
                f"node {vol.spec.node}: a local volume stays on its node (detach it first, or use a Ceph pool)"
            )
    existing = await get_migration(store, inst.id)
    if existing is not None and existing[0].spec.active:
        m = existing[0].spec
        raise errors.Conflict(f"instance {inst.name} is already migrating ({m.phase}) to node {m.target}")
    target = node or await pick_target(store, inst, live=live)
    await check_target(store, inst, target, live=live)
    image = await target_image(store, inst, target)
    nic_ops = await ports_arriving(store, inst, target=target)
    mig = MigrationSpec(
        instance=inst.id,
        project=inst.project,
        operation=op_id,
        source=spec.node,
        target=target,
        live=live,
        target_image=image,
        started_at=ids.now(),
    )
    if existing is None:
        op: Any = Create(MIGRATION.dump(MIGRATION.new(project="", name=inst.id, spec=mig, stamp=ids.now())))
    else:
        obj, record = existing
        op = Update(MIGRATION.dump(obj.replace(spec=mig, updated_at=ids.now())), expect_revision=record.revision)
    try:
        # The instance's revision is part of the condition: a stop, resize or delete committed since we read it
        # makes this a 409 (look again) rather than a migration of what is no longer there.
        await store.commit(Txn([op, *nic_ops, Check(kind=INSTANCE.name, id=inst.id, expect_revision=inst.revision)]))
    except TxnFailed:
        raise errors.Conflict(f"instance {inst.name} changed meanwhile; try again") from None
    return target


async def ports_arriving(store: Store, inst: Any, *, target: str) -> list[Update]:
    """The updates that mark the instance's NICs as arriving on ``target`` (VPC NICs, and NICs straight on an
    external network's LAN: the target plugs them into its own provider bridge and serves them DHCP)."""
    out: list[Update] = []
    for nic in inst.spec.nics:
        record = await store.get(PORT.name, nic.port)
        if record is None:
            raise errors.Conflict(f"instance {inst.name}'s NIC {nic.port} is gone meanwhile; try again")
        out.append(_port_update(record, arriving=target))
    return out


def _port_update(record: Record, **changes: str) -> Update:
    port = PORT.load(record)
    moved = port.replace(spec=msgspec.structs.replace(port.spec, **changes), updated_at=ids.now())
    return Update(PORT.dump(moved), expect_revision=record.revision)


async def ports_moved(store: Store, instance_id: str, *, to: str | None) -> list[Update]:
    """The updates that end the arrival of the instance's NICs: each one's ``node`` set to ``to`` (the migration
    succeeded) or left (``to`` None: it failed), and ``arriving`` cleared; nothing for a port already so."""
    irec = await store.get(INSTANCE.name, instance_id)
    if irec is None:
        return []
    out: list[Update] = []
    for nic in INSTANCE.load(irec).spec.nics:
        record = await store.get(PORT.name, nic.port)
        if record is None:
            continue
        p = PORT.load(record).spec
        if p.arriving or (to is not None and p.node != to):
            out.append(_port_update(record, arriving="", **({"node": to} if to is not None else {})))
    return out


async def volumes_moved(store: Store, inst: Any, to: str) -> list[Op]:
    """The updates that hand the instance's attached volumes (its boot volume included; all in Ceph, see
    :func:`begin`) and their snapshots to node ``to`` with the instance: commit them in the transaction that moves
    it, or the target would unplug disks no attachment of its node names. No fencing: the source handed them over
    (``previous_node`` stays empty)."""
    out: list[Op] = []
    for vol, revision in await attached_volumes(store, inst):
        if vol.spec.node == to:
            continue
        att = vol.spec.attachment
        spec = msgspec.structs.replace(
            vol.spec,
            node=to,
            previous_node="",
            attachment=msgspec.structs.replace(att, node=to) if att is not None else None,
        )
        out.append(Update(VOLUME.dump(vol.replace(spec=spec, updated_at=ids.now())), expect_revision=revision))
        out += await snapshots_follow(store, vol, to, ids.now())
    return out


async def migrate_instance(
    ctx: Context, store: Store, operations: Operations, ref: str, *, node: str | None = None, cold: bool = False
) -> Written:
    """Start a migration of instance ``ref`` to ``node`` (or the node the scheduler prefers); see the module
    docstring for what is refused."""
    inst = await get_instance(ctx, store, ref)
    op_id = Operations.new_id()
    await begin(store, inst, op_id, node=node, cold=cold)

    def work(_record: Record) -> Any:
        return lambda report: follow(store, inst.id, op_id, report)

    target_ref = {"kind": INSTANCE.name, "id": inst.id, "name": inst.name}
    return await operations.start(ctx, ACTION, target_ref, work, label="operation", op_id=op_id)


async def drain_node(ctx: Context, store: Store, operations: Operations, node: str) -> Written:
    """``node drain``: cordon ``node`` (nothing new is placed there), then move its instances away one at a
    time (running ones live, stopped ones cold; the scheduler picks each target); its result lists what moved where
    and what stays, with the reason (volumes, GPUs, an instance neither running nor
    stopped, no room or no copy of a node-local image elsewhere)."""
    from minicloud.compute import nodes

    await nodes.cordon(dataclasses.replace(ctx, idempotency=None), store, node, reason="draining")
    op_id = Operations.new_id()

    def work(_record: Record) -> Any:
        async def drain(report: Reporter) -> dict[str, Any]:
            records = await list_all(store, INSTANCE.name, where={"node": node})
            todo = sorted((INSTANCE.load(r) for r in records), key=lambda i: i.name)
            moved: list[dict[str, str]] = []
            stayed: list[dict[str, str]] = []
            for done, inst in enumerate(todo):
                await report(done, len(todo), f"instance {inst.name}")
                fresh = await store.get(INSTANCE.name, inst.id)
                if fresh is None:
                    continue
                inst = INSTANCE.load(fresh)
                try:
                    await begin(store, inst, op_id)
                    result = await follow(store, inst.id, op_id, _silent)
                    moved.append({"instance": inst.name, "id": inst.id, "node": result["node"]})
                except errors.MinicloudError as exc:
                    stayed.append({"instance": inst.name, "id": inst.id, "reason": exc.detail or str(exc)})
            await report(len(todo), len(todo), f"{len(moved)} moved, {len(stayed)} stay")
            return {"node": node, "moved": moved, "stayed": stayed}

        return drain

    return await operations.start(
        ctx, DRAIN_ACTION, {"kind": "node", "name": node}, work, label="operation", op_id=op_id
    )


async def _silent(done: int, total: int, message: str = "") -> None:
    """A progress reporter that reports nothing (the drain reports per instance)."""


def _disks(m: MigrationSpec) -> str:
    """What happens to the root disk, said once the source is moving the guest."""
    if m.phase != "migrating":
        return ""
    return " (copying the root disk)" if m.disk_copy else " (root disk shared: no copy)"


async def follow(store: Store, instance_id: str, op_id: str, report: Reporter) -> dict[str, Any]:
    """The operation's work: report the migration's phases until it ends (or another migration replaced it)."""
    deadline = time.monotonic() + WAIT_LIMIT
    last = ""
    sub = store.subscribe()
    try:
        while True:
            found = await get_migration(store, instance_id)
            if found is None or found[0].spec.operation != op_id:
                raise errors.Conflict("the migration record was replaced or removed")
            m = found[0].spec
            if m.phase != last:
                last = m.phase
                await report(_PROGRESS.get(m.phase, 0), 4, f"{m.phase}: {m.source} -> {m.target}{_disks(m)}")
            if m.phase == "done":
                return {"instance": instance_id, "node": m.target, "source": m.source, "started_at": m.started_at,
                        "finished_at": m.finished_at, "disk_copy": m.disk_copy}  # fmt: skip
            if m.phase == "failed":
                raise errors.Conflict(f"the migration to node {m.target} failed: {m.error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.Unavailable("the migration is still going on; see the instance")
            try:
                async with asyncio.timeout(min(remaining, 5.0)):
                    async for change in sub:
                        if change.kind == MIGRATION.name:
                            break
            except TimeoutError:
                pass
    finally:
        sub.close()
