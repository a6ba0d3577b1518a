"""Instance services: create (with placement), start, stop, reboot, resize, delete and the console log's location.

They take a :class:`~minicloud.core.context.Context` and the store, never a request, and write through
:func:`minicloud.core.write.commit` (audit and ``Idempotency-Key`` in the same transaction): the HTTP handlers in
:mod:`minicloud.api.instances`, a leader loop or a test without HTTP all get the same behaviour.

The services record what the user wants (``spec``: shape, image, power, a delete request); the compute reconciler of
the instance's node (:mod:`agent.reconcilers.compute`) converges libvirt to it and writes ``status`` back.

Placement happens at create, so a request that fits nowhere is refused with 409 instead of leaving an instance stuck
in ``error``: the scheduler's pure :func:`~minicloud.compute.scheduler.place` picks the node and the instance is
committed together with a compare-and-swap on that node's ``placement`` record, so two concurrent creates (on any
nodes of the cluster) cannot both take the last free slot. :class:`NodeLocks` serialises the placements of one
process per node so that many creates arriving together do not waste rounds on that compare-and-swap.

Root disks and pools (:func:`root_disk`): a disk image in a ``ceph`` pool whose copy is ``ready`` gives an RBD clone
that any node may run (the scheduler picks the node with the most free memory among all of them); a local image, a
kernel image or a local volume pins the instance to its node (``local`` pool: today's qcow2 overlay). ``--boot-volume``
makes an available, unattached volume of the project the root disk: it is attached as ``vda`` in the instance's own
transaction and outlives the instance. Volumes attached to an instance are released (attachment cleared, state
``available``) in the transaction that removes the instance's record, i.e. only after its node destroyed the guest:
releasing them at the delete request would let another instance (on another node) attach a volume the dying guest
may still be writing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from minicloud import errors, ids
from minicloud.cluster.kinds import SCHEDULER_WEIGHER
from minicloud.compute import nodes as node_states
from minicloud.compute import server_groups, types
from minicloud.compute.images import Pool, default_pool, pool_for
from minicloud.compute.kinds import (
    HYPERVISOR,
    IMAGE,
    INSTANCE,
    KEYPAIR,
    PLACEMENT,
    HypervisorSpec,
    ImageSpec,
    ImageStatus,
    InstanceNicSpec,
    InstanceObserved,
    InstanceSpec,
    PlacementSpec,
    RebootRequest,
)
from minicloud.compute.scheduler import Demand, NodeCapacity, SchedRequest, demand_of, place, schedule, usage
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written, commit, replay
from minicloud.gpu import placement as gpu_placement
from minicloud.gpu import service as gpus
from minicloud.iam.directory import Directory, authorize
from minicloud.model.compute import InstanceCreate, NicCreate
from minicloud.network import default_vpc, ipam, ports
from minicloud.network.kinds import PORT
from minicloud.state import Create, Delete, Op, Store, TxnFailed, Update, list_all
from minicloud.storage import common as storage_common
from minicloud.storage.kinds import (
    DISK_SLOTS,
    LOCAL_POOL_NAME,
    POOL,
    VOLUME,
    Attachment,
    VolumeObserved,
    VolumeSpec,
    slots_id,
)
from minicloud.storage.volumes import snapshots_follow

Instance = Obj[InstanceSpec, InstanceObserved]
Image = Obj[ImageSpec, ImageStatus]
Volume = Obj[VolumeSpec, VolumeObserved]
#: The lock of placements that may go to any node (an image or volume on Ceph).
_ANY_NODE = "*"
_PLACEMENT_ATTEMPTS = 8
_UPDATE_ATTEMPTS = 5


class NodeLocks:
    """One ``asyncio.Lock`` per node name, made on first use: placements on one node, one at a time per process."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, node: str) -> asyncio.Lock:
        return self._locks.setdefault(node, asyncio.Lock())


# -- reads ---------------------------------------------------------------------------------------------------------
async def get_instance(ctx: Context, store: Store, ref: str) -> Instance:
    """The instance ``ref`` (id or name) names in ``ctx``'s project; 404 otherwise."""
    return await crud.get(ctx, store, INSTANCE, ref)


async def hypervisor(store: Store, node: str) -> Obj[HypervisorSpec, Any] | None:
    """The capacity record ``node``'s agent published (None: compute never ran there)."""
    record = await store.get_by_name(HYPERVISOR.name, "", node)
    return HYPERVISOR.load(record) if record is not None else None


async def node_usage(store: Store, node: str) -> dict[str, Demand]:
    """What the instances placed on ``node`` take (indexed: this node's instances only)."""
    records = await list_all(store, INSTANCE.name, where={"node": node})
    return usage((node, demand_of(INSTANCE.load(r).spec)) for r in records)


def placement_id(node: str) -> str:
    return f"{PLACEMENT.prefix}-{node}"


# -- create --------------------------------------------------------------------------------------------------------
def _unknown(param: str, what: str, ref: str, project: str, command: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(
        f"there is no {what} '{ref[:64]}' in project '{project}'; see `minicloud {command} list`",
        invalid_params=[{"name": param, "reason": f"unknown {what}"}],
    )


async def _wanted_nics(
    ctx: Context, store: Store, nics: list[NicCreate] | None, directory: Directory | None
) -> list[ports.Wanted]:
    """The NICs asked for, resolved; none asked for: one on the project's default VPC (made on first use) when the
    cluster has the ``host`` network (:mod:`minicloud.network.default_vpc`), else none (the node's default bridge)."""
    if not nics:
        subnet = await default_vpc.ensure_default_vpc(ctx, store)
        if subnet is None:
            return []
        nics = [NicCreate(subnet=subnet.id)]
    return [
        await ports.resolve(
            ctx,
            store,
            subnet=n.subnet,
            network=n.network,
            ip=n.ip,
            security_groups=n.security_groups,
            directory=directory,
        )
        for n in nics
    ]


async def _port_ops(
    ctx: Context, store: Store, obj: Instance, wanted: list[ports.Wanted], *, first_index: int = 0, spread: int = 0
) -> tuple[list[InstanceNicSpec], list[Op]]:
    """New ports for ``wanted`` on ``obj``'s node (addresses allocated on a fresh read), as the instance's NIC
    copies and the ops that record ports and addresses."""
    nics: list[InstanceNicSpec] = []
    ops: list[Op] = []
    taken: set[str] = set()
    for i, w in enumerate(wanted):
        port, subnet, port_ops = await ports.create_ops(
            ctx,
            store,
            w,
            project=obj.project,
            instance_id=obj.id,
            index=first_index + i,
            node=obj.spec.node,
            spread=spread,
            exclude=frozenset(taken),
        )
        taken.add(ipam.alloc_name(subnet.id, port.spec.address))
        ops += port_ops
        nics.append(
            InstanceNicSpec(
                port=port.id,
                network=w.network.id,
                network_name=w.network.name,
                subnet=subnet.id,
                subnet_name=subnet.name,
                mac=port.spec.mac,
                ip=port.spec.address,
                security_groups=[g.id for g in w.groups],
                security_group_names=[g.name for g in w.groups],
            )
        )
    return nics, ops


async def _release_ops(store: Store, obj: Instance) -> list[Op]:
    """The ops that remove every port of ``obj`` and release their addresses (commit them with the record's
    removal): the ports its spec names and any other named after it."""
    found = {p.id: p for p in await ports.instance_ports(store, obj.project, obj.id)}
    for nic in obj.spec.nics:
        if nic.port not in found and (record := await store.get(PORT.name, nic.port)) is not None:
            found[nic.port] = PORT.load(record)
    ops: list[Op] = []
    for port in found.values():
        ops += await ports.delete_ops(store, port)
    return ops


@dataclass(frozen=True)
class RootDisk:
    """Where an instance's root disk comes from, and so where it may run."""

    image: Image | None
    #: ``--boot-volume``: the volume that is the root disk.
    volume: Volume | None
    #: The pool of the root disk (None: no pool records yet, the node's ``instances`` directory).
    pool: Pool | None
    #: The only node it may run on (its image's or volume's), or None: any node with compute capacity.
    node: str | None

    @property
    def pool_driver(self) -> str:
        if self.volume is not None:
            return self.volume.spec.driver
        return self.pool.spec.driver if self.pool is not None else ""


def _pool_label(pool: Pool | None) -> str:
    return f"pool '{pool.name}'" if pool is not None else "the node's local disk"


async def _local_pool(store: Store) -> Pool | None:
    record = await store.get_by_name(POOL.name, "", LOCAL_POOL_NAME)
    return POOL.load(record) if record is not None else None


async def root_disk(ctx: Context, store: Store, body: InstanceCreate) -> RootDisk:
    """Resolve ``body``'s image or boot volume and pool (404 for unknown ones, 409 when they cannot be used now).

    - a boot volume: its own pool; runs anywhere when it is on Ceph, else on the volume's node;
    - a disk image in a ``ceph`` pool: a clone in that pool (``--pool`` must name it), once the copy is ``ready``
      (409 while it is being copied); runs on any node;
    - otherwise (a local image, or ``--pool`` naming a local pool): a qcow2 overlay on the image's node;
    - a kernel image: a blank root disk in ``--pool`` or the default pool, on the image's node (the kernel is there).
    """
    if (body.image is None) == (body.boot_volume is None):
        raise errors.ValidationFailed(
            "give the image to make the root disk from (--image), or a volume to boot from (--boot-volume)",
            invalid_params=[{"name": "image", "reason": "exactly one of image and boot_volume is required"}],
        )
    explicit = await pool_for(ctx, store, body.pool) if body.pool is not None else None
    if body.boot_volume is not None:
        volume = await crud.find(ctx, store, VOLUME, body.boot_volume)
        if volume is None:
            raise errors.NotFound(
                f"there is no volume '{body.boot_volume[:64]}' in project '{ctx.project}'; see `minicloud volume list`",
                invalid_params=[{"name": "boot_volume", "reason": "unknown volume"}],
            )
        _bootable(volume)
        if explicit is not None and explicit.id != volume.spec.pool:
            raise errors.ValidationFailed(
                f"volume '{volume.name}' is in pool '{volume.spec.pool_name or volume.spec.pool}', not "
                f"'{explicit.name}': the root disk is the volume itself; leave out --pool",
                invalid_params=[{"name": "pool", "reason": "not the boot volume's pool"}],
            )
        record = await store.get(POOL.name, volume.spec.pool)
        pool = POOL.load(record) if record is not None else None
        node = None if volume.spec.driver == "ceph" else volume.spec.node
        return RootDisk(image=None, volume=volume, pool=pool, node=node)
    assert body.image is not None
    image = await crud.find(ctx, store, IMAGE, body.image)
    if image is None:
        raise _unknown("image", "image", body.image, ctx.project, "image")
    if image.spec.boot != "disk":
        pool = explicit if explicit is not None else await default_pool(store)
        return RootDisk(image=image, volume=None, pool=pool, node=image.spec.node)
    in_ceph = image.spec.pool_driver == "ceph"
    if explicit is not None and explicit.spec.driver == "ceph" and explicit.id != image.spec.pool:
        raise errors.Conflict(
            f"image '{image.name}' is not in {_pool_label(explicit)} (its disk is on node {image.spec.node}"
            + (f" and in pool {image.spec.pool}" if image.spec.pool else "")
            + f"); import it again with `--pool {explicit.name}`, or leave out --pool"
        )
    wanted = explicit if explicit is not None else None
    if wanted is None:
        wanted = await _pool_of(store, image) if in_ceph else await _local_pool(store)
    if wanted is not None and wanted.spec.driver == "ceph":
        state = image.status.pool_state
        if state != "ready":
            why = (
                f"copying it into pool '{wanted.name}' failed: {image.status.reason or 'see the node log'}; "
                "delete the image and import it again"
                if state == "error"
                else f"image '{image.name}' is still being copied into pool '{wanted.name}', retry in a moment"
            )
            raise errors.Conflict(why if state != "error" else f"image '{image.name}' cannot be used: {why}")
        return RootDisk(image=image, volume=None, pool=wanted, node=None)
    return RootDisk(image=image, volume=None, pool=wanted, node=image.spec.node)


async def _pool_of(store: Store, image: Image) -> Pool | None:
    record = await store.get(POOL.name, image.spec.pool)
    if record is None:
        raise errors.Conflict(f"the pool of image '{image.name}' ({image.spec.pool}) no longer exists")
    return POOL.load(record)


def _bootable(volume: Volume) -> None:
    """409 unless ``volume`` can become a root disk now: available, unattached, not being deleted, with data."""
    att = volume.spec.attachment
    if att is not None:
        raise errors.Conflict(
            f"volume '{volume.name}' is attached to instance '{att.instance_name or att.instance}'; detach it first"
        )
    if volume.spec.deleted:
        raise errors.Conflict(f"volume '{volume.name}' is being deleted")
    if volume.status.state != "available" or volume.status.size_gib < 1:
        raise errors.Conflict(f"volume '{volume.name}' is {volume.status.state}, not available; wait for it")


async def _boot_volume_ops(store: Store, obj: Instance) -> list[Op]:
    """Attach the boot volume as ``vda`` of ``obj`` (read fresh, checked again): the op for the instance's
    transaction, a compare-and-swap on the volume."""
    record = await store.get(VOLUME.name, obj.spec.root_volume)
    if record is None:
        raise errors.NotFound(f"volume {obj.spec.root_volume} no longer exists")
    volume = VOLUME.load(record)
    _bootable(volume)
    node = obj.spec.node
    spec = msgspec.structs.replace(
        volume.spec,
        attachment=Attachment(instance=obj.id, instance_name=obj.name, node=node, device="vda"),
        root_of=obj.id,
        node=node if volume.spec.driver == "ceph" else volume.spec.node,
        previous_node=volume.spec.node if volume.spec.node not in ("", node) else volume.spec.previous_node,
    )
    status = msgspec.structs.replace(volume.status, state="attaching", reason="")
    updated = volume.replace(spec=spec, status=status, updated_at=obj.updated_at)
    # a ceph volume's snapshots follow it to the instance's node (its old node may be gone for good)
    follow = await snapshots_follow(store, volume, spec.node, obj.updated_at)
    return [Update(VOLUME.dump(updated), expect_revision=record.revision), *follow]


def _root_ops(root: RootDisk) -> Callable[[Store, Instance], Awaitable[list[Op]]]:
    """The ops the instance's transaction commits for its root disk: a Check that its image and pool are still
    there and not being deleted (so a delete of either, which marks it before its last look for users, either sees
    the instance or makes this create read again and answer 404/409: never an instance of a deleted image or pool),
    and the boot volume's attachment."""

    async def ops(store: Store, obj: Instance) -> list[Op]:
        found: list[Op] = []
        if root.image is not None:
            found.append(await storage_common.still(store, IMAGE, root.image.id, f"image '{root.image.name}'"))
        if root.pool is not None:
            found.append(await storage_common.still(store, POOL, root.pool.id, f"pool '{root.pool.name}'"))
        if root.volume is not None:
            found += await _boot_volume_ops(store, obj)
        return found

    return ops


def _root_gone(exc: BaseException) -> bool:
    """Whether a create failed because its image, pool or boot volume went meanwhile (the next try says so)."""
    cause = exc.__context__
    return (
        isinstance(cause, TxnFailed)
        and cause.reason == "not-found"
        and getattr(cause.op, "kind", "") in (IMAGE.name, POOL.name, VOLUME.name)
    )


async def create_instance(
    ctx: Context,
    store: Store,
    body: InstanceCreate,
    *,
    locks: NodeLocks | None = None,
    directory: Directory | None = None,
    weigher: str = "spread",
) -> Written:
    """Create an instance in ``ctx``'s project: check the image or boot volume and pool (:func:`root_disk`), type
    and key pair (and each NIC's subnet or network and security groups), ``--zone``, ``--node`` (admin) and
    ``--server-group``, place it with the scheduler (:func:`~minicloud.compute.scheduler.schedule`: filters, then
    the weigher: the cluster setting ``scheduler-weigher`` (``minicloud cluster set``), else ``weigher``, this node's
    ``compute.scheduler_weigher``; 409 saying why each node was refused otherwise; the reason is recorded in
    ``spec.placement``),
    record it (201) with its ports and their addresses (and the boot volume's attachment) in the same transaction
    (409 for an address already used or an exhausted subnet). The node then builds and starts it (``status.state`` pending → building → running). Idempotent under
    ``ctx.idempotency``."""
    if (first := await replay(ctx, store)) is not None:
        return first
    if await store.get_by_name(INSTANCE.name, ctx.project, body.name) is not None:
        raise errors.AlreadyExists(f"an instance named '{body.name}' already exists in project '{ctx.project}'")
    root = await root_disk(ctx, store, body)
    itype = await types.lookup(ctx, store, body.type)
    public_keys: list[str] = []
    if body.keypair is not None:
        keypair = await crud.find(ctx, store, KEYPAIR, body.keypair)
        if keypair is None:
            raise _unknown("keypair", "key pair", body.keypair, ctx.project, "keypair")
        public_keys.append(keypair.spec.public_key)
    if root.volume is not None:
        disk_gib = root.volume.spec.size_gib
        if body.disk_gib is not None and body.disk_gib != disk_gib:
            raise errors.ValidationFailed(
                f"the root disk is volume '{root.volume.name}' ({disk_gib} GiB); leave out --disk-size (grow the "
                "volume with `minicloud volume extend`)",
                invalid_params=[{"name": "disk_gib", "reason": "the boot volume's size is the root disk's"}],
            )
    else:
        assert root.image is not None
        disk_gib = body.disk_gib or itype.disk_gib
        image_gib = math.ceil((root.image.spec.virtual_size_bytes or 0) / (1 << 30))
        if disk_gib < image_gib:
            raise errors.ValidationFailed(
                f"the root disk ({disk_gib} GiB) would be smaller than the image ({image_gib} GiB); give "
                f"--disk-size {image_gib} or more, or a larger type",
                invalid_params=[{"name": "disk_gib", "reason": f"smaller than the image ({image_gib} GiB)"}],
            )
    group = await _placement_hints(ctx, store, body, directory)
    wanted = await _wanted_nics(ctx, store, body.nics, directory)
    spec = InstanceSpec(
        uuid=str(uuid.uuid4()),
        image_id=root.image.id if root.image is not None else "",
        image_name=root.image.name if root.image is not None else "",
        type=itype.name,
        vcpus=itype.vcpus,
        memory_mib=itype.memory_mib,
        disk_gib=disk_gib,
        keypair=body.keypair,
        public_keys=public_keys,
        user_data=body.user_data,
        power="running" if body.start else "stopped",
        node=root.node or "",
        description=body.description,
        pool=root.pool.id if root.pool is not None else "",
        pool_driver=root.pool_driver,
        root_volume=root.volume.id if root.volume is not None else "",
        server_group=group.id if group is not None else "",
        zone=body.zone or "",
        gpus=itype.gpus,
        gpu_model=itype.gpu_model,
    )
    obj = INSTANCE.new(project=ctx.project, name=body.name, spec=spec, labels=body.labels, stamp=ctx.clock())
    extra = _root_ops(root)
    req = SchedRequest(
        demand=demand_of(spec), pinned=root.node, zone=body.zone, node=body.node, gpus=itype.gpus,
        gpu_model=itype.gpu_model,
    )  # fmt: skip
    lock_name = root.node or body.node or _ANY_NODE
    if locks is None:
        return await _place_and_commit(ctx, store, obj, wanted, req, extra, group=group, weigher=weigher)
    async with locks.get(lock_name):
        return await _place_and_commit(ctx, store, obj, wanted, req, extra, group=group, weigher=weigher)


async def _placement_hints(
    ctx: Context, store: Store, body: InstanceCreate, directory: Directory | None
) -> server_groups.GroupObj | None:
    """Check ``--node`` (cluster administrators only; a compute node), ``--zone`` (a zone some node has: 400
    otherwise) and ``--server-group`` (the caller's project's: 404 otherwise); the group."""
    if body.node is not None:
        if directory is not None:
            await authorize(directory, ctx.principal, "admin:instances:place", "", cluster=True)
        elif not ctx.principal.admin:
            raise errors.Forbidden(
                "choosing the node (--node) is for cluster administrators (admin:instances:place); give --zone instead",
                action="admin:instances:place",
            )
        if await hypervisor(store, body.node) is None:
            raise errors.BadRequest(
                f"there is no compute node '{body.node}'; see `minicloud node list`",
                invalid_params=[{"name": "node", "reason": "unknown compute node"}],
            )
    if body.zone is not None:
        known = sorted({z for z in (await node_states.zones(store)).values() if z})
        if body.zone not in known:
            raise errors.BadRequest(
                f"there is no zone '{body.zone}': "
                + (f"the zones are {', '.join(known)}" if known else "no node has a zone (`cluster add --zone`)"),
                invalid_params=[{"name": "zone", "reason": "unknown zone"}],
            )
    if body.server_group is None:
        return None
    return await server_groups.resolve(ctx, store, body.server_group)


async def _place_and_commit(
    ctx: Context,
    store: Store,
    obj: Instance,
    wanted: list[ports.Wanted],
    req: SchedRequest,
    extra: Callable[[Store, Instance], Awaitable[list[Op]]] | None = None,
    *,
    group: server_groups.GroupObj | None = None,
    weigher: str = "spread",
) -> Written:
    """Decide on fresh figures and commit the instance with a compare-and-swap on its node's placement record (and
    on its server group's record) and its ports (``port.node`` = the placement) with their addresses, and
    ``extra``'s ops (the boot volume's attachment); another placement on that node (or in that group) committing
    first, or another port taking an address first, means: back off, decide again."""
    for attempt in range(_PLACEMENT_ATTEMPTS):
        if attempt:
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))
        views, cpus = await node_states.sched_nodes(store, only=req.pinned or req.node)
        group_ops: list[Op] = []
        if group is not None:
            zones = {v.name: v.zone for v in views} if not (req.pinned or req.node) else await node_states.zones(store)
            sg, join = await server_groups.snapshot(store, group, zones)
            req = dataclasses.replace(req, group=sg)
            group_ops = [join]
        node_gpus: dict[str, list[gpus.Gpu]] = {}
        if req.gpus:
            node_gpus = await gpus.all_gpus(store)
            views = [dataclasses.replace(v, gpus=tuple(g.spec for g in node_gpus.get(v.name, []))) for v in views]
        # The cluster's setting when an administrator set one (the placement cache's copy: no store read), else this
        # node's configuration: every node weighs alike once it is set.
        chosen = await node_states.cluster_setting(store, SCHEDULER_WEIGHER) or weigher
        decision = schedule(req, views, weigher=chosen)
        node = decision.node
        # CPU hot-plug up to the node's CPUs (`instance resize` while running)
        obj = obj.replace(
            spec=msgspec.structs.replace(
                obj.spec, node=node, max_vcpus=max(obj.spec.vcpus, cpus.get(node, 0)), placement=decision.reason
            )
        )
        token_record = await store.get(PLACEMENT.name, placement_id(node))
        token_op: Op
        if token_record is None:
            token = PLACEMENT.new(
                project="", name=placement_id(node), id=placement_id(node), spec=PlacementSpec(seq=1), stamp=ctx.clock()
            )
            token_op = Create(PLACEMENT.dump(token))
        else:
            token = PLACEMENT.load(token_record)
            token = token.replace(spec=PlacementSpec(seq=token.spec.seq + 1), updated_at=ctx.clock())
            token_op = Update(PLACEMENT.dump(token), expect_revision=token_record.revision)
        nics, port_ops = await _port_ops(ctx, store, obj, wanted, spread=min(attempt, 8))
        obj = obj.replace(spec=msgspec.structs.replace(obj.spec, nics=nics))
        extra_ops = await extra(store, obj) if extra is not None else []
        extra_ops += _gpu_claims(req, node_gpus.get(node, []), obj, ctx.clock())
        try:
            return await crud.create(ctx, store, INSTANCE, obj, extra=[token_op, *group_ops, *port_ops, *extra_ops])
        except errors.PreconditionFailed:
            continue  # another placement on this node or in the group committed first (or a subnet or volume changed)
        except errors.AlreadyExists as exc:
            if ipam.lost_race(exc):
                continue  # another port took an address first
            if token_record is None and await store.get(PLACEMENT.name, placement_id(node)) is not None:
                continue  # the placement record was created concurrently
            raise
        except errors.MinicloudError as exc:
            if ipam.lost_race(exc) or _root_gone(exc) or _gpu_gone(exc):
                continue  # a subnet, the image, the pool or a GPU was deleted or changed meanwhile: read again
            raise
    raise errors.Conflict("placement kept racing with other creates on the same node; retry")


def _gpu_gone(exc: BaseException) -> bool:
    """Whether a create failed because a GPU it took left its node's inventory meanwhile (decide again)."""
    cause = exc.__context__
    record = getattr(cause, "op", None) and getattr(cause.op, "record", None)  # type: ignore[union-attr]
    return isinstance(cause, TxnFailed) and cause.reason == "not-found" and getattr(record, "kind", "") == gpus.GPU.name


def _gpu_claims(req: SchedRequest, here: list[gpus.Gpu], obj: Instance, stamp: str) -> list[Op]:
    """The compare-and-swap Updates that make the chosen node's GPUs (as read for the decision) the instance's: a
    GPU taken meanwhile by another create fails the transaction, which then decides again."""
    if not req.gpus:
        return []
    chosen = {s.pci_address for s in gpu_placement.choose([g.spec for g in here], req.gpus, req.gpu_model)}
    return gpus.claim_ops([g for g in here if g.spec.pci_address in chosen], obj.id, obj.name, stamp)


# -- verbs ---------------------------------------------------------------------------------------------------------
def _not_deleting(obj: Instance) -> None:
    if obj.spec.deleted:
        raise errors.Conflict(f"instance '{obj.name}' is being deleted")


async def _not_migrating(store: Store, obj: Instance) -> None:
    """409 while the instance migrates: its NICs are being set up on the target from what it had at the start."""
    from minicloud.compute.migration import get_migration  # (it builds on this module)

    found = await get_migration(store, obj.id)
    if found is not None and found[0].spec.active:
        m = found[0].spec
        raise errors.Conflict(
            f"instance '{obj.name}' is migrating to node {m.target} ({m.phase}); change its NICs once that ends"
        )


async def _change(
    ctx: Context,
    store: Store,
    ref: str,
    mutate: Callable[[Instance], Instance],
    *,
    expect: int | None = None,
    status: int = 202,
) -> Written:
    """Read-modify-write of the instance ``ref`` names (``mutate`` may raise to refuse), compare-and-swap on
    ``expect`` or on the revision read (then retried on a fresh read); answers ``status`` with the instance."""
    for attempt in range(_UPDATE_ATTEMPTS):
        current = await get_instance(ctx, store, ref)
        updated = mutate(current).replace(updated_at=ctx.clock())
        op = Update(INSTANCE.dump(updated), expect_revision=expect if expect is not None else current.revision)
        try:
            return await commit(
                ctx,
                store,
                [op],
                status=status,
                label=INSTANCE.label,
                respond=lambda rev, u=updated: INSTANCE.to_view(u.replace(revision=rev)),
            )
        except errors.PreconditionFailed:
            if expect is not None:
                raise
            if attempt == _UPDATE_ATTEMPTS - 1:
                raise errors.Conflict("the instance kept changing while this request ran; retry it") from None
    raise AssertionError("unreachable")


def _with_spec(obj: Instance, **changes: Any) -> Instance:
    _not_deleting(obj)
    return obj.replace(spec=msgspec.structs.replace(obj.spec, **changes))


async def start_instance(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Power the instance on (no-op when it is running); one in ``error`` is tried again (a new spec)."""

    def mutate(obj: Instance) -> Instance:
        retry = obj.spec.retry + 1 if obj.status.state == "error" else obj.spec.retry
        return _with_spec(obj, power="running", retry=retry)

    return await _change(ctx, store, ref, mutate, expect=expect)


async def stop_instance(
    ctx: Context, store: Store, ref: str, *, force: bool = False, expect: int | None = None
) -> Written:
    """Shut the instance down: ACPI power button, powered off after ``compute.stop_timeout``; ``force`` at once."""
    return await _change(ctx, store, ref, lambda o: _with_spec(o, power="stopped", stop_force=force), expect=expect)


async def reboot_instance(
    ctx: Context, store: Store, ref: str, *, force: bool = False, expect: int | None = None
) -> Written:
    """Reboot a running instance: ACPI reboot, or a hard reset with ``force`` (409 when it is stopped)."""

    def mutate(obj: Instance) -> Instance:
        _not_deleting(obj)
        if obj.spec.power != "running":
            raise errors.Conflict(f"instance '{obj.name}' is stopped; start it instead of rebooting it")
        return _with_spec(obj, reboot=RebootRequest(seq=obj.spec.reboot.seq + 1, force=force))

    return await _change(ctx, store, ref, mutate, expect=expect)


async def resize_instance(ctx: Context, store: Store, ref: str, type_ref: str, *, expect: int | None = None) -> Written:
    """Give an instance another type. Stopped: any type (vCPUs, memory; the root disk never shrinks). Running: only
    the vCPU count may change, up to the maximum the instance was created with (CPU hot-plug); memory and disk
    changes need it stopped (409 saying why). The node must have room for the new shape (409)."""
    itype = await types.lookup(ctx, store, type_ref)
    obj = await get_instance(ctx, store, ref)
    _not_deleting(obj)
    spec, state = obj.spec, obj.status.state
    stopped = spec.power == "stopped" and state == "stopped"
    if (spec.gpus or itype.gpus) and not stopped:
        raise errors.Conflict(
            f"instance '{obj.name}' has GPUs passed through and cannot be resized while it is {state}: stop it first "
            f"(`minicloud instance stop {obj.name} --wait`)"
        )
    if (itype.gpus, itype.gpu_model) != (spec.gpus, spec.gpu_model):
        have = f"{spec.gpus} GPU(s)" + (f" matching '{spec.gpu_model}'" if spec.gpu_model else "")
        raise errors.Conflict(
            f"instance '{obj.name}' has {have} and type {itype.name} asks for {itype.gpus}"
            + (f" matching '{itype.gpu_model}'" if itype.gpu_model else "")
            + ": GPUs do not change by resize; create a new instance of that type"
        )
    if not stopped:
        why = (
            "its memory would change"
            if itype.memory_mib != spec.memory_mib
            else "its root disk would grow"
            if itype.disk_gib > spec.disk_gib
            else f"it can have at most {spec.vcpu_limit} vCPUs while running"
            if itype.vcpus > spec.vcpu_limit
            else f"it is {state}"
            if state != "running"
            else ""
        )
        if why:
            raise errors.Conflict(
                f"instance '{obj.name}' cannot be resized to {itype.name} while running: {why}. Stop it first "
                f"(`minicloud instance stop {obj.name} --wait`); running instances can only change their vCPUs"
            )
    hv = await hypervisor(store, spec.node)
    if hv is not None:
        used = await node_usage(store, spec.node)
        others = {spec.node: used[spec.node] - demand_of(spec)}
        wanted = Demand(itype.vcpus, itype.memory_mib, max(itype.disk_gib, spec.disk_gib))
        place(wanted, [NodeCapacity.of(spec.node, hv.spec)], others)

    def mutate(current: Instance) -> Instance:
        s = current.spec
        return _with_spec(
            current,
            type=itype.name,
            vcpus=itype.vcpus,
            max_vcpus=max(itype.vcpus, s.vcpu_limit),
            memory_mib=itype.memory_mib,
            disk_gib=max(itype.disk_gib, s.disk_gib),
        )

    return await _change(ctx, store, ref, mutate, expect=expect)


async def delete_instance(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Ask for the instance's deletion: its node destroys the domain and removes its disk, seed and console log, then
    the record (202 with the instance in ``deleting``; 404 once the node finished). An instance whose node never ran
    compute has nothing to clean up: its record goes at once (204)."""
    obj = await get_instance(ctx, store, ref)
    if await hypervisor(store, obj.spec.node) is None:
        extra = [
            *await _release_ops(store, obj),
            *await volume_release_ops(store, obj),
            *await gpus.release_ops(store, obj.spec.node, obj.id),
        ]
        return await crud.delete_obj(ctx, store, INSTANCE, obj, expect=expect, extra=extra)

    def mutate(current: Instance) -> Instance:
        return current.replace(
            spec=msgspec.structs.replace(current.spec, deleted=True),
            status=msgspec.structs.replace(current.status, state="deleting"),
        )

    return await _change(ctx, store, ref, mutate, expect=expect)


# -- NICs ----------------------------------------------------------------------------------------------------------
async def record_removal_ops(store: Store, obj: Instance) -> list[Op]:
    """What removes the instance's record for good, its ports and their addresses included, its volumes'
    attachments and (a default-bridge guest) its pinned address in the ``host`` pool: the node's teardown commits
    these once the guest is gone."""
    return [
        crud.delete_op(obj),
        *await _release_ops(store, obj),
        *await volume_release_ops(store, obj),
        *await gpus.release_ops(store, obj.spec.node, obj.id),
        *(await default_vpc.pin_release_ops(store, obj.spec.node, obj.id) if not obj.spec.nics else []),
    ]


async def attached_volumes(store: Store, obj: Instance) -> list[tuple[Volume, int]]:
    """The volumes attached to ``obj`` (its boot volume included), with their revisions. A volume's ``spec.node``
    follows its attachment, so they are among the volumes of the instance's node (indexed)."""
    out: dict[str, tuple[Volume, int]] = {}
    for record in await list_all(store, VOLUME.name, where={"node": obj.spec.node}) if obj.spec.node else []:
        volume = VOLUME.load(record)
        if volume.spec.attachment is not None and volume.spec.attachment.instance == obj.id:
            out[volume.id] = (volume, record.revision)
    if obj.spec.root_volume and obj.spec.root_volume not in out:
        record = await store.get(VOLUME.name, obj.spec.root_volume)
        if record is not None and (att := VOLUME.load(record).spec.attachment) is not None and att.instance == obj.id:
            out[record.id] = (VOLUME.load(record), record.revision)
    return list(out.values())


async def volume_release_ops(store: Store, obj: Instance) -> list[Op]:
    """The ops that detach every volume of ``obj`` (attachment and ``root_of`` cleared, state ``available``; a boot
    volume is kept) and remove its ``diskslots`` record: commit them with the record's removal, once the guest is
    gone (compare-and-swap on each volume)."""
    ops: list[Op] = []
    stamp = ids.now()
    for volume, revision in await attached_volumes(store, obj):
        spec = msgspec.structs.replace(volume.spec, attachment=None, root_of="")
        state = volume.status.state if volume.status.state in ("creating", "error") else "available"
        status = msgspec.structs.replace(volume.status, state=state, device="", reason="")
        updated = volume.replace(spec=spec, status=status, updated_at=stamp)
        ops.append(Update(VOLUME.dump(updated), expect_revision=revision))
    slots = await store.get(DISK_SLOTS.name, slots_id(obj.id))
    if slots is not None:
        ops.append(Delete(kind=DISK_SLOTS.name, id=slots.id, expect_revision=slots.revision))
    return ops


async def add_nic(
    ctx: Context, store: Store, ref: str, body: NicCreate, *, directory: Directory | None = None
) -> Written:
    """Give an instance another NIC (hot-plugged while it runs): a port with an address, recorded with the
    instance in one transaction (202; the node plugs it). 409 at :data:`ports.MAX_NICS` NICs, for an address
    used or an exhausted subnet, or for an instance being deleted; 404 for a subnet, network or group the project
    does not have."""
    (wanted,) = await _wanted_nics(ctx, store, [body], directory)

    async def step(attempt: int) -> Written:
        obj = await get_instance(ctx, store, ref)
        _not_deleting(obj)
        await _not_migrating(store, obj)
        if len(obj.spec.nics) >= ports.MAX_NICS:
            raise errors.Conflict(f"instance '{obj.name}' has {ports.MAX_NICS} NICs already; remove one first")
        existing = await ports.instance_ports(store, obj.project, obj.id)
        index = max([p.spec.index for p in existing], default=-1) + 1
        nics, port_ops = await _port_ops(ctx, store, obj, [wanted], first_index=index, spread=min(attempt, 8))
        updated = obj.replace(spec=msgspec.structs.replace(obj.spec, nics=[*obj.spec.nics, *nics]))
        return await _commit_nics(ctx, store, obj, updated, port_ops)

    return await ipam.retrying(step)


async def remove_nic(ctx: Context, store: Store, ref: str, nic: str) -> Written:
    """Unplug and delete one NIC (its port id, MAC or address), releasing its address with the instance's change
    (202; the node unplugs it). 404 when the instance has no such NIC."""

    async def step(_: int) -> Written:
        obj = await get_instance(ctx, store, ref)
        _not_deleting(obj)
        await _not_migrating(store, obj)
        found = [n for n in obj.spec.nics if nic in (n.port, n.mac, n.ip)]
        if not found:
            raise errors.NotFound(f"instance '{obj.name}' has no NIC {crud.shown(nic)}; see `minicloud instance show`")
        gone = found[0]
        record = await store.get(PORT.name, gone.port)
        ops = await ports.delete_ops(store, PORT.load(record)) if record is not None else []
        updated = obj.replace(spec=msgspec.structs.replace(obj.spec, nics=[n for n in obj.spec.nics if n is not gone]))
        return await _commit_nics(ctx, store, obj, updated, ops)

    return await ipam.retrying(step)


async def _commit_nics(ctx: Context, store: Store, current: Instance, updated: Instance, ops: list[Op]) -> Written:
    updated = updated.replace(updated_at=ctx.clock())
    return await commit(
        ctx,
        store,
        [Update(INSTANCE.dump(updated), expect_revision=current.revision), *ops],
        status=202,
        label=INSTANCE.label,
        respond=lambda rev: INSTANCE.to_view(updated.replace(revision=rev)),
    )


# -- console -------------------------------------------------------------------------------------------------------
def instance_dir(data_path: Path, instance_id: str) -> Path:
    """The node's directory of an instance's files (``root.qcow2``, ``seed.iso``, ``console.log``, ``nvram.fd``)."""
    return data_path / "instances" / instance_id


async def console_log(ctx: Context, store: Store, ref: str, *, node: str, data_path: Path) -> tuple[Instance, Path]:
    """The instance and the path of its serial console log on this node (``node``, ``data_path``); 409 naming the
    node that keeps it when that is another one."""
    obj = await get_instance(ctx, store, ref)
    if obj.spec.node != node:
        raise errors.Conflict(
            f"the console log of '{obj.name}' is kept on node {obj.spec.node}; ask that node's API (`--remote`)",
            node=obj.spec.node,
        )
    return obj, instance_dir(data_path, obj.id) / "console.log"


async def is_going(store: Store, instance_id: str) -> bool:
    """Whether the instance is gone or being deleted (a console follower stops then)."""
    record = await store.get(INSTANCE.name, instance_id)
    return record is None or INSTANCE.load(record).spec.deleted
