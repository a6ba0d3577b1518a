"""The hypervisor interface the compute reconciler drives, its registry, and the in-memory fake.

Every method is idempotent in the direction it names: starting a running domain, destroying a stopped one or
undefining a missing one is success. Methods raise :class:`DriverError` (with a message for humans) and nothing
else; the reconciler turns it into the instance's ``error`` reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol


class DriverError(Exception):
    """The hypervisor refused or failed; ``str(exc)`` says what happened."""


@dataclass(frozen=True)
class DomainInfo:
    uuid: str
    name: str
    #: ``running``, ``shutoff``, ``paused``, ``crashed`` or ``other``.
    state: str
    #: The persistent definition (our metadata is in it; None for foreign transient domains).
    xml: str


class ComputeDriver(Protocol):
    async def open(self, on_event: Callable[[str], None]) -> None:
        """Connect; ``on_event(uuid)`` is called on the event loop whenever a domain changes state."""

    async def close(self) -> None: ...

    async def domains(self) -> list[DomainInfo]:
        """Every domain the hypervisor knows (the caller tells ours from others by their metadata)."""

    async def domain(self, uuid: str) -> DomainInfo | None:
        """The domain with this uuid, or None if the hypervisor has none."""

    async def live_xml(self, uuid: str) -> str | None:
        """The running domain's live definition (what the guest has now: a disk it has not let go of is still in
        it), or None when the domain is not running."""

    async def define(self, xml: str) -> None:
        """Create or replace the persistent definition (by its uuid)."""

    async def start(self, uuid: str) -> None: ...

    async def shutdown(self, uuid: str) -> None:
        """Ask the guest to power off (ACPI); returns at once."""

    async def destroy(self, uuid: str) -> None:
        """Power off now."""

    async def reboot(self, uuid: str, *, force: bool) -> None:
        """ACPI reboot, or a hard reset with ``force``."""

    async def undefine(self, uuid: str) -> None:
        """Remove the definition (and UEFI variables); the domain must not be running."""

    async def set_vcpus(self, uuid: str, count: int) -> None:
        """Give a running domain ``count`` vCPUs now and from its next start (CPU hot-plug, up to its maximum)."""

    async def attach_device(self, uuid: str, device_xml: str) -> None:
        """Hot-plug a device (``<interface>``…) into a running domain, live and in its definition."""

    async def detach_device(self, uuid: str, device_xml: str) -> None:
        """Unplug a device from a running domain, live and from its definition (done if it is not there)."""

    async def block_resize(self, uuid: str, target_dev: str, size_bytes: int) -> None:
        """Grow disk ``target_dev`` of a running domain to ``size_bytes`` and tell the guest. For an RBD disk, call it
        after the volume driver grew the image (QEMU only learns the new size); for a file disk QEMU grows the file
        itself (``qemu-img resize`` cannot while the guest has it open). A stopped guest sees the new size at start."""

    async def define_secret(self, uuid: str, usage: str, value: bytes) -> None:
        """Create or update the persistent, private libvirt secret ``uuid`` of usage type ``ceph`` named ``usage``
        with ``value`` (a cephx key's raw bytes); another secret with that usage name is replaced. Idempotent."""

    async def undefine_secret(self, uuid: str) -> None:
        """Remove secret ``uuid`` (done if it is not there)."""


class FakeDriver:
    """Domains in memory. Semantics: ``start`` makes a defined domain ``running``; ``shutdown`` and ``destroy`` make it
    ``shutoff`` at once (a fake guest always obeys ACPI); ``reboot`` counts in ``reboots``; every change notifies.
    ``fail_next`` makes the next call of that method name raise :class:`DriverError` (tests of rollback).
    ``secrets`` maps uuid → (usage, value); ``block_sizes`` records ``block_resize`` by (uuid, target dev)."""

    def __init__(self) -> None:
        self.doms: dict[str, DomainInfo] = {}
        self.secrets: dict[str, tuple[str, bytes]] = {}
        self.block_sizes: dict[tuple[str, str], int] = {}
        self.reboots: dict[str, int] = {}
        self.fail_next: set[str] = set()
        self._notify: Callable[[str], None] = lambda uuid: None

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail_next:
            self.fail_next.discard(method)
            raise DriverError(f"fake {method} failure")

    def _set(self, uuid: str, state: str) -> None:
        if uuid not in self.doms:
            raise DriverError(f"domain {uuid} is not defined")
        self.doms[uuid] = replace(self.doms[uuid], state=state)
        asyncio.get_running_loop().call_soon(self._notify, uuid)

    async def open(self, on_event: Callable[[str], None]) -> None:
        self._notify = on_event

    async def close(self) -> None:
        pass

    async def domains(self) -> list[DomainInfo]:
        return list(self.doms.values())

    async def domain(self, uuid: str) -> DomainInfo | None:
        return self.doms.get(uuid)

    async def live_xml(self, uuid: str) -> str | None:
        dom = self.doms.get(uuid)
        return dom.xml if dom is not None and dom.state == "running" else None

    async def define(self, xml: str) -> None:
        import xml.etree.ElementTree as ET

        self._maybe_fail("define")
        root = ET.fromstring(xml)
        uuid, name = root.findtext("uuid") or "", root.findtext("name") or ""
        state = self.doms[uuid].state if uuid in self.doms else "shutoff"
        self.doms[uuid] = DomainInfo(uuid=uuid, name=name, state=state, xml=xml)

    async def start(self, uuid: str) -> None:
        self._maybe_fail("start")
        self._set(uuid, "running")

    async def shutdown(self, uuid: str) -> None:
        self._set(uuid, "shutoff")

    async def destroy(self, uuid: str) -> None:
        if uuid in self.doms:
            self._set(uuid, "shutoff")

    async def reboot(self, uuid: str, *, force: bool) -> None:
        self.reboots[uuid] = self.reboots.get(uuid, 0) + 1

    async def undefine(self, uuid: str) -> None:
        self.doms.pop(uuid, None)

    async def set_vcpus(self, uuid: str, count: int) -> None:
        import xml.etree.ElementTree as ET

        dom = self.doms.get(uuid)
        if dom is None or dom.state != "running":
            raise DriverError("the domain is not running")
        root = ET.fromstring(dom.xml)
        vcpu = root.find("vcpu")
        if vcpu is None or count > int(vcpu.text or 0):
            raise DriverError(f"the domain has at most {vcpu.text if vcpu is not None else '?'} vCPUs")
        vcpu.set("current", str(count))
        self.doms[uuid] = replace(dom, xml=ET.tostring(root, encoding="unicode"))

    def _devices(self, uuid: str) -> tuple[DomainInfo, Any, Any]:
        import xml.etree.ElementTree as ET

        dom = self.doms.get(uuid)
        if dom is None or dom.state != "running":
            raise DriverError("the domain is not running")
        root = ET.fromstring(dom.xml)
        devices = root.find("devices")
        if devices is None:
            devices = ET.SubElement(root, "devices")
        return dom, root, devices

    async def attach_device(self, uuid: str, device_xml: str) -> None:
        import xml.etree.ElementTree as ET

        self._maybe_fail("attach_device")
        dom, root, devices = self._devices(uuid)
        devices.append(ET.fromstring(device_xml))
        self.doms[uuid] = replace(dom, xml=ET.tostring(root, encoding="unicode"))

    async def detach_device(self, uuid: str, device_xml: str) -> None:
        import xml.etree.ElementTree as ET

        dom, root, devices = self._devices(uuid)
        gone = ET.fromstring(device_xml)
        if gone.tag == "disk":
            dev, serial = _disk_target(gone), gone.findtext("serial")
            for disk in devices.findall("disk"):
                if (dev and _disk_target(disk) == dev) or (serial and disk.findtext("serial") == serial):
                    devices.remove(disk)
        mac = gone.find("mac")
        for iface in devices.findall("interface"):
            found = iface.find("mac")
            if mac is not None and found is not None and found.get("address") == mac.get("address"):
                devices.remove(iface)
        self.doms[uuid] = replace(dom, xml=ET.tostring(root, encoding="unicode"))

    async def block_resize(self, uuid: str, target_dev: str, size_bytes: int) -> None:
        self._maybe_fail("block_resize")
        _dom, _root, devices = self._devices(uuid)
        if not any(_disk_target(d) == target_dev for d in devices.findall("disk")):
            raise DriverError(f"the domain has no disk {target_dev}")
        self.block_sizes[(uuid, target_dev)] = size_bytes

    async def define_secret(self, uuid: str, usage: str, value: bytes) -> None:
        self._maybe_fail("define_secret")
        for other, (other_usage, _) in list(self.secrets.items()):
            if other_usage == usage and other != uuid:
                del self.secrets[other]
        self.secrets[uuid] = (usage, bytes(value))

    async def undefine_secret(self, uuid: str) -> None:
        self.secrets.pop(uuid, None)


def _disk_target(disk: Any) -> str | None:
    target = disk.find("target")
    return None if target is None else target.get("dev")


def make_driver(name: str, uri: str) -> ComputeDriver:
    """The driver ``compute.driver`` names (an explicit registry, no plugin discovery)."""
    if name == "fake":
        return FakeDriver()
    if name == "libvirt":
        from agent.compute.libvirt_driver import LibvirtDriver

        return LibvirtDriver(uri)
    raise ValueError(f"no compute driver {name!r}")
