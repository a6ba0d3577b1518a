"""The compute reconciler: converges the hypervisor on this node to the instance records assigned to it.

Level-triggered and idempotent (CONVENTIONS 10, 15): each pass takes the records of this node and the domains the
hypervisor has, and for each instance does whatever step is missing — build (root disk overlay, NoCloud seed, define),
start, stop, reboot, redefine after a resize, tear down — then writes the observed ``status`` back through the store.
A pass runs when an instance or image record changes, when libvirt reports a lifecycle event, and every
``compute.resync_interval`` seconds. A restarted agent needs nothing special: the next pass adopts running domains
and finishes (or rolls back) whatever the last one left half done.

Ownership: a domain is ours when its XML carries our metadata (``agent.compute.xml.read_metadata``) *and* its root
disk lives in this node's ``<data_dir>/instances``; nothing else is ever touched. A failed build is rolled back (no
domain, overlay or seed remains) and the instance goes to ``error`` with the reason; it is not retried until its
spec changes (``instance start`` asks again).

Files per instance, in ``<data_dir>/instances/<id>/``: ``root.qcow2`` (an overlay on the image, or a blank disk for
kernel images), ``seed.iso`` (NoCloud), ``console.log`` (serial port, appended across restarts), ``nvram.fd`` (UEFI).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import msgspec
import psutil

from agent import faults
from agent.compute import design, seed
from agent.compute.driver import ComputeDriver, DomainInfo, DriverError
from agent.compute.xml import InstanceMetadata, read_metadata
from agent.net.default import NetworkDriver, NetworkError
from minicloud import ids
from minicloud.compute import images as image_files
from minicloud.compute.scheduler import HYPERVISOR_KIND
from minicloud.config import Config
from minicloud.state import Create, Delete, Record, Store, Txn, TxnFailed, Update, list_all

log = logging.getLogger("minicloud.compute")
INSTANCE_KIND = "instance"
IMAGE_KIND = "image"
NETWORK_NAME = "default"
#: Unrecorded image files are removed once nothing has written to them for this long (an import in progress writes).
_STRAY_IMAGE_IDLE = 600.0


class BuildError(Exception):
    """A build step failed; the message is for the instance's ``status.reason``."""


def _qemu_img(*args: str) -> None:
    out = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise BuildError(f"qemu-img {args[0]} failed: {out.stderr.strip()[-300:]}")


def _spec_fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class ComputeReconciler:
    def __init__(
        self,
        *,
        store: Store,
        config: Config,
        driver: ComputeDriver,
        network: NetworkDriver | None,
        virt_type: str,
        virt_reason: str,
    ) -> None:
        self.store = store
        self.config = config
        self.node = config.node_name
        self.driver = driver
        self.network = network
        self.virt_type = virt_type
        self.virt_reason = virt_reason
        self.instances_dir = config.data_path / "instances"
        self.images_dir = config.data_path / "images"
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._awaiting_lease: set[str] = set()
        self._connected = False
        self._network_checked = 0.0
        #: Why compute does not work on this node right now ("" when it does).
        self.problem = ""
        self._lease_wait_since: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the passes. Connecting to the hypervisor and building the network happen in the first pass and are
        retried until they work, so a node whose libvirtd is down (or whose subnet is taken) still serves the API
        and says what is wrong in its log; its capacity is published only once compute works."""
        self.instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.prepare()  # so a healthy node has published its capacity before the API serves
        sub = self.store.subscribe()
        self._tasks = [
            asyncio.create_task(self._watch(sub), name="compute-watch"),
            asyncio.create_task(self._loop(), name="compute-reconciler"),
        ]
        self._sub = sub

    async def close(self) -> None:
        self._sub.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.driver.close()

    async def _watch(self, sub: Any) -> None:
        async for change in sub:
            if change.kind in (INSTANCE_KIND, IMAGE_KIND):
                self._wake.set()

    async def prepare(self) -> bool:
        """Connect to the hypervisor and converge the network (again every resync interval); False if not possible."""
        now = time.monotonic()
        if self._connected and now - self._network_checked < self.config.compute.resync_interval:
            return True
        try:
            if not self._connected:
                await self.driver.open(lambda uuid: self._wake.set())
                self._connected = True
            if self.network is not None:
                await self.network.ensure()
            self._network_checked = now
            await self.publish_capacity()
        except (DriverError, NetworkError, OSError) as exc:
            if str(exc) != self.problem:
                log.error("compute is not available on this node; retrying", extra={"error": str(exc)})
            self.problem = str(exc)
            return False
        if self.problem:
            log.info("compute is available again")
        self.problem = ""
        return True

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                if await self.prepare():
                    await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("compute pass failed; will retry")
            # Poll faster while something is expected soon: a guest to power off, or a DHCP lease to appear.
            fast = self._stop_requested or self._awaiting_lease
            timeout = 1.0 if fast else 5.0 if self.problem else self.config.compute.resync_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    # -- capacity --------------------------------------------------------------------------------------------------
    async def publish_capacity(self) -> None:
        """Write this node's ``hypervisor`` record (what the scheduler may hand out), if it changed."""
        cfg = self.config.compute
        disk = shutil.disk_usage(self.config.data_path)
        spec = {
            "cpus": psutil.cpu_count() or 1,
            "memory_mib": psutil.virtual_memory().total >> 20,
            "disk_gib": disk.total >> 30,
            "cpu_allocation_ratio": cfg.cpu_allocation_ratio,
            "ram_allocation_ratio": cfg.ram_allocation_ratio,
            "reserved_memory_mib": cfg.reserved_memory_mib,
            "reserved_disk_gib": cfg.reserved_disk_gib,
            "virt_type": self.virt_type,
            "virt_reason": self.virt_reason,
        }
        for _ in range(5):
            current = await self.store.get_by_name(HYPERVISOR_KIND, "", self.node)
            stamp = ids.now()
            if current is None:
                rec = Record(kind=HYPERVISOR_KIND, id=ids.new_id("hv"), project="", name=self.node, spec=spec, created_at=stamp, updated_at=stamp)  # fmt: skip
                op: Any = Create(rec)
            elif current.spec == spec:
                return
            else:
                op = Update(
                    msgspec.structs.replace(current, spec=spec, updated_at=stamp), expect_revision=current.revision
                )
            try:
                await self.store.commit(Txn([op]))
                return
            except TxnFailed:
                continue

    # -- one pass --------------------------------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        self._awaiting_lease.clear()
        records = await list_all(self.store, INSTANCE_KIND, where={"node": self.node})  # indexed, not a scan
        domains = await self.driver.domains()
        ours = {d.uuid: d for d in domains if self._is_ours(d)}
        leases = self.network.leases() if self.network is not None else {}
        await asyncio.gather(*(self._guarded(r, ours.get(r.spec["uuid"]), leases) for r in records))
        await self._collect_orphans(records, ours)

    def _is_ours(self, dom: DomainInfo) -> bool:
        try:
            meta = read_metadata(dom.xml)
        except ValueError:
            return False
        return meta is not None and str(self.instances_dir / meta.id) in dom.xml

    async def _guarded(self, record: Record, dom: DomainInfo | None, leases: dict[str, str]) -> None:
        lock = self._locks.setdefault(record.id, asyncio.Lock())
        if lock.locked():
            self._wake.set()  # the running converge will be followed by another pass
            return
        async with lock:
            try:
                await self.converge(record, dom, leases)
            except asyncio.CancelledError:
                raise
            except (DriverError, BuildError, OSError) as exc:
                log.warning("instance step failed", extra={"instance": record.id, "error": str(exc)})
                await self._set_status(
                    record.id, state="error", reason=str(exc), error_spec=_spec_fingerprint(record.spec)
                )
            except Exception as exc:
                log.exception("converging an instance failed", extra={"instance": record.id})
                reason = f"internal error ({type(exc).__name__}); see the agent log on node {self.node}"
                await self._set_status(
                    record.id, state="error", reason=reason, error_spec=_spec_fingerprint(record.spec)
                )

    async def converge(self, record: Record, dom: DomainInfo | None, leases: dict[str, str]) -> None:
        spec, status = record.spec, record.status or {}
        uuid = spec["uuid"]
        if spec.get("deleted"):
            await self._teardown(record.id, uuid)
            self._stop_requested.pop(record.id, None)
            with contextlib.suppress(TxnFailed):
                await self.store.commit(
                    Txn([Delete(kind=INSTANCE_KIND, id=record.id, expect_revision=record.revision)])
                )
            self._locks.pop(record.id, None)
            log.info("instance deleted", extra={"instance": record.id})
            return
        if status.get("state") == "error" and status.get("error_spec") == _spec_fingerprint(spec):
            return  # failed for this very spec: wait for the user to change something (or `instance start`)
        if dom is None:
            await self._set_status(record.id, state="building", reason="")
            try:
                await self._build(record)
            except BaseException:
                await self._teardown(record.id, uuid)  # a failed build leaves nothing behind
                raise
            dom = DomainInfo(uuid=uuid, name=self.domain_name(record), state="shutoff", xml="")
        elif dom.state == "shutoff":
            xml = design.domain_for(self._guest_spec(record, await self._image(record))).to_xml()
            if _shape(dom.xml) != _shape(xml):
                await self.driver.define(xml)  # resized while stopped
        if spec["power"] == "running":
            await self._converge_running(record, dom, leases)
        else:
            await self._converge_stopped(record, dom)

    async def _converge_running(self, record: Record, dom: DomainInfo, leases: dict[str, str]) -> None:
        spec, status = record.spec, record.status or {}
        uuid = spec["uuid"]
        self._stop_requested.pop(record.id, None)
        if dom.state in ("shutoff", "crashed"):
            if status.get("state") == "running" and dom.state == "shutoff":
                # The guest powered itself off: like EC2, the instance is now stopped (not restarted behind its back).
                await self._update(
                    record.id,
                    spec={"power": "stopped"},
                    status={"state": "stopped", "reason": "the guest shut itself down", "stopped_at": ids.now()},
                )
                return
            await self.driver.start(uuid)
            self._lease_wait_since.pop(record.id, None)
        if dom.xml and _current_vcpus(dom.xml) not in (0, spec["vcpus"]):
            await self.driver.set_vcpus(uuid, spec["vcpus"])  # resized while running: CPU hot-plug
        reboot = spec.get("reboot", {})
        changes: dict[str, Any] = {}
        if reboot.get("seq", 0) > status.get("reboot_seq", 0):
            await self.driver.reboot(uuid, force=bool(reboot.get("force")))
            changes["reboot_seq"] = reboot["seq"]
        mac = design.mac_for(record.id, 0)
        addresses = [{"network": NETWORK_NAME, "mac": mac, "ip": leases.get(mac)}] if self.network is not None else []
        if self.network is not None and leases.get(mac) is None:
            # Poll for the lease for the first two minutes after start; a guest without DHCP must not keep us busy.
            since = self._lease_wait_since.setdefault(record.id, time.monotonic())
            if time.monotonic() - since < 120:
                self._awaiting_lease.add(record.id)
        else:
            self._lease_wait_since.pop(record.id, None)
        await self._set_status(
            record.id,
            state="running",
            reason="",
            addresses=addresses,
            virt_type=self.virt_type,
            launched_at=status.get("launched_at") if status.get("state") == "running" else ids.now(),
            **changes,
        )

    async def _converge_stopped(self, record: Record, dom: DomainInfo) -> None:
        uuid = record.spec["uuid"]
        status = record.status or {}
        if dom.state not in ("shutoff",):
            asked = self._stop_requested.get(record.id)
            timeout = self.config.compute.stop_timeout
            if (
                record.spec.get("stop_force")
                or dom.state != "running"
                or (asked and time.monotonic() - asked > timeout)
            ):
                await self.driver.destroy(uuid)
            else:
                if asked is None:
                    await self.driver.shutdown(uuid)
                    self._stop_requested[record.id] = time.monotonic()
                await self._set_status(record.id, state="stopping", reason="")
                return
        self._stop_requested.pop(record.id, None)
        if status.get("state") != "stopped":
            await self._set_status(record.id, state="stopped", reason="", addresses=[], stopped_at=ids.now())

    # -- building and tearing down -----------------------------------------------------------------------------------
    def domain_name(self, record: Record) -> str:
        return f"mc-{record.id}"

    def _guest_spec(self, record: Record, image: Record) -> design.GuestSpec:
        spec = record.spec
        d = self.instances_dir / record.id
        files = self.images_dir / image.id
        kernel_boot = image.spec["boot"] == "kernel"
        uefi = image.spec.get("firmware") == "uefi"
        nics = (
            (design.Nic(mac=design.mac_for(record.id, 0), bridge=self.config.network.bridge),) if self.network else ()
        )
        return design.GuestSpec(
            uuid=spec["uuid"],
            domain_name=self.domain_name(record),
            virt_type=self.virt_type,  # type: ignore[arg-type]
            vcpus=spec["vcpus"],
            max_vcpus=spec.get("max_vcpus"),
            memory_mib=spec["memory_mib"],
            root_disk=d / "root.qcow2",
            seed_iso=d / "seed.iso",
            console_log=d / "console.log",
            kernel=files / "kernel" if kernel_boot else None,
            initrd=files / "initrd" if kernel_boot and (files / "initrd").exists() else None,
            cmdline=image.spec.get("cmdline", "") if kernel_boot else "",
            firmware="uefi" if uefi and not kernel_boot else "bios",
            nvram=d / "nvram.fd" if uefi and not kernel_boot else None,
            nics=nics,
            metadata=InstanceMetadata(
                id=record.id,
                project=record.project,
                name=record.name,
                node=self.node,
                image=image.id,
                type=spec["type"],
                created=record.created_at,
            ),
        )

    async def _image(self, record: Record) -> Record:
        image = await self.store.get(IMAGE_KIND, record.spec["image_id"])
        if image is None:
            raise BuildError(f"image {record.spec['image_name']} ({record.spec['image_id']}) no longer exists")
        if image.spec.get("node") != self.node:
            raise BuildError(f"image {image.name} is stored on node {image.spec.get('node')}, not on {self.node}")
        return image

    async def _build(self, record: Record) -> None:
        image = await self._image(record)
        d = self.instances_dir / record.id
        await asyncio.to_thread(self._write_files, record, image, d)
        await self.driver.define(design.domain_for(self._guest_spec(record, image)).to_xml())
        faults.point("compute.build.after_define")

    def _write_files(self, record: Record, image: Record, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec = record.spec
        root = d / "root.qcow2"
        if not root.exists():
            tmp = d / "root.qcow2.tmp"
            size = f"{spec['disk_gib']}G"
            if image.spec["boot"] == "disk":
                backing = self.images_dir / image.id / "disk"
                _qemu_img("create", "-q", "-f", "qcow2", "-F", image.spec["format"], "-b", str(backing), str(tmp))
                if spec["disk_gib"] << 30 > (image.spec.get("virtual_size_bytes") or 0):
                    _qemu_img("resize", "-q", str(tmp), size)
            else:
                _qemu_img("create", "-q", "-f", "qcow2", str(tmp), size)
            os.replace(tmp, root)
        seed_path = d / "seed.iso"
        if not seed_path.exists():
            seed.write_nocloud_seed(
                seed_path,
                meta_data=seed.meta_data(record.id, record.name, public_keys=spec.get("public_keys", [])),
                user_data=spec.get("user_data", "").encode(),
                network_config=seed.network_config_dhcp([design.mac_for(record.id, 0)] if self.network else []),
            )

    async def _teardown(self, instance_id: str, uuid: str) -> None:
        """Destroy and undefine the domain, remove its files. Idempotent."""
        await self.driver.destroy(uuid)
        faults.point("compute.teardown.after_destroy")
        await self.driver.undefine(uuid)
        await asyncio.to_thread(shutil.rmtree, self.instances_dir / instance_id, True)

    async def _collect_orphans(self, records: list[Record], ours: dict[str, DomainInfo]) -> None:
        """Domains and instance directories of ours that no record names any more (e.g. a record deleted while the
        agent was down, or a crash between building and recording): remove them."""
        wanted_uuids = {r.spec["uuid"] for r in records}
        wanted_ids = {r.id for r in records}
        for uuid, dom in ours.items():
            if uuid not in wanted_uuids:
                meta = read_metadata(dom.xml)
                log.warning("removing a domain no instance record names", extra={"uuid": uuid, "domain": dom.name})
                await self._teardown(meta.id if meta else "", uuid)
        live_ids = {m.id for d in ours.values() if (m := read_metadata(d.xml)) is not None}
        if self.instances_dir.is_dir():
            for entry in self.instances_dir.iterdir():
                # Only once the record is surely gone: a create commits before this node builds anything.
                known = entry.name in wanted_ids or entry.name in live_ids
                if not known and await self.store.get(INSTANCE_KIND, entry.name) is None:
                    await asyncio.to_thread(shutil.rmtree, entry, True)
        # Image files no image record names (the record was deleted through another node, or an import crashed
        # between moving its files into place and recording them).
        # Images are pinned to the node that imported them: only this node's image records can name files here.
        images = {r.id for r in await list_all(self.store, IMAGE_KIND, where={"node": self.node})}
        strays = await asyncio.to_thread(
            image_files.stray_entries, self.images_dir, images, idle_seconds=_STRAY_IMAGE_IDLE, now=time.time()
        )
        for entry in strays:
            log.warning("removing image files no image record names", extra={"path": str(entry)})
            await asyncio.to_thread(shutil.rmtree, entry, True)

    # -- status writes ---------------------------------------------------------------------------------------------
    async def _set_status(self, instance_id: str, **changes: Any) -> None:
        await self._update(instance_id, status=changes)

    async def _update(self, instance_id: str, *, status: dict[str, Any], spec: dict[str, Any] | None = None) -> None:
        """Merge ``status`` (and ``spec``) changes into the record with compare-and-swap; no write when nothing
        changes. A deleted record is left alone."""
        for _ in range(10):
            record = await self.store.get(INSTANCE_KIND, instance_id)
            if record is None:
                return
            if record.spec.get("deleted") and status.get("state") not in (None, "deleting"):
                status = {k: v for k, v in status.items() if k != "state"}
            new_status = {**(record.status or {}), **status}
            new_spec = {**record.spec, **(spec or {})}
            if new_status == record.status and new_spec == record.spec:
                return
            updated = msgspec.structs.replace(record, status=new_status, spec=new_spec, updated_at=ids.now())
            try:
                await self.store.commit(Txn([Update(updated, expect_revision=record.revision)]))
                return
            except TxnFailed:
                continue


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


def _current_vcpus(xml: str) -> int:
    """The vCPUs a domain definition gives the guest (``current``, else the count); 0 if it says nothing."""
    vcpu = ET.fromstring(xml).find("vcpu")
    if vcpu is None:
        return 0
    return int(vcpu.get("current") or vcpu.text or 0)
