"""Libvirt domain XML: one frozen dataclass per element, each rendering itself with ``to_element()``.

This module is mechanism only: it knows how libvirt spells things, not what a guest should get; that is decided in
``agent.compute.design``. Nothing here is built by string concatenation, so every value is escaped by ElementTree.

Rendering is deterministic: attributes come out in a fixed order, children in document order, and ``Domain.to_xml()``
indents with two spaces, so equal objects give byte-identical XML (golden tests depend on it).

The only XML we read back is our own metadata (``InstanceMetadata.from_element`` and ``read_metadata``), stored inside
``<metadata>`` in the namespace ``NS`` (prefix ``minicloud``). A domain without it is not ours and is never touched.
"""

from __future__ import annotations

import datetime as _dt
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

NS = "https://minicloud.dev/xmlns/instance/1"
NS_PREFIX = "minicloud"

# ElementTree keeps prefixes in a process-wide table; registering ours makes the output read `minicloud:instance`
# instead of `ns0:instance`. The URI is ours alone, so this cannot change how anything else serialises.
ET.register_namespace(NS_PREFIX, NS)


class MetadataError(ValueError):
    """A domain carries our metadata element but it is incomplete or malformed (hand-edited, or a bug)."""


def _element(
    tag: str,
    attrs: dict[str, str | None] | None = None,
    text: str | None = None,
    children: tuple[ET.Element, ...] | list[ET.Element] = (),
) -> ET.Element:
    """An element with the attributes that are not None (in the order given), optional text, and children."""
    el = ET.Element(tag, {k: v for k, v in (attrs or {}).items() if v is not None})
    if text is not None:
        el.text = text
    el.extend(children)
    return el


def _yes_no(value: bool | None) -> str | None:
    return None if value is None else ("yes" if value else "no")


def _q(tag: str) -> str:
    return f"{{{NS}}}{tag}"


# --- metadata ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceMetadata:
    """``<minicloud:instance>``: which instance a domain belongs to. Written at define time, read by the reconciler.

    ``created`` is an ISO 8601 time with a timezone, as the store writes it (``minicloud.ids.now()``, e.g.
    ``2026-11-22T10:30:00.000Z``); it is kept as given, so a round trip returns the same string.
    """

    id: str
    project: str
    name: str
    node: str
    image: str
    type: str
    created: str

    _FIELDS = ("id", "project", "name", "node", "image", "type", "created")

    def __post_init__(self) -> None:
        try:
            created = _dt.datetime.fromisoformat(self.created)
        except (TypeError, ValueError):
            raise ValueError(f"InstanceMetadata.created must be an ISO 8601 time, not {self.created!r}") from None
        if created.tzinfo is None:
            raise ValueError(f"InstanceMetadata.created must have a timezone (e.g. a trailing Z): {self.created!r}")

    def to_element(self) -> ET.Element:
        return _element(_q("instance"), children=[_element(_q(f), text=getattr(self, f)) for f in self._FIELDS])

    @classmethod
    def from_element(cls, el: ET.Element) -> InstanceMetadata:
        """Parse ``<minicloud:instance>``. Raises ``MetadataError`` when a field is missing or ``created`` is invalid."""
        if el.tag != _q("instance"):
            raise MetadataError(f"expected {_q('instance')}, got {el.tag}")
        values: dict[str, str] = {}
        for field in cls._FIELDS:
            child = el.find(_q(field))
            if child is None:
                raise MetadataError(f"minicloud instance metadata has no <{field}>")
            values[field] = (child.text or "").strip()
        try:
            return cls(**values)
        except ValueError as e:
            raise MetadataError(f"minicloud instance metadata: {e}") from None


def read_metadata(domain_xml: str) -> InstanceMetadata | None:
    """Our metadata from a domain's XML (as ``virDomain.XMLDesc()`` returns it), or None when the domain is not ours.

    None means: no ``<metadata>/<minicloud:instance>`` in our namespace; such domains must be left alone. Raises
    ``MetadataError`` when our element is there but malformed, and ``xml.etree.ElementTree.ParseError`` for invalid XML.
    """
    root = ET.fromstring(domain_xml)
    el = root.find(f"metadata/{_q('instance')}")
    return None if el is None else InstanceMetadata.from_element(el)


# --- os, cpu, features, clock -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vcpu:
    """``<vcpu current=…>count</vcpu>``: ``count`` is the maximum, ``current`` (if set) how many are online at boot."""

    count: int
    current: int | None = None

    def to_element(self) -> ET.Element:
        current = None if self.current is None else str(self.current)
        return _element("vcpu", {"current": current}, str(self.count))


@dataclass(frozen=True)
class Loader:
    """``<loader>``: firmware image; for UEFI a read-only pflash OVMF_CODE file."""

    path: str
    readonly: bool = True
    type: Literal["pflash", "rom"] = "pflash"
    secure: bool | None = None

    def to_element(self) -> ET.Element:
        attrs = {"readonly": _yes_no(self.readonly), "type": self.type, "secure": _yes_no(self.secure)}
        return _element("loader", attrs, self.path)


@dataclass(frozen=True)
class Nvram:
    """``<nvram template=…>path</nvram>``: the guest's writable UEFI variable store, created from ``template``."""

    path: str
    template: str | None = None

    def to_element(self) -> ET.Element:
        return _element("nvram", {"template": self.template}, self.path)


@dataclass(frozen=True)
class Os:
    """``<os>``: an HVM guest, optionally with firmware, a kernel for direct boot, and a boot device order."""

    arch: str = "x86_64"
    machine: str = "q35"
    loader: Loader | None = None
    nvram: Nvram | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    boot: tuple[Literal["hd", "cdrom", "network", "fd"], ...] = ()

    def to_element(self) -> ET.Element:
        children = [_element("type", {"arch": self.arch, "machine": self.machine}, "hvm")]
        children += [x.to_element() for x in (self.loader, self.nvram) if x is not None]
        for tag, value in (("kernel", self.kernel), ("initrd", self.initrd), ("cmdline", self.cmdline)):
            if value is not None:
                children.append(_element(tag, text=value))
        children += [_element("boot", {"dev": dev}) for dev in self.boot]
        return _element("os", children=children)


@dataclass(frozen=True)
class Features:
    """``<features>``: ACPI (clean shutdown via the power button) and the APIC."""

    acpi: bool = True
    apic: bool = True

    def to_element(self) -> ET.Element:
        names = [n for n, on in (("acpi", self.acpi), ("apic", self.apic)) if on]
        return _element("features", children=[_element(n) for n in names])


@dataclass(frozen=True)
class Cpu:
    """``<cpu mode=…>``; ``model`` only with mode ``custom``."""

    mode: Literal["host-passthrough", "host-model", "maximum", "custom"]
    model: str | None = None
    check: Literal["none", "partial", "full"] | None = None

    def to_element(self) -> ET.Element:
        children = [] if self.model is None else [_element("model", {"fallback": "forbid"}, self.model)]
        return _element("cpu", {"mode": self.mode, "check": self.check}, children=children)


@dataclass(frozen=True)
class Timer:
    """``<timer name=… tickpolicy=… present=…/>`` inside ``<clock>``."""

    name: str
    tickpolicy: Literal["delay", "catchup", "merge", "discard"] | None = None
    present: bool | None = None

    def to_element(self) -> ET.Element:
        return _element("timer", {"name": self.name, "tickpolicy": self.tickpolicy, "present": _yes_no(self.present)})


@dataclass(frozen=True)
class Clock:
    """``<clock offset=…>`` with optional timers."""

    offset: Literal["utc", "localtime"] = "utc"
    timers: tuple[Timer, ...] = ()

    def to_element(self) -> ET.Element:
        return _element("clock", {"offset": self.offset}, children=[t.to_element() for t in self.timers])


# --- devices -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IoTune:
    """``<iotune>``: per-disk I/O limits enforced by QEMU (bytes or operations per second; None or 0: no limit).

    libvirt refuses a total limit together with a read or write limit of the same unit; so does this class."""

    total_bytes_sec: int | None = None
    read_bytes_sec: int | None = None
    write_bytes_sec: int | None = None
    total_iops_sec: int | None = None
    read_iops_sec: int | None = None
    write_iops_sec: int | None = None

    _FIELDS = ("total_bytes_sec", "read_bytes_sec", "write_bytes_sec", "total_iops_sec", "read_iops_sec",
               "write_iops_sec")  # fmt: skip

    def __post_init__(self) -> None:
        for unit in ("bytes", "iops"):
            total = getattr(self, f"total_{unit}_sec")
            if total and (getattr(self, f"read_{unit}_sec") or getattr(self, f"write_{unit}_sec")):
                raise ValueError(f"iotune: total_{unit}_sec cannot be combined with read_{unit}_sec/write_{unit}_sec")
        for f in self._FIELDS:
            value = getattr(self, f)
            if value is not None and value < 0:
                raise ValueError(f"iotune: {f} must be >= 0, not {value}")

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in self._FIELDS)

    def to_element(self) -> ET.Element:
        children = [_element(f, text=str(getattr(self, f))) for f in self._FIELDS if getattr(self, f)]
        return _element("iotune", children=children)


def _disk_tail(
    target_dev: str, target_bus: str, iotune: IoTune | None, readonly: bool, serial: str | None
) -> list[ET.Element]:
    """The children every ``<disk>`` ends with, in libvirt's own order: target, iotune, readonly, serial."""
    children = [_element("target", {"dev": target_dev, "bus": target_bus})]
    if iotune:
        children.append(iotune.to_element())
    if readonly:
        children.append(_element("readonly"))
    if serial:
        children.append(_element("serial", text=serial))
    return children


@dataclass(frozen=True)
class Disk:
    """``<disk type='file'>``: a disk or CD-ROM backed by a file on the host.

    ``serial`` is what the guest sees as the disk's serial number (virtio-blk shows its first 20 characters, e.g. in
    ``/dev/disk/by-id/virtio-…``); ``iotune`` limits its I/O."""

    source: str
    target_dev: str
    target_bus: Literal["virtio", "sata", "scsi"] = "virtio"
    device: Literal["disk", "cdrom"] = "disk"
    driver_type: Literal["qcow2", "raw"] = "qcow2"
    readonly: bool = False
    discard: Literal["unmap", "ignore"] | None = None
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] | None = None
    serial: str | None = None
    iotune: IoTune | None = None

    def to_element(self) -> ET.Element:
        driver = {"name": "qemu", "type": self.driver_type, "cache": self.cache, "discard": self.discard}
        children = [_element("driver", driver), _element("source", {"file": self.source})]
        children += _disk_tail(self.target_dev, self.target_bus, self.iotune, self.readonly, self.serial)
        return _element("disk", {"type": "file", "device": self.device}, children=children)


@dataclass(frozen=True)
class RbdDisk:
    """``<disk type='network'>`` on Ceph RBD: QEMU opens ``pool/image`` through librbd (no kernel module), reaching
    the MONs ``hosts`` (address, port) as cephx ``username`` whose key is the libvirt secret ``secret_uuid`` (of
    usage type ``ceph``, defined before the domain starts). Always raw; ``cache='none'`` (librbd's own cache then
    runs write-through, safe for live migration) and ``discard='unmap'`` (trim frees RADOS objects)."""

    pool: str
    image: str
    hosts: tuple[tuple[str, int], ...]
    target_dev: str
    username: str
    secret_uuid: str
    target_bus: Literal["virtio", "sata", "scsi"] = "virtio"
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = "none"
    discard: Literal["unmap", "ignore"] | None = "unmap"
    readonly: bool = False
    serial: str | None = None
    iotune: IoTune | None = None

    def to_element(self) -> ET.Element:
        hosts = [_element("host", {"name": name, "port": str(port)}) for name, port in self.hosts]
        children = [
            _element("driver", {"name": "qemu", "type": "raw", "cache": self.cache, "discard": self.discard}),
            _element("source", {"protocol": "rbd", "name": f"{self.pool}/{self.image}"}, children=hosts),
            _element(
                "auth",
                {"username": self.username},
                children=[_element("secret", {"type": "ceph", "uuid": self.secret_uuid})],
            ),
        ]
        children += _disk_tail(self.target_dev, self.target_bus, self.iotune, self.readonly, self.serial)
        return _element("disk", {"type": "network", "device": "disk"}, children=children)


@dataclass(frozen=True)
class Interface:
    """``<interface type='bridge'>``: a NIC plugged into an existing host bridge; ``target_dev`` names the tap."""

    mac: str
    bridge: str
    model: str = "virtio"
    target_dev: str | None = None

    def to_element(self) -> ET.Element:
        children = [_element("mac", {"address": self.mac}), _element("source", {"bridge": self.bridge})]
        if self.target_dev is not None:
            children.append(_element("target", {"dev": self.target_dev}))
        children.append(_element("model", {"type": self.model}))
        return _element("interface", {"type": "bridge"}, children=children)


@dataclass(frozen=True)
class Serial:
    """``<serial type='file'>``: the guest's serial port written to a host file (``append`` keeps it over restarts)."""

    path: str
    port: int = 0
    append: bool = False

    def to_element(self) -> ET.Element:
        children = [
            _element("source", {"path": self.path, "append": "on" if self.append else None}),
            _element("target", {"port": str(self.port)}),
        ]
        return _element("serial", {"type": "file"}, children=children)


@dataclass(frozen=True)
class Console:
    """``<console type='file'>`` aliasing serial port ``port``: libvirt requires the same source as that ``<serial>``."""

    path: str
    port: int = 0
    append: bool = False

    def to_element(self) -> ET.Element:
        children = [
            _element("source", {"path": self.path, "append": "on" if self.append else None}),
            _element("target", {"type": "serial", "port": str(self.port)}),
        ]
        return _element("console", {"type": "file"}, children=children)


@dataclass(frozen=True)
class Controller:
    """``<controller type=… model=…>``, e.g. ``Controller("usb", "none")`` for a guest without USB."""

    type: str
    model: str | None = None
    index: int | None = None

    def to_element(self) -> ET.Element:
        index = None if self.index is None else str(self.index)
        return _element("controller", {"type": self.type, "index": index, "model": self.model})


@dataclass(frozen=True)
class MemBalloon:
    """``<memballoon>``; ``stats_period`` (seconds) makes the guest report memory statistics."""

    model: Literal["virtio", "none"] = "virtio"
    stats_period: int | None = None

    def to_element(self) -> ET.Element:
        children = [] if self.stats_period is None else [_element("stats", {"period": str(self.stats_period)})]
        return _element("memballoon", {"model": self.model}, children=children)


@dataclass(frozen=True)
class Rng:
    """``<rng model='virtio'>`` fed from a host random device."""

    backend: str = "/dev/urandom"
    model: str = "virtio"

    def to_element(self) -> ET.Element:
        return _element("rng", {"model": self.model}, children=[_element("backend", {"model": "random"}, self.backend)])


@dataclass(frozen=True)
class Hostdev:
    """``<hostdev mode='subsystem' type='pci'>``: one host PCI function passed through with VFIO (a GPU and each of
    its other functions get one each). ``address`` is sysfs's spelling, ``0000:3b:00.1``. ``managed``: libvirt
    binds it to ``vfio-pci`` at start and gives it back at stop; minicloud writes ``managed='no'`` and does the
    binding itself (``agent.gpu.vfio``), so a stopped instance keeps its GPU bound."""

    address: str
    managed: bool = False

    def to_element(self) -> ET.Element:
        try:
            domain, bus, rest = self.address.split(":")
            slot, function = rest.split(".")
            parts = (int(domain, 16), int(bus, 16), int(slot, 16), int(function, 16))
        except ValueError:
            raise ValueError(f"not a PCI address: {self.address!r} (want DDDD:BB:SS.F)") from None
        attrs = dict(zip(("domain", "bus", "slot", "function"), parts, strict=True))
        source = _element(
            "source",
            children=[
                _element(
                    "address",
                    {
                        "domain": f"0x{attrs['domain']:04x}",
                        "bus": f"0x{attrs['bus']:02x}",
                        "slot": f"0x{attrs['slot']:02x}",
                        "function": f"0x{attrs['function']:x}",
                    },
                )
            ],
        )
        return _element(
            "hostdev", {"mode": "subsystem", "type": "pci", "managed": _yes_no(self.managed)}, children=[source]
        )


Device = Disk | RbdDisk | Interface | Serial | Console | Controller | MemBalloon | Rng | Hostdev


# --- the domain ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """``<domain>``: a whole guest definition. ``current_memory_kib`` defaults to ``memory_kib``.

    No ``<emulator>`` is written (libvirt picks the binary for the arch and machine), and no graphics.
    """

    type: Literal["kvm", "qemu"]
    name: str
    uuid: str
    memory_kib: int
    vcpu: Vcpu
    os: Os
    devices: tuple[Device, ...] = ()
    current_memory_kib: int | None = None
    metadata: InstanceMetadata | None = None
    features: Features | None = Features()
    cpu: Cpu | None = None
    clock: Clock = Clock()
    on_poweroff: Literal["destroy", "restart", "preserve"] = "destroy"
    on_reboot: Literal["destroy", "restart", "preserve"] = "restart"
    on_crash: Literal["destroy", "restart", "preserve", "coredump-destroy", "coredump-restart"] = "destroy"

    def to_element(self) -> ET.Element:
        current = self.memory_kib if self.current_memory_kib is None else self.current_memory_kib
        children = [_element("name", text=self.name), _element("uuid", text=self.uuid)]
        if self.metadata is not None:
            children.append(_element("metadata", children=[self.metadata.to_element()]))
        children += [
            _element("memory", {"unit": "KiB"}, str(self.memory_kib)),
            _element("currentMemory", {"unit": "KiB"}, str(current)),
            self.vcpu.to_element(),
            self.os.to_element(),
        ]
        children += [x.to_element() for x in (self.features, self.cpu) if x is not None]
        children += [
            self.clock.to_element(),
            _element("on_poweroff", text=self.on_poweroff),
            _element("on_reboot", text=self.on_reboot),
            _element("on_crash", text=self.on_crash),
            _element("devices", children=[d.to_element() for d in self.devices]),
        ]
        return _element("domain", {"type": self.type}, children=children)

    def to_xml(self) -> str:
        """The domain as an indented XML document (no XML declaration), ending in a newline. Deterministic."""
        el = self.to_element()
        ET.indent(el, space="  ")
        return ET.tostring(el, encoding="unicode") + "\n"
