"""The real compute driver: libvirt-python, with every call off the event loop.

libvirt calls run in one bounded thread pool (libvirt connections are thread-safe); libvirt's own event loop runs in
a native thread started once per process, and lifecycle events reach asyncio with ``loop.call_soon_threadsafe``
(Nova's ``host.py`` does the same). A dropped connection (libvirtd restarted) is reopened on the next call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt

from agent.compute.driver import DomainInfo, DriverError

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down: still running until it is off
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread (once per process; it must
    happen before the first connection is opened for events to be delivered)."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _ignore_libvirt_errors(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we report them through exceptions instead."""


class LibvirtDriver:
    def __init__(self, uri: str = "qemu:///system", max_workers: int = 4) -> None:
        self.uri = uri
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="libvirt")
        self._conn: libvirt.virConnect | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: Callable[[str], None] = lambda uuid: None
        self._callback_id: int | None = None

    # -- plumbing ----------------------------------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except libvirt.libvirtError as exc:
            raise DriverError(exc.get_error_message() or str(exc)) from None

    def _connection(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
            log.warning("libvirt connection lost; reconnecting", extra={"uri": self.uri})
        conn = libvirt.open(self.uri)
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
        )
        self._conn = conn
        return conn

    def _lifecycle(self, _conn: Any, dom: libvirt.virDomain, _event: int, _detail: int, _opaque: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_event, dom.UUIDString())

    def _lookup(self, uuid: str) -> libvirt.virDomain | None:
        try:
            return self._connection().lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    # -- ComputeDriver -----------------------------------------------------------------------------------------------
    async def open(self, on_event: Callable[[str], None]) -> None:
        _ensure_event_loop()
        libvirt.registerErrorHandler(_ignore_libvirt_errors, None)
        self._loop = asyncio.get_running_loop()
        self._on_event = on_event
        await self._call(self._connection)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                try:
                    if self._callback_id is not None:
                        self._conn.domainEventDeregisterAny(self._callback_id)
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._pool, _close)
        self._pool.shutdown(wait=False)

    async def domains(self) -> list[DomainInfo]:
        def _list() -> list[DomainInfo]:
            out = []
            for dom in self._connection().listAllDomains(0):
                try:
                    state = _STATES.get(dom.state()[0], "other")
                    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                except libvirt.libvirtError:
                    continue  # vanished while we listed
                out.append(DomainInfo(uuid=dom.UUIDString(), name=dom.name(), state=state, xml=xml))
            return out

        return await self._call(_list)

    async def domain(self, uuid: str) -> DomainInfo | None:
        def _get() -> DomainInfo | None:
            dom = self._lookup(uuid)
            if dom is None:
                return None
            try:
                state = _STATES.get(dom.state()[0], "other")
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None  # vanished while we looked
                raise
            return DomainInfo(uuid=dom.UUIDString(), name=dom.name(), state=state, xml=xml)

        return await self._call(_get)

    async def live_xml(self, uuid: str) -> str | None:
        def _live() -> str | None:
            dom = self._lookup(uuid)
            try:
                if dom is None or not dom.isActive():
                    return None
                return dom.XMLDesc(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

        return await self._call(_live)

    async def define(self, xml: str) -> None:
        """Define (or redefine) a domain. ``VIR_DOMAIN_DEFINE_VALIDATE``: libvirt checks the XML against its RNG
        schema first and refuses an invalid one (``XML document failed to validate against schema: …``) rather than
        silently dropping what it does not know (a misspelt attribute of a ``<hostdev>`` address, say)."""
        await self._call(lambda: self._connection().defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE))

    async def start(self, uuid: str) -> None:
        def _start() -> None:
            dom = self._lookup(uuid)
            if dom is None:
                raise DriverError(f"domain {uuid} is not defined")
            if not dom.isActive():
                dom.create()

        await self._call(_start)

    async def shutdown(self, uuid: str) -> None:
        def _shutdown() -> None:
            dom = self._lookup(uuid)
            if dom is not None and dom.isActive():
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)

        await self._call(_shutdown)

    async def destroy(self, uuid: str) -> None:
        def _destroy() -> None:
            dom = self._lookup(uuid)
            if dom is None:
                return
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running: already off
                    raise

        await self._call(_destroy)

    async def reboot(self, uuid: str, *, force: bool) -> None:
        def _reboot() -> None:
            dom = self._lookup(uuid)
            if dom is None or not dom.isActive():
                raise DriverError("the domain is not running")
            if force:
                dom.reset()
            else:
                dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)

        await self._call(_reboot)

    async def undefine(self, uuid: str) -> None:
        def _undefine() -> None:
            dom = self._lookup(uuid)
            if dom is None:
                return
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise

        await self._call(_undefine)

    async def set_vcpus(self, uuid: str, count: int) -> None:
        def _set() -> None:
            dom = self._lookup(uuid)
            if dom is None or not dom.isActive():
                raise DriverError("the domain is not running")
            dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)

        await self._call(_set)

    async def attach_device(self, uuid: str, device_xml: str) -> None:
        def _attach() -> None:
            dom = self._lookup(uuid)
            if dom is None or not dom.isActive():
                raise DriverError("the domain is not running")
            dom.attachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)

        await self._call(_attach)

    async def detach_device(self, uuid: str, device_xml: str) -> None:
        def _detach() -> None:
            dom = self._lookup(uuid)
            if dom is None or not dom.isActive():
                raise DriverError("the domain is not running")
            try:
                dom.detachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_DEVICE_MISSING:
                    raise

        await self._call(_detach)

    async def block_resize(self, uuid: str, target_dev: str, size_bytes: int) -> None:
        def _resize() -> None:
            dom = self._lookup(uuid)
            if dom is None or not dom.isActive():
                raise DriverError("the domain is not running")
            dom.blockResize(target_dev, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

        await self._call(_resize)

    async def define_secret(self, uuid: str, usage: str, value: bytes) -> None:
        def _define() -> None:
            conn = self._connection()
            try:  # libvirt refuses a second secret with the same usage: the one we replace goes first
                other = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, usage)
                if other.UUIDString() != uuid:
                    other.undefine()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                    raise
            secret = ET.Element("secret", {"ephemeral": "no", "private": "yes"})
            ET.SubElement(secret, "uuid").text = uuid
            ET.SubElement(ET.SubElement(secret, "usage", {"type": "ceph"}), "name").text = usage
            conn.secretDefineXML(ET.tostring(secret, encoding="unicode")).setValue(value)

        await self._call(_define)

    async def undefine_secret(self, uuid: str) -> None:
        def _undefine() -> None:
            try:
                self._connection().secretLookupByUUIDString(uuid).undefine()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                    raise

        await self._call(_undefine)

    # -- migration (agent.reconcilers.migration) ---------------------------------------------------------------------
    async def migrate(self, uuid: str, dest_uri: str, params: dict[str, Any], flags: int) -> None:
        """Peer-to-peer migration of a running domain: this node's libvirtd connects to ``dest_uri`` itself and moves
        it (``virDomainMigrateToURI3``); returns once the guest runs there."""

        def _migrate() -> None:
            dom = self._lookup(uuid)
            if dom is None:
                raise libvirt.libvirtError(f"no domain {uuid} to migrate")
            dom.migrateToURI3(dest_uri, params, flags)

        await self._call(_migrate)

    async def job_active(self, uuid: str) -> bool:
        """Whether libvirt runs a job (a migration) on the domain now."""

        def _job() -> bool:
            dom = self._lookup(uuid)
            if dom is None:
                return False
            try:
                return dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise

        return await self._call(_job)

    async def resume(self, uuid: str) -> None:
        """Resume a paused domain (one a failed migration left paused)."""

        def _resume() -> None:
            dom = self._lookup(uuid)
            if dom is not None and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()

        await self._call(_resume)

    async def remote_state(self, uri: str, uuid: str) -> str | None:
        """The state of domain ``uuid`` on another node's libvirtd (``running``, ``paused``, ``shutoff``…), None if
        it has none; DriverError when it cannot be reached."""

        def _remote() -> str | None:
            conn = libvirt.open(uri)
            try:
                try:
                    dom = conn.lookupByUUIDString(uuid)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        return None
                    raise
                return _STATES.get(dom.state()[0], "other")
            finally:
                conn.close()

        return await self._call(_remote)

    async def remote_destroy(self, uri: str, uuid: str) -> None:
        """Destroy (and undefine) domain ``uuid`` on another node's libvirtd (a half-arrived copy)."""

        def _destroy() -> None:
            conn = libvirt.open(uri)
            try:
                try:
                    dom = conn.lookupByUUIDString(uuid)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        return
                    raise
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            finally:
                conn.close()

        await self._call(_destroy)

    async def migratable_xml(self, uuid: str) -> str | None:
        """The running domain's live definition as a migration sends it (``VIR_DOMAIN_XML_MIGRATABLE``)."""

        def _xml() -> str | None:
            dom = self._lookup(uuid)
            if dom is None or not dom.isActive():
                return None
            return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)

        return await self._call(_xml)

    async def start_paused(self, uuid: str) -> None:
        """Start a stopped domain with its vCPUs paused (QEMU at reset, the guest not running): what a cold migration
        moves, with its disks, and stops again on the target."""

        def _start() -> None:
            dom = self._lookup(uuid)
            if dom is None:
                raise libvirt.libvirtError(f"domain {uuid} is not defined")
            if not dom.isActive():
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)

        await self._call(_start)

    async def remote_stop(self, uri: str, uuid: str) -> None:
        """Power off domain ``uuid`` on another node's libvirtd, keeping its definition (a cold migration's end)."""

        def _stop() -> None:
            conn = libvirt.open(uri)
            try:
                dom = conn.lookupByUUIDString(uuid)
                if dom.isActive():
                    dom.destroy()
            finally:
                conn.close()

        await self._call(_stop)
