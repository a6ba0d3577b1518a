"""The compute reconciler: converges the hypervisor on this node to the instance records assigned to it.

It runs on the framework (:mod:`agent.reconcile`): one key per instance record of this node, plus :data:`NODE_KEY`
for the node as a whole. ``reconcile(instance id)`` is level-triggered and idempotent (CONVENTIONS 10, 15, 21): it
reads the record and the domain the hypervisor has, does whatever step is missing — build (root disk overlay,
NoCloud seed, define), start, stop, reboot, redefine after a resize, CPU hot-plug, tear down — and writes the
observed ``status`` back with compare-and-swap. ``reconcile(NODE_KEY)`` connects to the hypervisor, converges the
default network, publishes the node's capacity and collects what no record names (domains, instance directories,
image files). A key is reconciled when its record changes (an image change queues the node key), when libvirt
reports a lifecycle event for its domain, every ``compute.resync_interval`` seconds, and sooner when it waits for
something no record announces (a guest powering off, a DHCP lease). A restarted agent needs nothing special: the
first resync adopts running domains and finishes (or rolls back) whatever the last run left half done.

Ownership: a domain is ours when its XML carries our metadata (``agent.compute.xml.read_metadata``) *and* its root
disk lives in this node's ``<data_dir>/instances``; nothing else is ever touched. A failed build is rolled back (no
domain, overlay or seed remains) and the instance goes to ``error`` with the reason; it is not retried until its
spec changes (``instance start`` asks again). Store errors are not the instance's fault: they propagate, and the
framework retries the key with backoff.

Files per instance, in ``<data_dir>/instances/<id>/``: ``root.qcow2`` (an overlay on the image, or a blank disk for
kernel images), ``seed.iso`` (NoCloud), ``console.log`` (serial port, appended across restarts), ``nvram.fd`` (UEFI).

Storage (pools, :class:`~agent.storage.node.NodeStorage`): an instance whose ``spec.pool_driver`` is ``ceph`` has no
``root.qcow2``: its root disk is ``<id>-root`` in the pool, a clone of the image's protected ``base`` snapshot (a
blank volume for kernel images), reached through librbd with the node's cephx secret (defined in libvirt before the
domain); teardown deletes it after the domain is gone. ``--boot-volume`` instances boot from that volume (kept when
the instance goes). Volumes attached to the instance (``volume`` records whose ``attachment.instance`` is it) are in
its definition (``vdb``…, serial = volume id, ``<iotune>`` from the volume's QoS) and hot-plugged into / unplugged
from a running domain by difference, like NICs; the reconciler moves them ``attaching → in-use`` once the disk is in
the domain and ``detaching → available`` once it is gone from the running guest (a guest that does not let go keeps
it ``detaching`` with the reason, unless the detach was forced: then the domain is powered off and started without
it). A grown volume (``status.size_gib``, which the storage reconciler wrote after growing the data) is announced to a
running guest with ``block_resize``. Anything a pool is needed for waits, with the reason in the instance's status,
until the storage reconciler publishes the pool's driver on this node (``NodeStorage.on_change`` queues it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil

from agent import faults
from agent.compute import design, migrate, seed
from agent.compute.driver import ComputeDriver, DomainInfo, DriverError
from agent.compute.xml import InstanceMetadata, Interface, IoTune, read_metadata
from agent.net.default import NetworkDriver, NetworkError, guest_tap
from agent.net.nodenetworks import GUARD, NodeNetworks, tap_name
from agent.reconcile import Result, update_record
from agent.reconcilers import migration as migrating
from agent.storage.driver import DiskSource, StorageError, VolumeDriver
from agent.storage.node import NodeStorage
from minicloud import errors, ids
from minicloud.compute import image_files, migration
from minicloud.compute.instances import record_removal_ops
from minicloud.compute.kinds import (
    HYPERVISOR,
    IMAGE,
    INSTANCE,
    HypervisorSpec,
    ImageSpec,
    InstanceObserved,
    InstanceSpec,
)
from minicloud.compute.migration import MIGRATION, get_migration
from minicloud.config import Config
from minicloud.core.kinds import Obj
from minicloud.model.compute import Address
from minicloud.state import Change, Create, Record, Store, Txn, TxnFailed, Update, list_all
from minicloud.storage.kinds import VOLUME, Attachment, Qos, VolumeObserved, VolumeSpec

log = logging.getLogger("minicloud.compute")
Instance = Obj[InstanceSpec, InstanceObserved]
Image = Obj[ImageSpec, Any]
Volume = Obj[VolumeSpec, VolumeObserved]
NETWORK_NAME = "default"
#: The key of the node-wide work (hypervisor connection, network, capacity, garbage); no record id looks like it.
NODE_KEY = ":node"
#: Unrecorded image files are removed once nothing has written to them for this long (an import in progress writes).
_STRAY_IMAGE_IDLE = 600.0
#: How soon to look again while something is expected without a record change (a guest powering off, a lease).
_POLL = 1.0
#: How soon to retry while the hypervisor or the network cannot be used.
_UNAVAILABLE_RETRY = 5.0
#: How long a running guest gets to let go of a volume being detached before the detach is called refused (or, when
#: forced, the domain is powered off).
_DETACH_TIMEOUT = 30.0
_GIB = 1 << 30


class BuildError(Exception):
    """A build step failed; the message is for the instance's ``status.reason``."""


class WaitingForStorage(Exception):
    """A pool (or the cephx secret) the instance needs is not usable on this node yet; the message says which. The
    instance is queued again when the node's storage changes."""


def root_volume_name(instance_id: str) -> str:
    """The root disk of an instance in a pool (a clone of its image, or blank for kernel images)."""
    return f"{instance_id}-root"


@dataclass(frozen=True)
class Disks:
    """An instance's disks as this node can give them now: the root disk (a file or a pool's ``DiskSource``) and the
    attached volumes that can be plugged (their pool usable here), with the volume records behind them."""

    root: Path | DiskSource
    root_serial: str = ""
    root_iotune: IoTune | None = None
    #: The boot volume, when there is one.
    root_volume: Volume | None = None
    volumes: tuple[design.AttachedDisk, ...] = ()
    #: Volume id → record, of ``volumes``.
    attached: dict[str, Volume] = field(default_factory=dict)
    #: Volumes being detached from this instance (``status.state == detaching``).
    detaching: tuple[Volume, ...] = ()
    #: Attached volumes whose pool is not usable here yet (not plugged; the instance waits for storage).
    unplugged: tuple[Volume, ...] = ()

    @property
    def sources(self) -> list[DiskSource]:
        root = [self.root] if isinstance(self.root, DiskSource) else []
        return [*root, *(v.source for v in self.volumes)]


def _iotune(qos: Qos) -> IoTune | None:
    tune = IoTune(
        read_iops_sec=qos.read_iops_sec or None,
        write_iops_sec=qos.write_iops_sec or None,
        read_bytes_sec=qos.read_bytes_sec or None,
        write_bytes_sec=qos.write_bytes_sec or None,
    )
    return tune if tune else None


def _qemu_img(*args: str) -> None:
    out = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise BuildError(f"qemu-img {args[0]} failed: {out.stderr.strip()[-300:]}")


def _spec_fingerprint(spec: InstanceSpec) -> str:
    return hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:16]


class ComputeReconciler:
    """See the module docstring. Construct it, then run it with ``Controller(store, reconciler).start()``."""

    name = "compute"
    kinds = frozenset({INSTANCE.name, IMAGE.name, VOLUME.name, MIGRATION.name})

    def __init__(
        self,
        *,
        store: Store,
        config: Config,
        driver: ComputeDriver,
        network: NetworkDriver | None,
        virt_type: str,
        virt_reason: str,
        networks: NodeNetworks | None = None,
        storage: NodeStorage | None = None,
    ) -> None:
        self.store = store
        #: The pools usable on this node and the cephx secret (filled by the storage reconciler); None: no storage.
        self.storage = storage
        #: Instances waiting for a pool or the cephx secret on this node (queued again when storage changes).
        self._storage_waiting: set[str] = set()
        #: The cephx secret last defined in libvirt (uuid, usage, key), so it is defined once per agent run.
        self._secret_defined: tuple[str, str, bytes] | None = None
        #: (domain uuid, guest disk) → the size in bytes the running guest was last given (online extend).
        self._disk_sizes: dict[tuple[str, str], int] = {}
        #: (instance id, volume id) → when its detach from the running guest was first asked (monotonic).
        self._detach_since: dict[tuple[str, str], float] = {}
        #: Instances powered off here to force a volume's detach (not "the guest shut itself down": started again).
        self._forced_off: dict[str, bool] = {}
        #: Which VPC networks are built on this node (filled by the network reconciler); None: no VPC NICs here.
        self.networks = networks
        #: Instances waiting for a network to be built here, by network id (queued again when it is).
        self._waiting: dict[str, set[str]] = {}
        self.config = config
        self.node = config.node_name
        self.driver = driver
        self.network = network
        self.virt_type = virt_type
        self.virt_reason = virt_reason
        self.instances_dir = config.data_path / "instances"
        self.images_dir = config.data_path / "images"
        self._enqueue: Callable[[str], None] = lambda key: None
        self._stop_requested: dict[str, float] = {}
        self._lease_wait_since: dict[str, float] = {}
        #: Instance id by domain uuid, for libvirt's lifecycle events (and the reverse, for records deleted behind
        #: our back); learnt from the records reconciled, so lost on restart, when the node key's sweep takes over.
        self._ids: dict[str, str] = {}
        self._uuids: dict[str, str] = {}
        self._connected = False
        self._network_checked = 0.0
        #: Why compute does not work on this node right now ("" when it does).
        self.problem = ""

    # -- the framework's side ----------------------------------------------------------------------------------------
    async def start(self, enqueue: Callable[[str], None]) -> None:
        """Connecting to the hypervisor and building the network are tried once here (so a healthy node has
        published its capacity before the API serves) and then by the node key until they work, so a node whose
        libvirtd is down (or whose subnet is taken) still serves the API and says what is wrong in its log."""
        self._enqueue = enqueue
        if self.networks is not None:
            self.networks.on_change(self._network_changed)
        if self.storage is not None:
            self.storage.on_change(self._storage_changed)
        self.instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.prepare()

    async def close(self) -> None:
        await self.driver.close()

    def keys_for(self, change: Change) -> Iterable[str]:
        if change.kind == INSTANCE.name:
            if INSTANCE.load(change.record).spec.node == self.node:
                yield change.id
        elif change.kind == VOLUME.name:  # attached, detached, grown: the instance it belongs to plugs the difference
            vol = VOLUME.load(change.record)
            for att in {a.instance: a for a in (vol.spec.attachment, vol.spec.detached_from) if a}.values():
                if att.node == self.node or vol.spec.node == self.node:
                    yield att.instance
        elif change.kind == MIGRATION.name:  # the target prepares, the source moves the guest
            mig = MIGRATION.load(change.record).spec
            if self.node in (mig.source, mig.target):
                yield mig.instance
        else:  # an image: its files may have become strays
            yield NODE_KEY

    async def all_keys(self) -> list[str]:
        return [r.id for r in await self._records()] + [NODE_KEY]

    async def reconcile(self, key: str) -> Result:
        if key == NODE_KEY:
            return await self._reconcile_node()
        return await self._reconcile_instance(key)

    def _on_domain_event(self, uuid: str) -> None:
        self._enqueue(self._ids.get(uuid, NODE_KEY))

    def _network_changed(self, network_id: str) -> None:
        for instance_id in self._waiting.pop(network_id, set()):
            self._enqueue(instance_id)

    def _storage_changed(self, pool_id: str) -> None:
        waiting, self._storage_waiting = self._storage_waiting, set()
        for instance_id in waiting:
            self._enqueue(instance_id)

    def nics_of(self, inst: Instance) -> tuple[design.Nic, ...] | None:
        """The guest's NICs: one per port on its network's bridge with the port's MAC, or (no ports) one on the
        node's default bridge; None while a port's network is not built on this node yet (the instance is
        remembered and queued again when it is)."""
        spec = inst.spec
        if not spec.nics:
            if self.network is None:
                return ()
            bridge = self.config.network.bridge
            return (design.Nic(mac=design.mac_for(inst.id, 0), bridge=bridge, tap=guest_tap(inst.id)),)
        out: list[design.Nic] = []
        missing: list[str] = []
        for nic in spec.nics:
            bridge = self.networks.bridge_for(nic.network) if self.networks is not None else None
            if bridge is None:
                missing.append(nic.network)
                self._waiting.setdefault(nic.network, set()).add(inst.id)
            else:
                out.append(design.Nic(mac=nic.mac, bridge=bridge, tap=tap_name(nic.port)))
        return None if missing else tuple(out)

    async def _records(self) -> list[Instance]:
        """The instances assigned to this node."""
        records = await list_all(self.store, INSTANCE.name, where={"node": self.node})  # indexed, not a scan
        return [INSTANCE.load(r) for r in records]

    # -- the node ----------------------------------------------------------------------------------------------------
    async def prepare(self) -> bool:
        """Connect to the hypervisor and converge the network (again every resync interval); False if not possible."""
        now = time.monotonic()
        if self._connected and now - self._network_checked < self.config.compute.resync_interval:
            return True
        try:
            if not self._connected:
                await self.driver.open(self._on_domain_event)
                self._connected = True
            if self.network is not None:
                await self.network.ensure()
            self._network_checked = now
            with contextlib.suppress(OSError):  # no node certificate yet: no migrations either
                await asyncio.to_thread(migrate.write_tls_files, self.config.data_path)
            await self.publish_capacity()
        except (DriverError, NetworkError, OSError) as exc:
            if str(exc) != self.problem:
                log.error("compute is not available on this node; retrying", extra={"error": str(exc)})
            self.problem = str(exc)
            return False
        if self.problem:
            log.info("compute is available again")
            self.problem = ""
            for key in await self.all_keys():  # they were waiting for this
                self._enqueue(key)
        return True

    async def _reconcile_node(self) -> Result:
        if not await self.prepare():
            return Result(requeue_after=_UNAVAILABLE_RETRY)
        records = await self._records()
        ours = {d.uuid: d for d in await self.driver.domains() if self._is_ours(d)}
        await self._collect_orphans(records, ours)
        if self.network is not None:  # fixed addresses of default-bridge guests no record here names any more
            live = {design.mac_for(i.id, 0) for i in records if not i.spec.nics}
            for mac in [m for m in self.network.assignments() if m not in live]:
                await self._release_default(mac)
        if self.storage is not None:
            self.storage.set_guests_checked()  # no guest of an instance placed elsewhere is left: unfencing is safe
        await self._collect_pool_roots()
        return Result()

    # -- capacity --------------------------------------------------------------------------------------------------
    async def publish_capacity(self) -> None:
        """Write this node's ``hypervisor`` record (what the scheduler may hand out), if it changed."""
        cfg = self.config.compute
        disk = shutil.disk_usage(self.config.data_path)
        spec = HypervisorSpec(
            cpus=psutil.cpu_count() or 1,
            memory_mib=psutil.virtual_memory().total >> 20,
            disk_gib=disk.total >> 30,
            cpu_allocation_ratio=cfg.cpu_allocation_ratio,
            ram_allocation_ratio=cfg.ram_allocation_ratio,
            reserved_memory_mib=cfg.reserved_memory_mib,
            reserved_disk_gib=cfg.reserved_disk_gib,
            virt_type=self.virt_type,
            virt_reason=self.virt_reason,
        )
        # The node's own record, not a user's action: written directly (no audit entry), with compare-and-swap.
        for _ in range(5):
            record = await self.store.get_by_name(HYPERVISOR.name, "", self.node)
            stamp = ids.now()
            op: Any
            if record is None:
                op = Create(HYPERVISOR.dump(HYPERVISOR.new(project="", name=self.node, spec=spec, stamp=stamp)))
            else:
                current = HYPERVISOR.load(record)
                if current.spec == spec:
                    return
                op = Update(
                    HYPERVISOR.dump(current.replace(spec=spec, updated_at=stamp)), expect_revision=record.revision
                )
            try:
                await self.store.commit(Txn([op]))
                return
            except TxnFailed:
                continue

    # -- one instance ------------------------------------------------------------------------------------------------
    async def _reconcile_instance(self, instance_id: str) -> Result:
        if not self._connected or self.problem:
            return Result(requeue_after=_UNAVAILABLE_RETRY)  # and prepare() queues every key once it works
        record = await self.store.get(INSTANCE.name, instance_id)
        if record is None:
            await self._forget(instance_id)
            return Result()
        inst = INSTANCE.load(record)
        found = await get_migration(self.store, inst.id)
        mig = found[0].spec if found is not None else None
        if inst.spec.node != self.node:
            if mig is not None and mig.target == self.node:
                return await migrating.incoming(self, inst, mig)
            return Result()
        if mig is not None and mig.source == self.node and mig.phase in ("ready", "migrating"):
            return await migrating.outgoing(self, inst, mig)  # the guest is on its way: nothing else is done to it
        uuid = inst.spec.uuid
        self._ids[uuid], self._uuids[inst.id] = inst.id, uuid
        dom = await self.driver.domain(uuid)
        if dom is not None and not self._is_ours(dom):
            dom = None
        leases = self.network.leases() if self.network is not None else {}
        try:
            return await self.converge(inst, dom, leases)
        except (asyncio.CancelledError, TxnFailed, errors.MinicloudError):
            raise  # cancelled, or the store failed us: not the instance's fault; the framework retries with backoff
        except WaitingForStorage as exc:
            self._storage_waiting.add(inst.id)
            await self._set_status(inst.id, reason=str(exc))
            return Result(requeue_after=_UNAVAILABLE_RETRY)
        except (DriverError, BuildError, StorageError, OSError) as exc:
            log.warning("instance step failed", extra={"instance": inst.id, "error": str(exc)})
            await self._set_status(inst.id, state="error", reason=str(exc), error_spec=_spec_fingerprint(inst.spec))
        except Exception as exc:
            log.exception("converging an instance failed", extra={"instance": inst.id})
            reason = f"internal error ({type(exc).__name__}); see the agent log on node {self.node}"
            await self._set_status(inst.id, state="error", reason=reason, error_spec=_spec_fingerprint(inst.spec))
        return Result()

    async def _forget(self, instance_id: str) -> None:
        """The record is gone. If we tore it down ourselves there is nothing left; if it was deleted behind our back
        (another node, a restore) remove its domain and files now, or leave them to the node key's sweep."""
        await migration.forget(self.store, instance_id)
        uuid = self._uuids.pop(instance_id, None)
        self._stop_requested.pop(instance_id, None)
        await self._release_default(design.mac_for(instance_id, 0))
        self._lease_wait_since.pop(instance_id, None)
        self._storage_waiting.discard(instance_id)
        for key in [k for k in self._detach_since if k[0] == instance_id]:
            del self._detach_since[key]
        for key in [k for k in self._disk_sizes if k[0] == uuid]:
            del self._disk_sizes[key]
        if uuid is not None:
            self._ids.pop(uuid, None)
            dom = await self.driver.domain(uuid)
            if dom is not None and self._is_ours(dom):
                log.warning("removing the domain of a deleted instance record", extra={"instance": instance_id})
                await self._teardown(instance_id, uuid)
                return
        if (self.instances_dir / instance_id).exists():
            self._enqueue(NODE_KEY)

    def _is_ours(self, dom: DomainInfo) -> bool:
        try:
            meta = read_metadata(dom.xml)
        except ValueError:
            return False
        return meta is not None and str(self.instances_dir / meta.id) in dom.xml

    async def converge(self, inst: Instance, dom: DomainInfo | None, leases: dict[str, str]) -> Result:
        spec, status = inst.spec, inst.status
        uuid = spec.uuid
        if spec.deleted:
            await self._teardown(inst.id, uuid, inst)
            self._stop_requested.pop(inst.id, None)
            self._lease_wait_since.pop(inst.id, None)
            await self._release_default(design.mac_for(inst.id, 0))
            # The node removes the record once its resources are gone: the user's delete was audited when asked.
            # Its ports and their addresses go in the same transaction, and its volumes are released (attachments
            # cleared; a boot volume is kept) now that no guest has them open.
            removal = await record_removal_ops(self.store, inst)
            with contextlib.suppress(TxnFailed):  # changed meanwhile: that change queues us again
                await self.store.commit(Txn(removal))
            self._uuids.pop(inst.id, None)
            self._ids.pop(uuid, None)
            log.info("instance deleted", extra={"instance": inst.id})
            return Result()
        if status.state == "error" and status.error_spec == _spec_fingerprint(spec):
            return Result()  # failed for this very spec: wait for the user to change something (or `instance start`)
        guest_ip = await self._default_address(inst)
        if guest_ip is not None and status.bridge_ip != guest_ip:
            await self._set_status(inst.id, bridge_ip=guest_ip)  # what other nodes avoid (and migrations check)
        nics = self.nics_of(inst)
        if nics is None and (dom is None or (dom.state == "shutoff" and spec.power == "running")):
            if reasons := self._network_failures(inst):
                # a network this node cannot build (an external network's provider missing or not a bridge here)
                raise BuildError("; ".join(reasons))
            # A NIC's network is not built on this node yet: nothing to plug it into. Queued again when it is.
            names = sorted({n.network_name for n in spec.nics})
            await self._set_status(inst.id, reason=f"waiting for network {', '.join(names)} on node {self.node}")
            return Result(requeue_after=_UNAVAILABLE_RETRY)
        disks = await self.disks_of(inst)  # WaitingForStorage while the root disk's pool is not usable here
        if disks.unplugged:
            self._storage_waiting.add(inst.id)  # queued again when their pool is published here
        if dom is None:
            await self._set_status(inst.id, state="building", reason="")
            try:
                xml = await self._build(inst, nics or (), disks)
            except BaseException:
                with contextlib.suppress(WaitingForStorage, StorageError, DriverError):
                    await self._teardown(inst.id, uuid, inst)  # a failed build leaves nothing behind
                raise
            await self._sync_volumes(inst, disks, _disks(xml))
            dom = DomainInfo(uuid=uuid, name=self.domain_name(inst), state="shutoff", xml="")
        elif dom.state == "shutoff" and nics is not None:
            guest = self._guest_spec(inst, await self._image(inst), nics, disks)
            if inst.spec.gpus:
                guest = dataclasses.replace(guest, hostdevs=await self._gpu_functions(inst))
            xml = design.domain_for(guest).to_xml()
            if (
                _shape(dom.xml) != _shape(xml)
                or _interfaces(dom.xml) != _interfaces(xml)
                or _taps(dom.xml) != _taps(xml)  # defined before taps were named (libvirt's vnetN): name them
                or _disks(dom.xml) != _disks(xml)
            ):
                await self._ensure_secret(disks)
                await self.driver.define(xml)  # resized, NICs or volumes added or removed, while stopped
            await self._sync_volumes(inst, disks, _disks(xml))
        if spec.power == "running":
            return await self._converge_running(inst, dom, leases, nics, disks, guest_ip)
        return await self._converge_stopped(inst, dom)

    async def _converge_running(
        self,
        inst: Instance,
        dom: DomainInfo,
        leases: dict[str, str],
        nics: tuple[design.Nic, ...] | None = None,
        disks: Disks | None = None,
        guest_ip: str | None = None,
    ) -> Result:
        spec, status = inst.spec, inst.status
        uuid = spec.uuid
        self._stop_requested.pop(inst.id, None)
        forced = self._forced_off.pop(inst.id, False)
        if dom.state in ("shutoff", "crashed"):
            if status.state == "running" and dom.state == "shutoff" and not forced:
                # The guest powered itself off: like EC2, the instance is now stopped (not restarted behind its back).
                await self._update(
                    inst.id,
                    wanted={"power": "stopped"},
                    observed={"state": "stopped", "reason": "the guest shut itself down", "stopped_at": ids.now()},
                )
                return Result()
            if guest_ip is not None and self._unguarded(inst.id, guest_ip):
                await self._set_status(inst.id, reason=f"waiting for its anti-spoofing rules on node {self.node}")
                return Result(requeue_after=_UNAVAILABLE_RETRY)  # and queued again once they are in place
            if disks is not None:
                await self._ensure_secret(disks)
            await self.driver.start(uuid)
            self._lease_wait_since.pop(inst.id, None)
        if dom.xml and _current_vcpus(dom.xml) not in (0, spec.vcpus):
            await self.driver.set_vcpus(uuid, spec.vcpus)  # resized while running: CPU hot-plug
        if dom.xml and dom.state == "running" and nics is not None:
            await self._plug(uuid, dom.xml, nics)  # NICs added or removed while running: hot-plug
        disk_wait: float | None = None
        if dom.state == "running" and disks is not None:
            disk_wait = await self._plug_disks(inst, dom, disks)  # volumes attached or detached while running
            if self._forced_off.get(inst.id):
                return Result(requeue_after=_POLL)  # powered off to force a detach: started again next pass
        changes: dict[str, Any] = {}
        if spec.reboot.seq > status.reboot_seq:
            await self.driver.reboot(uuid, force=spec.reboot.force)
            changes["reboot_seq"] = spec.reboot.seq
        mac = design.mac_for(inst.id, 0)
        addresses = [Address(network=NETWORK_NAME, mac=mac, ip=leases.get(mac))] if self.network is not None else []
        if spec.nics:  # VPC ports: the address is IPAM's (DHCP hands out exactly that one)
            addresses = [Address(network=n.network_name, mac=n.mac, ip=n.ip) for n in spec.nics]
        result = Result()
        if self.network is not None and not spec.nics and leases.get(mac) is None:
            # Poll for the lease for the first two minutes after start; a guest without DHCP must not keep us busy.
            since = self._lease_wait_since.setdefault(inst.id, time.monotonic())
            if time.monotonic() - since < 120:
                result = Result(requeue_after=_POLL)
        else:
            self._lease_wait_since.pop(inst.id, None)
        if disk_wait is not None and (result.requeue_after is None or disk_wait < result.requeue_after):
            result = Result(requeue_after=disk_wait)
        await self._set_status(
            inst.id,
            state="running",
            reason="",
            addresses=addresses,
            virt_type=self.virt_type,
            launched_at=status.launched_at if status.state == "running" else ids.now(),
            **changes,
        )
        return result

    async def _converge_stopped(self, inst: Instance, dom: DomainInfo) -> Result:
        uuid = inst.spec.uuid
        if dom.state not in ("shutoff",):
            asked = self._stop_requested.get(inst.id)
            timeout = self.config.compute.stop_timeout
            if inst.spec.stop_force or dom.state != "running" or (asked and time.monotonic() - asked > timeout):
                await self.driver.destroy(uuid)
            else:
                if asked is None:
                    await self.driver.shutdown(uuid)
                    self._stop_requested[inst.id] = time.monotonic()
                await self._set_status(inst.id, state="stopping", reason="")
                return Result(requeue_after=_POLL)  # until the guest is off, or the timeout forces it
        self._stop_requested.pop(inst.id, None)
        if inst.status.state != "stopped":
            await self._set_status(inst.id, state="stopped", reason="", addresses=[], stopped_at=ids.now())
        return Result()

    def _network_failures(self, inst: Instance) -> list[str]:
        """Why this node cannot build some network of the instance's NICs (the network reconciler says so)."""
        if self.networks is None:
            return []
        out = {self.networks.failure(n.network) for n in inst.spec.nics}
        return sorted(r for r in out if r)

    # -- the default bridge's guests: a fixed address each, and anti-spoofing before they start ------------------
    async def _default_address(self, inst: Instance) -> str | None:
        """A default-bridge guest's fixed address (chosen once, kept while its record is on this node: its pin, its
        current lease, the address it had elsewhere, else a free one that no guest on another node has, if there is
        one; ``agent/net/default.py``); None for others.
        The network reconciler pins the guest's tap to it (told through ``NodeNetworks.guests_changed``)."""
        if self.network is None or inst.spec.nics:
            return None
        mac = design.mac_for(inst.id, 0)
        have = self.network.assignments().get(mac)
        if have is not None:
            return have
        prefer = [a.ip for a in inst.status.addresses if a.mac == mac and a.ip] + [inst.status.bridge_ip]
        # not, if it can be helped, an address a guest on another node has: the guest could not move there live
        elsewhere = await migration.bridge_addresses(self.store)
        avoid = {ip for ip, (iid, _, node) in elsewhere.items() if iid != inst.id and node != self.node}
        try:
            ip = await self.network.assign(mac, prefer, avoid)
        except NetworkError as exc:
            raise BuildError(str(exc)) from exc
        if self.networks is not None:
            self.networks.guests_changed()
        return ip

    async def _release_default(self, mac: str) -> None:
        if self.network is not None and await self.network.release(mac) and self.networks is not None:
            self.networks.guests_changed()

    def _unguarded(self, instance_id: str, ip: str) -> bool:
        """Whether the guest must not start yet: the network reconciler has not pinned its tap to ``ip`` in the
        kernel (it is then queued again under ``GUARD``). Never when nothing puts such rules in place."""
        nn = self.networks
        if nn is None or not nn.guarding or nn.guarded(guest_tap(instance_id), ip):
            return False
        self._waiting.setdefault(GUARD, set()).add(instance_id)
        return True

    # -- building and tearing down -----------------------------------------------------------------------------------
    def domain_name(self, inst: Instance) -> str:
        return f"mc-{inst.id}"

    async def _plug(self, uuid: str, xml: str, nics: tuple[design.Nic, ...]) -> None:
        """Make the running domain's NICs exactly ``nics``: attach the missing, detach the extra (live and in
        its definition), and re-plug a NIC whose bridge changed."""
        have = _interfaces(xml)
        want = {n.mac: n for n in nics}
        for mac, bridge in have.items():
            if mac not in want or want[mac].bridge != bridge:
                await self.driver.detach_device(uuid, _interface_xml(design.Nic(mac=mac, bridge=bridge)))
        for mac, nic in want.items():
            if have.get(mac) != nic.bridge:
                await self.driver.attach_device(uuid, _interface_xml(nic))

    def _guest_spec(
        self, inst: Instance, image: Image | None, nics: tuple[design.Nic, ...], disks: Disks
    ) -> design.GuestSpec:
        spec = inst.spec
        d = self.instances_dir / inst.id
        files = self.images_dir / image.id if image is not None else d
        kernel_boot = image is not None and image.spec.boot == "kernel"
        uefi = image is not None and image.spec.firmware == "uefi"
        return design.GuestSpec(
            uuid=spec.uuid,
            domain_name=self.domain_name(inst),
            virt_type=self.virt_type,  # type: ignore[arg-type]
            vcpus=spec.vcpus,
            max_vcpus=spec.max_vcpus,
            memory_mib=spec.memory_mib,
            root_disk=disks.root,
            root_serial=disks.root_serial,
            root_iotune=disks.root_iotune,
            volumes=disks.volumes,
            seed_iso=d / "seed.iso",
            console_log=d / "console.log",
            kernel=files / "kernel" if kernel_boot else None,
            initrd=files / "initrd" if kernel_boot and (files / "initrd").exists() else None,
            cmdline=image.spec.cmdline if image is not None and kernel_boot else "",
            firmware="uefi" if uefi and not kernel_boot else "bios",
            nvram=d / "nvram.fd" if uefi and not kernel_boot else None,
            nics=nics,
            metadata=InstanceMetadata(
                id=inst.id,
                project=inst.project,
                name=inst.name,
                node=self.node,
                image=image.id if image is not None else "",
                type=spec.type,
                created=inst.created_at,
            ),
        )

    async def _gpu_functions(self, inst: Instance) -> tuple[str, ...]:
        """The PCI functions of the instance's GPUs, bound to ``vfio-pci`` or checked to be
        (:mod:`agent.reconcilers.gpu`); a binding problem fails the build with what to do."""
        from agent.gpu import vfio
        from agent.reconcilers import gpu

        try:
            return await gpu.prepare(self.store, self.config, self.node, inst.id, inst.spec.gpus)
        except vfio.BindingError as exc:
            raise BuildError(f"GPU passthrough: {exc}") from None

    async def _image(self, inst: Instance) -> Image | None:
        """The instance's image (None for a boot-volume instance). A disk image cloned in a ``ceph`` pool may live
        on any node; otherwise its files must be on this one."""
        if not inst.spec.image_id:
            return None
        record = await self.store.get(IMAGE.name, inst.spec.image_id)
        if record is None:
            raise BuildError(f"image {inst.spec.image_name} ({inst.spec.image_id}) no longer exists")
        image = IMAGE.load(record)
        in_pool = inst.spec.pool_driver == "ceph" and image.spec.boot == "disk" and not inst.spec.root_volume
        if image.spec.node != self.node and not in_pool:
            raise BuildError(f"image {image.name} is stored on node {image.spec.node}, not on {self.node}")
        return image

    # -- disks and volumes -------------------------------------------------------------------------------------------
    def _pool(self, pool_id: str, what: str) -> VolumeDriver:
        """The driver of ``pool_id`` on this node; WaitingForStorage (naming ``what`` needs it) while there is none."""
        driver = self.storage.driver(pool_id) if self.storage is not None else None
        if driver is None:
            raise WaitingForStorage(f"waiting for storage pool {pool_id} on node {self.node} ({what})")
        return driver

    async def disks_of(self, inst: Instance, *, arriving_from: str = "") -> Disks:
        """The instance's disks as this node can give them now (see :class:`Disks`): the root disk (WaitingForStorage
        while its pool is not usable here) and its volumes, read from the volume records of this node (and of
        ``arriving_from``, the source of a migration to this node: its volumes move with it when it ends)."""
        spec = inst.spec
        root: Path | DiskSource = self.instances_dir / inst.id / "root.qcow2"
        root_serial, root_iotune, root_volume = "", None, None
        if spec.root_volume:
            record = await self.store.get(VOLUME.name, spec.root_volume)
            if record is None:
                raise BuildError(f"boot volume {spec.root_volume} no longer exists")
            root_volume = VOLUME.load(record)
            root = self._pool(root_volume.spec.pool, f"boot volume {root_volume.name}").source(root_volume.id)
            root_serial, root_iotune = root_volume.id, _iotune(root_volume.spec.qos)
        elif spec.pool_driver == "ceph":
            root = self._pool(spec.pool, "the root disk").source(root_volume_name(inst.id))
        volumes: list[design.AttachedDisk] = []
        attached: dict[str, Volume] = {}
        detaching: list[Volume] = []
        unplugged: list[Volume] = []
        nodes = [self.node, *([arriving_from] if arriving_from and arriving_from != self.node else [])]
        records = [r for node in nodes for r in await list_all(self.store, VOLUME.name, where={"node": node})]
        for record in records:
            vol = VOLUME.load(record)
            att, gone = vol.spec.attachment, vol.spec.detached_from
            if vol.id == spec.root_volume:
                continue
            if att is not None and att.instance == inst.id:
                if vol.status.state == "creating" or (vol.status.state == "error" and not vol.status.device):
                    continue  # no data yet, or never plugged and failed
                driver = self.storage.driver(vol.spec.pool) if self.storage is not None else None
                if driver is None:
                    unplugged.append(vol)
                    continue
                source = driver.source(vol.id)
                volumes.append(design.AttachedDisk(source, att.device, serial=vol.id, iotune=_iotune(vol.spec.qos)))
                attached[vol.id] = vol
            elif att is None and gone is not None and gone.instance == inst.id and vol.status.state == "detaching":
                detaching.append(vol)
        volumes.sort(key=lambda v: (len(v.target_dev), v.target_dev))
        return Disks(
            root=root,
            root_serial=root_serial,
            root_iotune=root_iotune,
            root_volume=root_volume,
            volumes=tuple(volumes),
            attached=attached,
            detaching=tuple(detaching),
            unplugged=tuple(unplugged),
        )

    async def _ensure_secret(self, disks: Disks) -> None:
        """Define the node's cephx secret in libvirt (once per agent run, and whenever it changes) when a disk is on
        RBD: QEMU reads it when it opens the disk."""
        if not any(src.kind == "rbd" for src in disks.sources):
            return
        secret = self.storage.ceph_secret() if self.storage is not None else None
        if secret is None:
            raise WaitingForStorage(f"waiting for the Ceph key on node {self.node}")
        wanted = (secret.uuid, secret.usage, secret.key)
        if self._secret_defined != wanted:
            await self.driver.define_secret(secret.uuid, secret.usage, secret.key)
            self._secret_defined = wanted

    async def _ensure_root(self, inst: Instance, image: Image | None) -> None:
        """The root disk in the instance's ``ceph`` pool: a clone of the image's ``base`` snapshot (a blank volume
        for a kernel image), of the instance's disk size. Idempotent."""
        spec = inst.spec
        driver = self._pool(spec.pool, "the root disk")
        name, size = root_volume_name(inst.id), spec.disk_gib * _GIB
        try:
            if image is not None and image.spec.boot == "disk":
                if image.spec.pool != spec.pool:
                    raise BuildError(f"image {image.name} is not in pool {spec.pool}")
                await driver.clone(image.id, "base", name, size)
            else:
                await driver.create(name, size)
        except StorageError as exc:
            raise BuildError(f"making the root disk in pool {spec.pool} failed: {exc}") from None
        faults.point("compute.build.after_root")

    async def _build(self, inst: Instance, nics: tuple[design.Nic, ...], disks: Disks) -> str:
        """Make the root disk and the seed, define the domain; returns its XML."""
        image = await self._image(inst)
        await self._ensure_secret(disks)  # before anything is made: a missing key only waits
        if inst.spec.pool_driver == "ceph" and not inst.spec.root_volume:
            await self._ensure_root(inst, image)
        d = self.instances_dir / inst.id
        await asyncio.to_thread(self._write_files, inst, image, d)
        guest = self._guest_spec(inst, image, nics, disks)
        if inst.spec.gpus:  # bound to vfio-pci (or checked to be) before the domain names them
            guest = dataclasses.replace(guest, hostdevs=await self._gpu_functions(inst))
        xml = design.domain_for(guest).to_xml()
        await self.driver.define(xml)
        faults.point("compute.build.after_define")
        return xml

    def _write_files(self, inst: Instance, image: Image | None, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec = inst.spec
        root = d / "root.qcow2"
        local_root = not spec.root_volume and spec.pool_driver != "ceph"
        if local_root and not root.exists():
            if image is None:
                raise BuildError("the instance names neither an image nor a boot volume")
            tmp = d / "root.qcow2.tmp"
            size = f"{spec.disk_gib}G"
            if image.spec.boot == "disk":
                if image.spec.format is None:
                    raise BuildError(f"image {image.name} records no disk format")
                backing = self.images_dir / image.id / "disk"
                _qemu_img("create", "-q", "-f", "qcow2", "-F", image.spec.format, "-b", str(backing), str(tmp))
                if spec.disk_gib << 30 > (image.spec.virtual_size_bytes or 0):
                    _qemu_img("resize", "-q", str(tmp), size)
            else:
                _qemu_img("create", "-q", "-f", "qcow2", str(tmp), size)
            os.replace(tmp, root)
        seed_path = d / "seed.iso"
        if not seed_path.exists():
            seed.write_nocloud_seed(
                seed_path,
                meta_data=seed.meta_data(inst.id, inst.name, public_keys=spec.public_keys),
                user_data=spec.user_data.encode(),
                network_config=seed.network_config_dhcp(
                    [n.mac for n in spec.nics] if spec.nics else [design.mac_for(inst.id, 0)] if self.network else []
                ),
            )

    async def _plug_disks(self, inst: Instance, dom: DomainInfo, disks: Disks) -> float | None:
        """Make the running domain's volumes exactly ``disks.volumes`` (hot-plug the missing, unplug the others,
        matched by guest disk and serial), announce grown volumes (``block_resize``) and move the volumes' states.
        Returns how soon to look again (a guest still holding a volume being detached), or None."""
        uuid = inst.spec.uuid
        live = await self._live_xml(uuid, dom)
        have = _disks(live)
        want = {d.target_dev: d for d in disks.volumes}
        errors_by_volume: dict[str, str] = {}
        unplugged = False
        for target, serial in have.items():
            if target == "vda" or target in _cdroms(live) or (target in want and want[target].serial == serial):
                continue
            # a volume detached (or moved to another guest disk), or a disk no attachment names any more
            self._detach_since.setdefault((inst.id, serial or target), time.monotonic())
            unplugged = True
            try:
                await self.driver.detach_device(uuid, _disk_elements(live)[target])
            except DriverError as exc:
                errors_by_volume[serial] = str(exc)
        if unplugged:  # what the guest let go of (a live detach may finish later, or never)
            live = await self._live_xml(uuid, await self.driver.domain(uuid) or dom)
            have = _disks(live)
        for target, disk in want.items():
            if have.get(target) == disk.serial or target in have:
                continue  # plugged, or its guest disk is still taken by a disk being unplugged
            try:
                await self._ensure_secret(Disks(root=Path(), volumes=(disk,)))
                await self.driver.attach_device(uuid, design.disk_xml(disk))
            except DriverError as exc:
                errors_by_volume[disk.serial] = f"plugging it into the guest failed: {exc}"
                continue
            have[target] = disk.serial
            self._disk_sizes[(uuid, target)] = disks.attached[disk.serial].status.size_gib * _GIB
        await self._grow(inst, disks, have, errors_by_volume)
        requeue = await self._sync_volumes(inst, disks, have, errors_by_volume)
        if errors_by_volume and requeue is None:
            requeue = _UNAVAILABLE_RETRY
        return requeue

    async def _grow(self, inst: Instance, disks: Disks, have: dict[str, str], errs: dict[str, str]) -> None:
        """Tell the running guest about volumes the storage reconciler grew (``status.size_gib`` above what it was
        given). After an agent restart each plugged volume is announced once at its current size (a no-op)."""
        uuid = inst.spec.uuid
        plugged = [(att.device, v) for v in disks.attached.values() if (att := v.spec.attachment) is not None]
        if disks.root_volume is not None:
            plugged.append(("vda", disks.root_volume))
        for target, vol in plugged:
            size = vol.status.size_gib * _GIB
            if have.get(target) != vol.id or size <= self._disk_sizes.get((uuid, target), 0):
                continue
            try:
                await self.driver.block_resize(uuid, target, size)
            except DriverError as exc:
                errs[vol.id] = f"telling the guest its new size failed: {exc}"
                continue
            self._disk_sizes[(uuid, target)] = size

    async def _sync_volumes(
        self, inst: Instance, disks: Disks, present: dict[str, str], errs: dict[str, str] | None = None
    ) -> float | None:
        """Move the volumes' states to what the domain now has (``present``: guest disk → serial): ``attaching →
        in-use`` for those in it, ``detaching → available`` for those gone. A volume still in a running guest past
        :data:`_DETACH_TIMEOUT` is refused (the reason says so) or, when its detach was forced, the domain is
        powered off (it starts again without it). Returns how soon to look again, or None."""
        errs = errs or {}
        requeue: float | None = None
        serials = set(present.values())
        if disks.root_volume is not None and present.get("vda") == disks.root_volume.id:
            await self._set_volume(disks.root_volume.id, inst.id, state="in-use", device="vda", reason="")
        for vol in disks.attached.values():
            att = vol.spec.attachment
            assert att is not None
            if present.get(att.device) == vol.id:
                await self._set_volume(vol.id, inst.id, state="in-use", device=att.device, reason="")
                self._detach_since.pop((inst.id, vol.id), None)
            elif vol.id in errs:
                await self._set_volume(vol.id, inst.id, reason=errs[vol.id])
        for vol in disks.detaching:
            if vol.id not in serials:
                await self._set_volume(vol.id, None, state="available", device="", reason="")
                self._detach_since.pop((inst.id, vol.id), None)
                continue
            since = self._detach_since.setdefault((inst.id, vol.id), time.monotonic())
            gone = vol.spec.detached_from
            if time.monotonic() - since < _DETACH_TIMEOUT:
                requeue = _POLL
                continue
            if gone is not None and gone.force:
                log.warning("powering off a guest that holds a force-detached volume", extra={"instance": inst.id})
                await self.driver.destroy(inst.spec.uuid)
                self._forced_off[inst.id] = True
                return _POLL
            why = errs.get(vol.id) or "it may still be mounted"
            await self._set_volume(
                vol.id,
                None,
                reason=f"the guest of instance {inst.name} has not released it ({why}); unmount it in the guest, or "
                "detach it with --force (the instance is powered off and started without it)",
            )
            requeue = _UNAVAILABLE_RETRY * 6
        return requeue

    async def _set_volume(self, volume_id: str, instance_id: str | None, **fields: Any) -> None:
        """Set these status fields of a volume (compare-and-swap; nothing written when nothing changes). With
        ``instance_id``: only while it is still attached to that instance; None: only while it is detaching. The
        storage reconciler's own states (``creating``, ``extending``, ``reverting``, ``error``) are not replaced."""

        def merge(record: Record) -> Record | None:
            current = VOLUME.load(record)
            att: Attachment | None = current.spec.attachment
            if instance_id is not None and (att is None or att.instance != instance_id):
                return None
            if instance_id is None and (att is not None or current.status.state != "detaching"):
                return None
            changes = dict(fields)
            if "state" in changes and current.status.state not in ("attaching", "in-use", "detaching"):
                changes.pop("state")
                changes.pop("device", None)
            new = current.replace(status=msgspec.structs.replace(current.status, **changes))
            if new == current:
                return None
            status = {**record.status, **msgspec.to_builtins(new.status)}
            return msgspec.structs.replace(record, status=status)

        await update_record(self.store, VOLUME.name, volume_id, merge)

    async def _live_xml(self, uuid: str, dom: DomainInfo) -> str:
        """The running domain's live XML (a disk the guest has not let go of is still there), else its
        definition."""
        return await self.driver.live_xml(uuid) or dom.xml

    async def _teardown(self, instance_id: str, uuid: str, inst: Instance | None = None) -> None:
        """Destroy and undefine the domain, remove its files and (``inst`` given) its root disk in a pool.
        Idempotent; a crash between two steps is finished by the next pass."""
        await self.driver.destroy(uuid)
        faults.point("compute.teardown.after_destroy")
        await self.driver.undefine(uuid)
        if inst is not None and inst.spec.gpus:  # the guest is gone: its GPUs go back to their drivers
            from agent.gpu import vfio
            from agent.reconcilers import gpu

            try:
                await gpu.give_back(self.store, self.config, self.node, instance_id)
            except vfio.BindingError as exc:
                log.warning(
                    "giving GPUs back to their drivers failed", extra={"instance": instance_id, "error": str(exc)}
                )
        if inst is not None and inst.spec.pool_driver == "ceph" and not inst.spec.root_volume:
            faults.point("compute.teardown.after_undefine")
            driver = self._pool(inst.spec.pool, "to delete the root disk")
            try:
                await driver.delete(root_volume_name(instance_id))
            except StorageError as exc:
                raise WaitingForStorage(f"deleting the root disk from pool {inst.spec.pool} failed: {exc}") from None
            faults.point("compute.teardown.after_root")
        await asyncio.to_thread(shutil.rmtree, self.instances_dir / instance_id, True)

    async def _collect_pool_roots(self) -> None:
        """Root disks in this node's ``ceph`` pools whose instance record is gone (deleted while no agent tore it
        down): removed. A record is committed before its root disk is made and removed after it is deleted, so a
        root disk without one is garbage whichever node made it."""
        if self.storage is None:
            return
        for pool_id, driver in sorted(self.storage.pools().items()):
            if driver.name != "ceph":
                continue
            try:
                names = await driver.list()
            except StorageError:
                continue
            for name in names:
                instance_id = name.removesuffix("-root")
                if instance_id == name or not instance_id.startswith(f"{INSTANCE.prefix}-"):
                    continue
                if await self.store.get(INSTANCE.name, instance_id) is None:
                    log.warning("removing a root disk no instance record names", extra={"pool": pool_id, "disk": name})
                    with contextlib.suppress(StorageError):
                        await driver.delete(name)

    async def _collect_orphans(self, instances: list[Instance], ours: dict[str, DomainInfo]) -> None:
        """Domains and instance directories of ours that no record names any more (e.g. a record deleted while the
        agent was down, or a crash between building and recording): remove them."""
        wanted_uuids = {i.spec.uuid for i in instances}
        wanted_ids = {i.id for i in instances}
        for uuid, dom in ours.items():
            if uuid not in wanted_uuids:
                meta = read_metadata(dom.xml)
                if meta is not None and await migrating.incoming_active(self.store, meta.id, self.node):
                    continue  # arriving by migration: ours once the migration is done
                log.warning("removing a domain no instance record names", extra={"uuid": uuid, "domain": dom.name})
                await self._teardown(meta.id if meta else "", uuid)
        live_ids = {m.id for d in ours.values() if (m := read_metadata(d.xml)) is not None}
        if self.instances_dir.is_dir():
            for entry in self.instances_dir.iterdir():
                # Only once the record is surely gone: a create commits before this node builds anything.
                known = entry.name in wanted_ids or entry.name in live_ids
                if not known and await self.store.get(INSTANCE.name, entry.name) is None:
                    await asyncio.to_thread(shutil.rmtree, entry, True)
        # Image files no image record names (the record was deleted through another node, or an import crashed
        # between moving its files into place and recording them).
        # Images are pinned to the node that imported them: only this node's image records can name files here.
        images = {r.id for r in await list_all(self.store, IMAGE.name, where={"node": self.node})}
        strays = await asyncio.to_thread(
            image_files.stray_entries, self.images_dir, images, idle_seconds=_STRAY_IMAGE_IDLE, now=time.time()
        )
        for entry in strays:
            log.warning("removing image files no image record names", extra={"path": str(entry)})
            await asyncio.to_thread(shutil.rmtree, entry, True)

    # -- status writes ---------------------------------------------------------------------------------------------
    async def _set_status(self, instance_id: str, **fields: Any) -> None:
        """Set these ``InstanceObserved`` fields (see :meth:`_update`)."""
        await self._update(instance_id, observed=fields)

    async def _update(
        self, instance_id: str, *, observed: dict[str, Any], wanted: dict[str, Any] | None = None
    ) -> None:
        """Set ``observed`` fields of the instance's typed status (and ``wanted`` fields of its spec: the few the node
        owns, e.g. ``power`` when the guest shut itself down) with compare-and-swap, on a fresh read after a
        concurrent write; no write when nothing changes. A record being deleted keeps its ``deleting`` state. These
        are the node's observations, not a user's action: no audit entry (the framework's
        :func:`~agent.reconcile.update_record`)."""

        def merge(record: Record) -> Record | None:
            current = INSTANCE.load(record)
            fields = observed
            if current.spec.deleted and fields.keys() & {"state"} and fields["state"] != "deleting":
                fields = {k: v for k, v in fields.items() if k != "state"}
            new = current.replace(
                spec=msgspec.structs.replace(current.spec, **(wanted or {})),
                status=msgspec.structs.replace(current.status, **fields),
            )
            return _stored(record, current, new)

        await update_record(self.store, INSTANCE.name, instance_id, merge)


def _stored(record: Record, current: Instance, new: Instance) -> Record | None:
    """``record`` with ``new``'s spec and status (None when nothing changed). Stored fields this version does not
    know are kept, so that an older agent does not erase what a newer one wrote."""
    if new == current:
        return None
    spec = record.spec if new.spec == current.spec else {**record.spec, **msgspec.to_builtins(new.spec)}
    status = record.status if new.status == current.status else {**record.status, **msgspec.to_builtins(new.status)}
    return msgspec.structs.replace(record, spec=spec, status=status)


_UNITS = {"b": 1, "bytes": 1, "kib": 1024, "k": 1024, "mib": 1 << 20, "m": 1 << 20, "gib": 1 << 30, "g": 1 << 30}


def _shape(xml: str) -> tuple[int, int, int]:
    """What a redefinition after resize changes: (maximum vCPUs, vCPUs at boot, memory bytes), read the same way
    from libvirt's XML and ours."""
    if not xml:
        return (0, 0, 0)
    root = ET.fromstring(xml)
    vcpu = root.find("vcpu")
    mem = root.find("memory")
    vcpus = int(vcpu.text or 0) if vcpu is not None else 0
    memory = int(mem.text or 0) * _UNITS.get((mem.get("unit") or "KiB").lower(), 1024) if mem is not None else 0
    return (vcpus, _current_vcpus(xml), memory)


def _interfaces(xml: str) -> dict[str, str]:
    """The bridge NICs a domain definition has: MAC → bridge."""
    if not xml:
        return {}
    out: dict[str, str] = {}
    for iface in ET.fromstring(xml).iter("interface"):
        mac, source = iface.find("mac"), iface.find("source")
        if mac is not None and mac.get("address"):
            out[(mac.get("address") or "").lower()] = source.get("bridge", "") if source is not None else ""
    return out


def _taps(xml: str) -> dict[str, str]:
    """The host tap each bridge NIC of a domain definition names: MAC → tap ("" when libvirt picks one)."""
    if not xml:
        return {}
    out: dict[str, str] = {}
    for iface in ET.fromstring(xml).iter("interface"):
        mac, target = iface.find("mac"), iface.find("target")
        if mac is not None and mac.get("address"):
            out[(mac.get("address") or "").lower()] = target.get("dev", "") if target is not None else ""
    return out


def _interface_xml(nic: design.Nic) -> str:
    """The ``<interface>`` of one NIC as ``domain_for`` designs it (the same tap name), for hot-plug."""
    iface = Interface(nic.mac, nic.bridge, model="virtio", target_dev=getattr(nic, "tap", None))
    return ET.tostring(iface.to_element(), encoding="unicode")


def _current_vcpus(xml: str) -> int:
    """The vCPUs a domain definition gives the guest (``current``, else the count); 0 if it says nothing."""
    vcpu = ET.fromstring(xml).find("vcpu")
    if vcpu is None:
        return 0
    return int(vcpu.get("current") or vcpu.text or 0)


def _disk_elements(xml: str) -> dict[str, str]:
    """The ``<disk>`` elements of a domain by guest disk (target dev), as XML (what ``detach_device`` is given)."""
    if not xml:
        return {}
    out: dict[str, str] = {}
    for disk in ET.fromstring(xml).iter("disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            out[target.get("dev") or ""] = ET.tostring(disk, encoding="unicode")
    return out


def _disks(xml: str) -> dict[str, str]:
    """A domain's disks: guest disk (target dev) → serial ("" when none), read the same way from libvirt's XML and
    ours."""
    if not xml:
        return {}
    out: dict[str, str] = {}
    for disk in ET.fromstring(xml).iter("disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            out[target.get("dev") or ""] = (disk.findtext("serial") or "").strip()
    return out


def _cdroms(xml: str) -> set[str]:
    if not xml:
        return set()
    return {
        t.get("dev") or ""
        for disk in ET.fromstring(xml).iter("disk")
        if disk.get("device") == "cdrom" and (t := disk.find("target")) is not None
    }
